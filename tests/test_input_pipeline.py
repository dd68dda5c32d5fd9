"""Tests for the input pipelines of conadv_jax.data (prepare, order, pipeline) on tiny local data
(never downloads)."""
import collections
import dataclasses
import gzip
import importlib.util
import itertools
import os
import pathlib
import shutil
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import errors
from conadv_jax.data import augment, datasets, fashion_mnist, order, pipeline, prepare, train_stream
from conadv_jax.method import optim

NUM_TRAIN = 20
NUM_TEST = 10


def _train_value(i: int) -> int:
  return 5 + 10 * i


def _test_value(i: int) -> int:
  return 7 + 20 * i


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding tiny IDX files whose image i is constant: its pixels identify it.

  Constant images stay constant under reflect-pad-and-crop and flips, so any pixel of an
  augmented image tells which example it is.
  """
  folder = tmp_path_factory.mktemp("fashion")
  for split, count, value in (("train", NUM_TRAIN, _train_value), ("test", NUM_TEST, _test_value)):
    images = np.stack([np.full([28, 28], value(i), np.uint8) for i in range(count)])
    labels = (np.arange(count) % 10).astype(np.uint8)
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(folder / images_name, images)
    fashion_mnist.write_idx(folder / labels_name, labels)
  fashion_mnist.get_builder(str(folder))  # Prepare once for the whole module.
  return str(folder)


def _default_config():
  """configs/default.py, loaded by path: configs/ is not an installed package."""
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
  spec = importlib.util.spec_from_file_location("_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config(**overrides):
  config = _default_config()
  config.batch_size = 4
  config.eval_batch_size = 4
  config.shuffle_buffer_size = 64
  config.synthetic_num_examples = NUM_TRAIN
  for key, value in overrides.items():
    config[key] = value
  return config


def _train(config, **kwargs):
  """train_batches with the info resolved here (tests that do not reuse it)."""
  return pipeline.train_batches(config, prepare.get_dataset_info(config), **kwargs)


def _eval(config, **kwargs):
  """eval_batches with the info resolved here (tests that do not reuse it)."""
  return pipeline.eval_batches(config, prepare.get_dataset_info(config), **kwargs)


def _ids(batch) -> list[int]:
  """Which examples a fashion batch holds (constant images: any pixel will do)."""
  return [int(v) for v in batch["image"][:, 14, 14, 0]]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_dataset_info_and_steps(fashion_dir):
  config = _config(data_dir=fashion_dir)
  info = prepare.get_dataset_info(config)
  assert info == datasets.DatasetInfo(
      spec=datasets.DATASETS["fashion_mnist"], num_classes=10, image_shape=(28, 28, 1),
      num_train_examples=NUM_TRAIN, num_eval_examples=NUM_TEST)
  assert optim.steps_per_epoch(config.batch_size, info.num_train_examples) == 5.0
  # Not floored: batches run on across epoch boundaries.
  assert optim.steps_per_epoch(6, info.num_train_examples) == 20 / 6
  assert optim.steps_per_epoch(32_768, 1_281_167) == 1_281_167 / 32_768
  synthetic = prepare.get_dataset_info(
      _config(dataset="synthetic", synthetic_num_classes=7))
  assert synthetic.num_classes == 7
  assert synthetic.image_shape == (32, 32, 3)
  assert synthetic.num_train_examples == NUM_TRAIN
  with pytest.raises(ValueError, match="batch_size"):
    optim.steps_per_epoch(64, info.num_train_examples)


def test_unknown_dataset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="fashion_mnist.*cifar10.*imagenet2012.*synthetic") as error:
    prepare.get_dataset_info(_config(dataset="mnist"))
  assert isinstance(error.value, datasets.UnknownDatasetError)
  assert isinstance(error.value, errors.UserError)


def test_imagenet_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as error:
    prepare.get_dataset_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"{tmp_path}/downloads/manual" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def test_batch_size_must_divide_among_processes(fashion_dir):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    _train(_config(data_dir=fashion_dir), process_index=0, process_count=3)
  with pytest.raises(ValueError, match="eval_batch_size"):
    _eval(_config(data_dir=fashion_dir, eval_batch_size=5), process_index=0, process_count=2)


def test_fashion_train_batches(fashion_dir):
  config = _config(data_dir=fashion_dir)
  batches = list(itertools.islice(
      _train(config, process_index=0, process_count=1), 10))
  for batch in batches:
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    # Constant images stay constant through pad-crop-flip; labels stay with their images.
    assert np.all(batch["image"] == batch["image"][:, :1, :1, :])
    np.testing.assert_array_equal(batch["label"], [(v - 5) // 10 % 10 for v in _ids(batch)])
  train_ids = sorted(_train_value(i) for i in range(NUM_TRAIN))
  epochs = [sum((_ids(b) for b in batches[e * 5:(e + 1) * 5]), []) for e in range(2)]
  assert sorted(epochs[0]) == train_ids and sorted(epochs[1]) == train_ids
  assert epochs[0] != epochs[1]  # Reshuffled per epoch (20! orders; a tie is no accident).
  other_seed = itertools.islice(_train(
      _config(data_dir=fashion_dir, seed=1), process_index=0, process_count=1), 5)
  assert sum((_ids(b) for b in other_seed), []) != epochs[0]


@pytest.mark.parametrize("overrides", [
    dict(dataset="fashion_mnist"),
    dict(dataset="fashion_mnist", cache=True),
    dict(dataset="synthetic", image_size=8),
], ids=["fashion_mnist", "fashion_mnist_cached", "synthetic"])
def test_resume_yields_the_same_batches(fashion_dir, overrides):
  config = _config(data_dir=fashion_dir, **overrides)
  # 5 steps per epoch: steps 0..11 cross two epoch boundaries.
  full = list(itertools.islice(
      _train(config, process_index=0, process_count=1), 12))
  for start in (4, 5, 7):
    resumed = list(itertools.islice(_train(
        config, start_step=start, process_index=0, process_count=1), 12 - start))
    _assert_batches_equal(full[start:], resumed)


def test_small_image_augmentation_is_a_padded_crop_or_its_flip():
  image = tf.reshape(tf.range(28 * 28, dtype=tf.int32) % 251, [28, 28, 1])
  padded = np.pad(image.numpy(), [(4, 4), (4, 4), (0, 0)], mode="reflect")
  candidates = [padded[y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
  candidates += [c[:, ::-1] for c in candidates]
  outputs = set()
  for seed in range(20):
    out = augment.small_train(
        {"image": image, "label": tf.constant(0)}, tf.constant([seed, 0], tf.int64), 28)["image"]
    assert out.shape == (28, 28, 1) and out.dtype == tf.float32
    assert any(np.array_equal(out.numpy(), c) for c in candidates)
    outputs.add(out.numpy().tobytes())
  assert len(outputs) > 5  # The seeds pick different crops / flips.


def test_train_examples_are_split_across_processes(fashion_dir):
  config = _config(data_dir=fashion_dir, batch_size=6)  # 2 per process; 18 of epoch 0's 20.
  per_process = []
  for index in range(3):
    batches = list(itertools.islice(
        _train(config, process_index=index, process_count=3), 3))
    assert all(b["image"].shape == (2, 28, 28, 1) for b in batches)
    per_process.append(sum((_ids(b) for b in batches), []))
  everything = sum(per_process, [])
  assert len(everything) == len(set(everything)) == 18  # Disjoint rows of the same batches.


@pytest.mark.parametrize("process_count,eval_batch_size", [(1, 4), (3, 6), (2, 2)])
def test_eval_scores_every_example_once(fashion_dir, process_count, eval_batch_size):
  config = _config(data_dir=fashion_dir, eval_batch_size=eval_batch_size)
  local_batch = eval_batch_size // process_count
  # One process reads the split in its prepared order: position -> example.
  in_order = [i for b in _eval(config, process_index=0, process_count=1)
              for i, m in zip(_ids(b), b["mask"]) if m]
  scored, indices, num_batches = [], [], set()
  for index in range(process_count):
    batches = list(_eval(
        config, process_index=index, process_count=process_count))
    num_batches.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (local_batch, 28, 28, 1)
      assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
      assert batch["mask"].shape == (local_batch,) and batch["mask"].dtype == np.float32
      mask = batch["mask"].astype(bool)
      scored += [i for i, m in zip(_ids(batch), mask) if m]
      # 'index' is the example's position in the whole split, whatever the process count.
      assert batch["index"].dtype == np.int32
      indices += batch["index"][mask].tolist()
      assert [in_order[i] for i in batch["index"][mask]] == np.array(_ids(batch))[mask].tolist()
      np.testing.assert_array_equal(batch["image"][~mask], 0)
      # Eval is not augmented: the pixels are the stored ones.
      np.testing.assert_array_equal(batch["label"][mask],
                                    [(v - 7) // 20 % 10 for v in np.array(_ids(batch))[mask]])
  assert sorted(scored) == sorted(_test_value(i) for i in range(NUM_TEST))
  assert sorted(indices) == list(range(NUM_TEST))
  # Every process steps through the same number of batches: ceil(largest slice / local batch).
  largest = -(-NUM_TEST // process_count)
  assert num_batches == {-(-largest // local_batch)}


def test_synthetic_eval_and_determinism():
  config = _config(dataset="synthetic", image_size=8, synthetic_num_examples=21,
                   synthetic_num_classes=3, eval_batch_size=4)
  info = prepare.get_dataset_info(config)
  assert info.num_eval_examples == 5
  counts, num_batches = 0, set()
  for index in range(2):
    batches = list(_eval(config, process_index=index, process_count=2))
    num_batches.add(len(batches))
    counts += sum(int(b["mask"].sum()) for b in batches)
  assert counts == 5 and num_batches == {2}
  batch = next(_train(config, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  assert batch["image"].min() < 10 and batch["image"].max() > 245  # Uniform over 0..255.
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
  again = next(_train(config, process_index=0, process_count=1))
  _assert_batches_equal([batch], [again])


def test_recipes_are_looked_up_by_name():
  out = augment.eval_fn("pad_crop", 14)({"image": tf.zeros([28, 28, 1], tf.uint8),
                                         "label": tf.constant(0)})
  assert out["image"].shape == (14, 14, 1) and out["image"].dtype == tf.float32
  with pytest.raises(ValueError, match="inception_crop, pad_crop, none"):
    augment.train_fn("mixup", 28)


def test_center_crop_window_geometry():
  window = augment.center_crop_window(tf.constant([256, 320, 3]), 224)
  np.testing.assert_array_equal(window, [16, 48, 224, 224])
  window = augment.center_crop_window(tf.constant([320, 256, 3]), 224)
  np.testing.assert_array_equal(window, [48, 16, 224, 224])
  window = augment.center_crop_window(tf.constant([512, 600, 3]), 224)
  np.testing.assert_array_equal(window, [32, 76, 448, 448])  # 224/256 of the shorter side.


@pytest.mark.parametrize("height,width", [(256, 320), (375, 500), (40, 30), (17, 47)])
def test_random_resized_crop_window_bounds(height, width):
  shape = tf.constant([height, width, 3])
  center = augment.center_crop_window(shape, 224).numpy()
  num_random = 0
  for seed in range(100):
    window = augment.random_resized_crop_window(
        shape, tf.constant([seed, 7], tf.int64), 224).numpy()
    y, x, h, w = window
    assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
    if np.array_equal(window, center):
      continue  # The fallback.
    num_random += 1
    assert 0.08 - 1e-6 <= h * w / (height * width) <= 1 + 1e-6
    assert 3 / 4 - 1e-6 <= w / h <= 4 / 3 + 1e-6
  assert num_random >= 80
  again = augment.random_resized_crop_window(shape, tf.constant([3, 7], tf.int64), 224)
  first = augment.random_resized_crop_window(shape, tf.constant([3, 7], tf.int64), 224)
  np.testing.assert_array_equal(again, first)


def test_random_resized_crop_falls_back_to_center_crop():
  shape = tf.constant([1000, 10, 3])  # No crop with aspect in [3/4, 4/3] has area >= 8%.
  window = augment.random_resized_crop_window(shape, tf.constant([0, 0], tf.int64), 224)
  np.testing.assert_array_equal(window, augment.center_crop_window(shape, 224))


IMAGENET_TRAIN = 16
IMAGENET_EVAL = 6
IMAGENET_SHARDS = 3


def _write_prepared(builder: tfds.core.DatasetBuilder, splits: dict[str, list[dict]],
                    num_shards: int) -> None:
  """Writes `splits` as a prepared TFDS copy of `builder`: TFRecord shards and metadata."""
  folder = pathlib.Path(builder.data_path)
  folder.mkdir(parents=True)
  infos = []
  for split, examples in splits.items():
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=builder.name, split=split, filetype_suffix="tfrecord")
    shards = np.array_split(np.arange(len(examples)), num_shards)
    for shard, indices in enumerate(shards):
      path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
      with tf.io.TFRecordWriter(str(path)) as writer:
        for i in indices:
          writer.write(builder.info.features.serialize_example(examples[i]))
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(s) for s in shards],
                                     num_bytes=0, filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> str:
  """A prepared imagenet2012 of real JPEGs of varied sizes, in 3 shards; label = example number.

  Train example i has label i, eval example i label 100 + i, so labels identify examples.
  """
  data_dir = tmp_path_factory.mktemp("imagenet")
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  rng = np.random.default_rng(0)

  def example(label: int) -> dict:
    height, width = rng.integers(30, 70, size=2)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, label * 15 % 256)], -1)
    pixels = (pixels + rng.integers(0, 30, pixels.shape)).clip(0, 255).astype(np.uint8)
    return {"image": pixels, "label": label, "file_name": f"n{label:08d}.JPEG"}

  _write_prepared(builder, {"train": [example(i) for i in range(IMAGENET_TRAIN)],
                            "validation": [example(100 + i) for i in range(IMAGENET_EVAL)]},
                  IMAGENET_SHARDS)
  return str(data_dir)


def _imagenet_config(data_dir, **overrides):
  return _config(dataset="imagenet2012", data_dir=data_dir, image_size=32, **overrides)


@pytest.mark.parametrize("cache", [False, True], ids=["file_slices", "cached"])
@pytest.mark.parametrize("aug_branch", ["none", "autoaugment"])
def test_imagenet_pipeline(imagenet_dir, cache, aug_branch):
  config = _imagenet_config(imagenet_dir, cache=cache, aug_branch=aug_branch)
  info = prepare.get_dataset_info(config)
  assert info == datasets.DatasetInfo(
      spec=datasets.DATASETS["imagenet2012"], num_classes=1000, image_shape=(32, 32, 3),
      num_train_examples=IMAGENET_TRAIN, num_eval_examples=IMAGENET_EVAL)
  train = list(itertools.islice(
      pipeline.train_batches(config, info, process_index=0, process_count=1), 10))
  eval_ = list(pipeline.eval_batches(config, info, process_index=0, process_count=1))
  keys = {"image", "label"} | ({"aug_image"} if aug_branch != "none" else set())
  for batch in train:
    assert set(batch) == keys
    for key in keys - {"label"}:
      assert batch[key].shape == (4, 32, 32, 3) and batch[key].dtype == np.uint8
      assert batch[key].std() > 10  # Decoded pictures, not blanks.
  # 10 batches of 4 = 2.5 epochs: every example once per epoch, across the boundaries.
  labels = np.concatenate([b["label"] for b in train])
  for epoch in range(2):
    assert sorted(labels[epoch * 16:(epoch + 1) * 16]) == list(range(16))
  assert len(eval_) == 2 and [b["mask"].sum() for b in eval_] == [4, 2]
  assert sorted(l for b in eval_ for l, m in zip(b["label"], b["mask"]) if m) == list(
      range(100, 106))
  assert all(set(b) == {"image", "label", "mask", "index"} and b["image"].dtype == np.uint8
             for b in eval_)
  for start in (3, 4, 9):  # Mid-epoch, at the first boundary, in the third epoch.
    resumed = list(itertools.islice(pipeline.train_batches(
        config, info, start_step=start, process_index=0, process_count=1), 10 - start))
    _assert_batches_equal(train[start:], resumed)


@pytest.mark.parametrize("num_devices", [1, len(jax.devices())])
def test_shard_and_prefetch_makes_global_arrays(num_devices):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  config = _config(dataset="synthetic", image_size=8, eval_batch_size=4 * num_devices,
                   synthetic_num_examples=40 * num_devices)  # 10 * num_devices eval examples.
  local = list(_eval(config, process_index=0, process_count=1))
  pulled = collections.Counter()

  def counting():
    for batch in local:
      pulled["n"] += 1
      yield batch

  out = pipeline.shard_and_prefetch(counting(), sharding, size=2)
  first = next(out)
  assert pulled["n"] == 3  # The current batch plus two in flight.
  result = [first, *out]
  assert len(result) == len(local) == 3
  for host, device in zip(local, result):
    assert set(device) == {"image", "label", "mask", "index"}
    for key, value in device.items():
      assert isinstance(value, jax.Array)
      assert value.sharding == sharding
      assert len(value.addressable_shards) == num_devices
      assert value.shape == host[key].shape and value.dtype == host[key].dtype
      np.testing.assert_array_equal(np.asarray(value), host[key])


@pytest.mark.parametrize("augment", [False, True])
def test_augment_switch(tmp_path, augment):
  """augment=False feeds the stored pixels; augment=True crops and flips some of them."""
  rng = np.random.default_rng(0)
  raw = {"train": rng.integers(0, 256, (16, 28, 28), np.uint8),
         "test": rng.integers(0, 256, (4, 28, 28), np.uint8)}
  for split, images in raw.items():
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(tmp_path / images_name, images)
    fashion_mnist.write_idx(tmp_path / labels_name, np.zeros(len(images), np.uint8))
  config = _config(data_dir=str(tmp_path), augment=augment)
  batches = list(itertools.islice(_train(config), 4))
  stored = {img.tobytes() for img in raw["train"]}
  fed = [img[..., 0].tobytes() for b in batches for img in b["image"]]
  assert all(f in stored for f in fed) == (not augment)


# --- The registry is the only per-dataset table. ---


def test_a_registered_generated_dataset_needs_no_other_table(monkeypatch):
  spec = datasets.DatasetSpec(
      "tiny_noise", num_classes=0, native_image_size=6, channels=1, pixel_mean=(127.5,),
      pixel_std=(73.6,), train_split="train", eval_split="test", num_train_examples=0,
      num_eval_examples=0, source="synthetic", augmentation="none")
  monkeypatch.setitem(datasets.DATASETS, "tiny_noise", spec)
  config = _config(dataset="tiny_noise", synthetic_num_examples=12, synthetic_num_classes=3)
  info = prepare.get_dataset_info(config)
  assert info.spec.name == "tiny_noise" and info.num_classes == info.spec.num_classes == 3
  assert info.image_shape == (6, 6, 1)  # Native size and channels of the entry.
  assert (info.num_train_examples, info.num_eval_examples) == (12, 3)
  batch = next(pipeline.train_batches(config, info, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 6, 6, 1) and set(batch["label"]) <= {0, 1, 2}
  eval_ = list(pipeline.eval_batches(config, info, process_index=0, process_count=1))
  assert eval_[0]["image"].shape == (4, 6, 6, 1) and sum(b["mask"].sum() for b in eval_) == 3


def test_a_registered_copy_of_a_dataset_uses_its_own_entry(fashion_dir, monkeypatch):
  spec = dataclasses.replace(datasets.DATASETS["fashion_mnist"], name="fashion_14",
                             native_image_size=14)
  monkeypatch.setitem(datasets.DATASETS, "fashion_14", spec)
  config = _config(dataset="fashion_14", data_dir=fashion_dir)
  info = prepare.get_dataset_info(config)
  assert info.spec == spec and info.image_shape == (14, 14, 1)
  assert info.num_train_examples == NUM_TRAIN  # Counts come from the prepared data.
  batch = next(pipeline.train_batches(config, info, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 14, 14, 1)


def test_an_unregistered_dataset_is_unknown(monkeypatch):
  # A new dict, not delitem: restoring an item would move it to the end of the registry.
  monkeypatch.setattr(datasets, "DATASETS", {
      name: spec for name, spec in datasets.DATASETS.items() if name != "cifar10"})
  with pytest.raises(datasets.UnknownDatasetError) as error:
    prepare.get_dataset_info(_config(dataset="cifar10"))
  assert "choose one of fashion_mnist, imagenet2012, synthetic." in str(error.value)


@pytest.mark.parametrize("field,value", [("num_classes", 5), ("channels", 3)])
def test_prepared_data_that_disagrees_with_the_registry_is_a_user_error(fashion_dir, monkeypatch,
                                                                        field, value):
  monkeypatch.setitem(datasets.DATASETS, "fashion_mnist", dataclasses.replace(
      datasets.DATASETS["fashion_mnist"], **{field: value}))
  with pytest.raises(prepare.DataMismatchError) as error:
    prepare.get_dataset_info(_config(data_dir=fashion_dir))
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert "10 classes and 1 channels" in message and fashion_dir in message
  assert "delete it" in message and "conadv_jax/data/datasets.py" in message


def test_pipelines_reuse_the_resolved_info(fashion_dir, monkeypatch):
  """Eval runs many times per training run; it must not look the dataset up again."""
  config = _config(data_dir=fashion_dir)
  info = prepare.get_dataset_info(config)

  def resolve_again(*args, **kwargs):
    raise AssertionError("the dataset was resolved again")

  monkeypatch.setattr(prepare, "_builder", resolve_again)
  monkeypatch.setattr(fashion_mnist, "get_builder", resolve_again)
  monkeypatch.setattr(tfds, "builder", resolve_again)
  monkeypatch.setattr(datasets, "get_spec", resolve_again)
  next(pipeline.train_batches(config, info, process_index=0, process_count=1))
  for _ in range(2):
    assert len(list(pipeline.eval_batches(config, info, process_index=0,
                                          process_count=1))) == 3


# --- One pipeline over all epochs; global batches that do not depend on the process count. ---

LAYOUT_CASES = [dict(dataset="fashion_mnist"), dict(dataset="fashion_mnist", cache=True),
                dict(dataset="synthetic", image_size=8)]
LAYOUT_IDS = ["fashion_mnist", "fashion_mnist_cached", "synthetic"]


@pytest.mark.parametrize("overrides", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_the_train_pipeline_is_built_once_for_all_epochs(fashion_dir, monkeypatch, overrides):
  config = _config(data_dir=fashion_dir, **overrides)  # 20 examples: 5 steps of 4 per epoch.
  info = prepare.get_dataset_info(config)
  calls = []
  make = train_stream.train_examples

  def recording(*args):
    calls.append(args[2:])
    return make(*args)

  monkeypatch.setattr(train_stream, "train_examples", recording)
  # Steps 7..15: the last 3 of epoch 1, all of epoch 2, 1 of epoch 3, from one dataset.
  batches = list(itertools.islice(pipeline.train_batches(
      config, info, start_step=7, process_index=0, process_count=1), 9))
  assert len(batches) == 9 and calls == [(0, 1, 28)]  # (process, count, first example).


def _fashion_ids(batches) -> list[bytes]:
  """Which examples (identified by their stored pixels: augment=False) the batches hold."""
  return [img.tobytes() for b in batches for img in b["image"]]


@pytest.mark.parametrize("process_count", [1, 2])
def test_epoch_boundaries_on_fashion_mnist(noise_fashion_dir, process_count):
  """Batch 6 of 20 examples: 3 1/3 steps per epoch, so most batches straddle a boundary.

  Every example must appear exactly once per epoch, none dropped at an epoch's end (global
  batch t is examples [6t, 6t + 6) of the concatenated epochs), epochs in different orders, and
  a resume at a step whose batch crosses a boundary must replay the stream exactly.
  """
  config = _config(data_dir=noise_fashion_dir, batch_size=6, augment=False)
  info = prepare.get_dataset_info(config)
  assert optim.steps_per_epoch(config.batch_size, info.num_train_examples) == pytest.approx(20 / 6)
  stored = sorted(img.tobytes() for img in fashion_mnist.load_split(noise_fashion_dir,
                                                                    "train")[0][..., None])

  def global_batches(start_step, count):
    parts = [list(itertools.islice(pipeline.train_batches(
        config, info, start_step=start_step, process_index=i, process_count=process_count),
        count)) for i in range(process_count)]
    return [{k: np.concatenate([p[t][k] for p in parts]) for k in parts[0][t]}
            for t in range(count)]

  batches = global_batches(0, 20)  # 120 examples: exactly 6 epochs.
  ids = _fashion_ids(batches)
  epochs = [ids[e * 20:(e + 1) * 20] for e in range(6)]
  for epoch in epochs:
    assert sorted(epoch) == stored
  assert len({tuple(e) for e in epochs}) == 6  # A new permutation every epoch.
  for start in (3, 6, 13):  # Batches 3, 6 and 13 hold the ends of epochs 0, 1 and 3.
    _assert_batches_equal(batches[start:], global_batches(start, 20 - start))


@pytest.mark.parametrize("overrides", [
    dict(dataset="synthetic", image_size=8),
    dict(dataset="fashion_mnist"),
    dict(dataset="fashion_mnist", aug_branch="autoaugment"),
    dict(dataset="synthetic", image_size=8, aug_branch="randaugment"),
], ids=["synthetic", "fashion_mnist", "fashion_mnist_aug", "synthetic_aug"])
def test_global_batches_do_not_depend_on_the_process_count(noise_fashion_dir, overrides):
  """What lets a run resume on another number of hosts: the hosts' rows make the same batch.

  Augmented views included: their seeds follow the example's global position, not the process.
  """
  config = _config(data_dir=noise_fashion_dir, batch_size=8, **overrides)
  info = prepare.get_dataset_info(config)
  assert order.data_order_key(config, info, 1) is None
  assert order.data_order_key(config, info, 4) is None
  one = list(itertools.islice(_train(config, process_index=0, process_count=1), 6))
  for count in (2, 4):
    parts = [list(itertools.islice(_train(config, process_index=i, process_count=count), 6))
             for i in range(count)]
    for step in range(6):  # 2.5 steps per epoch: crosses two epoch boundaries.
      assert all(p[step].keys() == one[step].keys() for p in parts)
      for key in one[step]:
        np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]),
                                      one[step][key], err_msg=f"{key} at step {step}")


def test_cached_imagenet_order_does_not_depend_on_the_process_count(imagenet_dir):
  config = _imagenet_config(imagenet_dir, cache=True, batch_size=6)
  info = prepare.get_dataset_info(config)
  assert order.data_order_key(config, info, 3) is None
  one = list(itertools.islice(_train(config, process_index=0, process_count=1), 6))
  parts = [list(itertools.islice(_train(config, process_index=i, process_count=3), 6))
           for i in range(3)]
  for step in range(6):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]),
                                    one[step][key])


def test_data_order_key_names_the_layouts_that_depend_on_the_process_count(imagenet_dir):
  config = _imagenet_config(imagenet_dir)
  info = prepare.get_dataset_info(config)
  keys = {count: order.data_order_key(config, info, count) for count in (1, 2, 4)}
  assert all(isinstance(key, str) and "imagenet2012" in key for key in keys.values())
  assert len(set(keys.values())) == 3  # A resume on another process count is told apart.
  cached = _imagenet_config(imagenet_dir, cache=True)
  assert order.data_order_key(cached, info, 4) is None
  cifar = datasets.DatasetInfo(
      spec=datasets.DATASETS["cifar10"], num_classes=10, image_shape=(32, 32, 3),
      num_train_examples=50_000, num_eval_examples=10_000)
  assert order.data_order_key(_config(dataset="cifar10"), cifar, 4) is None


@pytest.mark.parametrize("process_count", [1, 2])
def test_imagenet_file_slices_run_on_across_epochs(imagenet_dir, process_count):
  """Without cache: each process's slice, once per epoch, epochs back to back, resumable."""
  config = _imagenet_config(imagenet_dir, batch_size=3 * process_count)  # 3 per process.
  per_process = IMAGENET_TRAIN // process_count
  seen = []
  for index in range(process_count):
    batches = list(itertools.islice(_train(
        config, process_index=index, process_count=process_count), per_process))
    labels = np.concatenate([b["label"] for b in batches])
    epochs = labels.reshape(3, per_process)  # Whole epochs: 3 x this process's slice.
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # Reshuffled per epoch.
    seen.append(set(epochs[0]))
    for start in (2, 5):  # Batches that cross an epoch boundary (of 8 or 16 examples).
      resumed = list(itertools.islice(_train(
          config, start_step=start, process_index=index, process_count=process_count),
          len(batches) - start))
      _assert_batches_equal(batches[start:], resumed)
  assert set().union(*seen) == set(range(IMAGENET_TRAIN))  # Disjoint slices cover the split.
  assert sum(len(s) for s in seen) == IMAGENET_TRAIN


