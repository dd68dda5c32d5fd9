"""`run.lock`: one run per workdir, held by process 0 of the run until it exits.

Two runs on one workdir would interleave metrics.jsonl and race on checkpoints.

* Local (and other POSIX) filesystems: the run holds a kernel lock (`flock`) on `run.lock` for its
  lifetime. The kernel releases it however the process ends (SIGKILL, out of memory, a container
  restart), so a dead run's lock is taken over at once and a live run's lock never is: no pid or
  age is guessed. The file also names its owner (host, pid, start time), for the message that
  refuses a second run. It is written in full and locked before it is linked or renamed into
  place, so a reader never sees it empty or half-written, and whoever holds the kernel lock on
  the file at `run.lock` owns the workdir. It is written once: a heartbeat only checks that the
  file at `run.lock` is still the one this run holds.
* Object stores (`gs://...`, no kernel locks): a lease. The owner rewrites its heartbeat (at
  every log step and from a background thread); a lock whose heartbeat is older than
  `stale_after_s` (or whose pid is gone, when the owner ran on this very host and pid
  namespace) is stale and taken over with a warning. Every write is read back after a short
  pause, so of two runs that take a lock at once the one whose write was overwritten gives up;
  a heartbeat or a release first checks that the lock is still this run's.
"""
import json
import math
import os
import socket
import threading
import time
from typing import Any

import jax
from absl import logging
from etils import epath

from conadv_jax import errors
from conadv_jax.run import workdir as workdirs

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
# Lease only: a heartbeat further in the future than this is malformed, not fresh.
MAX_CLOCK_SKEW_S = 60
# Lease only: how long a release waits for the heartbeat thread's write in progress.
RELEASE_WAIT_S = 60


def _uses_kernel_lock(path: epath.Path) -> bool:
  """False for object stores (gs://...), which get the heartbeat lease instead."""
  return workdirs.is_local(path) and fcntl is not None


def _read_text(path: epath.Path) -> str:
  return epath.Path(path).read_text()


