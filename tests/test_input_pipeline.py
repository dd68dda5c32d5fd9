"""Tests for conadv_jax.input_pipeline on tiny local data (never downloads)."""
import collections
import dataclasses
import gzip
import importlib.util
import itertools
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import augment
from conadv_jax import datasets
from conadv_jax import errors
from conadv_jax import fashion_mnist
from conadv_jax import input_pipeline

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
  return input_pipeline.train_batches(config, input_pipeline.get_dataset_info(config), **kwargs)


def _eval(config, **kwargs):
  """eval_batches with the info resolved here (tests that do not reuse it)."""
  return input_pipeline.eval_batches(config, input_pipeline.get_dataset_info(config), **kwargs)


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
  info = input_pipeline.get_dataset_info(config)
  assert info == input_pipeline.DatasetInfo(
      spec=datasets.DATASETS["fashion_mnist"], num_classes=10, image_shape=(28, 28, 1),
      num_train_examples=NUM_TRAIN, num_eval_examples=NUM_TEST)
  assert input_pipeline.steps_per_epoch(config, info) == 5
  synthetic = input_pipeline.get_dataset_info(
      _config(dataset="synthetic", synthetic_num_classes=7))
  assert synthetic.num_classes == 7
  assert synthetic.image_shape == (32, 32, 3)
  assert synthetic.num_train_examples == NUM_TRAIN
  with pytest.raises(ValueError, match="batch_size"):
    input_pipeline.steps_per_epoch(_config(batch_size=64), info)


def test_unknown_dataset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="fashion_mnist.*cifar10.*imagenet2012.*synthetic") as error:
    input_pipeline.get_dataset_info(_config(dataset="mnist"))
  assert isinstance(error.value, datasets.UnknownDatasetError)
  assert isinstance(error.value, errors.UserError)


def test_imagenet_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as error:
    input_pipeline.get_dataset_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
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
    assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32
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
  config = _config(data_dir=fashion_dir, batch_size=6)  # 2 per process, 20 // 6 = 3 steps.
  per_process = []
  for index in range(3):
    batches = list(itertools.islice(
        _train(config, process_index=index, process_count=3), 3))
    assert all(b["image"].shape == (2, 28, 28, 1) for b in batches)
    per_process.append(sum((_ids(b) for b in batches), []))
  everything = sum(per_process, [])
  assert len(everything) == len(set(everything)) == 18  # Disjoint slices of 20 // 3 = 6 each.


