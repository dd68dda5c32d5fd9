"""Runs scripts/benchmark_input.py at a tiny size: its JSON layout, its counts and its data.

No timing assertions (the machine is shared): only that every number is positive and that the
counts and ratios agree with each other. The written dataset is read back with TFDS's reader
and decoded with Pillow, so the benchmark is known to measure real JPEGs of the sizes it says.
"""
import io
import json
import os
import pathlib
import re
import subprocess
import sys

from PIL import Image
import pytest
import tensorflow_datasets as tfds

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_input.py"
# 22 / 4: 5 steps per epoch where epochs drop their last partial batch, 5.5 where batches run on
# across epochs; either way, of the timed steps 2..9 only step 5 holds an epoch's first example.
NUM_TRAIN, NUM_EVAL, BATCH, STEPS, WARMUP = 22, 10, 4, 8, 2
WIDTHS, HEIGHTS = (40, 60), (30, 50)
RESULT_KEYS = {"pipeline", "images", "batches", "images_per_sec", "images_per_sec_repeats",
               "cpu_sec_per_image", "cpu_sec_per_image_repeats", "cpu_cores_busy",
               "median_fetch_s", "p90_fetch_s", "max_fetch_s", "median_fetch_cpu_s",
               "boundary_steps", "boundary_fetch_s", "boundary_fetch_cpu_s", "boundary_ratio",
               "meets_target", "batch"}


def _run(data_dir: pathlib.Path, out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(
      [sys.executable, str(SCRIPT), f"--num_train={NUM_TRAIN}", f"--num_eval={NUM_EVAL}",
       f"--batch_size={BATCH}", f"--steps={STEPS}", f"--warmup={WARMUP}", "--repeats=1",
       "--image_size=32", f"--width_range={WIDTHS[0]},{WIDTHS[1]}",
       f"--height_range={HEIGHTS[0]},{HEIGHTS[1]}", "--num_shards=2",
       f"--data_dir={data_dir}", f"--out={out}", *extra],
      env=env, timeout=300, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny benchmark run: (its data dir, its report)."""
  folder = tmp_path_factory.mktemp("bench_input")
  out = folder / "bench.json"
  proc = _run(folder / "data", out)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return folder / "data", json.loads(out.read_text())


def test_report_layout_and_counts(run):
  _, report = run
  assert report["schema"] == "conadv_jax.benchmark_input/1"
  assert set(report) >= {"command", "timestamp_utc", "machine", "code", "dataset", "config",
                         "results", "skipped"}
  assert report["machine"]["cpu_count"] >= 1
  assert report["code"]["input_pipeline_sha256"]
  config = report["config"]
  assert config["steps_per_epoch"] in (NUM_TRAIN // BATCH, NUM_TRAIN / BATCH)
  assert config["batch_size_per_host"] == BATCH and config["global_batch_size"] == BATCH
  dataset = report["dataset"]
  assert dataset["written_by_script"] and dataset["written_now"]
  assert (dataset["num_train"], dataset["num_eval"]) == (NUM_TRAIN, NUM_EVAL)
  assert dataset["mean_jpeg_bytes"] > 0

  results = report["results"]
  # The augmented branch runs exactly when the pipeline has one (config.aug_branch).
  assert set(results) | set(report["skipped"]) == {"train", "eval", "train_aug"}
  assert not set(results) & set(report["skipped"])
  assert {"train", "eval"} <= set(results)
  for name, result in results.items():
    assert set(result) == RESULT_KEYS, name
    assert result["pipeline"] == name
    for key in ("images_per_sec", "cpu_sec_per_image", "median_fetch_s", "p90_fetch_s",
                "max_fetch_s", "cpu_cores_busy"):
      assert result[key] > 0, (name, key)
    assert result["median_fetch_s"] <= result["p90_fetch_s"] <= result["max_fetch_s"]
    assert len(result["images_per_sec_repeats"]) == len(result["cpu_sec_per_image_repeats"]) == 1
    assert result["images_per_sec"] == result["images_per_sec_repeats"][0]
    assert len(result["boundary_fetch_cpu_s"]) == len(result["boundary_fetch_s"])
    assert result["median_fetch_cpu_s"] >= 0
    assert all(t >= 0 for t in result["boundary_fetch_cpu_s"])
    assert result["boundary_ratio"] == pytest.approx(
        max(result["boundary_fetch_s"]) / result["median_fetch_s"])
    assert result["batch"]["label"] == [[BATCH], "int32"]
    assert result["batch"]["image"][0] == [BATCH, 32, 32, 3]
  for name in ({"train", "train_aug"} & set(results)):
    result = results[name]
    assert result["images"] == STEPS * BATCH and result["batches"] == STEPS
    assert result["boundary_steps"] == [5] and len(result["boundary_fetch_s"]) == 1
    assert result["meets_target"] == (result["boundary_ratio"] <= 1.5)
  if "train_aug" in results:
    assert "aug_image" in results["train_aug"]["batch"]
  evaluation = results["eval"]
  assert evaluation["images"] == NUM_EVAL and evaluation["batches"] == -(-NUM_EVAL // BATCH)
  assert evaluation["boundary_steps"] == [0] and evaluation["meets_target"] is None


def test_written_dataset_is_real_jpegs_of_the_written_sizes(run):
  data_dir, _ = run
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
  assert builder.is_prepared()
  for split, count in (("train", NUM_TRAIN), ("validation", NUM_EVAL)):
    examples = list(builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
                    .as_numpy_iterator())
    assert len(examples) == count
    for example in examples:
      width, height = map(int, re.fullmatch(
          rf"bench_{split}_\d{{7}}_(\d+)x(\d+)\.JPEG", example["file_name"].decode()).groups())
      assert WIDTHS[0] <= width <= WIDTHS[1] and HEIGHTS[0] <= height <= HEIGHTS[1]
      image = Image.open(io.BytesIO(example["image"]))
      assert image.format == "JPEG" and image.mode == "RGB"
      assert image.size == (width, height)
      image.load()  # Decodes the whole file: a truncated or non-JPEG payload fails here.
      assert 0 <= example["label"] < 1000


def test_second_run_reuses_the_data_and_other_flags_are_refused(run, tmp_path):
  data_dir, _ = run
  shards = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.tfrecord*")}
  out = tmp_path / "again.json"
  proc = _run(data_dir, out, "--steps=1", "--warmup=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not json.loads(out.read_text())["dataset"]["written_now"]
  assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.tfrecord*")} == shards
  proc = _run(data_dir, tmp_path / "other.json", "--seed=1")
  assert proc.returncode != 0 and "pass another --data_dir" in proc.stderr
