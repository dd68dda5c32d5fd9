"""The checks a run makes before it reads data or imports TensorFlow, once per run.

They need only the config and the workdir, so a mistyped value or an unwritable --workdir fails
in seconds rather than after TensorFlow's import. main.py runs them before importing the loop;
train.train_and_evaluate runs them for callers from Python. A `Checked` run is the loop's proof
that they passed, so the loop never repeats them.
"""
import dataclasses
import hashlib
import json

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from conadv_jax import errors
from conadv_jax.run import config_history, config_validation, workdir as workdirs


@dataclasses.dataclass(frozen=True)
class Checked:
  """A config that passed validation on every process, and its prepared workdir."""
  config: ml_collections.ConfigDict
  workdir: epath.Path


def check(config: ml_collections.ConfigDict, workdir: str) -> Checked:
  """Validates `config` (alike on every process) and prepares `workdir`.

  Raises:
    errors.ConfigError: a config field has a value the run cannot use, or the processes of a
      multi-process run were started with different configs.
    workdirs.WorkdirError: the workdir cannot be created or written.
  """
  config_validation.validate(config, num_devices=jax.device_count())
  _check_same_on_all_processes(config)
  return Checked(config, workdirs.prepare(workdir))


def _check_same_on_all_processes(config: ml_collections.ConfigDict) -> None:
  """Refuses processes started with different configs: their "replicated" state would diverge.

  Compares a hash per field across processes before anything runs, so the message can name the
  fields that differ.
  """
  if jax.process_count() == 1:
    return
  flat = config_history.flatten(config)

  def digest(text: str) -> int:  # 31 bits: survives JAX's default int32.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1

  names = sorted(flat)
  summary = np.asarray([len(names), digest(" ".join(names))], np.int32)
  summaries = np.asarray(multihost_utils.process_allgather(summary))
  if not np.all(summaries == summaries[0]):
    raise errors.ConfigError("The processes of this run have configs with different fields; "
                             "start every process with the same --config file and overrides.")
  per_field = np.asarray([digest(json.dumps(flat[n], sort_keys=True)) for n in names], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(per_field))
  differing = [n for i, n in enumerate(names) if not np.all(gathered[:, i] == gathered[0, i])]
  if differing:
    me = jax.process_index()
    raise errors.ConfigError(
        f"The processes of this run were started with different configs (fields "
        f"{', '.join('config.' + n for n in differing)}; this is process {me}, with "
        f"{', '.join(f'{n}={flat[n]!r}' for n in differing)}). Every process must get the same "
        "--config file and overrides, or their replicated parameters would diverge.")
