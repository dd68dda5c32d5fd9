"""Deterministic, resumable, per-process tf.data input pipelines yielding numpy batches.

Per-dataset facts (splits, sizes, channels, source, augmentation recipe) come from the registry
(`datasets.get_spec`); `get_dataset_info` resolves the prepared data once (process 0 prepares,
the others wait for it) and the pipelines take its result. Each process yields host-local
batches; `shard_and_prefetch` assembles them into global jax.Arrays.

Training is one tf.data pipeline over all epochs. Global batch t is examples [tB, (t+1)B) of the
concatenation of the per-epoch orders, so an epoch is N / B steps (a float) and no example is
dropped at its end. Every order and every augmentation is a function of config.seed and of
positions in that stream, so a run resumed at step k sees exactly the batches an uninterrupted
run sees from step k on. Data that every process holds whole (generated, small, or cached) is
ordered globally, which also makes batch t independent of the process count; ImageNet without
cache is read as one file slice per process (`data_order_key` tells the two apart).

Batches are dicts of numpy arrays: 'image' uint8 raw pixels (B, H, W, C) (the model casts and
normalises on the device: a quarter of float32's bytes), 'label' int32 (B,); train batches also
'aug_image' (like 'image') when config.aug_branch is set; eval batches 'mask' float32 (B,), 0 on
padding, and 'index' int32 (B,), each row's position in the whole eval split.
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

from conadv_jax.data import augment
from conadv_jax.data import datasets
from conadv_jax import errors
from conadv_jax.data import fashion_mnist

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


def published_info(config: ml_collections.ConfigDict) -> datasets.DatasetInfo:
  """The datasets.DatasetInfo the registry's published sizes give, without data: for generated data,
  and for shape-only work (memory estimates, building a preset's state to inspect it)."""
  spec = datasets.get_spec(config)
  size = _image_size(config, spec)
  return datasets.DatasetInfo(spec=spec, num_classes=spec.num_classes,
                     image_shape=(size, size, spec.channels),
                     num_train_examples=spec.num_train_examples,
                     num_eval_examples=spec.num_eval_examples)


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


class _NotPreparedError(Exception):
  """_builder(prepare=False) found no prepared copy."""


def _builder(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
             prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of a non-generated dataset, preparing it if we can.

  Raises:
    _NotPreparedError: prepare=False and the data is not prepared.
  """
  _check_data_dir(config.data_dir)
  if spec.source == "fashion_mnist":
    try:
      return fashion_mnist.get_builder(config.data_dir, prepare=prepare)
    except fashion_mnist.FashionMnistNotPreparedError as e:
      raise _NotPreparedError(str(e)) from e
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
  if not prepare:
    raise _NotPreparedError(f"{spec.name} is not prepared in the TFDS data dir {data_dir}.")
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


def _process_0_outcome(ok: bool) -> bool:
  """A barrier: every process blocks until process 0 gets here; returns process 0's `ok`.

  Process 0 passes whether it prepared the data; the others' values are ignored. A collective
  (not a file to poll) so that process 0's failure releases the others at once.
  """
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _prepared_builder(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                      process_index: int, process_count: int) -> tfds.core.DatasetBuilder:
  """The prepared builder; only process 0 prepares (downloads, converts), the others wait.

  Two processes preparing the same data_dir at once would write the same folders.
  """
  if process_count == 1:
    return _builder(config, spec)
  if process_index == 0:
    try:
      builder = _builder(config, spec)
    except BaseException:
      _process_0_outcome(False)  # Release the others; they stop with a pointer to this error.
      raise
    _process_0_outcome(True)
    return builder
  if not _process_0_outcome(False):
    raise DataUnavailableError(
        f"Process 0 could not prepare {spec.name} (its log says why); this is process "
        f"{process_index}. Fix what process 0 reports and start all processes again.")
  try:
    return _builder(config, spec, prepare=False)
  except _NotPreparedError as e:
    data_dir = config.data_dir or tfds.core.constants.DATA_DIR
    raise DataUnavailableError(
        f"Process 0 prepared {spec.name} in the TFDS data dir {data_dir}, but process "
        f"{process_index} does not find it there ({e}). Every process must read the same "
        "data_dir: pass --config.data_dir=DIR on a file system all hosts share (or a gs:// "
        "bucket), or prepare the data on every host before the run (e.g. one single-process "
        "run per host).") from e


def get_dataset_info(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                     process_count: int | None = None) -> datasets.DatasetInfo:
  """Resolves config.dataset once: registry entry and prepared data, checked against each other.

  Prepares the data first where that can be done here (fashion_mnist from IDX files, TFDS
  downloads): on process 0 only, while the others wait at a barrier, then read what it
  prepared. Every process must call this (it holds a collective in multi-process runs). Pass
  the result to the pipelines and its `spec` to the model.

  Args:
    config: the run's config.
    process_index: this process (default: jax.process_index()).
    process_count: the number of processes (default: jax.process_count()).

  Raises:
    datasets.UnknownDatasetError: config.dataset is not registered.
    DataUnavailableError: the data is not prepared and cannot be, config.data_dir is not a
      readable folder, or a prepared copy is corrupt (the message says what to do); on a
      process other than 0: process 0 failed to prepare it, or what it prepared is not visible
      here.
    fashion_mnist.IdxFormatError: a local Fashion-MNIST IDX file is corrupt.
    DataMismatchError: the prepared data has other classes or channels than the registry says.
    InputConfigError: config.image_size < 0.
  """
  spec = datasets.get_spec(config)
  if spec.source == "synthetic":
    return published_info(config)
  size = _image_size(config, spec)
  builder = _prepared_builder(config, spec, *_process(process_index, process_count))
  num_classes = builder.info.features["label"].num_classes
  channels = builder.info.features["image"].shape[-1]
  if (num_classes, channels) != (spec.num_classes, spec.channels):
    raise DataMismatchError(
        f"The prepared data in {builder.data_path} has {num_classes} classes and {channels} "
        f"channels, but the registry entry datasets.DATASETS[{spec.name!r}] says "
        f"{spec.num_classes} and {spec.channels}. If that folder holds some other data, delete "
        f"it and run again; if the entry is wrong, fix it in conadv_jax/data/datasets.py.")
  splits = builder.info.splits
  return datasets.DatasetInfo(
      spec=spec,
      num_classes=num_classes,
      image_shape=(size, size, channels),
      num_train_examples=splits[spec.train_split].num_examples,
      num_eval_examples=splits[spec.eval_split].num_examples,
      builder=builder)


# ------------------------------------------------------------------------------------------------
# The data order.


def data_order_key(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                   process_count: int | None = None) -> str | None:
  """None when global batch t holds the same examples for any process count, else the layout.

  Generated data, datasets whose registry entry says they fit in memory and any dataset with
  config.cache = True are read whole by every process and ordered globally, so the order does
  not depend on the process (or device) count. Other TFDS datasets (ImageNet without cache) are
  read as one file slice per process, shuffled within it; a resume must then use the same
  process count, and the string names that layout so that the checkpoint can record it and a
  resume with a different one can be refused.
  """
  if _global_order(config, info):
    return None
  _, count = _process(None, process_count)
  return f"{info.spec.name}: TFDS file slices over {count} process{'es' if count > 1 else ''}"


def _global_order(config: ml_collections.ConfigDict, info: datasets.DatasetInfo) -> bool:
  return info.spec.source == "synthetic" or info.spec.fits_in_memory or config.cache


# ------------------------------------------------------------------------------------------------
# Examples: what the pipelines read, before preprocessing.


def _even_slice(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of process `index`'s part of a generated eval split (like tfds.even_splits)."""
  per_process, remainder = divmod(num_examples, count)
  start = per_process * index + min(index, remainder)
  return start, start + per_process + (index < remainder)


def _synthetic_example(config: ml_collections.ConfigDict,
                       info: datasets.DatasetInfo) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """example(index): uniform uint8 noise and a uniform label, generated from (seed, index)."""
  size, _, channels = info.image_shape
  num_classes = info.num_classes
  data_seed = tf.constant(_seed_pair(config.seed, info.spec.name), tf.int64)

  def example(index: tf.Tensor) -> dict[str, tf.Tensor]:
    image_seed, label_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(data_seed, tf.cast(index, tf.int64)), num=2))
    image = tf.random.stateless_uniform([size, size, channels], image_seed, 0, 256, tf.int32)
    label = tf.random.stateless_uniform([], label_seed, 0, num_classes, dtype=tf.int32)
    return {"image": tf.cast(image, tf.uint8), "label": label}

  return example


