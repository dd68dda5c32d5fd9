"""Deterministic, resumable, per-process tf.data input pipelines yielding numpy batches.

Each process reads only its slice of a split and yields host-local batches; `shard_and_prefetch`
assembles them into global jax.Arrays. Training batches depend only on (config.seed, step):
every epoch gets shuffle seeds derived from (seed, epoch) and every example augmentation seeds
derived from (seed, epoch, its position in the epoch), so a run resumed at step k sees exactly
the batches an uninterrupted run sees from step k on (for the same process count).

Batches are dicts of numpy arrays: 'image' float32 raw pixels in [0, 255] (B, H, W, C) (the
model normalises), 'label' int32 (B,), and for eval 'mask' float32 (B,), 0 on padding.
"""
from collections.abc import Callable, Iterator
import collections
import dataclasses
import functools
import math
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import fashion_mnist

# Side of model inputs when config.image_size is 0.
NATIVE_IMAGE_SIZE = {"fashion_mnist": 28, "cifar10": 32, "imagenet2012": 224, "synthetic": 32}
DATASETS = tuple(NATIVE_IMAGE_SIZE)
_EVAL_SPLIT = {"fashion_mnist": "test", "cifar10": "test", "imagenet2012": "validation"}
_SMALL_IMAGE_PADDING = 4  # Pixels of reflect padding before the random crop (CIFAR recipe).
_CROP_PADDING = 32  # ImageNet eval: crop image_size / (image_size + 32) of the shorter side.
_RRC_AREA_RANGE = (0.08, 1.0)
_RRC_ASPECT_RANGE = (3 / 4, 4 / 3)
_RRC_MAX_ATTEMPTS = 10

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset, without reading it."""
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of model inputs after preprocessing.
  num_train_examples: int
  num_eval_examples: int


# ------------------------------------------------------------------------------------------------
# Dataset resolution.


class DataUnavailableError(ValueError):
  """The dataset is not prepared and cannot be prepared here; the message says how."""


def _check_dataset(config: ml_collections.ConfigDict) -> str:
  if config.dataset not in DATASETS:
    raise ValueError(
        f"Unknown dataset {config.dataset!r}; config.dataset must be one of {', '.join(DATASETS)}.")
  return config.dataset


def _image_size(config: ml_collections.ConfigDict) -> int:
  size = config.image_size or NATIVE_IMAGE_SIZE[_check_dataset(config)]
  if size <= 0:
    raise ValueError(f"config.image_size must be >= 0, got {config.image_size}.")
  return size


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of a non-synthetic dataset, preparing it if we can."""
  name = _check_dataset(config)
  if name == "fashion_mnist":
    try:
      return fashion_mnist.get_builder(config.data_dir)
    except fashion_mnist.FashionMnistUnavailableError as e:
      raise DataUnavailableError(str(e)) from e
  builder = tfds.builder(name, data_dir=config.data_dir)
  if builder.data_path.exists() and builder.is_prepared():  # exists(): is_prepared() warns.
    return builder
  if name == "imagenet2012":
    data_dir = config.data_dir or tfds.core.constants.DATA_DIR
    raise DataUnavailableError(
        f"imagenet2012 is not prepared in the TFDS data dir {data_dir} (looked for "
        f"{builder.data_path}). TFDS cannot download it: get ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from image-net.org into {data_dir}/downloads/manual, run "
        f"`tfds build imagenet2012 --data_dir={data_dir}`, and pass "
        f"`--config.data_dir={data_dir}`.")
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataUnavailableError(
        f"{name} is not prepared in the TFDS data dir {config.data_dir or '(TFDS default)'} and "
        f"downloading it failed ({type(e).__name__}: {e}). Connect to the internet, or prepare "
        f"it elsewhere with `tfds build {name} --data_dir=DIR`, copy DIR here and pass "
        "`--config.data_dir=DIR`.") from e
  return builder


