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
    if exclusive and "://" not in str(self.path):
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      with os.fdopen(fd, "w") as f:
        f.write(text)
    else:
      self.path.write_text(text)

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
        age = time.time() - owner.get("heartbeat", time.time())
        raise WorkdirError(
            f"{self.path.parent} is in use by another run (pid {owner.get('pid')} on host "
            f"{owner.get('host')}, last heartbeat {age:.0f} s ago). Wait for it to finish or "
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