def _decode_fn(info: datasets.DatasetInfo) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """Stored example -> {'image': pixels (JPEGs stay encoded: decoded with the crop), 'label'}."""
  image_feature = info.builder.info.features["image"]

  def decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = example["image"]
    if not info.spec.jpeg_encoded:
      image = image_feature.decode_example(image)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  return decode


def _read_config(shuffle_seed: int | None = None) -> tfds.ReadConfig:
  # No TFDS auto-caching and no prefetch: the pipelines decide both.
  return tfds.ReadConfig(shuffle_seed=shuffle_seed, options=_options(), try_autocache=False,
                         skip_prefetch=True)


def _tfds_split(info: datasets.DatasetInfo, split: str) -> tf.data.Dataset:
  """A TFDS split (name or slice) of decodable examples, in the prepared order."""
  return info.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()},
                                 read_config=_read_config()).map(_decode_fn(info),
                                                                 tf.data.AUTOTUNE)


def _load_train_split(info: datasets.DatasetInfo) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """example(index) from the whole train split, read once into this process's memory.

  Pixels for decoded datasets, encoded bytes for JPEGs. Read in the prepared files' order,
  which is the same on every process, so that an index means the same example everywhere.
  """
  batches = list(_numpy_batches(
      _tfds_split(info, info.spec.train_split).batch(4096).prefetch(2), info))
  images = tf.constant(np.concatenate([b["image"] for b in batches]))
  labels = tf.constant(np.concatenate([b["label"] for b in batches]))
  if len(labels) != info.num_train_examples:
    raise CorruptDataError(
        f"The prepared {info.spec.name} in {info.builder.data_path} has {len(labels)} train "
        f"examples, but its metadata says {info.num_train_examples}; its files are truncated or "
        f"corrupt. Delete it and {_how_to_prepare(info.spec, _data_dir(info))}.")

  def example(index: tf.Tensor) -> dict[str, tf.Tensor]:
    return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}

  return example


