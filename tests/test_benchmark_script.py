"""Runs scripts/benchmark_step.py at a tiny size and checks its JSON report (no timing checks).

Both task layouts are timed, and the per-task costs and roofline projection are checked for
what they must satisfy whatever the machine: task A is about two vanilla passes, costs grow
with the rows, the split program counts as its larger branch.
"""
import json
import os
import pathlib
import subprocess
import sys

from cpu_env import no_tensorflow_env

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "benchmark_step.py"


def test_benchmark_script_writes_report(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Two fake CPU devices: the step runs over a real (sharded) mesh, as in training.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")) + (
          " --xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--batch_size=8", "--image_size=16", "--repeats=2",
       "--warmup=1", "--small_resnet_width=4", "--task_layout=both", "--task_costs",
       "--roofline=tpu_v3", "--roofline_cores=16", f"--json={out}"],
      env=env, timeout=600, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  report = json.loads(out.read_text())
  assert [r["method"] for r in report["results"]] == ["vanilla", "disadv", "conadv",
                                                       "conadv_split"]
  assert [r["task_layout"] for r in report["results"]] == ["shared"] * 3 + ["split"]
  for result in report["results"]:
    for key in ("ms_per_step", "images_per_sec", "compile_s"):
      assert result[key] > 0, (result["method"], key)
    assert result["peak_bytes"] is None or result["peak_bytes"] > 0
    assert len(result["ms_all"]) == 2
  assert report["num_devices"] == 2
  assert report["config"]["batch_size"] == 8
  assert report["config"]["channels"] == 1
  assert isinstance(report["device"], str)
  assert report["platform"] == "cpu" and isinstance(report["device_kind"], str)
  assert report["argv"][1:3] == ["--batch_size=8", "--image_size=16"]
  assert set(report["ratios"]) >= {"conadv/disadv", "conadv/vanilla", "conadv_split/conadv"}

  # Per-task costs at 4 rows (a device's share in the shared layout) and 8 (in split).
  costs = {int(rows): c for rows, c in report["task_costs"].items()}
  assert sorted(costs) == [4, 8]
  flops = {rows: {task: c[task]["flops"] for task in ("vanilla", "task_a", "task_b")}
           for rows, c in costs.items()}
  for rows in (4, 8):  # Task A is two forward/backward passes; the attack needs no weight grad.
    assert 1.8 < flops[rows]["task_a"] / flops[rows]["vanilla"] < 2.2, flops
    assert flops[rows]["task_b"] < flops[rows]["vanilla"], flops
    assert costs[rows]["task_a"]["bytes_accessed"] > 0
  for task in ("vanilla", "task_a", "task_b"):  # Linear in the rows.
    assert 1.8 < flops[8][task] / flops[4][task] < 2.2, flops
  # The split step's FLOPs: XLA counts the larger branch of a conditional (task A on 8 rows).
  split_flops = report["results"][3]["flops"]
  assert 0.8 < split_flops / flops[8]["task_a"] < 1.2, (split_flops, flops)

  projection = report["roofline_projection"]
  steps = {name: step["ms"] for name, step in projection["steps"].items()}
  assert projection["global_batch"] == 4 * 16 and steps["vanilla"] > 0
  assert steps["disadv"] == steps["conadv_shared"] > steps["vanilla"]
  assert steps["conadv_split_2x_cores"] < steps["conadv_shared"]


def test_task_timer_runs_without_tensorflow_and_writes_report(tmp_path):
  """scripts/benchmark_tasks.py where importing TensorFlow fails, as on a bare GPU machine."""
  out = tmp_path / "tasks.json"
  proc = subprocess.run(
      [sys.executable, str(SCRIPTS / "benchmark_tasks.py"),
       "--image_size=8", "--small_resnet_width=4", "--task_rows=2,4", "--task_repeats=2",
       "--task_warmup=1", "--roofline_cores=16", f"--json={out}"],
      env=no_tensorflow_env(tmp_path / "no_tf"), timeout=600, capture_output=True, text=True,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  report = json.loads(out.read_text())
  assert report["env"]["platform"] == "cpu" and report["skipped"] == []
  for rows in ("2", "4"):
    assert set(report["tasks"][rows]) >= {"task_a", "task_b", "vanilla"}
    for entry in report["tasks"][rows].values():
      assert entry["ms_median"] > 0 and len(entry["ms_all"]) == 2
  projection = report["measured_projection_ms"]
  assert projection["conadv_shared_1dev (= disadv)"] > projection["vanilla_1dev"]
  assert (projection["conadv_split_2x_devices (A on r, B on r)"]
          < projection["conadv_shared_1dev (= disadv)"] + projection["allreduce_ms_2gpu"])
