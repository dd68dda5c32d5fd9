"""The train stream: this process's preprocessed examples in batch order, over all epochs.

Which example comes where is `order`'s business; this module reads them in that order, either
from a split every process holds whole or from this process's slice of the split's files.
"""
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax import errors
from conadv_jax.data import datasets, examples, input_config, order


def train_examples(cfg: input_config.InputConfig, info: datasets.DatasetInfo, process_index: int,
                   process_count: int, first: int) -> tf.data.Dataset:
  """This process's preprocessed train examples from its `first` on, in batch order, endless."""
  if order.global_order(info.spec, cfg.cache):
    return _globally_ordered(cfg, info, process_index, process_count, first)
  return _file_slices(cfg, info, process_index, process_count, first)


def _globally_ordered(cfg: input_config.InputConfig, info: datasets.DatasetInfo,
                      process_index: int, process_count: int, first: int) -> tf.data.Dataset:
  """This process's rows of every global batch, from a split it holds whole."""
  num_examples = info.num_train_examples
  local_batch = cfg.batch_size // process_count
  example = (examples.synthetic_example(cfg.seed, info) if info.spec.source == "synthetic"
             else examples.load_train_split(info))
  preprocess = examples.train_preprocess(cfg, info)

  def make(local: tf.Tensor) -> examples.Example:
    position = order.global_position(local, local_batch, process_index, process_count)
    index = order.shuffled_index(cfg.seed, position, num_examples)
    return preprocess(example(index), order.example_seed(cfg.seed, position))

  return tf.data.Dataset.counter(first).map(make, tf.data.AUTOTUNE)


def _file_slices(cfg: input_config.InputConfig, info: datasets.DatasetInfo, process_index: int,
                 process_count: int, first: int) -> tf.data.Dataset:
  """Each process's own slice of the split's files, each epoch reshuffled within a window.

  For data too big for every process to hold (ImageNet without cache). Epoch e reads the
  slice's files in an order seeded by (seed, process, e), interleaved, through a shuffle window
  of config.shuffle_buffer_size; epochs follow one another in one dataset whose next two epochs
  are opened (files, window filled) in the background while the current one is consumed, so up
  to three windows are in memory (test_file_slices_open_the_next_epoch_before_the_current_one_ends
  checks it). The slices are equal (tfds.split_for_jax_process, remainder dropped), so every
  process has the same number of examples per epoch.
  """
  names, skips, takes = _slice_files(info, process_index, process_count)
  per_epoch = sum(takes)
  features = info.builder.info.features
  decode = examples.decode_fn(info)
  preprocess = examples.train_preprocess(cfg, info)
  window = max(min(cfg.shuffle_buffer_size, per_epoch), 1)

  def read(name: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
    records = tf.data.TFRecordDataset(name).skip(skip).take(take)
    # A shard shorter than its metadata says fails here (CorruptDataError), instead of
    # shortening the epoch without a word.
    return records.apply(tf.data.experimental.assert_cardinality(take))

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    file_seed, window_seed = order.file_slice_seeds(cfg.seed, process_index, epoch)
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

  def make(position: tf.Tensor, record: tf.Tensor) -> examples.Example:
    example = features.deserialize_example(
        record, decoders={"image": tfds.decode.SkipDecoding()})
    return preprocess(decode(example), order.example_seed(cfg.seed, position, process_index))

  return positions.map(make, tf.data.AUTOTUNE)


def _slice_files(info: datasets.DatasetInfo, process_index: int,
                 process_count: int) -> tuple[list[str], list[int], list[int]]:
  """(file names, records to skip, records to take) of this process's slice of the train split."""
  builder, spec = info.builder, info.spec
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
    raise errors.ConfigError(
        f"{spec.name} in {builder.data_path} is stored as {builder.info.file_format.value}; "
        "reading file slices needs TFRecord files. Set --config.cache=True, or rebuild it with "
        f"`tfds build {spec.name} --file_format=tfrecord`.")
  split = tfds.split_for_jax_process(spec.train_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  instructions = builder.info.splits[split].file_instructions
  names = [str(fi.filename) for fi in instructions]
  skips = [fi.skip for fi in instructions]
  takes = [fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip for fi in instructions]
  return names, skips, takes
