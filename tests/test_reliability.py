"""Faults end to end: main.py in separate processes, as a user, a pod or a scheduler runs it.

Several processes on one shared workdir, SIGTERM preemption, damaged and foreign checkpoints.
docs/reliability.md lists which test proves what. In-process tests of exact resume, non-finite
losses and a foreign checkpoint's method are in test_train.py.

Each run is configs/cpu_smoke.py:conadv (τ = 1); one takes ~30 s on 2 cores, mostly compiling.
"""
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from cpu_env import cpu_env

from conadv_jax.run import checkpointing, lock as locks

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'cpu_smoke.py'}:conadv"
RUN_TIMEOUT_S = 600  # Generous: 2 cores may be shared with another test file (pytest -n 2).
PREEMPTED = re.compile(r"Stopped by [\w ]+: saved a checkpoint at step (\d+)")

# Records which process opens results.json or metrics.jsonl for writing (a Python audit hook,
# loaded at start-up as sitecustomize): proves that only process 0 writes them.
_WRITE_AUDIT = '''
import os, sys
_LOG = os.environ.get("CONADV_TEST_WRITE_LOG")
def _hook(event, args):
  # A write is an open for writing, or a rename onto the name (workdir.write_atomically).
  if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
    target = args[0]
  elif event == "os.rename":
    target = args[1]
  else:
    return
  if (isinstance(target, (str, os.PathLike))
      and os.path.basename(os.fspath(target)) in ("results.json", "metrics.jsonl")):
    with open(f"{_LOG}.{os.getpid()}", "a") as f:
      f.write(os.path.basename(os.fspath(target)) + "\\n")
if _LOG:
  sys.addaudithook(_hook)
'''

# Makes orbax's restore of the state fail as a machine too small for it would (not damage to the
# checkpoint's files), loaded at start-up as sitecustomize.
_RESTORE_FAILS = '''
import os
_ERROR = os.environ.get("CONADV_TEST_RESTORE_ERROR")
if _ERROR:
  import orbax.checkpoint as ocp
  _restore = ocp.CheckpointManager.restore
  def _failing_restore(self, step, *args, **kwargs):
    composite = kwargs.get("args", args[0] if args else None)
    if composite is not None and "state" in composite:
      raise {"memory": MemoryError("out of host memory"),
             "device": RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                    "15.00GiB.")}[_ERROR]
    return _restore(self, step, *args, **kwargs)
  ocp.CheckpointManager.restore = _failing_restore
'''


# Makes orbax see the step folder CONADV_TEST_UNFINISHED as a save that never committed, as a
# save killed midway leaves it on an object store (no commit_success.txt).
_UNFINISHED_SAVE = '''
import os
_STEP = os.environ.get("CONADV_TEST_UNFINISHED")
if _STEP:
  import orbax.checkpoint as ocp
  _finalized = ocp.path.step.is_checkpoint_finalized
  ocp.path.step.is_checkpoint_finalized = (
      lambda path, *a, **k: os.path.basename(str(path)) != _STEP and _finalized(path, *a, **k))
'''


class _Main:
  """One `python main.py` process; its output goes to a file (an unread pipe would block it)."""

  def __init__(self, log: pathlib.Path, workdir: pathlib.Path, *flags: str, num_devices: int = 4,
               **env: str):
    self.log = log
    with open(log, "w") as f:
      self.popen = subprocess.Popen(
          [sys.executable, str(REPO / "main.py"), CONFIG, f"--workdir={workdir}", *flags],
          cwd=REPO, env=cpu_env(num_devices, **env), stdout=f, stderr=subprocess.STDOUT)

  @property
  def output(self) -> str:
    return self.log.read_text(errors="replace")

  def running(self) -> bool:
    return self.popen.poll() is None