def _parse_owner(text: str, lease: bool) -> dict[str, Any]:
  """The owner named by a lock's text; {} for anything that is not a well-formed lock.

  A lease also needs a heartbeat that can go stale: finite, and not in the future beyond clock
  skew (a NaN or future heartbeat would keep the workdir locked forever).
  """
  try:
    owner = json.loads(text)
  except ValueError:
    return {}
  time_ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  if (not isinstance(owner, dict) or not isinstance(owner.get("host"), str)
      or type(owner.get("pid")) is not int or not time_ok(owner.get("started"))
      or lease and not (time_ok(owner.get("heartbeat"))
                        and owner["heartbeat"] <= time.time() + MAX_CLOCK_SKEW_S)):
    return {}
  return owner


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
    # The other processes learn whether process 0 got the lock, so a refused run stops whole.
    errors.stop_together(self._acquire if self._enabled else lambda: None,
                         f"taking the lock {self.path}")
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _text(self) -> str:
    return json.dumps({**self._info, "heartbeat": time.time()} if self._lease else self._info)

  def _is_ours(self, owner: dict[str, Any] | None) -> bool:
    return bool(owner) and all(owner.get(k) == self._info[k] for k in ("host", "pid", "started"))

  def _read_owner(self, fd: int | None = None) -> dict[str, Any] | None:
    """The owner named by `run.lock` (or the open file `fd`); None if gone, {} if unreadable."""
    try:
      text = _read_text(self.path) if fd is None else os.pread(fd, 1 << 16, 0).decode()
    except FileNotFoundError:
      return None
    except Exception:  # pylint: disable=broad-except  # A folder, bad bytes, a storage error.
      return {}
    return _parse_owner(text, lease=self._lease)

  def _describe(self, owner: dict[str, Any]) -> str:
    now = time.time()
    return (f"pid {owner['pid']} on host {owner['host']}, started {now - owner['started']:.0f} s "
            "ago" + (f", last heartbeat {now - owner['heartbeat']:.0f} s ago" if self._lease
                     else ""))

  def _refuse(self, holder: str) -> workdirs.WorkdirError:
    return workdirs.WorkdirError(
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
      except OSError as e:  # A folder, a symbolic link, another user's file, a failed rename.
        why = ("it is a symbolic link" if os.path.islink(self.path) else
               f"{type(e).__name__}: {e}")
        raise workdirs.WorkdirError(
            f"Could not take the lock {self.path} ({why}). If it is not a plain file that this "
            "user can write (e.g. a folder or a symbolic link) and no run uses the workdir, "
            "delete it and run again.") from e
    self._acquire_lease()

  # Local filesystems: a kernel lock.

  def _locked_temporary(self) -> tuple[int, str]:
    """A new file holding our info and locked by us, to be linked or renamed to `run.lock`."""
    tmp = workdirs.write_temporary(self.path, self._text())
    try:
      fd = os.open(tmp, os.O_RDWR)  # Writable: NFS emulates flock with write locks.
    except BaseException:
      workdirs.unlink_quietly(tmp)
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # No one else knows this file.
    except OSError as e:
      os.close(fd)
      workdirs.unlink_quietly(tmp)
      raise _NoKernelLocks(f"{type(e).__name__}: {e}") from e
    except BaseException:
      os.close(fd)
      workdirs.unlink_quietly(tmp)
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

  def _acquire_kernel_lock(self) -> None:
    for _ in range(10):
      fd, tmp = self._locked_temporary()
      old = None
      try:
        create = 0
        try:
          os.link(tmp, self.path)  # Atomic, and fails if `run.lock` exists.
        except FileExistsError:
          pass
        except OSError:  # A filesystem without hard links: whoever locks the file owns it.
          create = os.O_CREAT
        # Checked by inode, not by opening `run.lock`: NFS may answer EEXIST to a resent link
        # that succeeded, and there locks belong to the process, so opening and closing our own
        # file would drop our lock.
        if self._at_path(fd):
          self._fd, fd = fd, None  # Ours from its first moment, and never seen empty.
          self._held = True
          return
        try:  # Not through a symbolic link: a broken one would be created, or seem to vanish.
          old = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | create, 0o644)
        except FileNotFoundError:
          continue  # Released in between: try again.
        try:
          fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # A live process holds it.
          owner = self._read_owner()
          if owner is None:
            continue  # Released in between.
          raise self._refuse(self._describe(owner) if owner else
                             "a live process holds its lock; the file does not say which")
        if not self._at_path(old):
          continue  # Its holder released it (removed it) in between: try again.
        # We hold the kernel lock on the file at `run.lock`: whoever wrote it is gone.
        previous = self._read_owner(old)
        os.replace(tmp, self.path)  # Our file, already locked, takes its place.
        tmp = None
        self._fd, fd = fd, None
        self._held = True
        logging.warning(
            "Taking over the stale lock %s (%s); no process holds it any more.", self.path,
            f"left by {self._describe(previous)}" if previous else "its contents cannot be read")
        return
      finally:
        if old is not None:
          os.close(old)  # After the replace: `run.lock` is never unlocked in between.
        if fd is not None:
          os.close(fd)
        if tmp is not None:
          workdirs.unlink_quietly(tmp)
    raise workdirs.WorkdirError(f"Could not take the lock {self.path}; it keeps changing hands.")

  def _check_local(self) -> None:
    if not self._at_path(self._fd):
      self._held = False
      fd, self._fd = self._fd, None
      os.close(fd)
      owner = self._read_owner()
      raise workdirs.WorkdirError(
          f"{self.path} was removed or replaced while this run held it"
          + (f" (it now names {self._describe(owner)})" if owner else "") + "; this run stops "
          "so that two runs do not mix their checkpoints in one workdir. Never delete the lock "
          "of a live run.")

  def _release_local(self) -> None:
    fd, self._fd = self._fd, None
    try:
      if self._at_path(fd):  # Removed while still held: a contender sees it is gone.
        self.path.unlink(missing_ok=True)
      else:
        logging.warning("%s is no longer this run's lock; left in place.", self.path)
    finally:
      os.close(fd)

  # Object stores: a lease.

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
      owner = self._read_owner()
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
          raise self._refuse(self._describe(owner))
        logging.warning("Taking over the stale lock %s of %s.", self.path, self._describe(owner))
      workdirs.write_atomically(self.path, self._text())
      time.sleep(SETTLE_S)  # A run that wrote at the same time has overwritten one of us.
      if self._is_ours(self._read_owner()):
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat_thread, daemon=True,
                                        name="run.lock heartbeat")
        self._thread.start()
        return
    raise workdirs.WorkdirError(
        f"Could not take the lock {self.path}; another run keeps taking it.")

  def _heartbeat_lease(self) -> None:
    with self._mutex:
      if self._lost:
        raise self._lost
      owner = self._read_owner()
      if not self._is_ours(owner):
        self._lost = workdirs.WorkdirError(
            f"{self.path} was taken over by another run ("
            + (self._describe(owner) if owner else "removed, or cannot be read") + ") while "
            "this run held it; this run stops so that two runs do not mix their checkpoints in "
            "one workdir. If this run's heartbeats were late, raise the lease's stale_after_s "
            f"({self._stale_after_s:.0f} s).")
        raise self._lost
      workdirs.write_atomically(self.path, self._text())

  def _heartbeat_thread(self) -> None:
    """Keeps the lease fresh while the loop is busy (compiling, evaluating, restoring)."""
    while not self._stop.wait(max(self._stale_after_s / 10, 0.05)):
      try:
        self._heartbeat_lease()
      except workdirs.WorkdirError:
        return  # The loop raises it at its next heartbeat().
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Refreshing %s failed (%s: %s); trying again.", self.path,
                        type(e).__name__, e)

  def _release_lease(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=RELEASE_WAIT_S)
      if self._thread.is_alive():  # Stuck in a write (a hung storage call): it holds the mutex.
        logging.warning("%s was not released: its heartbeat thread is stuck. It is stale %.0f s "
                        "after its last heartbeat.", self.path, self._stale_after_s)
        return
    with self._mutex:
      owner = self._read_owner()
      if self._is_ours(owner):
        self.path.unlink(missing_ok=True)
      elif owner is not None:
        logging.warning("%s is no longer this run's lock (%s); left in place.", self.path,
                        self._describe(owner) if owner else "it cannot be read")

  def heartbeat(self) -> None:
    """Checks that the lock is still this run's (WorkdirError if not); a lease is refreshed."""
    if not self._held:
      return
    try:
      if self._lease:
        self._heartbeat_lease()
      else:
        self._check_local()
    except workdirs.WorkdirError:
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
