"""Examples as the pipelines read them: generated, read from TFDS, and preprocessed.

Stored examples come from the prepared builder in `datasets.DatasetInfo`; generated ones are a
function of (seed, index). Preprocessing turns an example into model inputs: uint8 'image',
int32 'label' and, for training with config.aug_branch, 'aug_image'.
"""
from collections.abc import Callable, Iterator
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from conadv_jax.data import augment, datasets, input_config, order, prepare

Batch = dict[str, np.ndarray]
Example = dict[str, tf.Tensor]


def dataset_options() -> tf.data.Options:
  """Deterministic order; few threads, since JAX shares the host's cores."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1  # Parallelism comes from parallel maps.
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


def synthetic_example(seed: int, info: datasets.DatasetInfo) -> Callable[[tf.Tensor], Example]:
  """example(index): uniform uint8 noise and a uniform label, generated from (seed, index)."""
  size, _, channels = info.image_shape
  num_classes = info.num_classes
  data_seed = tf.constant(order.seed_pair(seed, info.spec.name), tf.int64)

  def example(index: tf.Tensor) -> Example:
    image_seed, label_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(data_seed, tf.cast(index, tf.int64)), num=2))
    image = tf.random.stateless_uniform([size, size, channels], image_seed, 0, 256, tf.int32)
    label = tf.random.stateless_uniform([], label_seed, 0, num_classes, dtype=tf.int32)
    return {"image": tf.cast(image, tf.uint8), "label": label}

  return example


def decode_fn(info: datasets.DatasetInfo) -> Callable[[Example], Example]:
  """Stored example -> {'image': pixels (JPEGs stay encoded: decoded with the crop), 'label'}."""
  image_feature = info.builder.info.features["image"]

  def decode(example: Example) -> Example:
    image = example["image"]
    if not info.spec.jpeg_encoded:
      image = image_feature.decode_example(image)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  return decode


def tfds_split(info: datasets.DatasetInfo, split: str) -> tf.data.Dataset:
  """A TFDS split (name or slice) of decodable examples, in the prepared order."""
  # No TFDS auto-caching and no prefetch: the pipelines decide both.
  read_config = tfds.ReadConfig(options=dataset_options(), try_autocache=False, skip_prefetch=True)
  return info.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()},
                                 read_config=read_config).map(decode_fn(info), tf.data.AUTOTUNE)


def load_train_split(info: datasets.DatasetInfo) -> Callable[[tf.Tensor], Example]:
  """example(index) from the whole train split, read once into this process's memory.

  Pixels for decoded datasets, encoded bytes for JPEGs. Read in the prepared files' order,
  which is the same on every process, so that an index means the same example everywhere.
  """
  batches = list(numpy_batches(
      tfds_split(info, info.spec.train_split).batch(4096).prefetch(2), info))
  images = tf.constant(np.concatenate([b["image"] for b in batches]))
  labels = tf.constant(np.concatenate([b["label"] for b in batches]))
  if len(labels) != info.num_train_examples:
    raise prepare.CorruptDataError(
        f"The prepared {info.spec.name} in {info.builder.data_path} has {len(labels)} train "
        f"examples, but its metadata says {info.num_train_examples}; its files are truncated or "
        f"corrupt. Delete it and {prepare.how_to_prepare(info.spec, _data_dir(info))}.")

  def example(index: tf.Tensor) -> Example:
    return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}

  return example


def _data_dir(info: datasets.DatasetInfo) -> str:
  return str(info.builder.data_path.parent.parent)  # DATA_DIR/NAME/VERSION.


def numpy_batches(ds: tf.data.Dataset, info: datasets.DatasetInfo) -> Iterator[Batch]:
  """Iterates `ds`, turning read errors of a prepared copy into prepare.CorruptDataError."""
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
    raise prepare.CorruptDataError(
        f"Reading the prepared {info.spec.name} in {path} failed ({type(e).__name__}: {cause}); "
        f"its files are truncated or corrupt. Delete {path} and "
        f"{prepare.how_to_prepare(info.spec, _data_dir(info))}.") from e


def _aug_view(cfg: input_config.InputConfig, info: datasets.DatasetInfo
              ) -> Callable[[Example, tf.Tensor], tf.Tensor] | None:
  """The augmented view of config.aug_branch (None when off): see augment.aug_view_fn."""
  if cfg.aug_branch == "none":
    return None
  size = info.image_shape[0]
  policy = augment.policy_fn(cfg.aug_branch, size,
                             randaugment_num_layers=cfg.randaugment_num_layers,
                             randaugment_magnitude=cfg.randaugment_magnitude)
  return augment.aug_view_fn(info.spec.augmentation, size, policy)


def train_preprocess(cfg: input_config.InputConfig, info: datasets.DatasetInfo
                     ) -> Callable[[Example, tf.Tensor], Example]:
  """preprocess(example, seed) -> model inputs: uint8 'image', int32 'label', 'aug_image'."""
  size = info.image_shape[0]
  train_fn = augment.train_fn(info.spec.augmentation, size)
  eval_fn = augment.eval_fn(info.spec.augmentation, size)
  aug_view = _aug_view(cfg, info)

  def preprocess(example: Example, seed: tf.Tensor) -> Example:
    main = train_fn(example, seed) if cfg.augment else eval_fn(example)
    out = {"image": augment.to_uint8(main["image"]), "label": main["label"]}
    if aug_view is not None:
      out["aug_image"] = aug_view(example, seed)
    return out

  return preprocess


def eval_preprocess(info: datasets.DatasetInfo) -> Callable[[Example], Example]:
  """preprocess(example) -> model inputs: uint8 'image' at the model's size, int32 'label'."""
  eval_fn = augment.eval_fn(info.spec.augmentation, info.image_shape[0])

  def preprocess(example: Example) -> Example:
    out = eval_fn(example)
    return {"image": augment.to_uint8(out["image"]), "label": out["label"]}

  return preprocess
