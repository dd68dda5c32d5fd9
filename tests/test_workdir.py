"""The workdir's small files are never seen half-written, and run.lock admits one run at a time.

A reader thread races the writer: with a truncate-then-write it sees empty or partial files
within a few hundred writes (a run killed at that moment would leave them so for good).

On a local filesystem the lock is a kernel lock (flock): a live holder is never taken over, a
dead one at once, whatever its file says, and a heartbeat does not rewrite the file. On object
stores (gs://) it is a heartbeat lease; the lease tests run it on a local folder by making
`locks._uses_kernel_lock` answer False.
"""
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conadv_jax.run import lock as locks, workdir

MIN_WRITES, MAX_WRITES = 100, 3000
RACE_BUDGET_S = 15  # Writes fsync: on a slow shared disk 3,000 of them took 9 minutes.
RACE_LIMIT_S = 120  # How long to go on writing while the reader has parsed nothing.


def _race(path, write, parse):
  """Runs `write(i)` while another thread parses `path`; returns what it saw.

  MAX_WRITES writes, or fewer once RACE_BUDGET_S has passed, but never fewer than MIN_WRITES and
  never stopping (before RACE_LIMIT_S) until the reader has parsed something: on a loaded
  machine it may otherwise never run while the file exists. seen["writes"] counts the writes.
  """
  seen = {"parsed": 0, "missing": 0, "bad": [], "writes": 0}
  done = threading.Event()

  def read():
    while not done.is_set():
      try:
        text = path.read_text()
      except FileNotFoundError:
        seen["missing"] += 1
        continue
      try:
        parse(text)
        seen["parsed"] += 1
      except ValueError:
        seen["bad"].append(text[:80])

  def go_on(elapsed: float) -> bool:
    if seen["writes"] < MIN_WRITES or (not seen["parsed"] and elapsed < RACE_LIMIT_S):
      return True
    return seen["writes"] < MAX_WRITES and elapsed < RACE_BUDGET_S

  reader = threading.Thread(target=read)
  reader.start()
  start = time.monotonic()
  try:
    while go_on(time.monotonic() - start):
      write(seen["writes"])
      seen["writes"] += 1
  finally:
    done.set()
    reader.join()
  return seen


def _lock_owner(text):
  owner = json.loads(text)
  if not isinstance(owner.get("pid"), int):
    raise ValueError(f"no pid in {text!r}")


def test_a_local_heartbeat_only_checks_the_lock(tmp_path):
  with locks.RunLock(tmp_path) as lock:
    before = (lock.path.read_bytes(), os.stat(lock.path))
    for _ in range(3):
      lock.heartbeat()
    after = (lock.path.read_bytes(), os.stat(lock.path))
    assert after == before  # Same bytes, inode and times: never rewritten.
    assert "heartbeat" not in json.loads(after[0])
  assert not list(tmp_path.iterdir())


def test_a_new_lock_is_never_seen_empty(tmp_path):
  def take_and_release(i):
    with locks.RunLock(tmp_path):
      time.sleep(0)  # Lets the reader thread run while the lock exists.

  seen = _race(tmp_path / locks.LOCK_NAME, take_and_release, _lock_owner)
  assert not seen["bad"], f"{len(seen['bad'])} torn reads, e.g. {seen['bad'][:3]}"
  assert seen["parsed"] > 0
  assert not list(tmp_path.iterdir())


