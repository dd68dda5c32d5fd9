"""Deterministic, resumable, per-process tf.data input pipelines yielding numpy batches.

Per-dataset facts (splits, sizes, channels, source, augmentation recipe) come from the registry
(`datasets.get_spec`); `get_dataset_info` resolves the prepared data once and the pipelines take
its result. Each process reads only its slice of a split and yields host-local batches;
`shard_and_prefetch` assembles them into global jax.Arrays.

Every source (TFDS or generated) offers one hook, `epoch(epoch, skip)`: this process's examples
of that epoch, preprocessed, in batch order, without the first `skip`. Training batches depend
only on (config.seed, step): every epoch gets shuffle seeds derived from (seed, epoch) and every
example augmentation seeds derived from (seed, epoch, its position in the epoch), so a run resumed
at step k sees exactly the batches an uninterrupted run sees from step k on (for the same process
count; for generated data, global batches do not depend on the process count either).

Batches are dicts of numpy arrays: 'image' float32 raw pixels in [0, 255] (B, H, W, C) (the
model normalises), 'label' int32 (B,), and for eval 'mask' float32 (B,), 0 on padding.
"""
from collections.abc import Callable, Iterator
import collections
import dataclasses
import os
import re

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import augment
from conadv_jax import datasets
from conadv_jax import errors
from conadv_jax import fashion_mnist

Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# Errors a user can fix; each message names the field, file or folder and the fix.


class DataUnavailableError(errors.UserError, ValueError):
  """The dataset is not prepared and cannot be prepared here; the message says how."""


class DataDirError(DataUnavailableError):
  """config.data_dir is not a readable folder."""


class CorruptDataError(DataUnavailableError):
  """A prepared copy of the dataset cannot be read; the message says which folder to delete."""


class DataMismatchError(errors.UserError, ValueError):
  """The prepared data disagrees with its registry entry on classes or channels."""


class InputConfigError(errors.UserError, ValueError):
  """A config field the input pipeline cannot use (batch sizes, image size)."""


