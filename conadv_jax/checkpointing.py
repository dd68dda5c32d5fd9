"""Checkpoints with orbax: the whole TrainState plus what it was made with.

The state holds everything a resumed run needs to continue bit-identically: parameters, BN
statistics, optimizer state, the adversarial FIFO and the step (which also fixes the data
position, since the input order is a function of (seed, step)). A small JSON record of the config
fields that shape the state lets a mismatched restart fail with a clear message instead of a
shape error deep inside orbax. A damaged newest checkpoint is skipped for the next older one, by
every process alike, and replaced when the resumed run reaches its step again.
"""
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# Config fields a checkpoint cannot be resumed across.
STATE_DEFINING_FIELDS = ("dataset", "model", "method", "staleness", "batch_size", "adv_bn",
                         "optimizer", "small_resnet_depth", "small_resnet_width", "image_size")


class CheckpointMismatchError(ValueError):
  """The workdir holds checkpoints of a different experiment."""


def _describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: config.get(k) for k in STATE_DEFINING_FIELDS}


def _all_processes(ok: bool) -> bool:
  """True if `ok` on every process: each reads only its own shards, so one may fail alone."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Saves every `checkpoint_every_steps`, keeps the newest `keep_checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    # Local paths made absolute for clear messages; URLs (gs://...) kept as they are.
    workdir = str(workdir)
    self.directory = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir),
                                  "checkpoints")
    self._description = _describe(config)
    self._every = config.checkpoint_every_steps
    self._damaged = set()  # Steps found unrestorable; replaced when saved again.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True),
        item_names=("state", "config"))

  def latest_step(self) -> int | None:
    """The newest step not known to be damaged, or None."""
    return max((s for s in self._manager.all_steps() if s not in self._damaged), default=None)

  def should_save(self, step: int) -> bool:
    return step % self._every == 0

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts an (asynchronous) save unless this step is saved already; True if started."""
    if step in self._manager.all_steps():
      if step not in self._damaged:
        return False
      # The resumed run recomputed this step bit-identically; only now drop the damaged copy.
      # Forced: orbax skips steps older than its newest, which may be another damaged one.
      logging.warning("Replacing the damaged checkpoint at step %d.", step)
      self._manager.delete(step)
      self._damaged.discard(step)
      force = True
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      config=ocp.args.JsonSave(self._description)), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any got a preemption notice (needs jax.distributed)."""
    return self._manager.reached_preemption(step)

  def restore_latest(self, abstract_state: Any) -> Any | None:
    """The newest restorable state (sharded as `abstract_state`), or None if there is none."""
    # Reads without orbax's cross-process barriers: a process failing alone would leave the
    # others waiting in one. The processes agree on each step's outcome below instead.
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    me = jax.process_index()
    reader = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})),
        item_names=("state", "config"))
    try:
      for step in steps:
        state, error = None, None
        try:
          saved = reader.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
          self._check_compatible(step, dict(saved.config))
          restored = reader.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
          state = restored.state
          if int(jax.device_get(state.step)) != step:
            raise ValueError(f"holds step {int(state.step)}")
        except CheckpointMismatchError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          error = f"{type(e).__name__}: {str(e)[:300]}"
        # All processes resume from the same step, or the first collective hangs.
        if _all_processes(error is None):
          logging.info("Restored checkpoint at step %d from %s.", step, self.directory)
          return state
        self._damaged.add(step)
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s); trying an older one.",
                        step, self.directory, error or "another process could not read its part")
    finally:
      reader.close()
    return None

  def _check_compatible(self, step: int, saved: dict[str, Any]) -> None:
    differing = {k: (saved.get(k), v) for k, v in self._description.items() if saved.get(k) != v}
    if differing:
      what = ", ".join(f"{k}={old!r} there but {new!r} now" for k, (old, new) in differing.items())
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} belongs to a different experiment "
          f"({what}). Resume with the original config, or start this one in a new --workdir.")

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