def test_write_atomically_shows_the_old_or_the_new_text(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train": {"loss": 1.0 / (s + 1)}}) + "\n" for s in range(200)]

  def whole(text):
    records = [json.loads(line) for line in text.splitlines()]
    if len(records) not in (100, 200):
      raise ValueError(f"{len(records)} records")

  seen = _race(path, lambda i: workdir.write_atomically(path, "".join(lines[:100 * (1 + i % 2)])),
               whole)
  assert not seen["bad"], f"{len(seen['bad'])} torn reads, e.g. {seen['bad'][:3]}"
  last = seen["writes"] - 1
  assert path.read_text() == "".join(lines[:100 * (1 + last % 2)])  # The last write's text.
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  path.write_text('{"final_step": 12}')

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    workdir.write_atomically(path, '{"final_step": 24}')
  assert path.read_text() == '{"final_step": 12}'
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # No temporary file left.


MALFORMED = ["", "[]", '"x"', "null", "{}", '{"pid": 1}',
             '{"host": "other", "pid": 5, "heartbeat": "abc"}',
             '{"host": "h", "pid": true, "started": 0, "heartbeat": 0}', "\udcff\udcfe"]


def _write_lock(path, text):
  path.write_bytes(text.encode("utf-8", "surrogateescape"))


def _owner(host=None, pid=None, age_s=0.0, **extra):
  now = time.time()
  return json.dumps({"host": host or socket.gethostname(), "pid": os.getpid() if pid is None
                     else pid, "started": now - age_s, "heartbeat": now - age_s, **extra})


def _holder(tmp_path):
  """A subprocess that takes the lock on `tmp_path`, says so, and sleeps."""
  code = ("import sys, time; from conadv_jax.run import lock\n"
          f"with lock.RunLock({str(tmp_path)!r}):\n"
          "  print('held', flush=True); time.sleep(600)\n")
  process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with selectors.DefaultSelector() as selector:  # A child hung importing jax fails, not hangs.
    selector.register(process.stdout, selectors.EVENT_READ)
    line = process.stdout.readline() if selector.select(timeout=120) else "(no answer in 120 s)"
  if line.strip() != "held":
    process.kill()
    process.wait()
    pytest.fail(f"the lock holder did not start: {line!r}")
  return process


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  with locks.RunLock(tmp_path) as first:
    with pytest.raises(workdir.WorkdirError, match=rf"is in use by another run \(pid {os.getpid()} "
                       rf"on host {re.escape(socket.gethostname())}, started \d+ s ago\)"):
      locks.RunLock(tmp_path).__enter__()
    first.heartbeat()  # Still ours.
  assert not list(tmp_path.iterdir())


def test_a_sigkilled_holder_s_lock_is_taken_over_at_once(tmp_path, caplog):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(workdir.WorkdirError, match=rf"in use by another run \(pid {holder.pid} "):
      locks.RunLock(tmp_path).__enter__()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid  # Left behind.
    start = time.monotonic()
    with locks.RunLock(tmp_path) as lock:  # Fresh heartbeat, same host: no waiting.
      assert time.monotonic() - start < 60  # Far below any age limit: no waiting.
      assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"Taking over the stale lock {tmp_path / 'run.lock'} (left by pid {holder.pid} " in (
        caplog.text)
    assert not list(tmp_path.iterdir())
  finally:
    holder.kill()
    holder.wait()


def test_a_lock_naming_our_own_pid_is_taken_over_when_no_one_holds_it(tmp_path):
  """A container restarted with the same hostname and pid (1) finds its former life's lock."""
  _write_lock(tmp_path / "run.lock", _owner(age_s=1.0))
  with locks.RunLock(tmp_path) as lock:
    owner = json.loads(lock.path.read_text())
    assert owner["pid"] == os.getpid() and owner["started"] == lock._info["started"]
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", MALFORMED)
def test_a_malformed_lock_that_no_one_holds_is_taken_over(tmp_path, text, caplog):
  _write_lock(tmp_path / "run.lock", text)
  with locks.RunLock(tmp_path):
    pass
  assert "its contents cannot be read" in caplog.text and "None" not in caplog.text
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["", "[]", '{"pid": 1}'])
def test_a_held_lock_with_malformed_contents_is_refused_plainly(tmp_path, text):
  with locks.RunLock(tmp_path) as held:
    with open(held.path, "w") as f:  # In place: the same file, still locked.
      f.write(text)
    with pytest.raises(workdir.WorkdirError, match="a live process holds its lock") as error:
      locks.RunLock(tmp_path).__enter__()
    assert "None" not in str(error.value)


@pytest.mark.parametrize("make", ["directory", "dangling symlink", "symlink loop"])
def test_a_lock_that_is_not_a_plain_file_is_refused_plainly(tmp_path, make):
  path = tmp_path / "run.lock"
  if make == "directory":
    path.mkdir()
  else:
    path.symlink_to(path if make == "symlink loop" else tmp_path / "gone")
  with pytest.raises(workdir.WorkdirError, match=rf"Could not take the lock {path} \(") as error:
    locks.RunLock(tmp_path).__enter__()
  assert ("Is a directory" if make == "directory" else "it is a symbolic link") in str(error.value)
  assert "delete it and run again" in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # No temporary left.
  assert path.is_symlink() != (make == "directory")
  assert not (tmp_path / "gone").exists()  # A broken link is not followed to create a file.


