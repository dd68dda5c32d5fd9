r"""Runs a grid of main.py runs described by a sweep file; resumable; writes one summary.

  python scripts/sweep.py --sweep=configs/sweeps/fashion_mnist_batch.py --root=/work/study_root \
      --parallel=2

A sweep file defines `get_sweep()` returning a list of ("configs/FILE.py:PRESET", overrides), the
overrides a dict of config fields (dotted for nested ones, e.g. "attack.epsilon") to values.

Why a subprocess per run: a crash, an out-of-memory kill or a bad value ends one run, not the
sweep, and every run is exactly what `python main.py ...` (printed in its command.txt) does.

Each run gets ROOT/<name>, the name made from the preset and the overrides (sorted), so it is
stable across invocations and says what the run is. Rerunning the same command:
  * skips a run whose results.json is final and was made with the config the sweep asks for;
  * reruns the command of any other run, which resumes it from its newest checkpoint (main.py's
    own resume), or finishes a run whose sweep entry changed, recording the change.
A failed run (non-zero exit) is reported with its exit status and the tail of its log and does
not stop the others; the sweep exits with status 1 if any run failed or was stopped. SIGTERM or
Ctrl-C to the sweep is passed to the running runs, which save a checkpoint and stop; children also
get SIGTERM if the sweep dies outright, so no orphan keeps a workdir locked.

`--parallel N` runs N at once and shares the cores among them: each child's XLA, TensorFlow and
OpenMP thread pools are sized to cores // N (single-threaded XLA when that is 1), so N runs do not
each spawn a pool the size of the machine and thrash.

Outputs in ROOT: summary.csv and summary.json (one row per run; SUMMARY_COLUMNS), rewritten
after every run ends; each run's log in ROOT/<name>/sweep.log.
"""
import csv
import ctypes
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For configs/ when run from anywhere.

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().")
flags.DEFINE_string("root", None, "Folder for the runs' workdirs and the summary.")
flags.DEFINE_integer("parallel", 1, "Runs at once.")
flags.DEFINE_integer("cores", 0, "Cores to share among the parallel runs (0: this process's).")
flags.DEFINE_bool("dry_run", False, "Print each run's status and command; run nothing.")
flags.DEFINE_bool("summary_only", False, "Rewrite the summary from the workdirs; run nothing.")
flags.DEFINE_multi_string("only", [], "Run only runs whose name contains one of these.")

SUMMARY_COLUMNS = (
    "name", "status", "exit_code", "config", "method", "staleness", "batch", "seed",
    "learning_rate", "test_top1", "train_top1", "gap", "robust_top1", "adv_top1", "sharpness",
    "sharpness_iterations", "wall_time_s", "step_time_s", "steps", "workdir")
LOG_NAME = "sweep.log"
TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Run:
  """One entry of a sweep: a config (file:preset) with overrides, in its own workdir."""
  config: str
  overrides: dict[str, Any]
  name: str
  workdir: pathlib.Path

  def command(self) -> list[str]:
    """The main.py command line; rerunning it resumes the run."""
    file, _, preset = self.config.partition(":")
    config = str(_config_path(file)) + (f":{preset}" if preset else "")
    return [sys.executable, str(REPO / "main.py"), f"--config={config}",
            f"--workdir={self.workdir}"] + [f"--config.{k}={_flag_value(v)}"
                                             for k, v in self.overrides.items()]


def _flag_value(value: Any) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def _config_path(file: str) -> pathlib.Path:
  path = pathlib.Path(file)
  return path if path.is_absolute() else REPO / path


def run_name(config: str, overrides: dict[str, Any]) -> str:
  """A readable, stable folder name: 'FILE-PRESET__key=value__...', keys sorted."""
  file, _, preset = config.partition(":")
  parts = [pathlib.Path(file).stem + (f"-{preset}" if preset else "")]
  parts += [f"{k}={_flag_value(v)}" for k, v in sorted(overrides.items())]
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))