# ------------------------------------------------------------------------------------------------
# Preprocessing.


def _example_seed(config: ml_collections.ConfigDict, position: tf.Tensor | int,
                  *salt: int) -> tf.Tensor:
  """int64 [2] augmentation seed of the example at `position` of the train stream.

  `position` counts examples over epochs (epoch e, position i: e * N + i for globally ordered
  data); `salt` is the process index for file slices, whose positions are per process. The main
  view uses the seed as is; the augmented view derives its own (augment.aug_view_seeds).
  """
  key = tf.constant(_seed_pair(config.seed, "augment", *salt), tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def _aug_view(config: ml_collections.ConfigDict,
              info: datasets.DatasetInfo) -> Callable[[dict[str, tf.Tensor], tf.Tensor], tf.Tensor] | None:
  """The augmented view of config.aug_branch (None when off): see augment.aug_view_fn."""
  if config.aug_branch == "none":
    return None
  size = info.image_shape[0]
  policy = augment.policy_fn(config.aug_branch, size,
                             randaugment_num_layers=config.randaugment_num_layers,
                             randaugment_magnitude=config.randaugment_magnitude)
  return augment.aug_view_fn(info.spec.augmentation, size, policy)


def _train_preprocess(config: ml_collections.ConfigDict, info: datasets.DatasetInfo
                      ) -> Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]:
  """preprocess(example, seed) -> model inputs: uint8 'image', int32 'label', 'aug_image'."""
  size = info.image_shape[0]
  train_fn = augment.train_fn(info.spec.augmentation, size)
  eval_fn = augment.eval_fn(info.spec.augmentation, size)
  aug_view = _aug_view(config, info)

  def preprocess(example: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    main = train_fn(example, seed) if config.augment else eval_fn(example)
    out = {"image": augment.to_uint8(main["image"]), "label": main["label"]}
    if aug_view is not None:
      out["aug_image"] = aug_view(example, seed)
    return out

  return preprocess


def _eval_preprocess(info: datasets.DatasetInfo) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  eval_fn = augment.eval_fn(info.spec.augmentation, info.image_shape[0])

  def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = eval_fn(example)
    return {"image": augment.to_uint8(out["image"]), "label": out["label"]}

  return preprocess


# ------------------------------------------------------------------------------------------------
# The train stream: this process's examples, one dataset over all epochs.


def _train_examples(config: ml_collections.ConfigDict, info: datasets.DatasetInfo, process_index: int,
                    process_count: int, first: int) -> tf.data.Dataset:
  """This process's preprocessed train examples from its `first` on, in batch order, endless."""
  if _global_order(config, info):
    return _globally_ordered(config, info, process_index, process_count, first)
  return _file_slices(config, info, process_index, process_count, first)


def _globally_ordered(config: ml_collections.ConfigDict, info: datasets.DatasetInfo, process_index: int,
                      process_count: int, first: int) -> tf.data.Dataset:
  """Global batch t = examples [tB, (t+1)B) of the concatenated per-epoch permutations.

  Epoch e's order is a permutation of the whole split seeded by (seed, e) (a stateless index
  shuffle: nothing is materialised, nothing refills at a boundary). This process makes rows
  [pb, (p+1)b) of every global batch, so the batches do not depend on the process count, and
  every example's augmentation is seeded by its global position, not by the process.
  """
  num_examples = info.num_train_examples
  global_batch, local_batch = config.batch_size, config.batch_size // process_count
  order_key = tf.constant(_seed_pair(config.seed, "order"), tf.int64)
  example = (_synthetic_example(config, info) if info.spec.source == "synthetic"
             else _load_train_split(info))
  preprocess = _train_preprocess(config, info)

  def make(local: tf.Tensor) -> dict[str, tf.Tensor]:
    step, row = local // local_batch, local % local_batch
    position = step * global_batch + process_index * local_batch + row
    epoch, in_epoch = position // num_examples, position % num_examples
    index = tf.random.experimental.index_shuffle(
        in_epoch, tf.random.experimental.stateless_fold_in(order_key, epoch), num_examples - 1)
    return preprocess(example(index), _example_seed(config, position))

  return tf.data.Dataset.counter(first).map(make, tf.data.AUTOTUNE)


def _file_slices(config: ml_collections.ConfigDict, info: datasets.DatasetInfo, process_index: int,
                 process_count: int, first: int) -> tf.data.Dataset:
  """Each process's own slice of the split's files, each epoch reshuffled within a window.

  For data too big for every process to hold (ImageNet without cache). Epoch e reads the
  slice's files in an order seeded by (seed, process, e), interleaved, through a shuffle window
  of config.shuffle_buffer_size; epochs follow one another in one dataset whose next two epochs
  are opened (files, window filled) in the background while the current one is consumed, so up
  to three windows are in memory (test_file_slices_open_the_next_epoch_before_the_current_one_ends
  checks it). The
  slices are equal (tfds.split_for_jax_process, remainder dropped), so every process has the
  same number of examples per epoch.
  """
  builder, spec = info.builder, info.spec
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
    raise InputConfigError(
        f"{spec.name} in {builder.data_path} is stored as {builder.info.file_format.value}; "
        "reading file slices needs TFRecord files. Set --config.cache=True, or rebuild it with "
        f"`tfds build {spec.name} --file_format=tfrecord`.")
  split = tfds.split_for_jax_process(spec.train_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  instructions = builder.info.splits[split].file_instructions
  names = [str(fi.filename) for fi in instructions]
  skips = [fi.skip for fi in instructions]
  takes = [fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip for fi in instructions]
  per_epoch = sum(takes)
  features = builder.info.features
  decode = _decode_fn(info)
  preprocess = _train_preprocess(config, info)
  shuffle_key = tf.constant(_seed_pair(config.seed, "shuffle", process_index), tf.int64)
  window = max(min(config.shuffle_buffer_size, per_epoch), 1)

  def read(name: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
    records = tf.data.TFRecordDataset(name).skip(skip).take(take)
    # A shard shorter than its metadata says fails here (CorruptDataError), instead of
    # shortening the epoch without a word.
    return records.apply(tf.data.experimental.assert_cardinality(take))

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    file_seed, window_seed = tf.unstack(tf.random.experimental.stateless_fold_in(
        shuffle_key, epoch))
    files = tf.data.Dataset.from_tensor_slices(
        (names, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64)))
    files = files.shuffle(len(names), seed=file_seed, reshuffle_each_iteration=False)
    records = files.interleave(read, cycle_length=min(len(names), 16),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records.shuffle(window, seed=window_seed, reshuffle_each_iteration=False)

  first_epoch, skip = divmod(first, per_epoch)
  # Parallel with one cycle: the iterators of the next 2 epochs (tf.data prefetches 2 input
  # elements per cycle slot) are made and their windows filled ahead of time.
  records = tf.data.Dataset.counter(first_epoch).interleave(
      epoch_records, cycle_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Skip consumed examples before the costly parse / decode / augment.
  positions = records.skip(skip).enumerate(start=first)

  def make(position: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
    example = features.deserialize_example(
        record, decoders={"image": tfds.decode.SkipDecoding()})
    return preprocess(decode(example), _example_seed(config, position, process_index))

  return positions.map(make, tf.data.AUTOTUNE)


def _data_dir(info: datasets.DatasetInfo) -> str:
  return str(info.builder.data_path.parent.parent)  # DATA_DIR/NAME/VERSION.


def _numpy_batches(ds: tf.data.Dataset, info: datasets.DatasetInfo) -> Iterator[Batch]:
  """Iterates `ds`, turning read errors of a prepared copy into CorruptDataError."""
  try:
    yield from ds.as_numpy_iterator()
  except GeneratorExit:
    # An unfinished stream closed at interpreter exit, when `tf` may already be torn down:
    # leave before the next clause looks up tf.errors (a noisy AttributeError otherwise).
    raise
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as e:
    # DataLossError: a record fails its checksum or is cut short. FailedPreconditionError: fewer
    # records than the metadata promises (a truncated file).
    if info.builder is None:
      raise
    path = info.builder.data_path
    # Drop TF's "{{function_node ...}}" prefix and "[Op:...]" suffix: the cause is in between.
    cause = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", e.message), flags=re.S)
    raise CorruptDataError(
        f"Reading the prepared {info.spec.name} in {path} failed ({type(e).__name__}: {cause}); "
        f"its files are truncated or corrupt. Delete {path} and "
        f"{_how_to_prepare(info.spec, _data_dir(info))}.") from e


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
                  info: datasets.DatasetInfo,
                  *,
                  start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """Endless host-local training batches for global steps start_step, start_step + 1, ...

  One tf.data pipeline over all epochs: nothing is rebuilt at an epoch boundary and no example
  is dropped there (a batch may hold the end of one epoch and the start of the next). Each batch
  has config.batch_size // process_count rows: 'image' uint8 (b, H, W, C), 'label' int32 (b,)
  and, with config.aug_branch, 'aug_image' like 'image'. The batch of step k is the same
  whatever start_step was, so resuming from a checkpoint replays the data exactly; see
  `data_order_key` for when it is also the same whatever the process count.

  Args:
    config: the run's config (batch_size, seed, shuffle_buffer_size, augment, aug_branch and
      its parameters, cache).
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
  if config.batch_size > info.num_train_examples:
    raise InputConfigError(
        f"config.batch_size={config.batch_size} is larger than the {info.num_train_examples} "
        f"training examples of {config.dataset}; lower it.")

  def generate() -> Iterator[Batch]:
    # Built at the first next(), so that reading a split into memory happens while iterating.
    ds = _train_examples(config, info, process_index, process_count, start_step * local_batch)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from _numpy_batches(ds.with_options(_options()), info)

  return generate()


def eval_batches(config: ml_collections.ConfigDict,
                 info: datasets.DatasetInfo,
                 *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One pass over this process's slice of the eval split, in host-local batches with a mask.

  Batches have config.eval_batch_size // process_count rows: 'image' uint8, 'label' int32,
  'mask' float32 (1.0 real, 0.0 padding) and 'index' int32, each row's position in the whole
  split (the same for any process count, so the eval attacks' keys are too; padding rows carry
  positions past their slice). Only a short batch is padded (the last of a slice, and
  the empty ones a process with a shorter slice adds so that all processes yield the same
  number of batches and collective eval steps line up). Every example of the split is in
  exactly one process's batches with mask 1. Cheap to call at every eval: `info` is not
  resolved again.

  Raises:
    InputConfigError: eval_batch_size not divisible by process_count.
    CorruptDataError: (while iterating) the prepared copy of the data cannot be read.
  """
  _hide_gpus_from_tf()
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  image_shape = info.image_shape
  if info.spec.source == "synthetic":
    slices = [_even_slice(info.num_eval_examples, i, process_count) for i in range(process_count)]
    sizes = [end - start for start, end in slices]
    # Eval indices follow train ones so that the two splits hold different examples.
    start, end = (bound + info.num_train_examples for bound in slices[process_index])
    examples = tf.data.Dataset.range(start, end).map(_synthetic_example(config, info),
                                                     tf.data.AUTOTUNE)
  else:
    splits = [tfds.split_for_jax_process(info.spec.eval_split, process_index=i,
                                         process_count=process_count, drop_remainder=False)
              for i in range(process_count)]
    sizes = [info.builder.info.splits[split].num_examples for split in splits]
    examples = _tfds_split(info, splits[process_index])
  num_batches = -(-max(sizes) // local_batch)
  first_index = sum(sizes[:process_index])  # Slices are contiguous, in process order.
  ds = examples.map(_eval_preprocess(info), tf.data.AUTOTUNE).batch(local_batch)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def pad(batch: Batch, position: int) -> Batch:
    num_real = len(batch["label"])
    mask = np.zeros([local_batch], np.float32)
    mask[:num_real] = 1.0
    index = np.arange(first_index + position, first_index + position + local_batch,
                      dtype=np.int32)
    if num_real == local_batch:
      return {**batch, "mask": mask, "index": index}
    padded = {"mask": mask, "index": index}
    for key, shape, dtype in (("image", image_shape, np.uint8), ("label", (), np.int32)):
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
      yield pad(batch, num_yielded * local_batch)
      num_yielded += 1
    empty = {"image": np.zeros((0, *image_shape), np.uint8), "label": np.zeros([0], np.int32)}
    for position in range(num_yielded, num_batches):
      yield pad(empty, position * local_batch)

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