def test_a_lock_this_user_cannot_open_is_refused_plainly(tmp_path, monkeypatch):
  path = tmp_path / "run.lock"
  _write_lock(path, _owner())
  real_open = os.open

  def open_(name, *args, **kwargs):  # As a file of another user, mode 0644 (root opens any).
    if str(name) == str(path):
      raise PermissionError(13, "Permission denied", str(name))
    return real_open(name, *args, **kwargs)

  monkeypatch.setattr(os, "open", open_)
  with pytest.raises(workdir.WorkdirError, match=rf"Could not take the lock {path} "
                     r"\(PermissionError: .*delete it and run again"):
    locks.RunLock(tmp_path).__enter__()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_a_failed_takeover_is_refused_plainly_and_keeps_the_old_lock(tmp_path, monkeypatch):
  path = tmp_path / "run.lock"
  _write_lock(path, _owner(pid=5))

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(workdir.WorkdirError, match=rf"Could not take the lock {path} "
                     r"\(OSError: \[Errno 28\] No space left on device\)"):
    locks.RunLock(tmp_path).__enter__()
  assert json.loads(path.read_text())["pid"] == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_a_resent_link_that_says_exists_is_known_as_ours(tmp_path, monkeypatch):
  """NFS may answer EEXIST to a retransmitted link that succeeded. There locks belong to the
  process, so opening and closing `run.lock` as another run's would drop our own lock: the lock
  must be recognised without opening it (one flock: the new file's)."""
  link, flock, flocks = os.link, locks.fcntl.flock, []

  def link_then_exists(source, target):
    link(source, target)
    raise FileExistsError(17, "File exists")

  monkeypatch.setattr(os, "link", link_then_exists)
  monkeypatch.setattr(locks.fcntl, "flock", lambda *a: (flocks.append(a), flock(*a))[1])
  with locks.RunLock(tmp_path) as lock:
    assert json.loads(lock.path.read_text())["started"] == lock._info["started"]
    assert len(flocks) == 1
    lock.heartbeat()
  assert not list(tmp_path.iterdir())


def test_a_lock_removed_by_hand_stops_its_run_and_is_not_deleted_by_it(tmp_path):
  with locks.RunLock(tmp_path) as first:
    first.path.unlink()
    with locks.RunLock(tmp_path) as second:
      with pytest.raises(workdir.WorkdirError, match="was removed or replaced while this run "
                         rf"held it \(it now names pid {os.getpid()} "):
        first.heartbeat()
      first.release()
      assert json.loads(second.path.read_text())["started"] == second._info["started"]
      second.heartbeat()
    assert not second.path.exists()


def test_no_hard_links_still_gives_one_holder(tmp_path, monkeypatch):
  def no_link(*args):
    raise PermissionError(1, "Operation not permitted")

  monkeypatch.setattr(os, "link", no_link)
  with locks.RunLock(tmp_path) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir.WorkdirError, match="is in use by another run"):
      locks.RunLock(tmp_path).__enter__()
  assert not list(tmp_path.iterdir())


@pytest.fixture
def lease(monkeypatch):
  """The object-store lease, on a local folder (written atomically, as GCS replaces objects)."""
  monkeypatch.setattr(locks, "_uses_kernel_lock", lambda path: False)
  monkeypatch.setattr(locks, "SETTLE_S", 1.0)  # Two contenders' read-write gaps fit in it.


# A lease's heartbeat must be able to go stale.
LEASE_MALFORMED = MALFORMED + [
    '{"host": "hostB", "pid": 5, "started": 0, "heartbeat": NaN}',
    '{"host": "hostB", "pid": 5, "started": 0, "heartbeat": Infinity}',
    '{"host": "hostB", "pid": 5, "started": 0, "heartbeat": 4102444800}']  # Year 2100.


@pytest.mark.parametrize("text", LEASE_MALFORMED)
@pytest.mark.parametrize("age_s, taken_over", [(0, False), (3600, True)])
def test_lease_an_unreadable_lock_is_judged_by_its_age(tmp_path, lease, text, age_s, taken_over):
  lock_path = tmp_path / locks.LOCK_NAME
  _write_lock(lock_path, text)
  written = time.time() - age_s
  os.utime(lock_path, (written, written))
  lock = locks.RunLock(tmp_path, stale_after_s=600)
  if taken_over:
    with lock:
      assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()
  else:
    with pytest.raises(workdir.WorkdirError, match=r"its lock cannot be read, written \d+ s ago"
                       ) as error:
      lock.__enter__()
    assert "None" not in str(error.value)
    assert lock_path.read_bytes() == text.encode("utf-8", "surrogateescape")  # Not ours.