def _import_file(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(sweep_file: str, root: str) -> list[Run]:
  """The sweep file's runs, each with its workdir under `root`; names must be distinct."""
  entries = _import_file(_config_path(sweep_file), "sweep_file").get_sweep()
  runs, seen = [], {}
  for config, overrides in entries:
    name = run_name(config, overrides)
    if name in seen:
      raise ValueError(f"Two sweep entries share the workdir name {name!r}: "
                       f"{seen[name]} and {(config, overrides)}.")
    seen[name] = (config, overrides)
    runs.append(Run(config, dict(overrides), name, pathlib.Path(root) / name))
  return runs


def flat_config(config: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """{dotted field: JSON value} of the config main.py would run, without running it."""
  file, _, preset = config.partition(":")
  module = _import_file(_config_path(file), f"config_{pathlib.Path(file).stem}")
  cfg = module.get_config(preset) if preset else module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return _flatten(cfg.to_dict())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return json.loads(json.dumps(flat, default=str))


def read_results(run: Run) -> dict[str, Any] | None:
  path = run.workdir / "results.json"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def is_finished(run: Run) -> bool:
  """results.json is final and its config is the one the sweep asks for (not an older entry)."""
  results = read_results(run)
  if not results or "final_step" not in results or "eval" not in results:
    return False
  # Fields the run's code did not have yet are not compared: it ran without them.
  ran = _flatten(results.get("config", {}))
  wanted = flat_config(run.config, run.overrides)
  if wanted.get("sharpness_num_examples") and not results.get("sharpness"):
    return False  # Finished by code without sharpness; a rerun measures it, no retraining.
  return all(ran[k] == wanted.get(k, ran[k]) for k in ran) and all(
      k in ran for k in run.overrides)


# ------------------------------------------------------------------------------------------------
# Running.


def child_env(parallel: int, cores: int) -> dict[str, str]:
  """os.environ with thread pools sized so that `parallel` runs share `cores` cores."""
  threads = max(1, cores // max(parallel, 1))
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads),
             TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
  if threads == 1:
    # XLA:CPU's pool is as large as the machine otherwise; one thread per run when runs fill it.
    flags_ = [f for f in env.get("XLA_FLAGS", "").split()
              if "multi_thread_eigen" not in f and "intra_op_parallelism" not in f]
    env["XLA_FLAGS"] = " ".join(flags_ + ["--xla_cpu_multi_thread_eigen=false",
                                          "intra_op_parallelism_threads=1"])
  return env


def _die_with_parent() -> None:
  """In the child: SIGTERM it when the sweep dies, so it checkpoints and frees its workdir."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except OSError:  # Not Linux: the sweep's own signal handler still forwards SIGTERM.
    pass


def tail(path: pathlib.Path, lines: int = TAIL_LINES) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return "(no log)"


class Sweep:
  """Starts runs, at most `parallel` at a time, and records how each ended."""

  def __init__(self, runs: Sequence[Run], root: pathlib.Path, parallel: int, cores: int):
    self.runs = list(runs)
    self.root = root
    self.parallel = max(parallel, 1)
    self.env = child_env(self.parallel, cores)
    self.outcome: dict[str, tuple[str, int | None]] = {}  # name -> (status, exit code)
    self.stop_requested: str | None = None
    self._running: dict[str, subprocess.Popen] = {}

  def _request_stop(self, signum, frame) -> None:
    del frame
    self.stop_requested = signal.Signals(signum).name
    print(f"[sweep] {self.stop_requested}: stopping the running runs (they checkpoint); rerun "
          "the same command to continue.", flush=True)
    for proc in self._running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  def _start(self, run: Run) -> subprocess.Popen:
    run.workdir.mkdir(parents=True, exist_ok=True)
    command = run.command()
    (run.workdir / "command.txt").write_text(" ".join(command) + "\n")
    log = (run.workdir / LOG_NAME).open("a")
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
    log.flush()
    print(f"[sweep] start  {run.name}", flush=True)
    proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    log.close()  # The child holds its own descriptor.
    return proc

  def _ended(self, run: Run, code: int) -> None:
    if code == 0 and is_finished(run):
      status = "finished"
      print(f"[sweep] done   {run.name}", flush=True)
    elif code == 0:  # main.py stopped on a signal after saving a checkpoint.
      status = "stopped"
      print(f"[sweep] stopped {run.name} (checkpoint saved; rerun to resume)", flush=True)
    else:
      status = "failed"
      print(f"[sweep] FAILED {run.name}: exit status {code}. Last lines of "
            f"{run.workdir / LOG_NAME}:\n{tail(run.workdir / LOG_NAME)}", flush=True)
    self.outcome[run.name] = (status, code)
    write_summary(self.root, self.runs, self.outcome)

  def execute(self) -> int:
    """Runs what is not finished; returns the number of runs not finished at the end."""
    pending = []
    for run in self.runs:
      if is_finished(run):
        self.outcome[run.name] = ("finished", 0)
        print(f"[sweep] skip   {run.name} (finished)", flush=True)
      else:
        pending.append(run)
    print(f"[sweep] {len(pending)} of {len(self.runs)} runs to do, {self.parallel} at a time.",
          flush=True)
    by_name = {run.name: run for run in self.runs}
    previous = {sig: signal.signal(sig, self._request_stop)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      while pending or self._running:
        while pending and len(self._running) < self.parallel and not self.stop_requested:
          run = pending.pop(0)
          self._running[run.name] = self._start(run)
        if self.stop_requested and not self._running:
          break
        time.sleep(0.5)
        for name, proc in list(self._running.items()):
          code = proc.poll()
          if code is not None:
            del self._running[name]
            self._ended(by_name[name], code)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    for run in pending:
      self.outcome.setdefault(run.name, ("pending", None))
    write_summary(self.root, self.runs, self.outcome)
    not_done = [n for n, (status, _) in self.outcome.items() if status != "finished"]
    failed = [n for n, (status, _) in self.outcome.items() if status == "failed"]
    print(f"[sweep] {len(self.runs) - len(not_done)} of {len(self.runs)} finished; "
          f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else "") +
          f". Summary: {self.root / 'summary.csv'}", flush=True)
    return len(not_done)


# ------------------------------------------------------------------------------------------------
# Summary.


def step_time_s(workdir: pathlib.Path, batch_size: int) -> float | None:
  """Median seconds per training step over the logged intervals (eval and checkpoint waits are
  outside them; the median drops the first, which includes compilation).

  From metrics.jsonl's images_per_sec_per_device: batch / that is the time per step of one
  device's share, which on one device (the CPU study) is the step's wall time.
  """
  path = workdir / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines()
  except OSError:
    return None
  times = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    rate = record.get("images_per_sec_per_device")
    if record.get("kind") == "train" and rate:
      times.append(batch_size / rate)
  return statistics.median(times) if times else None


def summary_row(run: Run, status: str, exit_code: int | None) -> dict[str, Any]:
  """One summary row: what the sweep asked for, and what results.json / metrics.jsonl say."""
  config = flat_config(run.config, run.overrides)
  results = read_results(run) if status == "finished" else None
  row = dict.fromkeys(SUMMARY_COLUMNS)
  row.update(name=run.name, status=status, exit_code=exit_code, config=run.config,
             method=config["method"], staleness=config["staleness"], batch=config["batch_size"],
             seed=config["seed"], learning_rate=config["learning_rate"], workdir=str(run.workdir))
  if results:
    ev, train = results.get("eval", {}), results.get("train", {})
    sharp = results.get("sharpness") or {}
    row.update(test_top1=ev.get("top1"), train_top1=train.get("top1"),
               robust_top1=ev.get("robust_top1"), adv_top1=ev.get("adv_top1"),
               sharpness=sharp.get("top_hessian_eigenvalue"),
               sharpness_iterations=sharp.get("iterations"),
               wall_time_s=results.get("wall_time_s"), steps=results.get("final_step"),
               step_time_s=step_time_s(run.workdir, config["batch_size"]))
    if row["test_top1"] is not None and row["train_top1"] is not None:
      row["gap"] = row["train_top1"] - row["test_top1"]
  return row


def write_summary(root: pathlib.Path, runs: Sequence[Run],
                  outcome: dict[str, tuple[str, int | None]]) -> list[dict[str, Any]]:
  """ROOT/summary.csv (missing values blank) and summary.json (null), one row per run."""
  rows = []
  for run in runs:
    status, code = outcome.get(run.name) or (("finished", 0) if is_finished(run) else
                                             ("pending", None))
    rows.append(summary_row(run, status, code))
  root.mkdir(parents=True, exist_ok=True)
  clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()} for row in rows]
  tmp = root / "summary.json.tmp"
  tmp.write_text(json.dumps(clean, indent=1))
  tmp.replace(root / "summary.json")
  tmp = root / "summary.csv.tmp"
  with tmp.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in clean])
  tmp.replace(root / "summary.csv")
  return clean


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.sweep or not FLAGS.root:
    raise app.UsageError("--sweep and --root are required.")
  root = pathlib.Path(FLAGS.root).resolve()
  runs = load_sweep(FLAGS.sweep, str(root))
  if FLAGS.only:
    runs = [r for r in runs if any(s in r.name for s in FLAGS.only)]
  if FLAGS.dry_run:
    for run in runs:
      print(("finished " if is_finished(run) else "to do    ") + " ".join(run.command()))
    return
  if FLAGS.summary_only:
    write_summary(root, runs, {})
    print(f"Wrote {root / 'summary.csv'} and summary.json ({len(runs)} runs).")
    return
  cores = FLAGS.cores or len(os.sched_getaffinity(0))
  sys.exit(1 if Sweep(runs, root, FLAGS.parallel, cores).execute() else 0)


if __name__ == "__main__":
  app.run(main)
