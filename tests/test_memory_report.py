"""Runs scripts/memory_report.py and checks its sizes against a count by hand.

The checkpoint sizes in docs/performance.md come from this script: the adversarial FIFO of
conadv_96k is τ = 1 global batch of 98,304 ImageNet images, 224·224·3 bytes each as uint8 plus an
int32 label (before the compact FIFO: 4 bytes per pixel and no labels), split over the hosts.
The working-memory fit compiles a tiny step, so it is checked for its layout only.
"""
import json
import pathlib
import subprocess
import sys

import pytest
from cpu_env import cpu_env

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "memory_report.py"
BATCH, PIXELS = 98_304, 224 * 224 * 3
RESNET50_PARAMS, ADV_BN_PARAMS = 25_557_032, 53_120  # tests/test_models.py checks both.


def _report(tmp_path: pathlib.Path, *flags: str) -> dict:
  out = tmp_path / "memory.json"
  done = subprocess.run([sys.executable, str(SCRIPT), *flags, f"--json={out}"], cwd=REPO,
                        env=cpu_env(1), capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(out.read_text())


def test_conadv_96k_state_and_checkpoint_sizes_are_the_hand_count(tmp_path):
  report = _report(tmp_path, "--config=configs/imagenet_resnet50.py:conadv_96k",
                   "--num_devices=8", "--num_hosts=1", "--grad_accum_steps=128",
                   "--num_devices=1024", "--num_hosts=128", "--grad_accum_steps=1",
                   "--measure_micro_batches=")
  sizes = report["state_bytes"]
  assert sizes["staleness"] == 1 and not sizes["aug_view"]
  assert sizes["fifo_images"] == BATCH * PIXELS
  assert sizes["fifo_labels"] == BATCH * 4
  assert sizes["fifo_before_float32"] == 4 * BATCH * PIXELS
  assert sizes["params"] == 4 * (RESNET50_PARAMS + ADV_BN_PARAMS)
  assert report["fit"] == {} and report["measured"] == []
  pod, eight = report["layouts"][1], report["layouts"][0]
  assert pod["checkpoint_per_host_gb"] == pytest.approx(BATCH * (PIXELS + 4) / 128 / 1e9)
  assert pod["checkpoint_per_host_before_gb"] == pytest.approx(4 * BATCH * PIXELS / 128 / 1e9)
  assert (pod["per_device_micro_batch"], eight["per_device_micro_batch"]) == (96, 96)
  assert pod["fifo_gb"] == pytest.approx(BATCH * (PIXELS + 4) / 1024 / 1e9)
  assert pod["total_gb"] is None  # Nothing compiled, so no working memory to add.


def test_working_memory_fit_from_two_tiny_compilations(tmp_path):
  report = _report(tmp_path, "--config=configs/cpu_smoke.py:conadv", "--num_devices=2",
                   "--num_hosts=1", "--grad_accum_steps=1", "--measure_micro_batches=2,4")
  assert [m["micro_batch"] for m in report["measured"]] == [2, 4]
  assert all(m["temp_bytes"] > 0 for m in report["measured"])
  fit = report["fit"]
  assert fit["temp_bytes_per_example"] > 0 and fit["max_relative_residual"] < 1e-6  # Two points.
  layout = report["layouts"][0]
  parts = (layout["state_replicated_gb"] + layout["fifo_gb"] + layout["input_batches_gb"] +
           layout["working_gb"])
  assert layout["total_gb"] == pytest.approx(parts)