@pytest.mark.parametrize("owner, taken_over", [
    (dict(host="hostB", age_s=10), False),
    (dict(host="hostB", age_s=3600), True),
    # This host and pid namespace: a dead pid, a reused one (another start time), our own pid
    # from a former life (pid_start differs), all at once.
    (dict(pid=2**22 + 7, host_id=locks._host_id()), True),
    (dict(pid=1, host_id=locks._host_id(), pid_start=-1), True),
    (dict(host_id=locks._host_id(), pid_start=-1), True),
    # Another pid namespace that shares our hostname: its pids mean nothing here.
    (dict(pid=2**22 + 7, host_id="other-boot/1"), False),
])
def test_lease_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, lease, owner,
                                                                  taken_over):
  _write_lock(tmp_path / "run.lock", _owner(**owner))
  lock = locks.RunLock(tmp_path, stale_after_s=600)
  if taken_over:
    with lock:
      pass
    assert not lock.path.exists()
  else:
    with pytest.raises(workdir.WorkdirError, match="is in use by another run"):
      lock.__enter__()
    assert lock.path.exists()


def test_lease_a_second_lock_in_the_same_process_is_refused(tmp_path, lease):
  with locks.RunLock(tmp_path):
    with pytest.raises(workdir.WorkdirError, match=rf"in use by another run \(pid {os.getpid()} "):
      locks.RunLock(tmp_path).__enter__()


def test_lease_two_contenders_at_once_give_one_holder(tmp_path, lease):
  contenders = [locks.RunLock(tmp_path) for _ in range(2)]
  outcomes = [None, None]
  go = threading.Barrier(2)

  def contend(i):
    go.wait()
    try:
      contenders[i].__enter__()
      outcomes[i] = "held"
    except workdir.WorkdirError as e:
      outcomes[i] = str(e)

  threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(o == "held" for o in outcomes) == [False, True], outcomes
  for lock in contenders:
    lock.release()
  assert not (tmp_path / "run.lock").exists()


def test_lease_heartbeat_and_release_leave_another_run_s_lock_alone(tmp_path, lease):
  lock = locks.RunLock(tmp_path)
  with lock:
    lock.heartbeat()
    taken = _owner(host="hostB", pid=5)
    _write_lock(lock.path, taken)  # Taken over by a run on hostB (our heartbeats were late).
    with pytest.raises(workdir.WorkdirError, match=r"was taken over by another run \(pid 5 on "
                       "host hostB"):
      lock.heartbeat()
  assert lock.path.read_text() == taken  # Neither rewritten nor removed.


def test_lease_heartbeats_never_leave_the_lock_half_written(tmp_path, lease):
  with locks.RunLock(tmp_path) as lock:
    seen = _race(lock.path, lambda i: lock.heartbeat(), _lock_owner)
  assert not seen["bad"], f"{len(seen['bad'])} torn reads, e.g. {seen['bad'][:3]}"
  assert seen["parsed"] > 0 and seen["missing"] == 0
  assert not (tmp_path / "run.lock").exists()
  assert not list(tmp_path.iterdir()), "temporary files left behind"


def test_lease_is_refreshed_by_a_background_thread(tmp_path, lease):
  with locks.RunLock(tmp_path, stale_after_s=1.0) as lock:
    first = json.loads(lock.path.read_text())["heartbeat"]
    deadline = time.monotonic() + 10
    while json.loads(lock.path.read_text())["heartbeat"] == first:
      assert time.monotonic() < deadline, "no heartbeat without the loop"
      time.sleep(0.05)
  assert not lock.path.exists()


def test_lease_release_does_not_wait_for_a_hung_heartbeat_write(tmp_path, lease, monkeypatch,
                                                               caplog):
  monkeypatch.setattr(locks, "RELEASE_WAIT_S", 0.2)
  hung, unblock = threading.Event(), threading.Event()
  write = workdir.write_atomically

  def hang(*args):
    hung.set()
    unblock.wait(60)
    write(*args)

  lock = locks.RunLock(tmp_path, stale_after_s=1.0).__enter__()  # A heartbeat every 0.1 s.
  try:
    monkeypatch.setattr(workdir, "write_atomically", hang)
    assert hung.wait(30), "no heartbeat from the thread"
    start = time.monotonic()
    lock.release()
    assert time.monotonic() - start < 30
    assert "was not released: its heartbeat thread is stuck" in caplog.text
  finally:
    unblock.set()
    lock._thread.join(30)


def test_lease_a_failed_heartbeat_write_warns_and_keeps_the_lock(tmp_path, lease, monkeypatch,
                                                                 caplog):
  with locks.RunLock(tmp_path) as lock:
    def full(*args):
      raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
      patch.setattr(workdir, "write_temporary", full)
      lock.heartbeat()  # A warning, not a traceback: the lease is refreshed again later.
    assert "Refreshing the heartbeat in" in caplog.text and "No space left" in caplog.text
    with pytest.raises(workdir.WorkdirError, match="is in use by another run"):
      locks.RunLock(tmp_path).__enter__()
    lock.heartbeat()
  assert not list(tmp_path.iterdir())