def _synthetic_num_eval_examples(config: ml_collections.ConfigDict) -> int:
  return max(config.synthetic_num_examples // 4, 1)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns sizes and shapes of config.dataset; prepares fashion_mnist once if needed.

  Raises:
    ValueError: unknown dataset, or a dataset that is not prepared and cannot be (the message
      says how to prepare it).
  """
  size = _image_size(config)
  if config.dataset == "synthetic":
    return DatasetInfo(
        num_classes=config.synthetic_num_classes,
        image_shape=(size, size, 3),
        num_train_examples=config.synthetic_num_examples,
        num_eval_examples=_synthetic_num_eval_examples(config))
  info = _builder(config).info
  return DatasetInfo(
      num_classes=info.features["label"].num_classes,
      image_shape=(size, size, info.features["image"].shape[-1]),
      num_train_examples=info.splits["train"].num_examples,
      num_eval_examples=info.splits[_EVAL_SPLIT[config.dataset]].num_examples)


def steps_per_epoch(config: ml_collections.ConfigDict, info: DatasetInfo) -> int:
  """Number of global training steps (batches of config.batch_size) in one epoch.

  Raises:
    ValueError: the global batch is larger than the training set.
  """
  steps = info.num_train_examples // config.batch_size
  if steps < 1:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} "
        f"training examples of {config.dataset}.")
  return steps


# ------------------------------------------------------------------------------------------------
# Preprocessing. Pure TF functions of one example; all randomness is stateless.


def center_crop_window(image_shape: tf.Tensor, image_size: int,
                       crop_padding: int = _CROP_PADDING) -> tf.Tensor:
  """Returns [offset_y, offset_x, height, width] of the ImageNet eval center crop.

  The square crop covers image_size / (image_size + crop_padding) of the shorter side, so that
  resizing it to image_size matches the usual "resize to 256, crop 224".
  """
  height, width = image_shape[0], image_shape[1]
  fraction = image_size / (image_size + crop_padding)
  crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  return tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])


def random_resized_crop_window(image_shape: tf.Tensor,
                               seed: tf.Tensor,
                               image_size: int,
                               area_range: tuple[float, float] = _RRC_AREA_RANGE,
                               aspect_range: tuple[float, float] = _RRC_ASPECT_RANGE,
                               max_attempts: int = _RRC_MAX_ATTEMPTS) -> tf.Tensor:
  """Returns [offset_y, offset_x, height, width] of an Inception-style random crop.

  Tries `max_attempts` (area fraction, log-uniform aspect ratio) draws at once and keeps the first
  whose integer crop fits in the image and still satisfies both ranges; if none does, falls back
  to `center_crop_window`. Deterministic given `seed` (shape [2]).
  """
  height, width = image_shape[0], image_shape[1]
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area_seed, aspect_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  area = tf.random.stateless_uniform([max_attempts], area_seed, *area_range) * h * w
  log_aspect = tf.random.stateless_uniform(
      [max_attempts], aspect_seed, math.log(aspect_range[0]), math.log(aspect_range[1]))
  aspect = tf.exp(log_aspect)  # width / height
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  # Judge the rounded crop, so the returned window itself satisfies both ranges.
  area_fraction = crop_h * crop_w / (h * w)
  real_aspect = crop_w / tf.maximum(crop_h, 1.0)
  valid = ((crop_h >= 1) & (crop_w >= 1) & (crop_h <= h) & (crop_w <= w) &
           (area_fraction >= area_range[0]) & (area_fraction <= area_range[1]) &
           (real_aspect >= aspect_range[0]) & (real_aspect <= aspect_range[1]))
  first = tf.argmax(tf.cast(valid, tf.int32))  # First valid attempt (0 when none is).
  crop_h = tf.cast(tf.gather(crop_h, first), tf.int32)
  crop_w = tf.cast(tf.gather(crop_w, first), tf.int32)
  crop_h = tf.clip_by_value(crop_h, 1, height)
  crop_w = tf.clip_by_value(crop_w, 1, width)
  offset_y = tf.random.stateless_uniform([], y_seed, 0, height - crop_h + 1, dtype=tf.int32)
  offset_x = tf.random.stateless_uniform([], x_seed, 0, width - crop_w + 1, dtype=tf.int32)
  window = tf.stack([offset_y, offset_x, crop_h, crop_w])
  return tf.where(tf.reduce_any(valid), window, center_crop_window(image_shape, image_size))


def _resize(image: tf.Tensor, image_size: int, method: str) -> tf.Tensor:
  image = tf.image.resize(image, [image_size, image_size], method=method)
  return tf.clip_by_value(image, 0.0, 255.0)  # Bicubic overshoots.


def _imagenet_train(example: dict[str, tf.Tensor], seed: tf.Tensor,
                    image_size: int) -> dict[str, tf.Tensor]:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  encoded = example["image"]
  window = random_resized_crop_window(tf.image.extract_jpeg_shape(encoded), crop_seed, image_size)
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)  # Decodes only the crop.
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = _resize(image, image_size, "bicubic")
  return {"image": tf.ensure_shape(image, [image_size, image_size, 3]), "label": example["label"]}


def _imagenet_eval(example: dict[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
  encoded = example["image"]
  window = center_crop_window(tf.image.extract_jpeg_shape(encoded), image_size)
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = _resize(image, image_size, "bicubic")
  return {"image": tf.ensure_shape(image, [image_size, image_size, 3]), "label": example["label"]}


def _small_train(example: dict[str, tf.Tensor], seed: tf.Tensor,
                 image_size: int) -> dict[str, tf.Tensor]:
  """Pad-and-crop plus horizontal flip, for 28x28 / 32x32 datasets."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image = example["image"]
  pad = _SMALL_IMAGE_PADDING
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  image = tf.image.stateless_random_crop(padded, image.shape, crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _small_eval({"image": image, "label": example["label"]}, image_size)


def _small_eval(example: dict[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
  image = tf.cast(example["image"], tf.float32)
  if image.shape[:2] != (image_size, image_size):
    image = _resize(image, image_size, "bilinear")
  return {"image": tf.ensure_shape(image, [image_size, image_size, image.shape[-1]]),
          "label": example["label"]}


# ------------------------------------------------------------------------------------------------
# Sources: this process's examples of a split, before decoding.


@dataclasses.dataclass(frozen=True)
class _Source:
  """One process's slice of a split and how to turn its examples into model inputs.

  `read(shuffle_seed)` yields raw examples (encoded images or synthetic indices) in a fixed order
  when shuffle_seed is None, else with files shuffled by that seed. `decode` makes them cacheable
  (decoded pixels for small images; ImageNet stays encoded so decoding can be fused with the
  crop); `train_fn(example, seed)` / `eval_fn(example)` finish them into float32 images.
  """
  read: Callable[[int | None], tf.data.Dataset]
  num_examples: int  # In this process's slice.
  max_num_examples: int  # In the largest slice over all processes.
  decode: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
  train_fn: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]
  eval_fn: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def _even_slice(num_examples: int, index: int, count: int,
                drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of process `index`'s part, split like tfds.even_splits."""
  per_process, remainder = divmod(num_examples, count)
  start, end = per_process * index, per_process * (index + 1)
  if not drop_remainder:
    start += min(index, remainder)
    end += min(index + 1, remainder)
  return start, end


def _no_augmentation(example: dict[str, tf.Tensor],
                     seed: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  del seed  # Noise images need no augmentation.
  return example


def _synthetic_source(config: ml_collections.ConfigDict, train: bool, process_index: int,
                      process_count: int) -> _Source:
  """Uniform-noise images with uniform labels, generated per example from (seed, index)."""
  size = _image_size(config)
  num_classes = config.synthetic_num_classes
  total = config.synthetic_num_examples if train else _synthetic_num_eval_examples(config)
  slices = [_even_slice(total, i, process_count, drop_remainder=train)
            for i in range(process_count)]
  start, end = slices[process_index]
  # Eval indices follow train ones so that the two splits hold different examples.
  offset = 0 if train else config.synthetic_num_examples
  data_seed = tf.constant(_seed_pair(config.seed, "synthetic"), tf.int64)

  def read(shuffle_seed: int | None) -> tf.data.Dataset:
    del shuffle_seed  # Generated in index order; the example shuffle does the rest.
    return tf.data.Dataset.range(offset + start, offset + end).map(lambda i: {"index": i})

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image_seed, label_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(data_seed, example["index"]), num=2))
    image = tf.random.stateless_uniform([size, size, 3], image_seed, 0.0, 255.0)
    label = tf.random.stateless_uniform([], label_seed, 0, num_classes, dtype=tf.int32)
    return {"image": image, "label": label}

  return _Source(
      read=read,
      num_examples=end - start,
      max_num_examples=max(e - s for s, e in slices),
      decode=decode,
      train_fn=_no_augmentation,
      eval_fn=_no_augmentation)


def _tfds_source(config: ml_collections.ConfigDict, train: bool, process_index: int,
                 process_count: int) -> _Source:
  """This process's slice of a prepared TFDS split, read without decoding the images."""
  builder = _builder(config)
  split_name = "train" if train else _EVAL_SPLIT[config.dataset]
  # Train slices are equal (remainder dropped) so every process has the same number of steps;
  # eval slices cover every example, and eval_batches pads the shorter ones.
  splits = [tfds.split_for_jax_process(split_name, process_index=i, process_count=process_count,
                                       drop_remainder=train) for i in range(process_count)]
  counts = [builder.info.splits[split].num_examples for split in splits]
  image_feature = builder.info.features["image"]
  size = _image_size(config)

  def read(shuffle_seed: int | None) -> tf.data.Dataset:
    # No TFDS auto-caching: a new pipeline per epoch would refill it; config.cache decides.
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=_options(),
                                  try_autocache=False, skip_prefetch=True)
    ds = builder.as_dataset(
        split=splits[process_index],
        shuffle_files=shuffle_seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config)
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})

  imagenet = config.dataset == "imagenet2012"

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    if imagenet:
      return example  # Decoding is fused with cropping in _imagenet_train / _imagenet_eval.
    return {"image": image_feature.decode_example(example["image"]), "label": example["label"]}

  return _Source(
      read=read,
      num_examples=counts[process_index],
      max_num_examples=max(counts),
      decode=decode,
      train_fn=functools.partial(_imagenet_train if imagenet else _small_train, image_size=size),
      eval_fn=functools.partial(_imagenet_eval if imagenet else _small_eval, image_size=size))


