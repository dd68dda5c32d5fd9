"""Checkpoints with orbax: the whole TrainState plus the run record (run_record.RunRecord).

The state holds everything a resumed run needs to continue bit-identically: parameters, BN
statistics, optimizer state, the adversarial FIFO and the step (which also fixes the data
position, since the input order is a function of (seed, step)). Restoring tells four cases apart,
because only one of them may ever cost a checkpoint:

* Its files are damaged (missing, truncated or corrupt: file-not-found, a JSON or decoding
  error, tensorstore's DATA_LOSS / OUT_OF_RANGE / FAILED_PRECONDITION / NOT_FOUND, an empty step
  folder): all processes agree on that and the next older one is tried. Once one restores, the
  damaged newer ones are moved aside to `checkpoints_damaged/` (never deleted). If none
  restores, the run is refused (CheckpointRestoreError) and nothing is moved: it never starts
  again from step 0 on its own.
* It fails for any other reason (out of memory, a device or library error, a transient storage
  error, a permission): refused (CheckpointRestoreError) naming the step and the error; nothing
  in the workdir is touched.
* It reads, but its arrays' structure, shapes or dtypes differ from the state this config builds,
  or its config differs in a field that decides the data or what a step is: another experiment.
  Refused by name (CheckpointMismatchError); nothing in the workdir is touched. So is a record
  that lacks a field or has an unknown one: what it would have said cannot be guessed.
* It reads and matches: restored. The remaining config differences are the caller's to log.
"""
import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from conadv_jax import errors
from conadv_jax.run import config_history, run_record

DAMAGED_DIR = "checkpoints_damaged"


class CheckpointMismatchError(errors.UserError, ValueError):
  """The workdir holds checkpoints of a different experiment."""


class CheckpointSaveError(errors.UserError, RuntimeError):
  """An (asynchronous) checkpoint save failed, e.g. a full disk."""


class CheckpointRestoreError(errors.UserError, RuntimeError):
  """No checkpoint could be restored, or one failed for a reason other than damaged files."""


class _Damaged(Exception):
  """A checkpoint's files are missing or do not decode (found by the checks here)."""


# Tensorstore's status codes for data that is missing, cut short or does not decode. Others
# (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INTERNAL, ...) say
# nothing about the files, so they never cost a checkpoint.
_DAMAGE_CODES = ("DATA_LOSS:", "OUT_OF_RANGE:", "FAILED_PRECONDITION:", "NOT_FOUND:")
_RESTORED, _DAMAGED, _FAILED = 0, 1, 2


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from (orbax wraps tensorstore's)."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _says_nothing_about_the_files(error: BaseException) -> bool:
  """Memory, or an I/O error other than "not there" (permissions, a full disk, the network)."""
  return (isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)
          or (isinstance(error, OSError)
              and not isinstance(error, (FileNotFoundError, NotADirectoryError))))


def is_damage(error: BaseException) -> bool:
  """True if `error` says the checkpoint's files are missing, truncated or corrupt.

  When in doubt it says no: anything in the chain that is not about the files themselves (even
  one raised while handling a missing file) makes the run stop rather than move a checkpoint.
  """
  chain = _chain(error)
  if any(_says_nothing_about_the_files(e) for e in chain):
    return False
  return any(
      isinstance(e, (_Damaged, FileNotFoundError, NotADirectoryError, json.JSONDecodeError,
                     UnicodeDecodeError))
      or (isinstance(e, ValueError) and str(e).startswith(_DAMAGE_CODES)) for e in chain)


def _describe(error: BaseException) -> str:
  """The error and, if orbax wrapped it, the one it came from; short."""
  text = f"{type(error).__name__}: {str(error)[:300]}"
  cause = error.__cause__ or error.__context__
  if cause is not None and type(error) is Exception:  # orbax's wrapper: the cause says more.
    text = f"{type(cause).__name__}: {str(cause)[:300]}"
  return text


@dataclasses.dataclass
class Restored:
  """A restored state, its step and the record saved with it."""
  state: Any
  step: int
  record: run_record.RunRecord


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndex.
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def state_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype)}, alike for a state, its shapes and orbax's saved metadata."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in leaves if leaf is not None}