def _wait(processes: list[_Main], timeout: float = RUN_TIMEOUT_S) -> list[int]:
  """Exit statuses; kills all if one is still running at the deadline."""
  deadline = time.monotonic() + timeout
  try:
    return [p.popen.wait(max(deadline - time.monotonic(), 0.1)) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.popen.kill()
      p.popen.wait()
    raise AssertionError(f"not finished after {timeout} s:\n" +
                         "\n".join(p.output[-3000:] for p in processes)) from None


def _run(log: pathlib.Path, workdir: pathlib.Path, *flags: str, num_devices: int = 4) -> str:
  """Runs main.py to the end, expecting success; returns its output."""
  process = _Main(log, workdir, *flags, num_devices=num_devices)
  assert _wait([process]) == [0], process.output[-5000:]
  return process.output


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(log_dir: pathlib.Path, workdir: pathlib.Path, *flags: str,
                         **env: str) -> list[_Main]:
  """Processes 0 and 1 of one run, 2 fake CPU devices each, sharing `workdir` (as a pod's GCS)."""
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  return [_Main(log_dir / f"process_{i}.log", workdir, *flags, address, "--num_processes=2",
                f"--process_id={i}", num_devices=2, **env) for i in range(2)]


def _metrics(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl; a line still being written is left out."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return lines


def _steps(workdir: pathlib.Path, kind: str = "train") -> list[int]:
  return [m["step"] for m in _metrics(workdir) if m["kind"] == kind]


def _results(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "results.json").read_text())


def _wait_until(condition, processes: list[_Main], what: str, timeout: float = RUN_TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while not condition():
    if not all(p.running() for p in processes):
      raise AssertionError(f"a process ended before {what}:\n" +
                           "\n".join(p.output[-3000:] for p in processes))
    if time.monotonic() > deadline:
      raise AssertionError(f"no {what} after {timeout} s")
    time.sleep(0.02)


def _preempted_step(output: str) -> int:
  found = PREEMPTED.findall(output)
  assert len(found) == 1, output[-5000:]
  return int(found[0])


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> pathlib.Path:
  """cpu_smoke to the end in one process with 4 devices: checkpoints at 4, 8 and 12."""
  workdir = tmp_path_factory.mktemp("single") / "workdir"
  _run(workdir.parent / "main.log", workdir)
  return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[pathlib.Path, list[_Main], pathlib.Path]:
  """The same run as two processes with 2 devices each, auditing who writes the result files."""
  log_dir = tmp_path_factory.mktemp("two_processes")
  (log_dir / "sitecustomize.py").write_text(_WRITE_AUDIT)
  audit = log_dir / "writes"
  workdir = log_dir / "workdir"
  processes = _start_two_processes(
      log_dir, workdir, CONADV_TEST_WRITE_LOG=str(audit),
      PYTHONPATH=os.pathsep.join([str(log_dir), os.environ.get("PYTHONPATH", "")]))
  assert _wait(processes) == [0, 0], "\n".join(p.output[-5000:] for p in processes)
  return workdir, processes, audit


def test_two_processes_match_one_and_only_process_0_writes(single_run, two_process_run):
  workdir, processes, audit = two_process_run
  one, two = _results(single_run), _results(workdir)
  assert two["final_step"] == 12 and two["eval"]["num_examples"] == 64
  # The attacks too: their keys come from each example's index in the split.
  for key in ("loss", "top1", "adv_top1", "robust_top1"):
    assert abs(two["eval"][key] - one["eval"][key]) <= 1e-4, (key, one["eval"], two["eval"])
  assert "Process 0 of 2; 2 local / 4 global devices" in processes[0].output
  assert "Process 1 of 2; 2 local / 4 global devices" in processes[1].output

  def writes(process):
    path = pathlib.Path(f"{audit}.{process.popen.pid}")
    return path.read_text().split() if path.exists() else []

  assert writes(processes[1]) == []
  assert writes(processes[0]).count("results.json") == 1
  assert _steps(workdir) == list(range(2, 13, 2)) and _steps(workdir, "eval") == [6, 12]
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  # Every process took part in every checkpoint (orbax writes one part per process).
  for step in (4, 8, 12):
    parts = workdir / "checkpoints" / str(step) / "state"
    assert (parts / "ocdbt.process_0").is_dir() and (parts / "ocdbt.process_1").is_dir()


def test_sigterm_saves_exits_0_and_restart_is_bit_identical(tmp_path):
  total = 30
  flags = (f"--config.num_train_steps={total}", "--config.checkpoint_every_steps=4",
           "--config.log_every_steps=1", "--config.eval_every_steps=15")
  reference = tmp_path / "uninterrupted"
  _run(tmp_path / "uninterrupted.log", reference, *flags)

  workdir = tmp_path / "preempted"
  process = _Main(tmp_path / "preempted.log", workdir, *flags)
  _wait_until(lambda: (workdir / "checkpoints" / "4").is_dir(), [process], "first checkpoint")
  target = random.randint(5, total - 10)  # Leaves 10 steps for the signal to arrive.
  _wait_until(lambda: max(_steps(workdir), default=0) >= target, [process], f"step {target}")
  signalled = time.monotonic()
  process.popen.send_signal(signal.SIGTERM)
  assert _wait([process], timeout=60) == [0], process.output[-5000:]
  assert time.monotonic() - signalled < 60
  stopped = _preempted_step(process.output)
  assert target <= stopped < total, (target, stopped)
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  assert not (workdir / "results.json").exists()

  output = _run(tmp_path / "restarted.log", workdir, *flags)  # The same command again.
  assert f"resuming from step {stopped} " in output
  assert _results(workdir)["param_fingerprint"] == _results(reference)["param_fingerprint"]
  assert _results(workdir)["eval"] == _results(reference)["eval"]
  assert _steps(workdir) == list(range(1, total + 1)), f"SIGTERM after step {target}"
  assert _steps(workdir, "eval") == [15, 30]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(two_process_run, tmp_path):
  """JAX's preemption sync (jax.distributed is up) makes both processes save the same step."""
  reference, _, _ = two_process_run
  workdir = tmp_path / "workdir"
  flags = ("--config.log_every_steps=1",)  # Finer steps in metrics.jsonl; same training.
  processes = _start_two_processes(tmp_path, workdir, *flags)
  _wait_until(lambda: max(_steps(workdir), default=0) >= 2, processes, "step 2")
  signalled = time.monotonic()
  processes[1].popen.send_signal(signal.SIGTERM)  # As if only that host got the notice.
  assert _wait(processes, timeout=60) == [0, 0], "\n".join(p.output[-5000:] for p in processes)
  assert time.monotonic() - signalled < 60
  stopped = {_preempted_step(p.output) for p in processes}
  assert len(stopped) == 1, stopped
  stopped = stopped.pop()
  assert (workdir / "checkpoints" / str(stopped)).is_dir()

  (tmp_path / "restart").mkdir()
  restarted = _start_two_processes(tmp_path / "restart", workdir, *flags)  # The same commands.
  assert _wait(restarted) == [0, 0], "\n".join(p.output[-5000:] for p in restarted)
  assert all(f"resuming from step {stopped} " in p.output for p in restarted)
  assert _results(workdir)["param_fingerprint"] == _results(reference)["param_fingerprint"]
  assert _steps(workdir) == list(range(1, 13))


def test_two_process_run_resumes_with_one_process(single_run, two_process_run, tmp_path):
  """A job preempted on 2 hosts continues on 1: batch t is the same examples for any process
  count (synthetic data has one global order), so it ends where the 1-process run ends."""
  reference, _, _ = two_process_run
  workdir = tmp_path / "workdir"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # As if preempted after the step-8 checkpoint.
  (workdir / "results.json").unlink()
  output = _run(tmp_path / "one_process.log", workdir)
  assert "resuming from step 8 " in output and "Process 0 of 2" not in output
  one, resumed = _results(single_run), _results(workdir)
  assert resumed["final_step"] == 12 and resumed["eval"]["num_examples"] == 64
  for key in ("loss", "top1", "adv_top1"):
    assert abs(resumed["eval"][key] - one["eval"][key]) <= 1e-4, (key, one["eval"],
                                                                   resumed["eval"])
  assert _steps(workdir) == list(range(2, 13, 2)) and _steps(workdir, "eval") == [6, 12]


def _write_fashion_idx(folder: pathlib.Path) -> pathlib.Path:
  """A small Fashion-MNIST as its four IDX files (128 train, 40 test examples)."""
  from conadv_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True)
  for split, count in (("train", 128), ("test", 40)):
    images_name, labels_name = fashion_mnist.IDX_FILES[split]
    fashion_mnist.write_idx(folder / images_name,
                            rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    fashion_mnist.write_idx(folder / labels_name, (np.arange(count) % 10).astype(np.uint8))
  return folder


def test_two_processes_prepare_a_tfds_dataset_once_and_match_one_process(tmp_path):
  """Fashion-MNIST from IDX files in an unprepared data_dir that both processes share: process 0
  converts it while process 1 waits at the real barrier, and with TFDS data as with synthetic
  data the global batches, so the results, do not depend on the process count."""
  flags = ["--config.dataset=fashion_mnist", "--config.image_size=0",
           "--config.num_train_steps=6", "--config.eval_every_steps=6",
           "--config.sharpness_num_examples=0"]
  two = _start_two_processes(tmp_path, tmp_path / "two",
                             f"--config.data_dir={_write_fashion_idx(tmp_path / 'data_two')}",
                             *flags)
  assert _wait(two) == [0, 0], "\n".join(p.output[-5000:] for p in two)
  preparing = [p.output.count("Preparing fashion_mnist_idx") for p in two]
  assert preparing == [1, 0], preparing
  _run(tmp_path / "one.log", tmp_path / "one",
       f"--config.data_dir={_write_fashion_idx(tmp_path / 'data_one')}", *flags)
  one, two_results = _results(tmp_path / "one"), _results(tmp_path / "two")
  assert one["eval"]["num_examples"] == two_results["eval"]["num_examples"] == 40
  for key in ("loss", "top1", "adv_top1", "robust_top1"):
    assert abs(two_results["eval"][key] - one["eval"][key]) <= 1e-4, (key, one, two_results)


def test_the_adversarial_evals_do_not_depend_on_eval_batch_size(single_run, tmp_path):
  """Through main.py: 64 eval examples as 4 batches of 16 instead of 24 + 24 + 16 (padded). The
  attacks' randomness is keyed by each example's index, not its place in a batch."""
  workdir = tmp_path / "workdir"
  _run(tmp_path / "main.log", workdir, "--config.eval_batch_size=16")
  one, other = _results(single_run)["eval"], _results(workdir)["eval"]
  assert other["num_examples"] == one["num_examples"] == 64
  for key in ("loss", "top1", "adv_top1", "robust_top1"):
    assert abs(other[key] - one[key]) <= 1e-5, (key, one, other)


def test_resume_on_half_the_devices_with_twice_the_accumulation(single_run, tmp_path):
  """A job preempted on 4 devices continues on 2 with grad_accum_steps=2: the same global
  batches and the same BN groups (8 rows), so it ends where the 4-device run ends, up to float
  summation order."""
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # As if preempted after the step-8 checkpoint.
  (workdir / "results.json").unlink()
  output = _run(tmp_path / "main.log", workdir, "--config.grad_accum_steps=2", num_devices=2)
  assert "resuming from step 8 " in output and "on 2 devices" in output
  assert "grad_accum_steps: 1 in the checkpoint, 2 now" in output
  one, resumed = _results(single_run), _results(workdir)
  assert resumed["final_step"] == 12 and resumed["eval"]["num_examples"] == 64
  for key in ("loss", "top1", "adv_top1", "robust_top1"):
    assert abs(resumed["eval"][key] - one["eval"][key]) <= 1e-4, (key, one["eval"],
                                                                   resumed["eval"])
  assert _steps(workdir) == list(range(2, 13, 2)) and _steps(workdir, "eval") == [6, 12]


def _damage(checkpoint: pathlib.Path, how: str) -> pathlib.Path:
  """Truncates to half, or deletes, the largest file of a checkpoint's state (the FIFO's data)."""
  victim = max((p for p in (checkpoint / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  if how == "truncated":
    os.truncate(victim, victim.stat().st_size // 2)
  else:
    victim.unlink()
  return victim


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_newest_checkpoint_falls_back_and_finishes(single_run, tmp_path, how):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  victim = _damage(workdir / "checkpoints" / "12", how)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "kind": "tra')  # And a line cut short, as by a kill mid-write.

  output = _run(tmp_path / "main.log", workdir, "--config.num_train_steps=16")
  assert re.search(r"Checkpoint at step 12 in \S+ cannot be restored", output), victim
  assert "Restored checkpoint at step 8 " in output
  assert "resuming from step 8 " in output
  assert "Moved the damaged checkpoint at step 12 aside to" in output
  assert "dropped a line that is not a metrics record" in output
  assert len(list((workdir / "checkpoints_damaged").glob("12.*"))) == 1  # Kept, not deleted.
  assert _results(workdir)["final_step"] == 16
  assert _steps(workdir) == list(range(2, 17, 2))  # 10 and 12 again, once each.
  # Every checkpoint kept now restores, the recomputed 12 included, with finite values.
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "record"))
  assert manager.all_steps() == [8, 12, 16]
  for step in manager.all_steps():
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert int(state["step"]) == step
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(state["params"]))


def _chunk_bytes(state: pathlib.Path, key: str) -> tuple[pathlib.Path, int, int]:
  """(file, offset, length) of one stored chunk, from the checkpoint's OCDBT index."""
  store = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
  version = ts.ocdbt.dump(store).result()["versions"][-1]
  assert version["root_height"] == 0  # A small checkpoint: one b-tree node.
  entries = ts.ocdbt.dump(store, version["root"]["location"]).result()["entries"]
  value = next(e["indirect_value"] for e in entries if e["key"] == key.encode())
  prefix, name, offset, length = value.removeprefix("value:").split(":")
  return state / prefix / name, int(offset), int(length)


def test_checkpoint_part_of_one_process_damaged_both_fall_back(two_process_run, tmp_path):
  """Only process 1 reads the FIFO rows of its devices; both must resume from one older step."""
  reference, _, _ = two_process_run
  workdir = tmp_path / "workdir"
  shutil.copytree(reference, workdir)
  # FIFO rows 24..31 (of 32): process 1's second device. Zeroed: the chunk no longer decodes.
  path, offset, length = _chunk_bytes(workdir / "checkpoints" / "12" / "state",
                                      "adv_fifo.image/0.3.0.0.0")
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(bytes(length))

  processes = _start_two_processes(tmp_path, workdir, "--config.num_train_steps=16")
  assert _wait(processes, timeout=300) == [0, 0], "\n".join(p.output[-5000:] for p in processes)
  assert "another process could not read its part" in processes[0].output
  assert re.search(r"Checkpoint at step 12 in \S+ cannot be restored \(\w+", processes[1].output)
  assert all("resuming from step 8 " in p.output for p in processes)
  assert _results(workdir)["final_step"] == 16
  assert _steps(workdir) == list(range(2, 17, 2))


def _checkpoint_files(workdir: pathlib.Path) -> dict[str, tuple[int, float]]:
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime)
          for p in (workdir / "checkpoints").rglob("*") if p.is_file()}


@pytest.mark.parametrize("flag,difference", [
    ("--config.staleness=2", "staleness: 1 in the checkpoint, 2 now: refused"),
    ("--config.seed=1", "seed: 0 in the checkpoint, 1 now: refused"),
    ("--config.method=disadv --config.staleness=0", "method: 'conadv' in the checkpoint"),
    ("--config.model=ResNet18", "model: 'SmallResNet' in the checkpoint, 'ResNet18' now"),
    # Not in any hand-kept list: the saved arrays themselves differ.
    ("--config.optimizer=lars", "the saved state differs from the one this config builds"),
    ("--config.synthetic_num_classes=7", "params.head.kernel: (16, 10) float32 there, "
     "(16, 7) float32 now"),
])
def test_checkpoint_of_another_experiment_is_refused_and_kept(single_run, tmp_path, flag,
                                                              difference):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  before = _checkpoint_files(workdir)
  config_json = (workdir / "config.json").read_text()
  metrics = (workdir / "metrics.jsonl").read_bytes()
  process = _Main(tmp_path / "main.log", workdir, *flag.split())
  assert _wait([process], timeout=120) == [2], process.output[-5000:]
  assert "belongs to a different experiment" in process.output
  assert difference in process.output, process.output[-3000:]
  assert "Traceback" not in process.output
  assert _checkpoint_files(workdir) == before  # Nothing deleted, moved or rewritten.
  assert (workdir / "config.json").read_text() == config_json
  assert (workdir / "metrics.jsonl").read_bytes() == metrics
  assert not (workdir / "checkpoints_damaged").exists()


def test_changed_settings_are_warned_and_recorded(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  output = _run(tmp_path / "main.log", workdir, "--config.learning_rate=0.1",
                "--config.num_train_steps=16", "--config.attack.epsilon=4")
  assert "learning_rate: 0.05 in the checkpoint, 0.1 now" in output
  assert "num_train_steps: 12 in the checkpoint, 16 now" in output
  assert "attack.epsilon: 9.0 in the checkpoint, 4.0 now" in output
  results = _results(workdir)
  assert results["config_history"] == [{"step": 12, "changes": {
      "attack.epsilon": [9.0, 4.0], "learning_rate": [0.05, 0.1], "num_train_steps": [12, 16]}}]
  assert _steps(workdir) == list(range(2, 17, 2)) and _steps(workdir, "eval") == [6, 12, 16]


def test_checkpoint_past_the_new_total_is_refused(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  before = _checkpoint_files(workdir)
  config_json = (workdir / "config.json").read_text()
  metrics = (workdir / "metrics.jsonl").read_text()
  process = _Main(tmp_path / "main.log", workdir, "--config.num_train_steps=8")
  assert _wait([process], timeout=120) == [2], process.output[-5000:]
  assert "is at step 12, past this run's 8 steps" in process.output
  assert "Traceback" not in process.output
  assert _checkpoint_files(workdir) == before
  assert (workdir / "config.json").read_text() == config_json
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_rerunning_a_finished_run_adds_no_line(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  metrics = (workdir / "metrics.jsonl").read_text()
  _run(tmp_path / "main.log", workdir)
  assert (workdir / "metrics.jsonl").read_text() == metrics
  assert _results(workdir)["eval"] == _results(single_run)["eval"]


def test_empty_and_foreign_entries_never_push_out_a_checkpoint(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  (workdir / "checkpoints" / "99").mkdir()  # Empty: as left by a crash mid-save elsewhere.
  (workdir / "checkpoints" / "NOTES.txt").write_text("mine")
  output = _run(tmp_path / "main.log", workdir, "--config.num_train_steps=16")
  assert "Moved the damaged checkpoint at step 99 aside" in output
  assert "resuming from step 12 " in output
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "record"))
  assert manager.all_steps() == [8, 12, 16]
  assert (workdir / "checkpoints" / "NOTES.txt").read_text() == "mine"


def _unchanged_workdir(workdir: pathlib.Path):
  """What a refused run must leave as it was: checkpoint files, config.json, metrics.jsonl."""
  return (_checkpoint_files(workdir), (workdir / "config.json").read_text(),
          (workdir / "metrics.jsonl").read_text())


def _raised_while_handling(first: BaseException, second: BaseException) -> BaseException:
  """`second`, raised in an `except` block handling `first` (so first is its __context__)."""
  try:
    try:
      raise first
    except type(first):
      raise second  # pylint: disable=raise-missing-from
  except type(second) as e:
    return e


def test_only_damaged_files_count_as_damage():
  """The classification behind the next tests; real orbax/tensorstore errors of damaged files
  are raised in test_damaged_newest_checkpoint_falls_back_and_finishes and the zeroed-chunk
  test (OUT_OF_RANGE, FAILED_PRECONDITION from a truncated or corrupt zstd stream)."""
  def wrapped(cause):  # As orbax's serialization wraps tensorstore's error.
    try:
      raise Exception("Encountered error while reading array index") from cause
    except Exception as e:  # pylint: disable=broad-except
      return e

  damage = [FileNotFoundError(2, "No such file"), json.JSONDecodeError("Expecting value", "", 0),
            ValueError("DATA_LOSS: Error decoding manifest"),
            wrapped(ValueError('OUT_OF_RANGE: Error reading "params/0.0"')),
            wrapped(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream")),
            ValueError('NOT_FOUND: Error opening "zarr" driver')]
  other = [MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: Out of memory"),
           wrapped(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")),
           wrapped(ValueError("UNAVAILABLE: connection reset")),
           ValueError("DEADLINE_EXCEEDED: GCS read"), PermissionError(13, "Permission denied"),
           ValueError("INVALID_ARGUMENT: sharding"), KeyError("state"), TypeError("new orbax"),
           _raised_while_handling(FileNotFoundError(2, "No such file"),
                                  PermissionError(13, "Permission denied")),
           OSError(28, "No space left on device")]
  assert [checkpointing.is_damage(e) for e in damage] == [True] * len(damage)
  assert [checkpointing.is_damage(e) for e in other] == [False] * len(other)


@pytest.mark.parametrize("error, shown", [
    ("memory", "MemoryError: out of host memory"),  # Other kinds: the classification test above.
])
def test_a_restore_error_that_is_not_damage_stops_and_keeps_every_checkpoint(
    single_run, tmp_path, error, shown):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  before = _unchanged_workdir(workdir)
  (tmp_path / "sitecustomize.py").write_text(_RESTORE_FAILS)
  process = _Main(tmp_path / "main.log", workdir, "--config.num_train_steps=16",
                  CONADV_TEST_RESTORE_ERROR=error,
                  PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
  assert _wait([process], timeout=180) == [2], process.output[-5000:]
  assert re.search(r"error: The checkpoint at step 12 in \S+ could not be restored", process.output)
  assert shown in process.output
  assert "nothing in the workdir was moved or deleted" in process.output
  assert "Traceback" not in process.output
  assert _unchanged_workdir(workdir) == before  # Every checkpoint in place, nothing rewritten.
  assert not (workdir / "checkpoints_damaged").exists()


def test_an_unfinished_save_is_moved_aside_and_the_run_resumes_before_it(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # As if killed while saving step 12 to gs://:
  shutil.copytree(workdir / "checkpoints" / "8", workdir / "checkpoints" / "12")  # has files.
  (workdir / "results.json").unlink()
  (tmp_path / "sitecustomize.py").write_text(_UNFINISHED_SAVE)
  process = _Main(tmp_path / "main.log", workdir, CONADV_TEST_UNFINISHED="12",
                  PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
  assert _wait([process]) == [0], process.output[-5000:]
  assert "Moved an unfinished save (no commit marker) at step 12 aside" in process.output
  assert "resuming from step 8 " in process.output
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == ["12"]
  assert _results(workdir)["final_step"] == 12


def test_no_checkpoint_restores_is_refused_and_nothing_is_moved(single_run, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  for step in (4, 8, 12):
    _damage(workdir / "checkpoints" / str(step), "truncated")
  before = _unchanged_workdir(workdir)
  process = _Main(tmp_path / "main.log", workdir, "--config.num_train_steps=16")
  assert _wait([process], timeout=180) == [2], process.output[-5000:]
  assert re.search(r"error: None of the checkpoints in \S+ restores: step 12: .*; step 8: .*; "
                   r"step 4: .*Nothing was moved or deleted", process.output)
  assert "run the same command to start from step 0" in process.output
  assert "Traceback" not in process.output
  assert _unchanged_workdir(workdir) == before
  assert not (workdir / "checkpoints_damaged").exists()


def test_resume_with_another_data_layout_is_refused_and_kept(single_run, tmp_path):
  """As if the checkpoint came from ImageNet without cache on 2 processes (per-process file
  slices): the record saved with it names that layout; this run reads one global order. Only
  the record on disk is edited; main.py runs unchanged."""
  workdir = tmp_path / "workdir"
  shutil.copytree(single_run, workdir)
  record_file = workdir / "checkpoints" / "12" / "record" / "metadata"
  record = json.loads(record_file.read_text())
  assert record["data_order"] is None  # Synthetic data: one global order.
  record["data_order"] = "imagenet2012: TFDS file slices over 2 processes"
  record_file.write_text(json.dumps(record))
  before = _unchanged_workdir(workdir)
  process = _Main(tmp_path / "main.log", workdir, "--config.num_train_steps=16")
  assert _wait([process], timeout=180) == [2], process.output[-5000:]
  assert ("error: The checkpoint in " in process.output and "(step 12) was trained with the data "
          "read as imagenet2012: TFDS file slices over 2 processes, but this run would read it "
          "as one global order" in process.output), process.output[-3000:]
  assert "Resume with the same number of processes as before" in process.output
  assert "Traceback" not in process.output
  assert _unchanged_workdir(workdir) == before
  assert not (workdir / "checkpoints_damaged").exists()


def test_one_run_per_workdir_and_a_dead_run_s_lock_is_taken_over(tmp_path):
  workdir = tmp_path / "workdir"
  first = _Main(tmp_path / "first.log", workdir, "--config.num_train_steps=100000",
                "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000")
  _wait_until(lambda: max(_steps(workdir), default=0) >= 2, [first], "step 2")
  second = _Main(tmp_path / "second.log", workdir)
  assert _wait([second], timeout=120) == [2], second.output[-5000:]
  assert "is in use by another run" in second.output
  assert f"pid {first.popen.pid}" in second.output
  assert first.running()
  first.popen.kill()  # SIGKILL: the lock stays behind, stale.
  first.popen.wait()
  assert (workdir / "run.lock").exists()
  output = _run(tmp_path / "third.log", workdir)
  assert "Taking over the stale lock" in output
  assert _steps(workdir) == list(range(2, 13, 2))  # The killed run's lines were dropped.
  assert not (workdir / "run.lock").exists()


@pytest.mark.parametrize("resumed", [True, False], ids=["resumed", "fresh"])
def test_a_failed_save_stops_the_run_at_once_and_keeps_the_last_good_checkpoint(
    single_run, tmp_path, resumed):
  """A file-size limit makes the checkpoint's data file fail to write, as a full disk would.

  Saves every 12 steps: the save at step 12 fails, and the run must stop before the next save
  at 24 (orbax alone reports the failure only there).
  """
  workdir = tmp_path / "workdir"
  if resumed:
    shutil.copytree(single_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")
    (workdir / "results.json").unlink()
  log = tmp_path / "main.log"
  # The limit is set in the child itself (a preexec_fn would fork this multithreaded process).
  limited = ("import os, resource, sys; "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000)); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
  with open(log, "w") as f:
    status = subprocess.run(
        [sys.executable, "-c", limited, str(REPO / "main.py"), CONFIG, f"--workdir={workdir}",
         "--config.num_train_steps=48", "--config.checkpoint_every_steps=12",
         "--config.log_every_steps=1"], cwd=REPO, env=cpu_env(4), stdout=f,
        stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False).returncode
  output = log.read_text()
  assert status == 2, output[-5000:]
  assert "error: Saving a checkpoint in" in output, output[-5000:]
  assert ("the last good checkpoint is step 8" if resumed else
          "no checkpoint was saved before it, so a resume starts from step 0") in output
  assert "Traceback" not in output
  steps = _steps(workdir)
  assert 12 < max(steps) < 24, steps  # Stopped soon after the failed save.
  assert steps == sorted(set(steps)), steps  # Each logged step once, in order.
  first = 9 if resumed else 1  # The resumed run restarts from the step-8 checkpoint.
  assert set(range(first, max(steps) + 1)) <= set(steps)  # This run logged every step.
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "record"))
  assert manager.all_steps() == ([4, 8] if resumed else [])
  if resumed:
    state = manager.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert int(state["step"]) == 8


def test_fifo_fill_is_logged_and_a_run_records_its_config_and_a_trace(tmp_path):
  workdir = tmp_path / "workdir"
  output = _run(tmp_path / "main.log", workdir, "--config.staleness=2",
                "--config.profile_steps=2")
  assert "Filling the adversarial FIFO with attacks on the first 2 batches" in output
  assert "Filled 2 of 2 FIFO slots" in output
  assert re.search(r"Adversarial FIFO: 2 batches of \(\d+, [\d, ]+\), [\d.]+ MiB per device",
                   output), output[-3000:]
  assert json.loads((workdir / "config.json").read_text())["staleness"] == 2
  assert list(workdir.glob("plugins/profile/*/*.xplane.pb")), sorted(workdir.rglob("*"))


def test_sigint_saves_and_exits_0(tmp_path):
  workdir = tmp_path / "workdir"
  process = _Main(tmp_path / "main.log", workdir, "--config.num_train_steps=100000",
                  "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000")
  _wait_until(lambda: max(_steps(workdir), default=0) >= 2, [process], "step 2")
  process.popen.send_signal(signal.SIGINT)  # Ctrl-C.
  assert _wait([process], timeout=60) == [0], process.output[-5000:]
  assert "Stopped by SIGINT" in process.output
  stopped = _preempted_step(process.output)
  assert (workdir / "checkpoints" / str(stopped)).is_dir()


def test_a_missing_peer_fails_fast_with_the_fix(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  process = _Main(tmp_path / "main.log", tmp_path / "workdir", f"--coordinator_address={address}",
                  "--num_processes=2", "--process_id=0", "--distributed_timeout=5",
                  num_devices=2)
  assert _wait([process], timeout=60) == [2], process.output[-5000:]
  assert f"not all 2 processes joined the coordinator at {address} within" in process.output
  assert "a distinct --process_id (0..1)" in process.output  # The fix.
  assert "Traceback" not in process.output


def test_a_busy_coordinator_port_is_named(tmp_path):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    process = _Main(tmp_path / "main.log", tmp_path / "workdir",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    "--process_id=0", num_devices=2)
    assert _wait([process], timeout=60) == [2], process.output[-5000:]
  assert f"port {port} on 127.0.0.1 is already in use" in process.output
  assert "Pick a free port for every process" in process.output  # The fix.
  assert "Traceback" not in process.output


def test_a_refused_lock_stops_every_process_of_the_run_at_once(tmp_path):
  """Process 0 alone takes the lock; before the others learned of a refusal, all hung >300 s."""
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  with locks.RunLock(workdir):  # This test process holds it, as a live earlier run would.
    processes = _start_two_processes(tmp_path, workdir)
    assert _wait(processes, timeout=120) == [2, 2], "\n".join(p.output[-3000:] for p in processes)
  assert "is in use by another run" in processes[0].output
  assert (f"Process 0 stopped while taking the lock {workdir / 'run.lock'} (its log says why); "
          "this is process 1") in processes[1].output
  assert "Traceback" not in processes[0].output + processes[1].output
  assert sorted(p.name for p in workdir.iterdir()) == []  # Nothing written, and our lock gone.


def test_processes_with_different_configs_are_refused_by_field(tmp_path):
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  processes = [_Main(tmp_path / f"process_{i}.log", tmp_path / "workdir", address,
                     "--num_processes=2", f"--process_id={i}",
                     f"--config.learning_rate={0.05 * (i + 1)}", num_devices=2)
               for i in range(2)]
  assert _wait(processes, timeout=120) == [2, 2], "\n".join(p.output[-3000:] for p in processes)
  for p in processes:
    assert "started with different configs (fields config.learning_rate" in p.output
    assert "Every process must get the same --config file and overrides" in p.output
    assert "Traceback" not in p.output
  assert not (tmp_path / "workdir" / "checkpoints").exists()
