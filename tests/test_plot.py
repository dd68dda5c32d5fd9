"""scripts/plot.py: valid PNGs and a mean ± std table from a small synthetic summary.csv."""
import csv
import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PLOT = REPO / "scripts" / "plot.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

spec = importlib.util.spec_from_file_location("plot_script", PLOT)
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)

COLUMNS = ("name", "status", "exit_code", "config", "method", "staleness", "batch", "seed",
           "learning_rate", "test_top1", "train_top1", "gap", "robust_top1", "adv_top1",
           "sharpness", "sharpness_iterations", "wall_time_s", "step_time_s", "steps", "workdir")


def write_summary(path: pathlib.Path) -> pathlib.Path:
  """2 methods x 2 batches x 2 seeds, one failed run, one run without sharpness."""
  rows = []
  for method, staleness in (("vanilla", 0), ("conadv", 1)):
    for batch in (256, 4096):
      for seed in (0, 1):
        test = 0.90 - (0.05 if batch == 4096 else 0) + 0.01 * seed + (0.02 if staleness else 0)
        rows.append({
            "name": f"{method}{staleness}-{batch}-{seed}", "status": "finished", "exit_code": 0,
            "method": method, "staleness": staleness, "batch": batch, "seed": seed,
            "test_top1": test, "train_top1": test + 0.03, "gap": 0.03,
            "robust_top1": test / 2, "sharpness": "" if seed else 10.0 + batch / 1024,
            "step_time_s": 0.01 * batch / 256 * (2 if staleness else 1), "wall_time_s": 60})
  rows.append({"name": "broken", "status": "failed", "exit_code": 2, "method": "disadv",
               "staleness": 0, "batch": 256, "seed": 0})
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return path


def test_pngs_and_table_are_written_from_a_small_summary(tmp_path):
  summary = write_summary(tmp_path / "summary.csv")
  proc = subprocess.run([sys.executable, str(PLOT), f"--summary={summary}",
                         f"--out={tmp_path / 'plots'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  for stem in ("test_top1", "gap", "robust_top1", "sharpness", "step_time"):
    data = (tmp_path / "plots" / f"{stem}.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, stem
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 400, stem
  table = (tmp_path / "plots" / "table.md").read_text().splitlines()
  # Mean and sample std of the two seeds (0.92, 0.93) of conadv τ=1 at batch 256; the failed
  # disadv run is left out; sharpness has one seed there.
  row = next(line for line in table if line.startswith("| 256 | conadv τ=1 |"))
  assert "92.50 ± 0.71 (2)" in row and "10.250 ± 0.000 (1)" in row
  assert not any("disadv" in line for line in table)
  assert len(table) == 2 + 4


def test_mean_and_std_over_seeds_per_method_and_batch(tmp_path):
  rows = plot.read_summary(write_summary(tmp_path / "summary.csv"))
  groups = plot.group(rows, "test_top1")
  assert set(groups) == {"vanilla", "conadv τ=1"}
  mean, std = plot.mean_std(groups["vanilla"][4096])
  assert mean == pytest.approx(0.855) and std == pytest.approx(0.00707, rel=1e-3)
  assert plot.group(rows, "sharpness")["vanilla"][256] == [10.25]
