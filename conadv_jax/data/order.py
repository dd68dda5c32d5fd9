"""The stateless data order: which example, with which augmentation seed, at each position.

Global training batch t is a pure function of (config.seed, t). It is examples [tB, (t+1)B) of
the concatenation of the per-epoch orders, epoch e's order being a permutation seeded by
(seed, e), and every example's augmentation is seeded by its position in that stream. So an
epoch is N / B steps (a float), no example is dropped at an epoch's end, nothing is rebuilt at a
boundary, and a run resumed at step k sees exactly the batches an uninterrupted run sees from
step k on.

Data that every process holds whole (generated, small, or cached) is ordered globally: process
p makes rows [pb, (p+1)b) of every global batch, so batch t is also independent of the process
(and device) count. Data too big for that (ImageNet without cache) is read as one file slice
per process, shuffled within a window seeded by (seed, process, epoch); a resume must then keep
the process count, which `data_order_key` names so that a checkpoint can record it.
"""
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from conadv_jax.data import datasets, input_config


def global_order(spec: datasets.DatasetSpec, cache: bool) -> bool:
  """Whether every process reads the whole train split (else: one file slice per process)."""
  return spec.source == "synthetic" or spec.fits_in_memory or cache


def data_order_key(config: ml_collections.ConfigDict | input_config.InputConfig,
                   info: datasets.DatasetInfo, process_count: int | None = None) -> str | None:
  """None when global batch t holds the same examples for any process count, else the layout.

  The string names the per-process file slices so that the checkpoint can record it and a
  resume with a different layout can be refused.
  """
  if global_order(info.spec, input_config.InputConfig.from_config(config).cache):
    return None
  count = jax.process_count() if process_count is None else process_count
  return f"{info.spec.name}: TFDS file slices over {count} process{'es' if count > 1 else ''}"


def seed_pair(*entropy: int | str) -> tuple[int, int]:
  """Two independent non-negative int32-range seeds derived from `entropy` (ints and strings)."""
  words = [int.from_bytes(e.encode(), "little") if isinstance(e, str) else int(e) % 2**64
           for e in entropy]
  state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
  return int(state[0] >> 1), int(state[1] >> 1)


def example_seed(seed: int, position: tf.Tensor | int, *salt: int) -> tf.Tensor:
  """int64 [2] augmentation seed of the example at `position` of the train stream.

  `position` counts examples over epochs (epoch e, position i: e * N + i for globally ordered
  data); `salt` is the process index for file slices, whose positions are per process. The main
  view uses the seed as is; the augmented view derives its own (augment.aug_view_seeds).
  """
  key = tf.constant(seed_pair(seed, "augment", *salt), tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def global_position(local: tf.Tensor, local_batch: int, process_index: int,
                    process_count: int) -> tf.Tensor:
  """Stream position of this process's `local`-th example: rows [pb, (p+1)b) of each batch."""
  step, row = local // local_batch, local % local_batch
  return step * (local_batch * process_count) + process_index * local_batch + row


def shuffled_index(seed: int, position: tf.Tensor, num_examples: int) -> tf.Tensor:
  """Index in the split of the example at `position` of the concatenated epoch permutations.

  A stateless index shuffle: nothing is materialised and nothing refills at a boundary.
  """
  order_key = tf.constant(seed_pair(seed, "order"), tf.int64)
  epoch, in_epoch = position // num_examples, position % num_examples
  return tf.random.experimental.index_shuffle(
      in_epoch, tf.random.experimental.stateless_fold_in(order_key, epoch), num_examples - 1)


def file_slice_seeds(seed: int, process_index: int,
                     epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(file order seed, shuffle window seed) of one epoch of this process's file slice."""
  key = tf.constant(seed_pair(seed, "shuffle", process_index), tf.int64)
  file_seed, window_seed = tf.unstack(tf.random.experimental.stateless_fold_in(key, epoch))
  return file_seed, window_seed


def even_slice(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of process `index`'s part of a generated eval split (like tfds.even_splits)."""
  per_process, remainder = divmod(num_examples, count)
  start = per_process * index + min(index, remainder)
  return start, start + per_process + (index < remainder)
