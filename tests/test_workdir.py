"""The workdir's small files are never seen half-written, and a damaged lock is reported plainly.

A reader thread races the writer: with a truncate-then-write it sees empty or partial files
within a few hundred writes (a run killed at that moment would leave them so for good).
"""
import json
import os
import threading
import time

import pytest

from conadv_jax import workdir

WRITES = 3000


def _race(path, write, parse):
  """Runs `write(i)` WRITES times while another thread parses `path`; returns what it saw."""
  seen = {"parsed": 0, "missing": 0, "bad": []}
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

  reader = threading.Thread(target=read)
  reader.start()
  try:
    for i in range(WRITES):
      write(i)
  finally:
    done.set()
    reader.join()
  return seen


def _lock_owner(text):
  owner = json.loads(text)
  if not isinstance(owner.get("pid"), int):
    raise ValueError(f"no pid in {text!r}")


def test_heartbeats_never_leave_the_lock_half_written(tmp_path):
  with workdir.RunLock(tmp_path) as lock:
    seen = _race(lock.path, lambda i: lock.heartbeat(), _lock_owner)
  assert not seen["bad"], f"{len(seen['bad'])} torn reads, e.g. {seen['bad'][:3]}"
  assert seen["parsed"] > 0 and seen["missing"] == 0
  assert not (tmp_path / "run.lock").exists()
  assert not list(tmp_path.iterdir()), "temporary files left behind"


def test_a_new_lock_is_never_seen_empty(tmp_path):
  def take_and_release(i):
    with workdir.RunLock(tmp_path):
      pass

  seen = _race(tmp_path / workdir.LOCK_NAME, take_and_release, _lock_owner)
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
  assert path.read_text() == "".join(lines[:200])  # The last write (i = WRITES - 1) is odd.
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


@pytest.mark.parametrize("age_s, taken_over", [(0, False), (3600, True)])
def test_an_unreadable_lock_is_judged_by_its_age(tmp_path, age_s, taken_over):
  lock_path = tmp_path / workdir.LOCK_NAME
  lock_path.write_text("")
  written = time.time() - age_s
  os.utime(lock_path, (written, written))
  lock = workdir.RunLock(tmp_path, stale_after_s=600)
  if taken_over:
    with lock:
      assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()
  else:
    with pytest.raises(workdir.WorkdirError, match=r"its lock cannot be read, written \d+ s ago"
                       ) as error:
      lock.__enter__()
    assert "None" not in str(error.value)
    assert lock_path.read_text() == ""  # Not ours to remove.