def _source(config: ml_collections.ConfigDict, train: bool, process_index: int,
            process_count: int) -> _Source:
  if _check_dataset(config) == "synthetic":
    return _synthetic_source(config, train, process_index, process_count)
  return _tfds_source(config, train, process_index, process_count)


# ------------------------------------------------------------------------------------------------
# Pipelines.


def _options() -> tf.data.Options:
  """Deterministic order; few threads, since JAX shares the host's cores."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1  # Parallelism comes from parallel maps.
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


def _seed_pair(*entropy: int | str) -> tuple[int, int]:
  """Two independent non-negative int32-range seeds derived from `entropy` (ints and strings)."""
  words = [int.from_bytes(e.encode(), "little") if isinstance(e, str) else int(e) % 2**64
           for e in entropy]
  state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
  return int(state[0] >> 1), int(state[1] >> 1)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count}).")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int, name: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"config.{name}={global_batch_size} must be a positive multiple of the number of "
        f"processes ({process_count}): each process loads an equal part of every batch.")
  return global_batch_size // process_count


def _hide_gpus_from_tf() -> None:
  """Keeps TensorFlow (input side only) from taking accelerator memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised; nothing to do then.
    pass


def train_batches(config: ml_collections.ConfigDict,
                  *,
                  start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """Endless host-local training batches for global steps start_step, start_step + 1, ...

  Each has config.batch_size // process_count examples of this process's slice; the examples
  of an epoch that do not fill a batch are dropped. The batch of step k is the same whatever
  start_step was, so resuming from a checkpoint replays the data exactly.

  Raises:
    ValueError: bad dataset, batch size not divisible by process_count, or start_step < 0.
  """
  _hide_gpus_from_tf()
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.batch_size, process_count, "batch_size")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  num_steps = steps_per_epoch(config, get_dataset_info(config))
  source = _source(config, True, process_index, process_count)
  buffer_size = max(min(config.shuffle_buffer_size, source.num_examples), 1)
  cached = source.read(None).map(source.decode, tf.data.AUTOTUNE).cache() if config.cache else None

  def synthetic_epoch(epoch: int, skip: int) -> tf.data.Dataset:
    # One global order per epoch; this process makes only its rows of each global batch, so
    # global batch k holds the same examples whatever the process count.
    order = np.random.default_rng(_seed_pair(config.seed, "synthetic order", epoch)).permutation(
        config.synthetic_num_examples)[:num_steps * config.batch_size]
    rows = order.reshape(num_steps, process_count, local_batch)[:, process_index].reshape(-1)
    ds = tf.data.Dataset.from_tensor_slices(rows[skip:]).map(lambda i: {"index": i})
    ds = ds.map(source.decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(local_batch, drop_remainder=True).prefetch(2).with_options(_options())

  def epoch_dataset(epoch: int, skip: int) -> tf.data.Dataset:
    if config.dataset == "synthetic":
      return synthetic_epoch(epoch, skip)
    file_seed, example_seed = _seed_pair(config.seed, "shuffle", epoch, process_index)
    if cached is not None:
      ds = cached.shuffle(buffer_size, seed=example_seed)
    else:
      ds = source.read(file_seed).shuffle(buffer_size, seed=example_seed)
    # Skip consumed examples before the costly decode / augment, and number the rest by their
    # position in the epoch, which (not the resume point) seeds their augmentation.
    ds = ds.skip(skip).enumerate(start=skip)
    epoch_key = tf.constant(_seed_pair(config.seed, "augment", epoch, process_index), tf.int64)

    def preprocess(index: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      if cached is None:
        example = source.decode(example)
      seed = tf.random.experimental.stateless_fold_in(epoch_key, index)
      return source.train_fn(example, seed) if config.augment else source.eval_fn(example)

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def generate() -> Iterator[Batch]:
    epoch, step_in_epoch = divmod(start_step, num_steps)
    while True:
      yield from epoch_dataset(epoch, step_in_epoch * local_batch).as_numpy_iterator()
      epoch, step_in_epoch = epoch + 1, 0

  return generate()


def eval_batches(config: ml_collections.ConfigDict,
                 *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One pass over this process's slice of the eval split, in host-local padded batches.

  Batches have config.eval_batch_size // process_count examples and a 'mask' (1.0 real, 0.0
  padding). Every example of the split is in exactly one process's batches with mask 1, and all
  processes yield the same number of batches (padding with fully masked ones), so collective
  eval steps line up across hosts.

  Raises:
    ValueError: bad dataset, or eval_batch_size not divisible by process_count.
  """
  _hide_gpus_from_tf()
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  image_shape = get_dataset_info(config).image_shape
  source = _source(config, False, process_index, process_count)
  num_batches = -(-source.max_num_examples // local_batch)
  ds = source.read(None)
  ds = ds.map(lambda example: source.eval_fn(source.decode(example)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def pad(batch: Batch) -> Batch:
    num_real = len(batch["label"])
    mask = np.zeros([local_batch], np.float32)
    mask[:num_real] = 1.0
    padded = {"mask": mask}
    for key, shape, dtype in (("image", image_shape, np.float32), ("label", (), np.int32)):
      value = np.zeros((local_batch, *shape), dtype)
      value[:num_real] = batch[key]
      padded[key] = value
    return padded

  def generate() -> Iterator[Batch]:
    num_yielded = 0
    for batch in ds.as_numpy_iterator():
      if num_yielded == num_batches:
        raise RuntimeError(f"The eval split yielded more than the {num_batches} batches expected "
                           "from its size; processes would fall out of step.")
      yield pad(batch)
      num_yielded += 1
    empty = {"image": np.zeros((0, *image_shape), np.float32), "label": np.zeros([0], np.int32)}
    for _ in range(num_batches - num_yielded):
      yield pad(empty)

  return generate()


def shard_and_prefetch(batches: Iterator[Batch],
                       sharding: jax.sharding.Sharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Turns host-local batches into global jax.Arrays, keeping `size` transfers in flight.

  Every process passes its own local batch; `sharding` (e.g. NamedSharding(mesh, P("data")))
  must split only the leading (batch) axis, since it is used for every key. Transfers are
  asynchronous, so with size >= 1 copying the next batches overlaps the current step.
  """
  def to_global(batch: Batch) -> dict[str, jax.Array]:
    return {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in batch.items()}

  queue = collections.deque()
  for batch in batches:
    queue.append(to_global(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