def test_cache_reshuffles_the_whole_split_every_epoch(imagenet_dir):
  """cache=True: a fresh permutation of all examples per epoch, whatever the shuffle window.

  With a window of 1 (no shuffling through a window at all), each epoch must still be a
  permutation of the split, different every epoch, with examples moving anywhere; without
  cache, the same window leaves every file's examples in their stored order.
  """
  config = _imagenet_config(imagenet_dir, cache=True, shuffle_buffer_size=1, batch_size=16,
                            augment=False)
  epochs = [b["label"] for b in itertools.islice(_train(config, process_index=0,
                                                        process_count=1), 12)]
  assert all(sorted(e) == list(range(16)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 12
  position = np.array([np.argsort(e) for e in epochs])  # position[epoch, example].
  assert np.all(position.max(0) - position.min(0) >= 8)  # Every example travels > half way.
  assert len({e[0] for e in epochs}) >= 6  # Many different examples come first.
  windowed = _imagenet_config(imagenet_dir, shuffle_buffer_size=1, batch_size=16, augment=False)
  for batch in itertools.islice(_train(windowed, process_index=0, process_count=1), 3):
    for shard in np.array_split(np.arange(16), IMAGENET_SHARDS):
      labels = batch["label"]
      assert list(labels[np.isin(labels, shard)]) == list(shard)


LONG_EPOCH = 256  # Train records of `long_imagenet_dir`.


@pytest.fixture(scope="module")
def long_imagenet_dir(tmp_path_factory) -> str:
  """A prepared imagenet2012 whose epoch (256 tiny JPEGs, 4 shards) is far longer than what the
  stages after the epoch interleave (decode map, batch, prefetch) read ahead of the consumer."""
  data_dir = tmp_path_factory.mktemp("imagenet_long")
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  rng = np.random.default_rng(1)
  example = lambda i: {"image": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8),
                       "label": i % 1000, "file_name": f"n{i:08d}.JPEG"}
  _write_prepared(builder, {"train": [example(i) for i in range(LONG_EPOCH)],
                            "validation": [example(i) for i in range(4)]}, 4)
  return str(data_dir)


def test_file_slices_open_the_next_epoch_before_the_current_one_ends(long_imagenet_dir,
                                                                     monkeypatch):
  """Without cache, the next epoch's files are read and its shuffle window filled in the
  background while the consumer is still at the start of the current epoch.

  Every record read from a file is counted. The window holds a whole epoch, so an opened epoch
  reads all its 256 records before yielding one. After one batch of 4, nothing downstream has
  asked for anything past epoch 0 (252 examples are left in it), so reads beyond 256 are the
  interleave opening later epochs on its own: at least one (what hides the boundary), at most
  two (tf.data's interleave prefetches 2 × cycle_length = 2 input elements: up to 3 windows in
  memory, as docs/performance.md says). The wait below bounds a poll, it times nothing; the
  upper bound can miss a third epoch on a slow machine, never fail wrongly.
  """
  reads = []
  lock = threading.Lock()
  real_dataset = tf.data.TFRecordDataset

  def count(record):
    with lock:
      reads.append(1)
    return record

  def counting_dataset(*args, **kwargs):
    return real_dataset(*args, **kwargs).map(
        lambda r: tf.ensure_shape(tf.py_function(count, [r], tf.string), []))

  monkeypatch.setattr(tf.data, "TFRecordDataset", counting_dataset)
  config = _imagenet_config(long_imagenet_dir, batch_size=4, shuffle_buffer_size=LONG_EPOCH)
  batches = pipeline.train_batches(config, prepare.get_dataset_info(config),
                                   process_index=0, process_count=1)
  try:
    assert next(batches)["image"].shape == (4, 32, 32, 3)
    deadline = time.monotonic() + 120
    while len(reads) < 2 * LONG_EPOCH and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(reads) >= 2 * LONG_EPOCH, len(reads)  # Epoch 1 opened while in epoch 0.
    time.sleep(1.0)
    assert len(reads) <= 3 * LONG_EPOCH, len(reads)  # Never more than two epochs ahead.
  finally:
    batches.close()


# --- Mistakes a user can make end in a UserError that names the file and the fix. ---


def _write_idx_dir(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", 8), ("test", 4)):
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(folder / images_name, np.zeros([count, 28, 28], np.uint8))
    fashion_mnist.write_idx(folder / labels_name, np.zeros([count], np.uint8))
  return folder


def test_data_dir_that_is_a_file(tmp_path):
  idx_file = _write_idx_dir(tmp_path) / "train-images-idx3-ubyte.gz"
  for data_dir in (idx_file, idx_file / "tfds"):
    with pytest.raises(prepare.DataDirError) as error:
      prepare.get_dataset_info(_config(data_dir=str(data_dir)))
    assert isinstance(error.value, errors.UserError)
    message = str(error.value)
    assert f"config.data_dir='{data_dir}'" in message and "not a folder" in message
    assert f"--config.data_dir={tmp_path} if train-images-idx3-ubyte.gz" in message


def test_unreadable_data_dir(tmp_path, monkeypatch):
  folder = _write_idx_dir(tmp_path / "private")
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
      os.fspath(path) != str(folder) and access(path, mode, **kwargs)))  # Root reads anything.
  with pytest.raises(prepare.DataDirError) as error:
    prepare.get_dataset_info(_config(data_dir=str(folder)))
  assert isinstance(error.value, errors.UserError)
  assert str(folder) in str(error.value) and f"chmod u+rx {folder}" in str(error.value)


