"""scripts/sweep.py: runs a grid through main.py, resumes it, survives a failed run, summarises.

The end-to-end tests run tiny synthetic configs (configs/cpu_smoke.py, a few steps, no eval
attacks) through real main.py subprocesses; the rest test the bookkeeping on hand-made workdirs.
"""
import csv
import importlib.util
import itertools
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from cpu_env import cpu_env

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.py"


def _load_sweep_module():
  spec = importlib.util.spec_from_file_location("sweep_script", SWEEP)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep_module()

# Cheap runs: vanilla (no attack to compile), no adversarial evals.
TINY = {"eval_adversarial": False, "eval_pgd_steps": 0, "checkpoint_every_steps": 2,
        "log_every_steps": 1}


def write_sweep_file(path: pathlib.Path, entries) -> pathlib.Path:
  path.write_text("def get_sweep():\n  return " + repr(entries) + "\n")
  return path


def run_sweep(sweep_file, root, *flags, wait=True, timeout=600):
  args = [sys.executable, str(SWEEP), f"--sweep={sweep_file}", f"--root={root}", *flags]
  if not wait:
    return subprocess.Popen(args, cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(args, cwd=REPO, env=cpu_env(1), capture_output=True, text=True,
                        timeout=timeout, check=False)


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  with path.open() as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


# --- Bookkeeping, without running anything. ---


def test_run_names_are_stable_readable_and_distinct(tmp_path):
  a = sweep.run_name("configs/fashion_mnist.py:conadv2", {"seed": 1, "batch_size": 4096})
  b = sweep.run_name("configs/fashion_mnist.py:conadv2", {"batch_size": 4096, "seed": 1})
  assert a == b == "fashion_mnist-conadv2__batch_size=4096__seed=1"
  assert sweep.run_name("configs/cpu_smoke.py", {"attack.epsilon": 4.0}) == (
      "cpu_smoke__attack.epsilon=4.0")
  duplicate = write_sweep_file(tmp_path / "dup.py", [("configs/cpu_smoke.py:vanilla", {"seed": 0}),
                                                     ("configs/cpu_smoke.py:vanilla", {"seed": 0})])
  with pytest.raises(ValueError, match="share the workdir name"):
    sweep.load_sweep(str(duplicate), str(tmp_path / "root"))


def test_the_command_resumes_with_the_same_overrides(tmp_path):
  entries = [("configs/cpu_smoke.py:conadv2", {"seed": 3, "learning_rate": 0.1,
                                               "attack.epsilon": 4.0, "augment": False})]
  (run,) = sweep.load_sweep(str(write_sweep_file(tmp_path / "s.py", entries)),
                            str(tmp_path / "root"))
  command = run.command()
  assert command[1] == str(REPO / "main.py")
  assert f"--config={REPO / 'configs' / 'cpu_smoke.py'}:conadv2" in command
  assert f"--workdir={tmp_path / 'root' / run.name}" in command
  assert {"--config.seed=3", "--config.learning_rate=0.1", "--config.attack.epsilon=4.0",
          "--config.augment=False"} <= set(command)
  config = sweep.flat_config(run.config, run.overrides)
  assert (config["method"], config["staleness"], config["attack.epsilon"]) == ("conadv", 2, 4.0)


def _fake_run(root: pathlib.Path, seed: int, results: dict | None, rates=(),
              **overrides) -> "sweep.Run":
  overrides = {"seed": seed, **overrides}
  name = sweep.run_name("configs/cpu_smoke.py:conadv", overrides)
  run = sweep.Run("configs/cpu_smoke.py:conadv", overrides, name, root / name)
  run.workdir.mkdir(parents=True)
  if results is not None:
    config = sweep.flat_config(run.config, run.overrides)
    nested = {}
    for key, value in config.items():
      *parents, leaf = key.split(".")
      node = nested
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = value
    (run.workdir / "results.json").write_text(json.dumps({"config": nested, **results}))
  lines = [{"step": i + 1, "kind": "train", "loss": 1.0, "images_per_sec_per_device": r}
           for i, r in enumerate(rates)] + [{"step": 5, "kind": "eval", "top1": 0.5}]
  (run.workdir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return run


def test_summary_rows_come_from_results_and_missing_values_stay_empty(tmp_path):
  root = tmp_path / "root"
  full = _fake_run(root, 0, {
      "final_step": 12, "wall_time_s": 30.5,
      "eval": {"top1": 0.75, "robust_top1": 0.25, "adv_top1": 0.5, "num_examples": 64},
      "train": {"loss": 0.3, "top1": 0.9},
      "sharpness": {"top_hessian_eigenvalue": 12.5, "iterations": 20}},
      rates=[1.0, 32.0, 16.0, 64.0])  # Batch 32: 32, 1, 2 and 0.5 s per step; the median 1.5.
  partial = _fake_run(root, 1, {"final_step": 12, "wall_time_s": 3.0, "eval": {"top1": 0.5},
                                "train": {"loss": 0.3, "top1": None}})
  pending = _fake_run(root, 2, None)
  rows = sweep.write_summary(root, [full, partial, pending], {})
  header, csv_rows = read_csv(root / "summary.csv")
  assert header == list(sweep.SUMMARY_COLUMNS)
  for column in ("method", "staleness", "batch", "seed", "test_top1", "train_top1", "gap",
                 "robust_top1", "sharpness", "wall_time_s", "steps", "step_time_s"):
    assert column in header
  first = rows[0]
  assert (first["status"], first["method"], first["staleness"], first["batch"]) == (
      "finished", "conadv", 1, 32)
  assert first["gap"] == pytest.approx(0.9 - 0.75)
  assert (first["robust_top1"], first["sharpness"], first["sharpness_iterations"]) == (
      0.25, 12.5, 20)
  assert (first["steps"], first["wall_time_s"]) == (12, 30.5)
  assert first["step_time_s"] == pytest.approx(1.5)
  # No train top-1: no gap; no sharpness; both empty in the CSV and null in the JSON.
  assert rows[1]["gap"] is None and rows[1]["sharpness"] is None
  assert csv_rows[1]["gap"] == "" and csv_rows[1]["test_top1"] == "0.5"
  assert json.loads((root / "summary.json").read_text())[1]["sharpness"] is None
  assert rows[2]["status"] == "pending" and rows[2]["test_top1"] is None


def test_a_result_made_with_other_settings_is_not_finished(tmp_path):
  run = _fake_run(tmp_path, 0, {"final_step": 12, "eval": {"top1": 0.5}, "train": {}})
  assert sweep.is_finished(run)
  # Asked for sharpness and finished by code that did not measure it: a rerun measures it.
  measured = _fake_run(tmp_path / "sharp", 0, {"final_step": 12, "eval": {"top1": 0.5},
                                               "train": {}}, sharpness_num_examples=64)
  assert not sweep.is_finished(measured)
  results = json.loads((measured.workdir / "results.json").read_text())
  results["sharpness"] = {"top_hessian_eigenvalue": 3.0, "iterations": 20}
  (measured.workdir / "results.json").write_text(json.dumps(results))
  assert sweep.is_finished(measured)
  results = json.loads((run.workdir / "results.json").read_text())
  results["config"]["num_train_steps"] = 6  # The preset has changed since this run ended.
  (run.workdir / "results.json").write_text(json.dumps(results))
  assert not sweep.is_finished(run)


def test_parallel_runs_share_the_cores():
  alone = sweep.child_env(parallel=1, cores=2)
  assert alone["OMP_NUM_THREADS"] == alone["TF_NUM_INTRAOP_THREADS"] == "2"
  assert "multi_thread_eigen" not in alone.get("XLA_FLAGS", "")
  two = sweep.child_env(parallel=2, cores=2)
  assert two["OMP_NUM_THREADS"] == two["TF_NUM_INTRAOP_THREADS"] == "1"
  assert "--xla_cpu_multi_thread_eigen=false" in two["XLA_FLAGS"]


class _TimedRun(sweep.Run):
  """A run whose command only logs when it starts and ends (+1 / -1) to the root's events.txt."""

  def command(self) -> list[str]:
    script = ("import sys, time\n"
              "def log(delta):\n"
              "  with open(sys.argv[1], 'a') as f:\n"
              "    f.write(f'{time.time()} {delta}\\n')\n"
              "log(1); time.sleep(1.5); log(-1)\n")
    return [sys.executable, "-c", script, str(self.workdir.parent / "events.txt")]


# In-process, Popen's preexec_fn forks this JAX-threaded test process; the child only sets its
# parent-death signal and execs, so the fork warning does not apply.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_parallel_runs_that_many_at_once_and_no_more(tmp_path):
  runs = [_TimedRun("configs/cpu_smoke.py:vanilla", {"seed": i}, f"run{i}", tmp_path / f"run{i}")
          for i in range(5)]
  assert sweep.Sweep(runs, tmp_path, parallel=2, cores=2).execute() == 5  # None finished.
  events = sorted((float(time_s), int(delta)) for time_s, delta in
                  (line.split() for line in (tmp_path / "events.txt").read_text().splitlines()))
  assert len(events) == 10
  running = list(itertools.accumulate(delta for _, delta in events))
  assert max(running) == 2 and running[-1] == 0


def test_the_study_sweep_uses_one_learning_rate_rule_for_every_method():
  """The fair protocol: at each batch size every method gets the learning rate vanilla's tuning
  chose, the same epochs and the same seeds; 4 batches x 4 methods x 3 seeds."""
  runs = sweep.load_sweep("configs/sweeps/fashion_mnist_batch.py", "/tmp/unused")
  assert len(runs) == 48
  by_batch = {}
  for run in runs:
    config = sweep.flat_config(run.config, run.overrides)
    key = config["batch_size"]
    by_batch.setdefault(key, set()).add((config["learning_rate"], config["num_epochs"],
                                         config["optimizer"], config["warmup_epochs"]))
    assert config["seed"] in (0, 1, 2)
  assert sorted(by_batch) == [256, 1024, 4096, 16384]
  assert all(len(recipes) == 1 for recipes in by_batch.values()), by_batch
  methods = {(sweep.flat_config(r.config, r.overrides)["method"],
              sweep.flat_config(r.config, r.overrides)["staleness"]) for r in runs}
  assert methods == {("vanilla", 0), ("disadv", 0), ("conadv", 1), ("conadv", 2)}


# --- End to end through main.py. ---


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
  # This one also measures robust top-1 and sharpness, to check they reach the summary.
  good = dict(TINY, num_train_steps=4, seed=0, eval_pgd_steps=2, sharpness_num_examples=32,
              sharpness_iterations=3)
  bad = dict(TINY, num_train_steps=4, seed=1, learning_rate=-1.0)  # Refused by validation.
  # One at a time, the failing run first: the good run is still queued when the failure comes,
  # so this shows that a run queued after a failure still starts, not only that one running
  # beside it is left alone.
  sweep_file = write_sweep_file(tmp_path / "s.py", [("configs/cpu_smoke.py:vanilla", bad),
                                                    ("configs/cpu_smoke.py:vanilla", good)])
  proc = run_sweep(sweep_file, tmp_path / "root", "--parallel=1")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  bad_name = sweep.run_name("configs/cpu_smoke.py:vanilla", bad)
  good_name = sweep.run_name("configs/cpu_smoke.py:vanilla", good)
  assert f"FAILED {bad_name}: exit status 2" in proc.stdout
  events = [line.split()[1:3] for line in proc.stdout.splitlines()
            if line.split()[:2] in (["[sweep]", "start"], ["[sweep]", "FAILED"],
                                    ["[sweep]", "done"])]
  assert events == [["start", bad_name], ["FAILED", f"{bad_name}:"], ["start", good_name],
                    ["done", good_name]], proc.stdout
  assert "config.learning_rate=-1.0 is not allowed" in proc.stdout  # The tail of its log.
  assert "1 failed" in proc.stdout
  header, rows = read_csv(tmp_path / "root" / "summary.csv")
  assert header == list(sweep.SUMMARY_COLUMNS)
  by_seed = {row["seed"]: row for row in rows}
  assert (by_seed["1"]["status"], by_seed["1"]["exit_code"], by_seed["1"]["test_top1"]) == (
      "failed", "2", "")
  good_row = by_seed["0"]
  results = json.loads((tmp_path / "root" / good_row["name"] / "results.json").read_text())
  assert good_row["status"] == "finished" and good_row["steps"] == "4"
  assert float(good_row["test_top1"]) == results["eval"]["top1"]
  assert float(good_row["train_top1"]) == results["train"]["top1"]
  assert float(good_row["gap"]) == pytest.approx(results["train"]["top1"] -
                                                 results["eval"]["top1"])
  assert float(good_row["robust_top1"]) == results["eval"]["robust_top1"]
  assert float(good_row["sharpness"]) == results["sharpness"]["top_hessian_eigenvalue"]
  assert int(good_row["sharpness_iterations"]) == results["sharpness"]["iterations"]
  assert float(good_row["step_time_s"]) > 0


def _latest_checkpoint(workdir: pathlib.Path) -> int:
  folder = workdir / "checkpoints"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=0)


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path):
  first = dict(TINY, num_train_steps=2, seed=0)
  # Long enough that the sweep is stopped between its first checkpoint and its end.
  second = dict(TINY, num_train_steps=400, seed=1, eval_every_steps=400,
                checkpoint_every_steps=25)
  sweep_file = write_sweep_file(tmp_path / "s.py", [("configs/cpu_smoke.py:vanilla", first),
                                                    ("configs/cpu_smoke.py:vanilla", second)])
  root = tmp_path / "root"
  first_dir = root / sweep.run_name("configs/cpu_smoke.py:vanilla", first)
  second_dir = root / sweep.run_name("configs/cpu_smoke.py:vanilla", second)
  proc = run_sweep(sweep_file, root, "--parallel=1", wait=False)
  deadline = time.time() + 480
  while _latest_checkpoint(second_dir) < 25 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)  # As `kill` would stop a nohup'd sweep.
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1, output
  assert f"stopped {second_dir.name}" in output
  assert (first_dir / "results.json").exists() and not (second_dir / "results.json").exists()
  stopped_at = _latest_checkpoint(second_dir)
  assert 25 <= stopped_at < 400
  first_results = (first_dir / "results.json").read_text()
  first_log = (first_dir / sweep.LOG_NAME).read_text()

  rerun = run_sweep(sweep_file, root, "--parallel=1")
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f"skip   {first_dir.name}" in rerun.stdout
  assert (first_dir / sweep.LOG_NAME).read_text() == first_log  # Not started again.
  assert (first_dir / "results.json").read_text() == first_results
  log = (second_dir / sweep.LOG_NAME).read_text()
  assert log.count("=====") == 2 and f"resuming from step {stopped_at}" in log
  results = json.loads((second_dir / "results.json").read_text())
  assert results["final_step"] == 400 and results["config_history"] == []
  _, rows = read_csv(root / "summary.csv")
  assert [row["status"] for row in rows] == ["finished", "finished"]
