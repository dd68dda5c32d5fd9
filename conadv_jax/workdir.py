"""The run's workdir: checked before anything runs, and held by one run at a time.

Two runs on one workdir would interleave metrics.jsonl and race on checkpoints, so process 0 of
a run holds `run.lock` until it exits.

* Local (and other POSIX) filesystems: the run holds a kernel lock (`flock`) on `run.lock` for its
  lifetime. The kernel releases it however the process ends (SIGKILL, out of memory, a container
  restart), so a dead run's lock is taken over at once and a live run's lock never is: no pid or
  age is guessed. The file also names its owner (host, pid, start time, heartbeat), for the
  message that refuses a second run. Every version of the file is written in full and locked
  before it is linked or renamed into place, so a reader never sees it empty or half-written,
  and whoever holds the kernel lock on the file at `run.lock` owns the workdir.
* Object stores (`gs://...`, no kernel locks): a lease. The owner rewrites its heartbeat (at
  every log step and from a background thread); a lock whose heartbeat is older than
  `stale_after_s` (or whose pid is gone, when the owner ran on this very host and pid
  namespace) is stale and taken over with a warning. Every write is read back after a short
  pause, so of two runs that take a lock at once the one whose write was overwritten gives up;
  a heartbeat or a release first checks that the lock is still this run's.
"""
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
from absl import logging
from etils import epath

from conadv_jax import errors

try:
  import fcntl
except ImportError:  # Not POSIX: the lease below is used everywhere.
  fcntl = None

LOCK_NAME = "run.lock"
DEFAULT_STALE_AFTER_S = 15 * 60
# Lease only. Every write replaces the whole object, so a lock that cannot be read is damage
# unless it is being written right now: after this long it is taken over.
UNREADABLE_GRACE_S = 60
# Lease only: how long a run waits after writing the lock before reading it back to see whether
# another run's write replaced its own.
SETTLE_S = 2.0


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
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); "
                       "pass a folder you can write to.") from e
  return path


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _uses_kernel_lock(path: epath.Path) -> bool:
  """False for object stores (gs://...), which get the heartbeat lease instead."""
  return _is_local(path) and fcntl is not None


def _unlink_quietly(name: str) -> None:
  try:
    os.unlink(name)
  except OSError:
    pass


