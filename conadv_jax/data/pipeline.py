"""Per-process tf.data train and eval pipelines yielding numpy batches, and their device feed.

Each process yields host-local batches of `Batch` (dicts of numpy arrays); `shard_and_prefetch`
assembles them into global jax.Arrays. 'image' is uint8 raw pixels (B, H, W, C) (the model casts
and normalises on the device: a quarter of float32's bytes), 'label' int32 (B,); train batches
also have 'aug_image' (like 'image') when config.aug_branch is set; eval batches 'mask' float32
(B,), 0 on padding, and 'index' int32 (B,), each row's position in the whole eval split. Which
examples a train batch holds is `order`'s business.
"""
from collections.abc import Iterator
import collections

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import errors
from conadv_jax.data import datasets, examples, input_config, order, prepare, train_stream

Batch = examples.Batch
Config = ml_collections.ConfigDict | input_config.InputConfig


def _local_batch_size(global_batch_size: int, process_count: int, name: str) -> int:
  errors.check_value(name, global_batch_size, lambda v: v > 0 and v % process_count == 0,
                     f"it must be a positive multiple of the number of processes "
                     f"({process_count}): each process loads an equal part of every batch")
  return global_batch_size // process_count


def _hide_gpus_from_tf() -> None:
  """Keeps TensorFlow (input side only) from taking accelerator memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised; nothing to do then.
    pass


def train_batches(config: Config,
                  info: datasets.DatasetInfo,
                  *,
                  start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """Endless host-local training batches for global steps start_step, start_step + 1, ...

  Each batch has config.batch_size // process_count rows: 'image' uint8 (b, H, W, C), 'label'
  int32 (b,) and, with config.aug_branch, 'aug_image' like 'image'. The batch of step k is the
  one `order` assigns to k whatever start_step was, so a resume replays the data exactly.

  Args:
    config: the run's config (its data fields; see input_config.InputConfig).
    info: `get_dataset_info(config)`.
    start_step: the global step of the first batch.
    process_index: this process (default: jax.process_index()).
    process_count: the number of processes (default: jax.process_count()).

  Raises:
    errors.ConfigError: a data field is invalid, or the batch size is not divisible
      by process_count or is larger than the train split.
    prepare.CorruptDataError: (while iterating) the prepared copy of the data cannot be read.
    ValueError: start_step < 0 or process_index out of range.
  """
  cfg = input_config.InputConfig.from_config(config)
  _hide_gpus_from_tf()
  process_index, process_count = prepare.process(process_index, process_count)
  local_batch = _local_batch_size(cfg.batch_size, process_count, "batch_size")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  errors.check_value("batch_size", cfg.batch_size, lambda v: v <= info.num_train_examples,
                     f"it exceeds the {info.num_train_examples} training examples of "
                     f"{cfg.dataset}; lower it")

  def generate() -> Iterator[Batch]:
    # Built at the first next(), so that reading a split into memory happens while iterating.
    ds = train_stream.train_examples(cfg, info, process_index, process_count,
                                     start_step * local_batch)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from examples.numpy_batches(ds.with_options(examples.dataset_options()), info)

  return generate()


def eval_batches(config: Config,
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
    errors.ConfigError: a data field is invalid, or eval_batch_size is not divisible
      by process_count.
    prepare.CorruptDataError: (while iterating) the prepared copy of the data cannot be read.
  """
  cfg = input_config.InputConfig.from_config(config)
  _hide_gpus_from_tf()
  process_index, process_count = prepare.process(process_index, process_count)
  local_batch = _local_batch_size(cfg.eval_batch_size, process_count, "eval_batch_size")
  split, sizes = _eval_slice(cfg.seed, info, process_index, process_count)
  num_batches = -(-max(sizes) // local_batch)
  first_index = sum(sizes[:process_index])  # Slices are contiguous, in process order.
  ds = split.map(examples.eval_preprocess(info), tf.data.AUTOTUNE).batch(local_batch)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(examples.dataset_options())
  empty = {"image": np.zeros((0, *info.image_shape), np.uint8), "label": np.zeros([0], np.int32)}

  def generate() -> Iterator[Batch]:
    num_yielded = 0
    for batch in examples.numpy_batches(ds, info):
      if num_yielded == num_batches:
        raise RuntimeError(f"The eval split yielded more than the {num_batches} batches expected "
                           "from its size; processes would fall out of step.")
      yield _pad(batch, local_batch, first_index + num_yielded * local_batch)
      num_yielded += 1
    for position in range(num_yielded, num_batches):
      yield _pad(empty, local_batch, first_index + position * local_batch)

  return generate()


def _eval_slice(seed: int, info: datasets.DatasetInfo, process_index: int,
                process_count: int) -> tuple[tf.data.Dataset, list[int]]:
  """This process's contiguous slice of the eval split, and the sizes of every process's."""
  if info.spec.source == "synthetic":
    slices = [order.even_slice(info.num_eval_examples, i, process_count)
              for i in range(process_count)]
    # Eval indices follow train ones so that the two splits hold different examples.
    start, end = (bound + info.num_train_examples for bound in slices[process_index])
    split = tf.data.Dataset.range(start, end).map(examples.synthetic_example(seed, info),
                                                  tf.data.AUTOTUNE)
    return split, [end - start for start, end in slices]
  splits = [tfds.split_for_jax_process(info.spec.eval_split, process_index=i,
                                       process_count=process_count, drop_remainder=False)
            for i in range(process_count)]
  sizes = [info.builder.info.splits[split].num_examples for split in splits]
  return examples.tfds_split(info, splits[process_index]), sizes


def _pad(batch: Batch, local_batch: int, first: int) -> Batch:
  """`batch` padded to local_batch rows, with 'mask' and 'index' (positions from `first` on)."""
  num_real = len(batch["label"])
  mask = np.zeros([local_batch], np.float32)
  mask[:num_real] = 1.0
  index = np.arange(first, first + local_batch, dtype=np.int32)
  if num_real == local_batch:
    return {**batch, "mask": mask, "index": index}
  padded = {"mask": mask, "index": index}
  for key in ("image", "label"):
    value = np.zeros((local_batch, *batch[key].shape[1:]), batch[key].dtype)
    value[:num_real] = batch[key]
    padded[key] = value
  return padded


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