# ------------------------------------------------------------------------------------------------
# Dataset resolution.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset, resolved once per run.

  Attributes:
    spec: the registry entry; its num_classes and pixel statistics are what the model uses.
    num_classes: label count of the prepared data (equal to spec.num_classes, checked).
    image_shape: (H, W, C) of model inputs after preprocessing.
    num_train_examples: examples in the prepared train split.
    num_eval_examples: examples in the prepared eval split.
    builder: the prepared TFDS builder (None for generated data), kept so that the pipelines
      neither resolve nor re-read it.
  """
  spec: datasets.DatasetSpec
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: int
  builder: tfds.core.DatasetBuilder | None = dataclasses.field(
      default=None, compare=False, repr=False)


def _image_size(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec) -> int:
  size = config.image_size or spec.native_image_size
  if size <= 0:
    raise InputConfigError(f"config.image_size={config.image_size} is not allowed: use 0 (the "
                           f"dataset's native {spec.native_image_size}) or a positive side.")
  return size


def _check_data_dir(data_dir: str | None) -> None:
  """A local config.data_dir must be a readable folder, or not exist yet (TFDS creates it)."""
  if not data_dir or "://" in data_dir:  # None: TFDS's default. URLs (gs://...): TFDS's business.
    return
  path = os.path.abspath(data_dir)
  existing = path
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is a file" if existing == path else f"is inside {existing}, which is a file"
    raise DataDirError(
        f"config.data_dir={data_dir!r} {what}, not a folder: pass a TFDS data dir (for "
        "fashion_mnist also a folder holding the four IDX .gz files, e.g. "
        f"--config.data_dir={os.path.dirname(existing)} if {os.path.basename(existing)} is one "
        "of them).")
  if existing == path and not os.access(path, os.R_OK | os.X_OK):
    raise DataDirError(
        f"config.data_dir={data_dir!r} is a folder this user cannot read. Make it readable "
        f"(e.g. `chmod u+rx {path}`) or pass another folder.")


def _builder(config: ml_collections.ConfigDict,
             spec: datasets.DatasetSpec) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of a non-generated dataset, preparing it if we can."""
  _check_data_dir(config.data_dir)
  if spec.source == "fashion_mnist":
    try:
      return fashion_mnist.get_builder(config.data_dir)
    except fashion_mnist.FashionMnistUnavailableError as e:
      raise DataUnavailableError(str(e)) from e
  data_dir = config.data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(spec.name, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise  # The registry names a dataset TFDS does not know: a bug, not a user error.
  except Exception as e:  # pylint: disable=broad-except
    # Building reads the metadata of a prepared copy; a corrupt one fails with its parser's error.
    folder = os.path.join(data_dir, spec.name)
    raise CorruptDataError(
        f"The prepared {spec.name} in {folder} cannot be read ({type(e).__name__}: {e}); it is "
        f"corrupt or incomplete. Delete {folder} and {_how_to_prepare(spec, data_dir)}.") from e
  if builder.data_path.exists() and builder.is_prepared():  # exists(): is_prepared() warns.
    return builder
  if spec.manual_download:
    raise DataUnavailableError(
        f"{spec.name} is not prepared in the TFDS data dir {data_dir} (looked for "
        f"{builder.data_path}). TFDS cannot download it: get {spec.manual_download} into "
        f"{data_dir}/downloads/manual, run `tfds build {spec.name} --data_dir={data_dir}`, and "
        f"pass `--config.data_dir={data_dir}`.")
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataUnavailableError(
        f"{spec.name} is not prepared in the TFDS data dir {config.data_dir or '(TFDS default)'} "
        f"and downloading it failed ({type(e).__name__}: {e}). Connect to the internet, or "
        f"prepare it elsewhere with `tfds build {spec.name} --data_dir=DIR`, copy DIR here and "
        "pass `--config.data_dir=DIR`.") from e
  return builder


def _how_to_prepare(spec: datasets.DatasetSpec, data_dir: str) -> str:
  """The end of a 'delete the prepared copy and ...' sentence."""
  if spec.manual_download:
    return f"rebuild it with `tfds build {spec.name} --data_dir={data_dir}`"
  return "run again: it is prepared afresh"


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Resolves config.dataset once: registry entry and prepared data, checked against each other.

  Prepares the data first where that can be done here (fashion_mnist from IDX files, TFDS
  downloads). Pass the result to the pipelines and its `spec` to the model.

  Raises:
    datasets.UnknownDatasetError: config.dataset is not registered.
    DataUnavailableError: the data is not prepared and cannot be, config.data_dir is not a
      readable folder, or a prepared copy is corrupt (the message says what to do).
    fashion_mnist.IdxFormatError: a local Fashion-MNIST IDX file is corrupt.
    DataMismatchError: the prepared data has other classes or channels than the registry says.
    InputConfigError: config.image_size < 0.
  """
  spec = datasets.get_spec(config)
  size = _image_size(config, spec)
  if spec.source == "synthetic":
    return DatasetInfo(
        spec=spec,
        num_classes=spec.num_classes,
        image_shape=(size, size, spec.channels),
        num_train_examples=spec.num_train_examples,
        num_eval_examples=spec.num_eval_examples)
  builder = _builder(config, spec)
  num_classes = builder.info.features["label"].num_classes
  channels = builder.info.features["image"].shape[-1]
  if (num_classes, channels) != (spec.num_classes, spec.channels):
    raise DataMismatchError(
        f"The prepared data in {builder.data_path} has {num_classes} classes and {channels} "
        f"channels, but the registry entry datasets.DATASETS[{spec.name!r}] says "
        f"{spec.num_classes} and {spec.channels}. If that folder holds some other data, delete "
        f"it and run again; if the entry is wrong, fix it in conadv_jax/datasets.py.")
  splits = builder.info.splits
  return DatasetInfo(
      spec=spec,
      num_classes=num_classes,
      image_shape=(size, size, channels),
      num_train_examples=splits[spec.train_split].num_examples,
      num_eval_examples=splits[spec.eval_split].num_examples,
      builder=builder)


def steps_per_epoch(config: ml_collections.ConfigDict, info: DatasetInfo) -> int:
  """Number of global training steps (batches of config.batch_size) in one epoch.

  Raises:
    InputConfigError: the global batch is larger than the training set.
  """
  steps = datasets.steps_per_epoch(config.batch_size, info.num_train_examples)
  if steps < 1:
    raise InputConfigError(
        f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} "
        f"training examples of {config.dataset}; lower it.")
  return steps


# ------------------------------------------------------------------------------------------------
# Sources: this process's examples of a split, one tf.data.Dataset per epoch.


@dataclasses.dataclass(frozen=True)
class _Source:
  """One process's slice of a split.

  `epoch(epoch, skip)` holds the slice's examples of that epoch as model inputs ({'image'
  float32 (H, W, C), 'label' int32}), unbatched, in the order they are batched, without the first
  `skip`. Training examples are shuffled and augmented with seeds from (config.seed, epoch, their
  position), so the result does not depend on `skip` beyond dropping examples; eval examples come
  in one fixed order, unaugmented, whatever the epoch.
  """
  epoch: Callable[[int, int], tf.data.Dataset]
  num_examples: int  # In this process's slice.
  max_num_examples: int  # In the largest slice over all processes.


def _even_slice(num_examples: int, index: int, count: int,
                drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of process `index`'s part, split like tfds.even_splits."""
  per_process, remainder = divmod(num_examples, count)
  start, end = per_process * index, per_process * (index + 1)
  if not drop_remainder:
    start += min(index, remainder)
    end += min(index + 1, remainder)
  return start, end


