"""Dataset resolution and preparation: from config.dataset to a checked `datasets.DatasetInfo`.

Per-dataset facts (splits, sizes, channels, source) come from the registry
(`datasets.get_spec`); `get_dataset_info` resolves the prepared data once (process 0 prepares,
the others wait for it) and the pipelines take its result. The errors here are the data
problems a user can fix; each message names the field, file or folder and the fix.
"""
import dataclasses
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from conadv_jax import errors
from conadv_jax.data import datasets, fashion_mnist, input_config

Config = ml_collections.ConfigDict | input_config.InputConfig


class DataUnavailableError(errors.UserError, ValueError):
  """The dataset is not prepared and cannot be prepared here; the message says how."""


class DataDirError(DataUnavailableError):
  """config.data_dir is not a readable folder."""


class CorruptDataError(DataUnavailableError):
  """A prepared copy of the dataset cannot be read; the message says which folder to delete."""


class DataMismatchError(errors.UserError, ValueError):
  """The prepared data disagrees with its registry entry on classes or channels."""


def process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process, defaulting to JAX's; raises ValueError if out of range."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count}).")
  return index, count


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


def _builder(data_dir: str | None, spec: datasets.DatasetSpec,
             prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of a non-generated dataset, preparing it if we can.

  Raises:
    _NotPreparedError: prepare=False and the data is not prepared.
  """
  _check_data_dir(data_dir)
  if spec.source == "fashion_mnist":
    try:
      return fashion_mnist.get_builder(data_dir, prepare=prepare)
    except fashion_mnist.FashionMnistNotPreparedError as e:
      raise _NotPreparedError(str(e)) from e
    except fashion_mnist.FashionMnistUnavailableError as e:
      raise DataUnavailableError(str(e)) from e
  builder = _tfds_builder(data_dir, spec)
  if builder.data_path.exists() and builder.is_prepared():  # exists(): is_prepared() warns.
    return builder
  resolved = data_dir or tfds.core.constants.DATA_DIR
  if not prepare:
    raise _NotPreparedError(f"{spec.name} is not prepared in the TFDS data dir {resolved}.")
  if spec.manual_download:
    raise DataUnavailableError(
        f"{spec.name} is not prepared in the TFDS data dir {resolved} (looked for "
        f"{builder.data_path}). TFDS cannot download it: get {spec.manual_download} into "
        f"{resolved}/downloads/manual, run `tfds build {spec.name} --data_dir={resolved}`, and "
        f"pass `--config.data_dir={resolved}`.")
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataUnavailableError(
        f"{spec.name} is not prepared in the TFDS data dir {data_dir or '(TFDS default)'} "
        f"and downloading it failed ({type(e).__name__}: {e}). Connect to the internet, or "
        f"prepare it elsewhere with `tfds build {spec.name} --data_dir=DIR`, copy DIR here and "
        "pass `--config.data_dir=DIR`.") from e
  return builder


def _tfds_builder(data_dir: str | None, spec: datasets.DatasetSpec) -> tfds.core.DatasetBuilder:
  """TFDS's builder of `spec`, prepared or not; a prepared copy's metadata must be readable."""
  try:
    return tfds.builder(spec.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise  # The registry names a dataset TFDS does not know: a bug, not a user error.
  except Exception as e:  # pylint: disable=broad-except
    # Building reads the metadata of a prepared copy; a corrupt one fails with its parser's error.
    resolved = data_dir or tfds.core.constants.DATA_DIR
    folder = os.path.join(resolved, spec.name)
    raise CorruptDataError(
        f"The prepared {spec.name} in {folder} cannot be read ({type(e).__name__}: {e}); it is "
        f"corrupt or incomplete. Delete {folder} and {how_to_prepare(spec, resolved)}.") from e


def how_to_prepare(spec: datasets.DatasetSpec, data_dir: str) -> str:
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


def _prepared_builder(data_dir: str | None, spec: datasets.DatasetSpec,
                      process_index: int, process_count: int) -> tfds.core.DatasetBuilder:
  """The prepared builder; only process 0 prepares (downloads, converts), the others wait.

  Two processes preparing the same data_dir at once would write the same folders.
  """
  if process_count == 1:
    return _builder(data_dir, spec)
  if process_index == 0:
    try:
      builder = _builder(data_dir, spec)
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
    return _builder(data_dir, spec, prepare=False)
  except _NotPreparedError as e:
    raise DataUnavailableError(
        f"Process 0 prepared {spec.name} in the TFDS data dir "
        f"{data_dir or tfds.core.constants.DATA_DIR}, but process "
        f"{process_index} does not find it there ({e}). Every process must read the same "
        "data_dir: pass --config.data_dir=DIR on a file system all hosts share (or a gs:// "
        "bucket), or prepare the data on every host before the run (e.g. one single-process "
        "run per host).") from e


def get_dataset_info(config: Config, *, process_index: int | None = None,
                     process_count: int | None = None) -> datasets.DatasetInfo:
  """Resolves config.dataset once: registry entry and prepared data, checked against each other.

  Prepares the data first where that can be done here (fashion_mnist from IDX files, TFDS
  downloads): on process 0 only, while the others wait at a barrier, then read what it
  prepared. Every process must call this (it holds a collective in multi-process runs). Pass
  the result to the pipelines and its `spec` to the model.

  Args:
    config: the run's config (its data fields).
    process_index: this process (default: jax.process_index()).
    process_count: the number of processes (default: jax.process_count()).

  Raises:
    datasets.UnknownDatasetError: config.dataset is not registered.
    errors.ConfigError: another data field of the config is invalid.
    DataUnavailableError: the data is not prepared and cannot be, config.data_dir is not a
      readable folder, or a prepared copy is corrupt (the message says what to do); on a
      process other than 0: process 0 failed to prepare it, or what it prepared is not visible
      here.
    fashion_mnist.IdxFormatError: a local Fashion-MNIST IDX file is corrupt.
    DataMismatchError: the prepared data has other classes or channels than the registry says.
  """
  cfg = input_config.InputConfig.from_config(config)
  spec = cfg.spec
  published = cfg.published_info()
  if spec.source == "synthetic":
    return published
  builder = _prepared_builder(cfg.data_dir, spec, *process(process_index, process_count))
  num_classes = builder.info.features["label"].num_classes
  channels = builder.info.features["image"].shape[-1]
  if (num_classes, channels) != (spec.num_classes, spec.channels):
    raise DataMismatchError(
        f"The prepared data in {builder.data_path} has {num_classes} classes and {channels} "
        f"channels, but the registry entry datasets.DATASETS[{spec.name!r}] says "
        f"{spec.num_classes} and {spec.channels}. If that folder holds some other data, delete "
        f"it and run again; if the entry is wrong, fix it in conadv_jax/data/datasets.py.")
  splits = builder.info.splits
  return dataclasses.replace(published,
                             num_train_examples=splits[spec.train_split].num_examples,
                             num_eval_examples=splits[spec.eval_split].num_examples,
                             builder=builder)