@pytest.mark.parametrize("process_count,eval_batch_size", [(1, 4), (3, 6), (2, 2)])
def test_eval_scores_every_example_once(fashion_dir, process_count, eval_batch_size):
  config = _config(data_dir=fashion_dir, eval_batch_size=eval_batch_size)
  local_batch = eval_batch_size // process_count
  scored, num_batches = [], set()
  for index in range(process_count):
    batches = list(_eval(
        config, process_index=index, process_count=process_count))
    num_batches.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (local_batch, 28, 28, 1)
      assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
      assert batch["mask"].shape == (local_batch,) and batch["mask"].dtype == np.float32
      mask = batch["mask"].astype(bool)
      scored += [i for i, m in zip(_ids(batch), mask) if m]
      np.testing.assert_array_equal(batch["image"][~mask], 0)
      # Eval is not augmented: the pixels are the stored ones.
      np.testing.assert_array_equal(batch["label"][mask],
                                    [(v - 7) // 20 % 10 for v in np.array(_ids(batch))[mask]])
  assert sorted(scored) == sorted(_test_value(i) for i in range(NUM_TEST))
  # Every process steps through the same number of batches: ceil(largest slice / local batch).
  largest = -(-NUM_TEST // process_count)
  assert num_batches == {-(-largest // local_batch)}


def test_synthetic_eval_and_determinism():
  config = _config(dataset="synthetic", image_size=8, synthetic_num_examples=21,
                   synthetic_num_classes=3, eval_batch_size=4)
  info = input_pipeline.get_dataset_info(config)
  assert info.num_eval_examples == 5
  counts, num_batches = 0, set()
  for index in range(2):
    batches = list(_eval(config, process_index=index, process_count=2))
    num_batches.add(len(batches))
    counts += sum(int(b["mask"].sum()) for b in batches)
  assert counts == 5 and num_batches == {2}
  batch = next(_train(config, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
  assert 0 <= batch["image"].min() and batch["image"].max() <= 255
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


@pytest.fixture
def mock_imagenet(tmp_path):
  """Mocked imagenet2012 (random JPEGs) whose metadata says it is prepared with 12 + 12."""
  num_examples = 12
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=builder.name, filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0,
                          filename_template=template) for split in ("train", "validation")]))
  pathlib.Path(builder.data_path).mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path)):
    yield str(tmp_path)


@pytest.mark.parametrize("image_size", [0, 64])
def test_imagenet_pipeline(mock_imagenet, image_size):
  config = _config(dataset="imagenet2012", data_dir=mock_imagenet, image_size=image_size)
  side = image_size or 224
  info = input_pipeline.get_dataset_info(config)
  assert info == input_pipeline.DatasetInfo(
      spec=datasets.DATASETS["imagenet2012"], num_classes=1000, image_shape=(side, side, 3),
      num_train_examples=12, num_eval_examples=12)
  train = list(itertools.islice(
      input_pipeline.train_batches(config, info, process_index=0, process_count=1), 4))
  eval_ = list(input_pipeline.eval_batches(config, info, process_index=0, process_count=1))
  assert len(eval_) == 3 and sum(b["mask"].sum() for b in eval_) == 12
  for batch in train + eval_:
    assert batch["image"].shape == (4, side, side, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 255
    assert batch["image"].max() > 0
    assert batch["label"].dtype == np.int32
    assert np.all((0 <= batch["label"]) & (batch["label"] < 1000))
  resumed = list(itertools.islice(
      input_pipeline.train_batches(config, info, start_step=2, process_index=0, process_count=1),
      2))
  _assert_batches_equal(train[2:], resumed)


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

  out = input_pipeline.shard_and_prefetch(counting(), sharding, size=2)
  first = next(out)
  assert pulled["n"] == 3  # The current batch plus two in flight.
  result = [first, *out]
  assert len(result) == len(local) == 3
  for host, device in zip(local, result):
    assert set(device) == {"image", "label", "mask"}
    for key, value in device.items():
      assert isinstance(value, jax.Array)
      assert value.sharding == sharding
      assert len(value.addressable_shards) == num_devices
      assert value.shape == host[key].shape and value.dtype == host[key].dtype
      np.testing.assert_array_equal(np.asarray(value), host[key])


def test_synthetic_global_batches_do_not_depend_on_the_process_count():
  """What makes a 2-host run equal a 1-host run: host rows concatenate to the same batch."""
  config = _config(dataset="synthetic", image_size=8, batch_size=12, synthetic_num_examples=40)
  one = list(itertools.islice(_train(
      config, process_index=0, process_count=1), 8))
  parts = [list(itertools.islice(_train(
      config, process_index=i, process_count=3), 8)) for i in range(3)]
  for step in range(8):  # 3 steps per epoch: crosses two epoch boundaries.
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]),
                                    one[step][key])


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
  stored = {img.tobytes() for img in raw["train"].astype(np.float32)}
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
  info = input_pipeline.get_dataset_info(config)
  assert info.spec.name == "tiny_noise" and info.num_classes == info.spec.num_classes == 3
  assert info.image_shape == (6, 6, 1)  # Native size and channels of the entry.
  assert (info.num_train_examples, info.num_eval_examples) == (12, 3)
  batch = next(input_pipeline.train_batches(config, info, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 6, 6, 1) and set(batch["label"]) <= {0, 1, 2}
  eval_ = list(input_pipeline.eval_batches(config, info, process_index=0, process_count=1))
  assert eval_[0]["image"].shape == (4, 6, 6, 1) and sum(b["mask"].sum() for b in eval_) == 3


def test_a_registered_copy_of_a_dataset_uses_its_own_entry(fashion_dir, monkeypatch):
  spec = dataclasses.replace(datasets.DATASETS["fashion_mnist"], name="fashion_14",
                             native_image_size=14)
  monkeypatch.setitem(datasets.DATASETS, "fashion_14", spec)
  config = _config(dataset="fashion_14", data_dir=fashion_dir)
  info = input_pipeline.get_dataset_info(config)
  assert info.spec == spec and info.image_shape == (14, 14, 1)
  assert info.num_train_examples == NUM_TRAIN  # Counts come from the prepared data.
  batch = next(input_pipeline.train_batches(config, info, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 14, 14, 1)


def test_an_unregistered_dataset_is_unknown(monkeypatch):
  # A new dict, not delitem: restoring an item would move it to the end of the registry.
  monkeypatch.setattr(datasets, "DATASETS", {
      name: spec for name, spec in datasets.DATASETS.items() if name != "cifar10"})
  with pytest.raises(datasets.UnknownDatasetError) as error:
    input_pipeline.get_dataset_info(_config(dataset="cifar10"))
  assert "choose one of fashion_mnist, imagenet2012, synthetic." in str(error.value)


@pytest.mark.parametrize("field,value", [("num_classes", 5), ("channels", 3)])
def test_prepared_data_that_disagrees_with_the_registry_is_a_user_error(fashion_dir, monkeypatch,
                                                                        field, value):
  monkeypatch.setitem(datasets.DATASETS, "fashion_mnist", dataclasses.replace(
      datasets.DATASETS["fashion_mnist"], **{field: value}))
  with pytest.raises(input_pipeline.DataMismatchError) as error:
    input_pipeline.get_dataset_info(_config(data_dir=fashion_dir))
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert "10 classes and 1 channels" in message and fashion_dir in message
  assert "delete it" in message and "conadv_jax/datasets.py" in message


def test_pipelines_reuse_the_resolved_info(fashion_dir, monkeypatch):
  """Eval runs many times per training run; it must not look the dataset up again."""
  config = _config(data_dir=fashion_dir)
  info = input_pipeline.get_dataset_info(config)

  def resolve_again(*args, **kwargs):
    raise AssertionError("the dataset was resolved again")

  monkeypatch.setattr(input_pipeline, "_builder", resolve_again)
  monkeypatch.setattr(fashion_mnist, "get_builder", resolve_again)
  monkeypatch.setattr(tfds, "builder", resolve_again)
  monkeypatch.setattr(datasets, "get_spec", resolve_again)
  next(input_pipeline.train_batches(config, info, process_index=0, process_count=1))
  for _ in range(2):
    assert len(list(input_pipeline.eval_batches(config, info, process_index=0,
                                                process_count=1))) == 3


# --- Every source goes through the same epoch hook. ---

HOOK_CASES = [dict(dataset="fashion_mnist"), dict(dataset="fashion_mnist", cache=True),
              dict(dataset="synthetic", image_size=8)]
HOOK_IDS = ["fashion_mnist", "fashion_mnist_cached", "synthetic"]


@pytest.mark.parametrize("overrides", HOOK_CASES, ids=HOOK_IDS)
def test_pipelines_read_every_source_through_its_epoch_hook(fashion_dir, monkeypatch, overrides):
  config = _config(data_dir=fashion_dir, **overrides)  # 20 examples: 5 steps of 4 per epoch.
  info = input_pipeline.get_dataset_info(config)
  calls = []
  make_source = input_pipeline._source

  def recording_source(*args, **kwargs):
    source = make_source(*args, **kwargs)

    def epoch(number, skip):
      calls.append((number, skip))
      return source.epoch(number, skip)

    return dataclasses.replace(source, epoch=epoch)

  monkeypatch.setattr(input_pipeline, "_source", recording_source)
  # Steps 7..15: the last 3 of epoch 1 (skipping 2 batches of 4), all of epoch 2, 1 of epoch 3.
  batches = list(itertools.islice(input_pipeline.train_batches(
      config, info, start_step=7, process_index=0, process_count=1), 9))
  assert len(batches) == 9 and calls == [(1, 8), (2, 0), (3, 0)]
  calls.clear()
  list(input_pipeline.eval_batches(config, info, process_index=0, process_count=1))
  assert calls == [(0, 0)]


@pytest.mark.parametrize("overrides", HOOK_CASES, ids=HOOK_IDS)
def test_epoch_hook_skip_only_drops_examples(fashion_dir, overrides):
  """What exact resume rests on: skipping changes neither the order nor the augmentation."""
  config = _config(data_dir=fashion_dir, **overrides)
  info = input_pipeline.get_dataset_info(config)
  for train in (True, False):
    source = input_pipeline._source(config, info, train, 0, 1)
    full = list(source.epoch(1, 0).as_numpy_iterator())
    assert len(full) == (NUM_TRAIN if train else info.num_eval_examples)
    _assert_batches_equal(full[6:], list(source.epoch(1, 6).as_numpy_iterator()))
    other_epoch = list(source.epoch(2, 0).as_numpy_iterator())
    assert train == any((a["image"] != b["image"]).any() for a, b in zip(full, other_epoch))


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
    with pytest.raises(input_pipeline.DataDirError) as error:
      input_pipeline.get_dataset_info(_config(data_dir=str(data_dir)))
    assert isinstance(error.value, errors.UserError)
    message = str(error.value)
    assert f"config.data_dir='{data_dir}'" in message and "not a folder" in message
    assert f"--config.data_dir={tmp_path} if train-images-idx3-ubyte.gz" in message


def test_unreadable_data_dir(tmp_path, monkeypatch):
  folder = _write_idx_dir(tmp_path / "private")
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
      os.fspath(path) != str(folder) and access(path, mode, **kwargs)))  # Root reads anything.
  with pytest.raises(input_pipeline.DataDirError) as error:
    input_pipeline.get_dataset_info(_config(data_dir=str(folder)))
  assert isinstance(error.value, errors.UserError)
  assert str(folder) in str(error.value) and f"chmod u+rx {folder}" in str(error.value)