def test_truncated_idx_file_names_it_and_the_fix(tmp_path):
  folder = _write_idx_dir(tmp_path)
  images = folder / "train-images-idx3-ubyte.gz"
  fashion_mnist.write_idx(images, np.zeros([8, 28, 28], np.uint8))
  payload = gzip.decompress(images.read_bytes())
  images.write_bytes(gzip.compress(payload[:-100]))
  with pytest.raises(fashion_mnist.IdxFormatError) as error:
    prepare.get_dataset_info(_config(data_dir=str(folder)))
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert f"{images}: IDX shape (8, 28, 28)" in message
  assert f"replace {images} with an intact copy" in message


def _prepared_copy(tmp_path) -> tuple[str, pathlib.Path]:
  """A data dir with fashion_mnist_idx prepared from IDX files, and its version folder."""
  data_dir = _write_idx_dir(tmp_path / "tfds")
  info = prepare.get_dataset_info(_config(data_dir=str(data_dir)))
  return str(data_dir), pathlib.Path(info.builder.data_path)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_corrupt_prepared_copy_says_to_delete_it(tmp_path, damage):
  data_dir, prepared = _prepared_copy(tmp_path)
  config = _config(data_dir=data_dir)
  info = prepare.get_dataset_info(config)
  for record in prepared.glob("*.tfrecord*"):
    data = bytearray(record.read_bytes())
    if damage == "truncate":
      data = data[:len(data) // 2]
    else:
      data[len(data) // 2] ^= 0xFF
    record.write_bytes(bytes(data))
  for batches in (lambda: list(itertools.islice(pipeline.train_batches(
      config, info, process_index=0, process_count=1), 3)),
                  lambda: list(pipeline.eval_batches(
                      config, info, process_index=0, process_count=1))):
    with pytest.raises(prepare.CorruptDataError) as error:
      batches()
    assert isinstance(error.value, errors.UserError)
    message = str(error.value)
    assert f"in {prepared} failed" in message and "{{" not in message
    assert f"Delete {prepared} and run again" in message
  # Doing what the message says works: the copy is prepared afresh from the IDX files.
  shutil.rmtree(prepared)
  info = prepare.get_dataset_info(config)
  assert len(list(itertools.islice(pipeline.train_batches(
      config, info, process_index=0, process_count=1), 3))) == 3


def test_unreadable_prepared_metadata_says_to_delete_it(tmp_path):
  data_dir, prepared = _prepared_copy(tmp_path)
  (prepared / "dataset_info.json").write_text("{not json")
  with pytest.raises(prepare.DataUnavailableError) as error:
    prepare.get_dataset_info(_config(data_dir=data_dir))
  assert isinstance(error.value, errors.UserError)
  assert f"Delete {prepared.parent} and run again" in str(error.value)
  shutil.rmtree(prepared.parent)
  assert prepare.get_dataset_info(_config(data_dir=data_dir)).num_train_examples == 8


def test_unreadable_tfds_metadata_says_how_to_rebuild(tmp_path):
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
  pathlib.Path(builder.data_path).mkdir(parents=True)
  (pathlib.Path(builder.data_path) / "dataset_info.json").write_text("{not json")
  with pytest.raises(prepare.CorruptDataError) as error:
    prepare.get_dataset_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert f"Delete {tmp_path}/imagenet2012" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def test_config_values_the_pipeline_cannot_use_are_user_errors(fashion_dir):
  config = _config(data_dir=fashion_dir)
  info = prepare.get_dataset_info(config)
  cases = [
      (lambda: prepare.get_dataset_info(_config(dataset="synthetic", image_size=-1)),
       "config.image_size=-1"),
      (lambda: optim.steps_per_epoch(64, info.num_train_examples),
       "config.batch_size=64"),
      (lambda: pipeline.train_batches(config, info, process_index=0, process_count=3),
       "config.batch_size=4"),
      (lambda: pipeline.eval_batches(_config(eval_batch_size=5), info, process_index=0,
                                     process_count=2), "config.eval_batch_size=5"),
  ]
  for fn, field in cases:
    with pytest.raises(errors.ConfigError, match=field) as error:
      fn()
    assert isinstance(error.value, errors.UserError) and isinstance(error.value, ValueError)


# --- The augmented view (config.aug_branch). ---


@pytest.fixture(scope="module")
def noise_fashion_dir(tmp_path_factory) -> str:
  """A Fashion-MNIST-like data dir whose images are distinct uniform noise (labels = index % 10)."""
  folder = tmp_path_factory.mktemp("noise_fashion")
  rng = np.random.default_rng(42)
  for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(folder / images_name, rng.integers(0, 256, (count, 28, 28), np.uint8))
    fashion_mnist.write_idx(folder / labels_name, (np.arange(count) % 10).astype(np.uint8))
  fashion_mnist.get_builder(str(folder))
  return str(folder)


AUG_CASES = LAYOUT_CASES


def _aug_config(data_dir, branch, **overrides):
  return _config(data_dir=data_dir, aug_branch=branch, **overrides)


def _without(batches, key):
  return [{k: v for k, v in b.items() if k != key} for b in batches]


@pytest.mark.parametrize("branch", ["autoaugment", "randaugment"])
@pytest.mark.parametrize("overrides", AUG_CASES, ids=LAYOUT_IDS)
def test_aug_view_leaves_the_main_view_unchanged(noise_fashion_dir, overrides, branch):
  plain = list(itertools.islice(_train(_config(data_dir=noise_fashion_dir, **overrides),
                                       process_index=0, process_count=1), 7))
  augmented = list(itertools.islice(_train(_aug_config(noise_fashion_dir, branch, **overrides),
                                           process_index=0, process_count=1), 7))
  for batch in augmented:
    assert set(batch) == {"image", "label", "aug_image"}
    assert batch["aug_image"].shape == batch["image"].shape
    assert batch["aug_image"].dtype == batch["image"].dtype
  _assert_batches_equal(plain, _without(augmented, "aug_image"))
  # A second view, not a copy: its own crop nearly always differs from the main view's. Noise
  # is not cropped; about 1/4 of its AutoAugment draws leave it as it is (closed gates).
  differs = [np.any(a != m) for b in augmented for a, m in zip(b["aug_image"], b["image"])]
  assert np.mean(differs) > (0.5 if overrides["dataset"] == "synthetic" else 0.8)


@pytest.mark.parametrize("overrides", AUG_CASES, ids=LAYOUT_IDS)
def test_aug_view_is_deterministic_and_resumes_exactly(noise_fashion_dir, overrides):
  config = _aug_config(noise_fashion_dir, "randaugment", **overrides)
  full = list(itertools.islice(_train(config, process_index=0, process_count=1), 12))
  _assert_batches_equal(full, list(itertools.islice(
      _train(config, process_index=0, process_count=1), 12)))
  for start in (3, 5, 9):  # Mid-epoch, at a boundary, in a later epoch.
    resumed = list(itertools.islice(_train(
        config, start_step=start, process_index=0, process_count=1), 12 - start))
    _assert_batches_equal(full[start:], resumed)
  # The views follow the seed. (New views every epoch: the exact recomputation of two
  # epochs in test_aug_view_is_the_policy_on_an_independent_crop.)
  other_seed = list(itertools.islice(_train(
      _aug_config(noise_fashion_dir, "randaugment", seed=1, **overrides),
      process_index=0, process_count=1), 1))
  assert np.any(other_seed[0]["aug_image"] != full[0]["aug_image"])


def _tile_apply_take(policy, image: np.ndarray, seed) -> np.ndarray:
  """A grayscale image through `policy` as an RGB image with three equal channels, channel 0."""
  rgb = tf.tile(tf.constant(image), [1, 1, 3])
  return policy(rgb, seed).numpy()[..., :1]


@pytest.mark.parametrize("branch", ["autoaugment", "randaugment"])
def test_aug_view_is_the_policy_on_an_independent_crop(noise_fashion_dir, branch):
  """Recomputes every view of the first two epochs from the stored pixels and the seed rule.

  With augment=False the main view is the stored image, which identifies the example. Its
  augmented view must be: the pad-crop-flip recipe with a seed folded from the example's seed,
  then the policy (translation and cutout scaled to 28 pixels) with the other half of that
  seed. Fashion-MNIST is grayscale, so it is also checked against running the policy on the
  image tiled to RGB and keeping one channel, which is what grayscale support must mean.
  """
  from conadv_jax.data import autoaugment  # pylint: disable=g-import-not-at-top
  config = _aug_config(noise_fashion_dir, branch, augment=False, randaugment_num_layers=3,
                       randaugment_magnitude=7.0)
  scale = 28 / 224
  if branch == "autoaugment":
    @tf.function  # Traced once per image shape: quicker than eager switch_case per example.
    def policy(image, seed):
      return autoaugment.autoaugment_v0(image, seed, translate_const=250 * scale,
                                        cutout_const=100 * scale)
  else:
    @tf.function
    def policy(image, seed):
      return autoaugment.randaugment(image, seed, num_layers=3, magnitude=7.0,
                                     translate_const=100 * scale, cutout_const=40 * scale)
  stored = {img.tobytes(): img for img in fashion_mnist.load_split(noise_fashion_dir, "train")[0]}
  batches = list(itertools.islice(_train(config, process_index=0, process_count=1), 10))
  policy_changed = 0
  for step, batch in enumerate(batches):
    for row in range(4):
      image = stored[batch["image"][row, ..., 0].tobytes()][..., None]
      seed = order.example_seed(config.seed, step * 4 + row)  # Its stream position.
      view_seed = tf.random.experimental.stateless_fold_in(
          seed, tf.constant(augment.AUG_VIEW_SALT, tf.int64))
      crop_seed, policy_seed = tf.random.experimental.stateless_split(view_seed, num=2)
      crop = augment.small_train({"image": tf.constant(image), "label": tf.constant(0)},
                                 crop_seed, 28)["image"]
      crop = tf.cast(tf.round(crop), tf.uint8)
      expected = policy(crop, policy_seed).numpy()
      got = batch["aug_image"][row]
      np.testing.assert_array_equal(got, expected)
      np.testing.assert_array_equal(got, _tile_apply_take(policy, crop.numpy(), policy_seed))
      policy_changed += np.any(expected != crop.numpy())
  assert policy_changed >= 20  # The policy is applied, not only the crop.


def test_policies_are_the_reference_ones_at_224():
  from conadv_jax.data import autoaugment  # pylint: disable=g-import-not-at-top
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
  for i in range(8):
    seed = tf.constant([i, 3], tf.int64)
    np.testing.assert_array_equal(augment.policy_fn("autoaugment", 224)(image, seed),
                                  autoaugment.autoaugment_v0(image, seed))
    np.testing.assert_array_equal(
        augment.policy_fn("randaugment", 224, randaugment_num_layers=1,
                          randaugment_magnitude=5.0)(image, seed),
        autoaugment.randaugment(image, seed, num_layers=1, magnitude=5.0))
  with pytest.raises(ValueError, match="autoaugment, randaugment"):
    augment.policy_fn("none", 224)


def test_eval_batches_have_no_aug_view(noise_fashion_dir):
  config = _aug_config(noise_fashion_dir, "autoaugment")
  for batch in _eval(config, process_index=0, process_count=1):
    assert set(batch) == {"image", "label", "mask", "index"}


def test_eval_batches_are_rounded_uint8_and_padded_only_when_short(noise_fashion_dir):
  config = _config(data_dir=noise_fashion_dir, image_size=14)  # Bilinear: fractional pixels.
  batches = list(_eval(config, process_index=0, process_count=1))
  assert [b["mask"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
  assert all(b["image"].dtype == np.uint8 for b in batches)
  np.testing.assert_array_equal(batches[-1]["image"][2:], 0)
  images, labels = fashion_mnist.load_split(noise_fashion_dir, "test")
  resized = tf.image.resize(images[..., None].astype(np.float32), [14, 14], "bilinear").numpy()
  expected = np.round(resized).astype(np.uint8)[labels]  # Labels 0..9 name the 10 examples.
  got = {int(l): img for b in batches for img, l, m in zip(b["image"], b["label"], b["mask"])
         if m}
  np.testing.assert_array_equal(np.stack([got[i] for i in range(10)]), expected)
  assert np.any(np.floor(resized) != np.round(resized))  # Rounding, not truncation, is tested.


def test_a_shard_shorter_than_its_metadata_is_corrupt_data(imagenet_dir, tmp_path):
  data_dir = tmp_path / "imagenet"
  shutil.copytree(imagenet_dir, data_dir)
  shard = next((data_dir / "imagenet2012").rglob("imagenet2012-train.tfrecord-00000-of-00003"))
  records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
  with tf.io.TFRecordWriter(str(shard)) as writer:  # Intact records, one fewer.
    for record in records[:-1]:
      writer.write(record)
  config = _imagenet_config(str(data_dir))
  info = prepare.get_dataset_info(config)
  with pytest.raises(prepare.CorruptDataError) as error:
    list(itertools.islice(pipeline.train_batches(config, info, process_index=0,
                                                 process_count=1), 4))
  assert "Delete" in str(error.value) and str(info.builder.data_path) in str(error.value)


# --- Only process 0 prepares a dataset; the others wait for it. ---


@pytest.fixture
def offline_fashion(monkeypatch, offline):
  """Offline (conftest), and records who prepares (converts or downloads) what."""
  del offline
  events, acting = [], ["process 1"]
  convert = fashion_mnist.FashionMnistIdx.download_and_prepare

  def recording_convert(self, *args, **kwargs):
    events.append(("prepare", acting[0]))
    return convert(self, *args, **kwargs)

  monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "download_and_prepare", recording_convert)
  return events, acting


def test_a_process_other_than_0_waits_for_process_0_to_prepare(tmp_path, monkeypatch,
                                                                offline_fashion):
  events, acting = offline_fashion
  config = _config(data_dir=str(_write_idx_dir(tmp_path / "tfds")))

  def barrier(ok):  # Process 0 prepares while process 1 waits here.
    events.append(("barrier", ok))
    acting[0] = "process 0"
    prepare.get_dataset_info(config, process_index=0, process_count=1)
    acting[0] = "process 1"
    return True

  monkeypatch.setattr(prepare, "_process_0_outcome", barrier)
  info = prepare.get_dataset_info(config, process_index=1, process_count=2)
  assert events == [("barrier", False), ("prepare", "process 0")]
  assert info.num_train_examples == 8


def test_process_0_prepares_then_releases_the_others(tmp_path, monkeypatch, offline_fashion):
  events, acting = offline_fashion
  acting[0] = "process 0"
  monkeypatch.setattr(prepare, "_process_0_outcome",
                      lambda ok: events.append(("barrier", ok)) or ok)
  config = _config(data_dir=str(_write_idx_dir(tmp_path / "tfds")))
  info = prepare.get_dataset_info(config, process_index=0, process_count=2)
  assert events == [("prepare", "process 0"), ("barrier", True)]
  assert info.num_train_examples == 8
  events.clear()  # Prepared now: nobody prepares again, the barrier is still passed.
  prepare.get_dataset_info(config, process_index=0, process_count=2)
  assert events == [("barrier", True)]


def test_process_0_failing_to_prepare_stops_every_process(tmp_path, monkeypatch, offline_fashion):
  events, acting = offline_fashion
  barrier_values = []
  monkeypatch.setattr(prepare, "_process_0_outcome",
                      lambda ok: barrier_values.append(ok) or ok)
  config = _config(data_dir=str(tmp_path / "no_idx_files"))
  acting[0] = "process 0"
  with pytest.raises(prepare.DataUnavailableError, match="download failed|internet"):
    prepare.get_dataset_info(config, process_index=0, process_count=2)
  assert barrier_values == [False]  # The others are released, told it failed.
  acting[0] = "process 1"
  with pytest.raises(prepare.DataUnavailableError) as error:
    prepare.get_dataset_info(config, process_index=1, process_count=2)
  assert "Process 0 could not prepare fashion_mnist" in str(error.value)
  assert isinstance(error.value, errors.UserError)
  assert events == []


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_data_that_process_0_prepared_out_of_sight_is_a_user_error(tmp_path, monkeypatch,
                                                                   offline_fashion, dataset):
  """A data_dir each host has for itself: process 1 must not prepare a second copy."""
  events, _ = offline_fashion
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: events.append(("prepare", self.name)))
  monkeypatch.setattr(prepare, "_process_0_outcome", lambda ok: True)
  data_dir = _write_idx_dir(tmp_path / "tfds")  # IDX files that process 1 must not convert.
  with pytest.raises(prepare.DataUnavailableError) as error:
    prepare.get_dataset_info(_config(dataset=dataset, data_dir=str(data_dir)),
                             process_index=1, process_count=2)
  message = str(error.value)
  assert f"Process 0 prepared {dataset} in the TFDS data dir {data_dir}" in message
  assert "process 1 does not find it" in message and "same data_dir" in message
  assert events == []
