"""The one exception type for mistakes a user can fix: main.py prints the message, no traceback.

Every error about the command line, the config, the workdir, the data or a checkpoint that the
user must act on derives from `UserError`, so the entry point catches one type and exits with
status 2. Bugs stay ordinary exceptions with tracebacks.
"""
import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
  """A mistake in the command, config, workdir or data; the message says what and how to fix."""


class ConfigError(UserError, ValueError):
  """A config field has a value the run cannot use; the message names it as config.FIELD."""


def check_value(field: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
  """Raises ConfigError("config.FIELD=VALUE is not allowed: ALLOWED.") unless ok(value).

  The one message shape of every owner of a config field. `field` is the dotted path
  (attack.epsilon). A value `ok` cannot even compare (None where a number belongs, which a
  type-safe ConfigDict lets through) is refused too, not turned into a traceback.
  """
  try:
    passed = ok(value)
  except TypeError:
    passed = False
  if not passed:
    raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
  """(check, what is allowed) for check_value: a finite number >= `low`."""
  return (lambda v: math.isfinite(v) and v >= low), f"it must be a finite >= {low}"


def stop_together(work: Callable[[], T], what: str) -> T:
  """Runs `work` here; if it fails on any process of the run, every process stops at once.

  A process that stops alone leaves the others blocked in their next collective (and itself in
  JAX's shutdown barrier) until the coordination service gives up, minutes later, with a message
  that does not say why. The process whose `work` failed re-raises its own error; the others
  raise a UserError naming it. `what` completes "stopped while ...".
  """
  import jax  # pylint: disable=g-import-not-at-top  # config_validation imports this module.
  if jax.process_count() == 1:
    return work()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  failure, result = None, None
  try:
    result = work()
  except BaseException as e:  # pylint: disable=broad-except  # Re-raised once the others know.
    failure = e
  failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None)))
  if failure is not None:
    raise failure
  if failed.any():
    names = ", ".join(str(i) for i in np.flatnonzero(failed))
    raise UserError(f"Process {names} stopped while {what} (its log says why); this is process "
                    f"{jax.process_index()}. Fix what it reports and start all processes again.")
  return result
