"""The checks a run makes before it reads data or imports TensorFlow, once per run.

They need only the config and the workdir, so a mistyped value or an unwritable --workdir fails
in seconds rather than after TensorFlow's import. main.py runs them before importing the loop;
train.train_and_evaluate runs them for callers from Python. A `Checked` run is the loop's proof
that they passed, so the loop never repeats them.
"""
import dataclasses

import jax
import ml_collections
from etils import epath

from conadv_jax.run import config_validation, workdir as workdirs


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
  config_validation.check_same_on_all_processes(config)
  return Checked(config, workdirs.prepare(workdir))