def _write_temporary(path: epath.Path, text: str) -> str:
  """Writes `text` to a new, uniquely named sibling of `path` (flushed to disk); its name."""
  tmp = str(epath.Path(path).parent / f".{epath.Path(path).name}.{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    _unlink_quietly(tmp)
    raise
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
  tmp = _write_temporary(path, text)
  try:
    os.replace(tmp, path)
  except BaseException:
    _unlink_quietly(tmp)
    raise


def _read_text(path: epath.Path) -> str:
  return epath.Path(path).read_text()


def _parse_owner(text: str) -> dict[str, Any]:
  """The owner named by a lock's text; {} for anything that is not a well-formed lock."""
  try:
    owner = json.loads(text)
  except ValueError:
    return {}
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if (not isinstance(owner, dict) or not isinstance(owner.get("host"), str)
      or not isinstance(owner.get("pid"), int) or isinstance(owner.get("pid"), bool)
      or not number(owner.get("started")) or not number(owner.get("heartbeat"))):
    return {}
  return owner


def _describe(owner: dict[str, Any]) -> str:
  now = time.time()
  return (f"pid {owner['pid']} on host {owner['host']}, started {now - owner['started']:.0f} s "
          f"ago, last heartbeat {now - owner['heartbeat']:.0f} s ago")


def _process_start(pid: int | str) -> int | None:
  """The process's start time (clock ticks after boot); None if it is gone, a zombie or unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat[stat.rindex(")") + 2:].split()  # The name in (...) may hold spaces.
  if fields[0] in ("Z", "X"):  # Dead, not yet reaped.
    return None
  return int(fields[19])


def _host_id() -> str:
  """Same string only for processes that see the same pids: boot id and pid namespace."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot = f.read().strip()
    return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
  except OSError:
    return ""  # Unknown: pids are never compared.


class _NoKernelLocks(Exception):
  """The filesystem refuses flock (some network or FUSE filesystems)."""


class RunLock:
  """`run.lock` in the workdir, held by process 0 for the run's lifetime (a context manager)."""

  def __init__(self, workdir: epath.Path, stale_after_s: float = DEFAULT_STALE_AFTER_S):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._stale_after_s = stale_after_s
    self._enabled = jax.process_index() == 0
    self._held = False
    self._fd = None  # Local: the open file whose flock we hold (the one at `path`).
    self._lease = not _uses_kernel_lock(self.path)
    self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "host_id": _host_id(), "pid_start": _process_start("self")}
    self._mutex = threading.Lock()  # Lease: the heartbeat thread and the loop write in turn.
    self._stop = threading.Event()
    self._thread = None
    self._lost = None  # Lease: a WorkdirError once the lock was found taken over.

  def __enter__(self) -> "RunLock":
    if self._enabled:
      self._acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _text(self) -> str:
    return json.dumps({**self._info, "heartbeat": time.time()})

  def _is_ours(self, owner: dict[str, Any] | None) -> bool:
    return bool(owner) and all(owner.get(k) == self._info[k] for k in ("host", "pid", "started"))

  def _refuse(self, holder: str) -> WorkdirError:
    return WorkdirError(
        f"{self.path.parent} is in use by another run ({holder}). Wait for it to finish or "
        f"stop it; if it is dead, delete {self.path} and run again. Two runs on one workdir "
        "would mix their checkpoints and metrics.")

  def _acquire(self) -> None:
    if not self._lease:
      try:
        self._acquire_kernel_lock()
        return
      except _NoKernelLocks as e:
        logging.warning("%s cannot be locked by the kernel (%s); using a heartbeat lease "
                        "instead (see docs/reliability.md, Limits).", self.path, e)
        self._lease = True
    self._acquire_lease()

  # Local filesystems: a kernel lock.

  def _locked_temporary(self) -> tuple[int, str]:
    """A new file holding our info and locked by us, to be linked or renamed to `run.lock`."""
    tmp = _write_temporary(self.path, self._text())
    try:
      fd = os.open(tmp, os.O_RDWR)  # Writable: NFS emulates flock with write locks.
    except BaseException:
      _unlink_quietly(tmp)
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # No one else knows this file.
    except OSError as e:
      os.close(fd)
      _unlink_quietly(tmp)
      raise _NoKernelLocks(f"{type(e).__name__}: {e}") from e
    except BaseException:
      os.close(fd)
      _unlink_quietly(tmp)
      raise
    return fd, tmp

  def _at_path(self, fd: int) -> bool:
    """True if `fd` is the file now at `run.lock` (not one removed or replaced meanwhile)."""
    try:
      here = os.stat(self.path)
    except FileNotFoundError:
      return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

  def _read_owner_local(self) -> dict[str, Any] | None:
    try:
      return _parse_owner(_read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, UnicodeDecodeError):
      return {}

  def _acquire_kernel_lock(self) -> None:
    for _ in range(10):
      fd, tmp = self._locked_temporary()
      old = None
      try:
        try:
          os.link(tmp, self.path)  # Atomic, and fails if `run.lock` exists.
          self._fd, fd = fd, None  # Ours from its first moment, and never seen empty.
          self._held = True
          return
        except FileExistsError:
          create = 0
        except OSError:  # A filesystem without hard links: whoever locks the file owns it.
          create = os.O_CREAT
        try:
          old = os.open(self.path, os.O_RDWR | create, 0o644)
        except FileNotFoundError:
          continue  # Released in between: try again.
        try:
          fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # A live process holds it.
          owner = self._read_owner_local()
          if owner is None:
            continue  # Released in between.
          if self._is_ours(owner) and self._at_path(fd):
            # The link was made although it said EEXIST (a retransmitted NFS request).
            self._fd, fd = fd, None
            self._held = True
            return
          raise self._refuse(_describe(owner) if owner else
                             "a live process holds its lock; the file does not say which")
        except OSError as e:
          raise WorkdirError(f"Could not lock {self.path} ({type(e).__name__}: {e}); check the "
                             "filesystem, or delete the file if no run uses the workdir.") from e
        if not self._at_path(old):
          continue  # Its holder released it (removed it) in between: try again.
        # We hold the kernel lock on the file at `run.lock`: whoever wrote it is gone.
        try:
          previous = _parse_owner(os.pread(old, 1 << 16, 0).decode())
        except (OSError, UnicodeDecodeError):
          previous = {}
        os.replace(tmp, self.path)  # Our file, already locked, takes its place.
        tmp = None
        self._fd, fd = fd, None
        self._held = True
        logging.warning(
            "Taking over the stale lock %s (%s); no process holds it any more.", self.path,
            f"left by {_describe(previous)}" if previous else "its contents cannot be read")
        return
      finally:
        if old is not None:
          os.close(old)  # After the replace: `run.lock` is never unlocked in between.
        if fd is not None:
          os.close(fd)
        if tmp is not None:
          _unlink_quietly(tmp)
    raise WorkdirError(f"Could not take the lock {self.path}; it keeps changing hands.")

  def _heartbeat_local(self) -> None:
    if not self._at_path(self._fd):
      self._held = False
      os.close(self._fd)
      self._fd = None
      owner = self._read_owner_local()
      raise WorkdirError(
          f"{self.path} was removed or replaced while this run held it"
          + (f" (it now names {_describe(owner)})" if owner else "") + "; this run stops so "
          "that two runs do not mix their checkpoints in one workdir. Never delete the lock of "
          "a live run.")
    fd, tmp = self._locked_temporary()
    try:
      os.replace(tmp, self.path)
    except BaseException:
      os.close(fd)
      _unlink_quietly(tmp)
      raise
    os.close(self._fd)
    self._fd = fd

  def _release_local(self) -> None:
    try:
      if self._at_path(self._fd):  # Removed while still held: a contender sees it is gone.
        self.path.unlink(missing_ok=True)
      else:
        logging.warning("%s is no longer this run's lock; left in place.", self.path)
    finally:
      os.close(self._fd)
      self._fd = None

  # Object stores: a lease.

  def _read_owner_lease(self) -> dict[str, Any] | None:
    try:
      return _parse_owner(_read_text(self.path))
    except FileNotFoundError:
      return None
    except Exception:  # pylint: disable=broad-except  # Unreadable: judged as damage below.
      return {}

  def _age_of_file(self) -> float:
    try:
      return time.time() - self.path.stat().mtime
    except Exception:  # pylint: disable=broad-except
      return 0.0

  def _owner_is_gone(self, owner: dict[str, Any]) -> bool:
    """Owners on this host and pid namespace: by their pid and its start time."""
    if not owner.get("host_id") or owner.get("host_id") != self._info["host_id"]:
      return False
    start = _process_start(owner["pid"])
    return start is None or (isinstance(owner.get("pid_start"), int)
                             and start != owner["pid_start"])  # A reused pid.

  def _acquire_lease(self) -> None:
    for _ in range(3):
      owner = self._read_owner_lease()
      if owner == {}:
        age = self._age_of_file()
        if age <= UNREADABLE_GRACE_S:
          raise self._refuse(f"its lock cannot be read, written {age:.0f} s ago; it is taken "
                             f"over once it is {UNREADABLE_GRACE_S} s old")
        logging.warning("Taking over the stale lock %s (its contents cannot be read, written "
                        "%.0f s ago).", self.path, age)
      elif owner is not None:
        if not (self._owner_is_gone(owner)
                or time.time() - owner["heartbeat"] > self._stale_after_s):
          raise self._refuse(_describe(owner))
        logging.warning("Taking over the stale lock %s of %s.", self.path, _describe(owner))
      write_atomically(self.path, self._text())
      time.sleep(SETTLE_S)  # A run that wrote at the same time has overwritten one of us.
      if self._is_ours(self._read_owner_lease()):
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat_thread, daemon=True,
                                        name="run.lock heartbeat")
        self._thread.start()
        return
    raise WorkdirError(f"Could not take the lock {self.path}; another run keeps taking it.")

  def _heartbeat_lease(self) -> None:
    with self._mutex:
      if self._lost:
        raise self._lost
      owner = self._read_owner_lease()
      if not self._is_ours(owner):
        self._lost = WorkdirError(
            f"{self.path} was taken over by another run ("
            + (_describe(owner) if owner else "removed, or cannot be read") + ") while this "
            "run held it; this run stops so that two runs do not mix their checkpoints in one "
            f"workdir. If this run's heartbeats were late, raise the lease's stale_after_s "
            f"({self._stale_after_s:.0f} s).")
        raise self._lost
      write_atomically(self.path, self._text())

  def _heartbeat_thread(self) -> None:
    """Keeps the lease fresh while the loop is busy (compiling, evaluating, restoring)."""
    while not self._stop.wait(max(self._stale_after_s / 10, 0.05)):
      try:
        self._heartbeat_lease()
      except WorkdirError:
        return  # The loop raises it at its next heartbeat().
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Refreshing %s failed (%s: %s); trying again.", self.path,
                        type(e).__name__, e)

  def _release_lease(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    with self._mutex:
      owner = self._read_owner_lease()
      if self._is_ours(owner):
        self.path.unlink(missing_ok=True)
      elif owner is not None:
        logging.warning("%s is no longer this run's lock (%s); left in place.", self.path,
                        _describe(owner) if owner else "it cannot be read")

  def heartbeat(self) -> None:
    """Refreshes the heartbeat after checking the lock is still ours (WorkdirError if not)."""
    if not self._held:
      return
    try:
      if self._lease:
        self._heartbeat_lease()
      else:
        self._heartbeat_local()
    except WorkdirError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # A full disk, a storage hiccup.
      # Locally the kernel lock still holds; a lease is refreshed again by its thread.
      logging.warning("Refreshing the heartbeat in %s failed (%s: %s); the run goes on.",
                      self.path, type(e).__name__, e)

  def release(self) -> None:
    """Removes the lock if it is still this run's; never another run's."""
    if self._held:
      self._held = False
      if self._lease:
        self._release_lease()
      else:
        self._release_local()