def _synthetic_source(config: ml_collections.ConfigDict, info: DatasetInfo, train: bool,
                      process_index: int, process_count: int) -> _Source:
  """Uniform-noise images with uniform labels, generated per example from (seed, index)."""
  spec = info.spec
  size, _, channels = info.image_shape
  num_classes = info.num_classes
  total = info.num_train_examples if train else info.num_eval_examples
  slices = [_even_slice(total, i, process_count, drop_remainder=train)
            for i in range(process_count)]
  start, end = slices[process_index]
  # Eval indices follow train ones so that the two splits hold different examples.
  offset = 0 if train else info.num_train_examples
  data_seed = tf.constant(_seed_pair(config.seed, spec.name), tf.int64)

  def example(index: tf.Tensor) -> dict[str, tf.Tensor]:
    image_seed, label_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(data_seed, index), num=2))
    image = tf.random.stateless_uniform([size, size, channels], image_seed, 0.0, 255.0)
    label = tf.random.stateless_uniform([], label_seed, 0, num_classes, dtype=tf.int32)
    return {"image": image, "label": label}

  aug_view = _aug_view(config, info)

  def train_epoch(epoch: int, skip: int) -> tf.data.Dataset:
    # One global order per epoch; this process makes only its rows of each global batch, so
    # global batch k holds the same examples whatever the process count.
    num_steps = steps_per_epoch(config, info)
    local_batch = config.batch_size // process_count
    order = np.random.default_rng(_seed_pair(config.seed, f"{spec.name} order", epoch)).permutation(
        info.num_train_examples)[:num_steps * config.batch_size]
    positions = np.arange(num_steps * config.batch_size).reshape(
        num_steps, process_count, local_batch)[:, process_index].reshape(-1)

    def train_example(index: tf.Tensor, position: tf.Tensor) -> dict[str, tf.Tensor]:
      out = example(index)
      if aug_view is not None:  # Generated data has no crop; its view is the policy alone.
        seed = _example_seed(config, epoch, position)
        out["aug_image"] = tf.cast(aug_view(out, seed), out["image"].dtype)
      return out

    ds = tf.data.Dataset.from_tensor_slices((order[positions][skip:], positions[skip:]))
    return ds.map(train_example, tf.data.AUTOTUNE)

  def eval_epoch(epoch: int, skip: int) -> tf.data.Dataset:
    del epoch  # The same examples every time.
    indices = tf.data.Dataset.range(offset + start + skip, offset + end)
    return indices.map(example, tf.data.AUTOTUNE)

  return _Source(
      epoch=train_epoch if train else eval_epoch,
      num_examples=end - start,
      max_num_examples=max(e - s for s, e in slices))


