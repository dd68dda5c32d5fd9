"""The run's workdir: checked before anything runs, and held by one run at a time.

Two runs on one workdir would interleave metrics.jsonl and race on checkpoints, so process 0 of
a run holds `run.lock` (host, pid, start time and a heartbeat) until it exits. A lock whose owner
is gone is stale and taken over with a warning: on this host when its pid no longer runs, from
another host (a preempted VM) when its heartbeat is older than `stale_after_s`.
"""
import json
import os
import socket
import time
from typing import Any

import jax
from absl import logging
from etils import epath

from conadv_jax import errors

LOCK_NAME = "run.lock"
DEFAULT_STALE_AFTER_S = 15 * 60


class WorkdirError(errors.UserError):
  """The workdir cannot be used (empty, a file, not writable, or held by another run)."""


def prepare(workdir: str) -> epath.Path:
  """Creates `workdir` if needed and checks that this process can write there."""
  if not workdir or not str(workdir).strip():
    raise WorkdirError("--workdir is empty; pass the folder for checkpoints and results, e.g. "
                       "--workdir=/tmp/my_run (rerun the same command to resume).")
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a folder; pass a folder path.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); "
                       "pass a folder you can write to.") from e
  return path


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _write_temporary(path: epath.Path, text: str) -> str:
  """Writes `text` to a fresh sibling of `path` (flushed to disk) and returns its name."""
  tmp = str(path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  return tmp


def write_atomically(path: epath.Path, text: str) -> None:
  """Replaces `path` by `text` so that a reader, or a kill midway, sees the old or the new file.

  A plain write truncates first: SIGKILL or preemption between the truncation and the write
  leaves an empty results.json, metrics.jsonl or run.lock behind.
  """
  path = epath.Path(path)
  if not _is_local(path):  # Object stores (gs://) replace whole objects already.
    path.write_text(text)
    return
  os.replace(_write_temporary(path, text), path)


def _create_exclusively(path: epath.Path, text: str) -> None:
  """Creates `path` holding `text`, or raises FileExistsError; never visible half-written."""
  if not _is_local(path):
    if path.exists():
      raise FileExistsError(path)
    path.write_text(text)
    return
  tmp = _write_temporary(path, text)
  try:
    os.link(tmp, path)  # Atomic, and fails if `path` exists.
  except FileExistsError:
    raise
  except OSError:  # A filesystem without hard links: create, then fill.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
      f.write(text)
  finally:
    os.unlink(tmp)


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class RunLock:
  """`run.lock` in the workdir, held by process 0 for the run's lifetime (a context manager)."""

  def __init__(self, workdir: epath.Path, stale_after_s: float = DEFAULT_STALE_AFTER_S):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._stale_after_s = stale_after_s
    self._enabled = jax.process_index() == 0
    self._held = False
    self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

  def __enter__(self) -> "RunLock":
    if self._enabled:
      self._acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _write(self, exclusive: bool) -> None:
    text = json.dumps({**self._info, "heartbeat": time.time()})
    (_create_exclusively if exclusive else write_atomically)(self.path, text)

  def _owner(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # Unreadable or half-written: judged by its age below.

  def _is_stale(self, owner: dict[str, Any]) -> bool:
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
      return not _pid_running(owner["pid"])
    heartbeat = owner.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
      heartbeat = self.path.stat().mtime
    return time.time() - heartbeat > self._stale_after_s

  def _acquire(self) -> None:
    for _ in range(3):
      try:
        self._write(exclusive=True)
        self._held = True
        return
      except FileExistsError:
        pass
      owner = self._owner()
      if owner is None:
        continue  # Released in between: try again.
      if not self._is_stale(owner):
        holder = (f"pid {owner.get('pid')} on host {owner.get('host')}, last heartbeat "
                  f"{time.time() - owner.get('heartbeat', time.time()):.0f} s ago" if owner else
                  f"its lock cannot be read, written {time.time() - self.path.stat().mtime:.0f} "
                  "s ago")
        raise WorkdirError(
            f"{self.path.parent} is in use by another run ({holder}). Wait for it to finish or "
            f"stop it; if it is dead, delete {self.path} and run again. Two runs on one "
            "workdir would mix their checkpoints and metrics.")
      logging.warning("Taking over the stale lock %s of pid %s on host %s.", self.path,
                      owner.get("pid"), owner.get("host"))
      self.path.unlink(missing_ok=True)
    raise WorkdirError(f"Could not take the lock {self.path}; another run keeps taking it.")

  def heartbeat(self) -> None:
    """Refreshes the lock's heartbeat, so that other hosts do not take it as stale."""
    if self._held:
      self._write(exclusive=False)

  def release(self) -> None:
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False
