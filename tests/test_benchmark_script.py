"""Runs scripts/benchmark_step.py at a tiny size and checks its JSON report (no timing checks)."""
import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_step.py"


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
       "--warmup=1", "--small_resnet_width=4", f"--json={out}"],
      env=env, timeout=300, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  report = json.loads(out.read_text())
  assert [r["method"] for r in report["results"]] == ["vanilla", "disadv", "conadv"]
  for result in report["results"]:
    for key in ("ms_per_step", "images_per_sec", "compile_s"):
      assert result[key] > 0, (result["method"], key)
    assert result["peak_bytes"] is None or result["peak_bytes"] > 0
    assert len(result["ms_all"]) == 2
  assert report["num_devices"] == 2
  assert report["config"]["batch_size"] == 8
  assert report["config"]["channels"] == 1
  assert isinstance(report["device"], str)
  assert set(report["ratios"]) >= {"conadv/disadv", "conadv/vanilla"}