def _tfds_source(config: ml_collections.ConfigDict, info: DatasetInfo, train: bool,
                 process_index: int, process_count: int) -> _Source:
  """This process's slice of a prepared TFDS split, read without decoding the images."""
  spec, builder = info.spec, info.builder
  split_name = spec.train_split if train else spec.eval_split
  # Train slices are equal (remainder dropped) so every process has the same number of steps;
  # eval slices cover every example, and eval_batches pads the shorter ones.
  splits = [tfds.split_for_jax_process(split_name, process_index=i, process_count=process_count,
                                       drop_remainder=train) for i in range(process_count)]
  counts = [builder.info.splits[split].num_examples for split in splits]
  image_feature = builder.info.features["image"]
  size = info.image_shape[0]
  train_fn = augment.train_fn(spec.augmentation, size)
  eval_fn = augment.eval_fn(spec.augmentation, size)
  aug_view = _aug_view(config, info)

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

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Makes examples cacheable: pixels, except JPEGs whose decoding is fused with the crop."""
    if spec.jpeg_encoded:
      return example
    return {"image": image_feature.decode_example(example["image"]), "label": example["label"]}

  def eval_epoch(epoch: int, skip: int) -> tf.data.Dataset:
    del epoch  # The same examples in the same order every time.
    return read(None).skip(skip).map(lambda ex: eval_fn(decode(ex)), tf.data.AUTOTUNE)

  buffer_size = max(min(config.shuffle_buffer_size, counts[process_index]), 1)
  cached = (read(None).map(decode, tf.data.AUTOTUNE).cache()
            if train and config.cache else None)

  def train_epoch(epoch: int, skip: int) -> tf.data.Dataset:
    file_seed, example_seed = _seed_pair(config.seed, "shuffle", epoch, process_index)
    if cached is not None:
      ds = cached.shuffle(buffer_size, seed=example_seed)
    else:
      ds = read(file_seed).shuffle(buffer_size, seed=example_seed)
    # Skip consumed examples before the costly decode / augment, and number the rest by their
    # position in the epoch, which (not the resume point) seeds their augmentation.
    ds = ds.skip(skip).enumerate(start=skip)

    def preprocess(index: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      if cached is None:
        example = decode(example)
      seed = _example_seed(config, epoch, index, process_index)
      out = train_fn(example, seed) if config.augment else eval_fn(example)
      if aug_view is not None:
        out["aug_image"] = tf.cast(aug_view(example, seed), out["image"].dtype)
      return out

    return ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)

  return _Source(
      epoch=train_epoch if train else eval_epoch,
      num_examples=counts[process_index],
      max_num_examples=max(counts))


def _aug_view(config: ml_collections.ConfigDict,
              info: DatasetInfo) -> Callable[[dict[str, tf.Tensor], tf.Tensor], tf.Tensor] | None:
  """The augmented view of config.aug_branch (None when off): see augment.aug_view_fn."""
  if config.aug_branch == "none":
    return None
  size = info.image_shape[0]
  policy = augment.policy_fn(config.aug_branch, size,
                             randaugment_num_layers=config.randaugment_num_layers,
                             randaugment_magnitude=config.randaugment_magnitude)
  return augment.aug_view_fn(info.spec.augmentation, size, policy)


def _source(config: ml_collections.ConfigDict, info: DatasetInfo, train: bool,
            process_index: int, process_count: int) -> _Source:
  """The source of `info`'s train (or eval) split for one process."""
  make = _synthetic_source if info.spec.source == "synthetic" else _tfds_source
  return make(config, info, train, process_index, process_count)


