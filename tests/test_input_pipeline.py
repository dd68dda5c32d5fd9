"""Tests for conadv_jax.input_pipeline on tiny local data (never downloads)."""
import collections
import importlib.util
import itertools
import pathlib

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

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
      num_classes=10, image_shape=(28, 28, 1), num_train_examples=NUM_TRAIN,
      num_eval_examples=NUM_TEST)
  assert input_pipeline.steps_per_epoch(config, info) == 5
  synthetic = input_pipeline.get_dataset_info(
      _config(dataset="synthetic", synthetic_num_classes=7))
  assert synthetic.num_classes == 7
  assert synthetic.image_shape == (32, 32, 3)
  assert synthetic.num_train_examples == NUM_TRAIN
  with pytest.raises(ValueError, match="batch_size"):
    input_pipeline.steps_per_epoch(_config(batch_size=64), info)


def test_unknown_dataset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="fashion_mnist.*cifar10.*imagenet2012.*synthetic"):
    input_pipeline.get_dataset_info(_config(dataset="mnist"))


def test_imagenet_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as error:
    input_pipeline.get_dataset_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"{tmp_path}/downloads/manual" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def test_batch_size_must_divide_among_processes(fashion_dir):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    input_pipeline.train_batches(_config(data_dir=fashion_dir), process_index=0, process_count=3)
  with pytest.raises(ValueError, match="eval_batch_size"):
    input_pipeline.eval_batches(_config(data_dir=fashion_dir, eval_batch_size=5),
                                process_index=0, process_count=2)


def test_fashion_train_batches(fashion_dir):
  config = _config(data_dir=fashion_dir)
  batches = list(itertools.islice(
      input_pipeline.train_batches(config, process_index=0, process_count=1), 10))
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
  other_seed = itertools.islice(input_pipeline.train_batches(
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
      input_pipeline.train_batches(config, process_index=0, process_count=1), 12))
  for start in (4, 5, 7):
    resumed = list(itertools.islice(input_pipeline.train_batches(
        config, start_step=start, process_index=0, process_count=1), 12 - start))
    _assert_batches_equal(full[start:], resumed)


def test_small_image_augmentation_is_a_padded_crop_or_its_flip():
  image = tf.reshape(tf.range(28 * 28, dtype=tf.int32) % 251, [28, 28, 1])
  padded = np.pad(image.numpy(), [(4, 4), (4, 4), (0, 0)], mode="reflect")
  candidates = [padded[y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
  candidates += [c[:, ::-1] for c in candidates]
  outputs = set()
  for seed in range(20):
    out = input_pipeline._small_train(
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
        input_pipeline.train_batches(config, process_index=index, process_count=3), 3))
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
    batches = list(input_pipeline.eval_batches(
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
    batches = list(input_pipeline.eval_batches(config, process_index=index, process_count=2))
    num_batches.add(len(batches))
    counts += sum(int(b["mask"].sum()) for b in batches)
  assert counts == 5 and num_batches == {2}
  batch = next(input_pipeline.train_batches(config, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
  assert 0 <= batch["image"].min() and batch["image"].max() <= 255
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
  again = next(input_pipeline.train_batches(config, process_index=0, process_count=1))
  _assert_batches_equal([batch], [again])


def test_center_crop_window_geometry():
  window = input_pipeline.center_crop_window(tf.constant([256, 320, 3]), 224)
  np.testing.assert_array_equal(window, [16, 48, 224, 224])
  window = input_pipeline.center_crop_window(tf.constant([320, 256, 3]), 224)
  np.testing.assert_array_equal(window, [48, 16, 224, 224])
  window = input_pipeline.center_crop_window(tf.constant([512, 600, 3]), 224)
  np.testing.assert_array_equal(window, [32, 76, 448, 448])  # 224/256 of the shorter side.


@pytest.mark.parametrize("height,width", [(256, 320), (375, 500), (40, 30), (17, 47)])
def test_random_resized_crop_window_bounds(height, width):
  shape = tf.constant([height, width, 3])
  center = input_pipeline.center_crop_window(shape, 224).numpy()
  num_random = 0
  for seed in range(100):
    window = input_pipeline.random_resized_crop_window(
        shape, tf.constant([seed, 7], tf.int64), 224).numpy()
    y, x, h, w = window
    assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
    if np.array_equal(window, center):
      continue  # The fallback.
    num_random += 1
    assert 0.08 - 1e-6 <= h * w / (height * width) <= 1 + 1e-6
    assert 3 / 4 - 1e-6 <= w / h <= 4 / 3 + 1e-6
  assert num_random >= 80
  again = input_pipeline.random_resized_crop_window(shape, tf.constant([3, 7], tf.int64), 224)
  first = input_pipeline.random_resized_crop_window(shape, tf.constant([3, 7], tf.int64), 224)
  np.testing.assert_array_equal(again, first)


def test_random_resized_crop_falls_back_to_center_crop():
  shape = tf.constant([1000, 10, 3])  # No crop with aspect in [3/4, 4/3] has area >= 8%.
  window = input_pipeline.random_resized_crop_window(shape, tf.constant([0, 0], tf.int64), 224)
  np.testing.assert_array_equal(window, input_pipeline.center_crop_window(shape, 224))


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
      num_classes=1000, image_shape=(side, side, 3), num_train_examples=12, num_eval_examples=12)
  train = list(itertools.islice(
      input_pipeline.train_batches(config, process_index=0, process_count=1), 4))
  eval_ = list(input_pipeline.eval_batches(config, process_index=0, process_count=1))
  assert len(eval_) == 3 and sum(b["mask"].sum() for b in eval_) == 12
  for batch in train + eval_:
    assert batch["image"].shape == (4, side, side, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 255
    assert batch["image"].max() > 0
    assert batch["label"].dtype == np.int32
    assert np.all((0 <= batch["label"]) & (batch["label"] < 1000))
  resumed = list(itertools.islice(
      input_pipeline.train_batches(config, start_step=2, process_index=0, process_count=1), 2))
  _assert_batches_equal(train[2:], resumed)


@pytest.mark.parametrize("num_devices", [1, len(jax.devices())])
def test_shard_and_prefetch_makes_global_arrays(num_devices):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  config = _config(dataset="synthetic", image_size=8, eval_batch_size=4 * num_devices,
                   synthetic_num_examples=40 * num_devices)  # 10 * num_devices eval examples.
  local = list(input_pipeline.eval_batches(config, process_index=0, process_count=1))
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
  one = list(itertools.islice(input_pipeline.train_batches(
      config, process_index=0, process_count=1), 8))
  parts = [list(itertools.islice(input_pipeline.train_batches(
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
  batches = list(itertools.islice(input_pipeline.train_batches(config), 4))
  stored = {img.tobytes() for img in raw["train"].astype(np.float32)}
  fed = [img[..., 0].tobytes() for b in batches for img in b["image"]]
  assert all(f in stored for f in fed) == (not augment)