def _signature_differences(saved: dict, current: dict, limit: int = 6) -> list[str]:
  lines = []
  for name in sorted(saved.keys() | current.keys()):
    if name not in current:
      lines.append(f"{name} only in the checkpoint")
    elif name not in saved:
      lines.append(f"{name} only in the state this config builds")
    elif saved[name] != current[name]:
      (s_shape, s_dtype), (c_shape, c_dtype) = saved[name], current[name]
      lines.append(f"{name}: {s_shape} {s_dtype} there, {c_shape} {c_dtype} now")
  return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def _worst_outcome(outcome: int) -> int:
  """The worst outcome over the processes: each reads only its own shards, so one may fail alone."""
  if jax.process_count() == 1:
    return outcome
  return int(np.max(multihost_utils.process_allgather(np.asarray(outcome, np.int32))))


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Saves every `every` steps, keeps the newest `keep`; the context closes the manager."""

  def __init__(self, workdir: str, *, every: int, keep: int):
    if keep < 1:
      raise ValueError(f"keep={keep}: at least one checkpoint must be kept.")
    # Local paths made absolute for clear messages; URLs (gs://...) kept as they are.
    workdir = str(workdir)
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._every = every
    self._keep = keep
    self._manager = None  # Opened after the restore pass, so damaged entries do not count.
    self._unchecked_save = False  # A save was started and its outcome not yet collected.

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _open(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               cleanup_tmp_directories=True),
          item_handlers=_handlers())
    return self._manager

  def latest_step(self) -> int | None:
    return self._open().latest_step()

  def should_save(self, step: int) -> bool:
    return step % self._every == 0

  def save(self, step: int, state: Any, record: run_record.RunRecord,
           force: bool = False) -> bool:
    """Starts an asynchronous save unless this step is saved already; True if started."""
    manager = self._open()
    if step in manager.all_steps():
      return False
    with self._save_errors():
      started = manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record.to_json())),
          force=force)
    self._unchecked_save |= started
    return started

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError once an asynchronous save has failed (cheap, host only).

    orbax's check_for_errors sees only the writers' errors; a failure in its finalize thread (a
    full disk while committing, say) is raised only by wait_until_finished, which orbax calls at
    the next save. So once a save is no longer in progress, its thread is joined here (at once:
    it has ended) to collect the outcome at the first step after it is known.
    """
    if self._manager is None:
      return
    with self._save_errors():
      self._manager.check_for_errors()
      if self._unchecked_save and not self._manager.is_saving_in_progress():
        self._unchecked_save = False
        self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _save_errors(self):
    """Turns a failed save (full disk, lost bucket, ...) into one clear CheckpointSaveError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f"Saving a checkpoint in {self.directory} failed ({type(e).__name__}: "
          f"{str(e)[:300]}). The run stopped; {self._last_good()}. Free disk space or fix the "
          "storage, then run the same command to resume.") from e

  def _last_good(self) -> str:
    steps = [int(p.name) for p in epath.Path(self.directory).iterdir()
             if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()]
    return (f"the last good checkpoint is step {max(steps)}" if steps else
            "no checkpoint was saved before it, so a resume starts from step 0")

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any got a preemption notice (needs jax.distributed)."""
    return self._open().reached_preemption(step)

  def restore_latest(self, abstract_state: Any,
                     config: dict[str, Any]) -> Restored | None:
    """The newest restorable checkpoint (sharded as `abstract_state`), or None if there is none.

    Newer checkpoints with damaged files are moved aside once an older one restored.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint is of another experiment.
      CheckpointRestoreError: a checkpoint failed to restore for a reason other than damaged
        files, or there are checkpoints and none of them restores.
    """
    if not epath.Path(self.directory).exists():
      return None
    steps = sorted((int(p.name) for p in epath.Path(self.directory).iterdir()
                    if p.name.isdigit()), reverse=True)
    # On object stores orbax writes into the step folder and commits with a marker file last: a
    # save killed midway leaves a numbered folder that never was a checkpoint. (Locally the
    # folder only gets its number once complete.) Every process sees the same files.
    for step in [s for s in steps if not ocp.path.step.is_checkpoint_finalized(
        epath.Path(self.directory) / str(s))]:
      self._move_aside(step, "an unfinished save (no commit marker)")
      steps.remove(step)
    me = jax.process_index()
    # Reads without orbax's cross-process barriers: a process failing alone would leave the
    # others waiting in one. The processes agree on each step's outcome below instead.
    reader = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})))
    expected = state_signature(abstract_state)
    damaged = []  # (step, error), newest first: moved aside once an older one restores.
    try:
      for step in steps:
        restored, error, outcome = None, None, _RESTORED
        try:
          restored = self._restore(reader, step, abstract_state, expected, config)
        except CheckpointMismatchError:
          raise  # Decided from readable metadata alone, so every process raises alike.
        except Exception as e:  # pylint: disable=broad-except
          error = _describe(e)
          outcome = _DAMAGED if is_damage(e) else _FAILED
        # All processes resume from the same step, or the first collective hangs.
        worst = _worst_outcome(outcome)
        if worst == _RESTORED:
          for newer, _ in damaged:
            self._move_aside(newer)
          logging.info("Restored checkpoint at step %d from %s.", step, self.directory)
          return restored
        if worst == _FAILED:
          raise CheckpointRestoreError(
              f"The checkpoint at step {step} in {self.directory} could not be restored ("
              + (error if outcome == _FAILED else
                 "another process failed for a reason other than damaged files; its log says "
                 "which") + "). That is not damage to its files (those are moved aside and "
              "an older checkpoint is used), so the run stops rather than guess: nothing in the "
              "workdir was moved or deleted. Fix the cause (e.g. memory or devices too small for "
              "the state, the storage, a library version) and run the same command again; if "
              f"you know this checkpoint is bad, move {self.directory}/{step} out of "
              f"{self.directory} by hand to resume from the one before.")
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s); trying an older one.",
                        step, self.directory, error or "another process could not read its part")
        damaged.append((step, error or "another process could not read its part"))
    finally:
      reader.close()
    with_files = [(step, error) for step, error in damaged if self._has_files(step)]
    if with_files:
      raise CheckpointRestoreError(
          f"None of the checkpoints in {self.directory} restores: " + "; ".join(
              f"step {step}: {error}" for step, error in with_files) + ". Nothing was moved or "
          "deleted, and the run does not start again from step 0 on its own. If they are "
          f"damaged beyond use, move {self.directory} aside by hand (e.g. to "
          f"{self.directory}_old) and run the same command to start from step 0; or fix the "
          "storage and run again.")
    for step, _ in damaged:  # Empty step folders: nothing to lose.
      self._move_aside(step)
    return None

  def _restore(self, reader: ocp.CheckpointManager, step: int, abstract_state: Any,
               expected: dict, config: dict[str, Any]) -> Restored:
    folder = epath.Path(self.directory) / str(step)
    missing = [item for item in ("state", "record") if not (folder / item).exists()]
    if missing:
      raise _Damaged(f"no {' or '.join(missing)} folder in {folder}")
    metadata = reader.item_metadata(step)
    if metadata is None or metadata["state"] is None:  # JSON items have no metadata.
      raise _Damaged("no readable array metadata")
    record = self._read_record(reader, step)
    saved = state_signature(metadata["state"].tree)
    self._check_same_experiment(step, saved, expected, record, config)
    state = reader.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state
    if int(jax.device_get(state.step)) != step:
      raise _Damaged(f"holds step {int(jax.device_get(state.step))}")
    return Restored(state, step, record)

  def _read_record(self, reader: ocp.CheckpointManager, step: int) -> run_record.RunRecord:
    saved = reader.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record
    try:
      return run_record.RunRecord.from_json(saved)
    except run_record.MalformedRecordError as e:
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} has a run record this code cannot "
          f"use ({e}): it was written by another version of this code, and what the missing "
          "fields would say cannot be guessed. Start this run in a new --workdir (or resume it "
          "with the version that wrote it). Nothing was changed in the workdir.") from e

  def _has_files(self, step: int) -> bool:
    """False for a step folder that holds no file at any depth (nothing to lose)."""
    folders = [epath.Path(self.directory) / str(step)]
    while folders:
      folder = folders.pop()
      if not folder.exists():
        continue
      for entry in folder.iterdir():  # epath has no recursive glob on gs://.
        if not entry.is_dir():
          return True
        folders.append(entry)
    return False

  def _check_same_experiment(self, step: int, saved_signature: dict, expected_signature: dict,
                             record: run_record.RunRecord, config: dict[str, Any]) -> None:
    refused, accepted = config_history.compare(record.config, config)
    structure = _signature_differences(saved_signature, expected_signature)
    if not refused and not structure:
      return
    lines = [f"{c.describe()}: refused, {config_history.why_refused(c)}" for c in refused]
    if structure:
      changed = "; ".join(c.describe() for c in accepted)
      lines.append("the saved state differs from the one this config builds (" +
                   "; ".join(structure) + ")" +
                   (f"; changed settings: {changed}" if changed else ""))
    raise CheckpointMismatchError(
        f"The checkpoint at step {step} in {self.directory} belongs to a different experiment: "
        + "; ".join(lines) + ". Resume with the original config, or start this one in a new "
        "--workdir. Nothing was changed in the workdir.")

  def _move_aside(self, step: int, what: str = "the damaged checkpoint") -> None:
    """Moves a damaged step out of orbax's sight (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      target = epath.Path(self.workdir) / DAMAGED_DIR / f"{step}.{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
      logging.warning("Moved %s at step %d aside to %s.", what, step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")

  def wait_until_finished(self) -> None:
    if self._manager is not None:
      with self._save_errors():
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

  def close(self) -> None:
    if self._manager is not None:
      manager, self._manager = self._manager, None
      try:
        manager.close()
      except Exception as e:  # pylint: disable=broad-except
        # A failed save was reported already (CheckpointSaveError); don't mask it.
        logging.warning("Closing the checkpoint manager: %s: %s", type(e).__name__, e)