def test_truncated_idx_file_names_it_and_the_fix(tmp_path):
  folder = _write_idx_dir(tmp_path)
  images = folder / "train-images-idx3-ubyte.gz"
  fashion_mnist.write_idx(images, np.zeros([8, 28, 28], np.uint8))
  payload = gzip.decompress(images.read_bytes())
  images.write_bytes(gzip.compress(payload[:-100]))
  with pytest.raises(fashion_mnist.IdxFormatError) as error:
    input_pipeline.get_dataset_info(_config(data_dir=str(folder)))
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert f"{images}: IDX shape (8, 28, 28)" in message
  assert f"replace {images} with an intact copy" in message


def _prepared_copy(tmp_path) -> tuple[str, pathlib.Path]:
  """A data dir with fashion_mnist_idx prepared from IDX files, and its version folder."""
  data_dir = _write_idx_dir(tmp_path / "tfds")
  info = input_pipeline.get_dataset_info(_config(data_dir=str(data_dir)))
  return str(data_dir), pathlib.Path(info.builder.data_path)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_corrupt_prepared_copy_says_to_delete_it(tmp_path, damage):
  data_dir, prepared = _prepared_copy(tmp_path)
  config = _config(data_dir=data_dir)
  info = input_pipeline.get_dataset_info(config)
  for record in prepared.glob("*.tfrecord*"):
    data = bytearray(record.read_bytes())
    if damage == "truncate":
      data = data[:len(data) // 2]
    else:
      data[len(data) // 2] ^= 0xFF
    record.write_bytes(bytes(data))
  for batches in (lambda: list(itertools.islice(input_pipeline.train_batches(
      config, info, process_index=0, process_count=1), 3)),
                  lambda: list(input_pipeline.eval_batches(
                      config, info, process_index=0, process_count=1))):
    with pytest.raises(input_pipeline.CorruptDataError) as error:
      batches()
    assert isinstance(error.value, errors.UserError)
    message = str(error.value)
    assert f"in {prepared} failed" in message and "{{" not in message
    assert f"Delete {prepared} and run again" in message
  # Doing what the message says works: the copy is prepared afresh from the IDX files.
  shutil.rmtree(prepared)
  info = input_pipeline.get_dataset_info(config)
  assert len(list(itertools.islice(input_pipeline.train_batches(
      config, info, process_index=0, process_count=1), 3))) == 3


def test_unreadable_prepared_metadata_says_to_delete_it(tmp_path):
  data_dir, prepared = _prepared_copy(tmp_path)
  (prepared / "dataset_info.json").write_text("{not json")
  with pytest.raises(input_pipeline.DataUnavailableError) as error:
    input_pipeline.get_dataset_info(_config(data_dir=data_dir))
  assert isinstance(error.value, errors.UserError)
  assert f"Delete {prepared.parent} and run again" in str(error.value)
  shutil.rmtree(prepared.parent)
  assert input_pipeline.get_dataset_info(_config(data_dir=data_dir)).num_train_examples == 8


def test_unreadable_tfds_metadata_says_how_to_rebuild(tmp_path):
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
  pathlib.Path(builder.data_path).mkdir(parents=True)
  (pathlib.Path(builder.data_path) / "dataset_info.json").write_text("{not json")
  with pytest.raises(input_pipeline.CorruptDataError) as error:
    input_pipeline.get_dataset_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert f"Delete {tmp_path}/imagenet2012" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def test_config_values_the_pipeline_cannot_use_are_user_errors(fashion_dir):
  config = _config(data_dir=fashion_dir)
  info = input_pipeline.get_dataset_info(config)
  cases = [
      (lambda: input_pipeline.get_dataset_info(_config(dataset="synthetic", image_size=-1)),
       "config.image_size=-1"),
      (lambda: input_pipeline.steps_per_epoch(_config(batch_size=64), info),
       "config.batch_size=64"),
      (lambda: input_pipeline.train_batches(config, info, process_index=0, process_count=3),
       "config.batch_size=4"),
      (lambda: input_pipeline.eval_batches(_config(eval_batch_size=5), info, process_index=0,
                                           process_count=2), "config.eval_batch_size=5"),
  ]
  for fn, field in cases:
    with pytest.raises(input_pipeline.InputConfigError, match=field) as error:
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


AUG_CASES = [dict(dataset="fashion_mnist"), dict(dataset="fashion_mnist", cache=True),
             dict(dataset="synthetic", image_size=8)]


def _aug_config(data_dir, branch, **overrides):
  return _config(data_dir=data_dir, aug_branch=branch, **overrides)


def _without(batches, key):
  return [{k: v for k, v in b.items() if k != key} for b in batches]


@pytest.mark.parametrize("branch", ["autoaugment", "randaugment"])
@pytest.mark.parametrize("overrides", AUG_CASES, ids=HOOK_IDS)
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
  # A second view, not a copy: (almost) every example's pixels differ from its main view.
  differs = [np.any(a != m) for b in augmented for a, m in zip(b["aug_image"], b["image"])]
  assert np.mean(differs) > 0.8


@pytest.mark.parametrize("overrides", AUG_CASES, ids=HOOK_IDS)
def test_aug_view_is_deterministic_and_resumes_exactly(noise_fashion_dir, overrides):
  config = _aug_config(noise_fashion_dir, "randaugment", **overrides)
  full = list(itertools.islice(_train(config, process_index=0, process_count=1), 12))
  _assert_batches_equal(full, list(itertools.islice(
      _train(config, process_index=0, process_count=1), 12)))
  for start in (3, 5, 9):  # Mid-epoch, at a boundary, in a later epoch.
    resumed = list(itertools.islice(_train(
        config, start_step=start, process_index=0, process_count=1), 12 - start))
    _assert_batches_equal(full[start:], resumed)
  # Each epoch draws new views: the same example's view differs between epochs.
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
  from conadv_jax import autoaugment  # pylint: disable=g-import-not-at-top
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
    epoch, first = divmod(step * 4, NUM_TRAIN)
    for row in range(4):
      image = stored[batch["image"][row, ..., 0].astype(np.uint8).tobytes()][..., None]
      seed = input_pipeline._example_seed(config, epoch, first + row, 0)
      view_seed = tf.random.experimental.stateless_fold_in(
          seed, tf.constant(augment.AUG_VIEW_SALT, tf.int64))
      crop_seed, policy_seed = tf.random.experimental.stateless_split(view_seed, num=2)
      crop = augment.small_train({"image": tf.constant(image), "label": tf.constant(0)},
                                 crop_seed, 28)["image"]
      crop = tf.cast(tf.round(crop), tf.uint8)
      expected = policy(crop, policy_seed).numpy()
      got = batch["aug_image"][row].astype(np.uint8)
      np.testing.assert_array_equal(got, expected)
      np.testing.assert_array_equal(got, _tile_apply_take(policy, crop.numpy(), policy_seed))
      policy_changed += np.any(expected != crop.numpy())
  assert policy_changed >= 20  # The policy is applied, not only the crop.


def test_policies_are_the_reference_ones_at_224():
  from conadv_jax import autoaugment  # pylint: disable=g-import-not-at-top
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
    assert set(batch) == {"image", "label", "mask"}