def _numpy_batches(ds: tf.data.Dataset, info: DatasetInfo) -> Iterator[Batch]:
  """Iterates `ds`, turning read errors of a prepared copy into CorruptDataError."""
  try:
    yield from ds.as_numpy_iterator()
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as e:
    # DataLossError: a record fails its checksum or is cut short. FailedPreconditionError: TFDS
    # found fewer records than its metadata promises (a truncated file).
    if info.builder is None:
      raise
    path = info.builder.data_path
    data_dir = str(path.parent.parent)  # DATA_DIR/NAME/VERSION.
    # Drop TF's "{{function_node ...}}" prefix and "[Op:...]" suffix: the cause is in between.
    cause = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", e.message), flags=re.S)
    raise CorruptDataError(
        f"Reading the prepared {info.spec.name} in {path} failed ({type(e).__name__}: {cause}); "
        f"its files are truncated or corrupt. Delete {path} and "
        f"{_how_to_prepare(info.spec, data_dir)}.") from e


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


def _example_seed(config: ml_collections.ConfigDict, epoch: int, position: tf.Tensor | int,
                  *salt: int) -> tf.Tensor:
  """int64 [2] augmentation seed of the example at `position` of `epoch`'s train order.

  The main view uses it as is; the augmented view derives its own from it
  (augment.aug_view_seeds). `salt` (the process index for sharded TFDS reads) keeps slices apart.
  """
  key = tf.constant(_seed_pair(config.seed, "augment", epoch, *salt), tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count}).")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int, name: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise InputConfigError(
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
                  info: DatasetInfo,
                  *,
                  start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """Endless host-local training batches for global steps start_step, start_step + 1, ...

  Each has config.batch_size // process_count examples of this process's slice; the examples
  of an epoch that do not fill a batch are dropped. The batch of step k is the same whatever
  start_step was, so resuming from a checkpoint replays the data exactly.

  Args:
    config: the run's config (batch_size, seed, shuffle_buffer_size, augment, cache).
    info: `get_dataset_info(config)`.
    start_step: the global step of the first batch.
    process_index: this process (default: jax.process_index()).
    process_count: the number of processes (default: jax.process_count()).

  Raises:
    InputConfigError: batch size not divisible by process_count, or larger than the train split.
    CorruptDataError: (while iterating) the prepared copy of the data cannot be read.
    ValueError: start_step < 0 or process_index out of range.
  """
  _hide_gpus_from_tf()
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.batch_size, process_count, "batch_size")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  num_steps = steps_per_epoch(config, info)
  source = _source(config, info, True, process_index, process_count)

  def generate() -> Iterator[Batch]:
    epoch, step_in_epoch = divmod(start_step, num_steps)
    while True:
      ds = source.epoch(epoch, step_in_epoch * local_batch)
      ds = ds.batch(local_batch, drop_remainder=True)
      num_batches = 0
      for batch in _numpy_batches(ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), info):
        yield batch
        num_batches += 1
      if num_batches != num_steps - step_in_epoch:
        raise RuntimeError(f"Epoch {epoch} yielded {num_batches} batches from step "
                           f"{step_in_epoch}, not the {num_steps - step_in_epoch} expected; "
                           "processes would fall out of step.")
      epoch, step_in_epoch = epoch + 1, 0

  return generate()


def eval_batches(config: ml_collections.ConfigDict,
                 info: DatasetInfo,
                 *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One pass over this process's slice of the eval split, in host-local padded batches.

  Batches have config.eval_batch_size // process_count examples and a 'mask' (1.0 real, 0.0
  padding). Every example of the split is in exactly one process's batches with mask 1, and all
  processes yield the same number of batches (padding with fully masked ones), so collective
  eval steps line up across hosts. Cheap to call at every eval: `info` is not resolved again.

  Raises:
    InputConfigError: eval_batch_size not divisible by process_count.
    CorruptDataError: (while iterating) the prepared copy of the data cannot be read.
  """
  _hide_gpus_from_tf()
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  image_shape = info.image_shape
  source = _source(config, info, False, process_index, process_count)
  num_batches = -(-source.max_num_examples // local_batch)
  ds = source.epoch(0, 0).batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())

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
    for batch in _numpy_batches(ds, info):
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
