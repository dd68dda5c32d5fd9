r"""Measures the ImageNet input pipeline on a small ImageNet-like dataset of real JPEGs.

Why: at 96K an ImageNet epoch is 13 steps, so whatever the train pipeline does at an epoch
boundary happens every few steps, and a host's decode throughput and CPU cost decide whether
the devices wait. This script measures the code that training runs, on data in the same format
as the real imagenet2012, without needing the 150 GB original.

1. Data. Unless --data_dir already holds it, writes a prepared TFDS `imagenet2012` (the builder
   `prepare` opens with `tfds.builder("imagenet2012", data_dir=...)`): TFRecord shards written
   by TFDS's own `Writer` with the builder's own features (JPEG bytes, label, file_name) and
   `dataset_info.json`, so TFDS reads it as a prepared copy and never downloads.
   Images are real baseline JPEGs (quality 90) of random size (by default widths 300-500,
   heights 250-450, around ImageNet's typical 400x350) whose content (smooth colour fields,
   a ramp, a few flat shapes, mid- and fine-grained noise) compresses to about 100 KB, close
   to an ImageNet training JPEG; decode cost depends on pixel count and compressed bytes, so
   both are matched. Each file_name ends in WIDTHxHEIGHT.JPEG. A data_dir holding a prepared
   imagenet2012 that this script did not write (the real one, say) is read as it is.
2. Pipelines. Runs `pipeline.train_batches` and `eval_batches` with the config of
   configs/imagenet_resnet50.py (--preset), with only data_dir and the batch sizes changed,
   as process --process_index of --process_count (one host of a multi-host job). When the
   config has an `aug_branch` field (an extra augmented view), the train pipeline is run again
   with config.aug_branch = --aug_branch; otherwise the JSON says why it was skipped.
3. Measures, per pipeline, after --warmup untimed batches (train) or one untimed pass (eval):
   * images/s per host: images of a repeat / its wall time; the median over --repeats;
   * host CPU-seconds per image: user + system CPU time of the whole process (getrusage:
     all threads, tf.data's included) / images; the median over repeats;
   * the fetch time of every batch (`next(iterator)`, nothing else between fetches, so the
     consumer never waits on anything but the pipeline: the input-bound case) and, for train,
     the fetch time of each batch that holds the first example of a new epoch against the
     median fetch time (`boundary_ratio` = worst boundary / median; target <= 1.5). The train
     iterator is one stream over warmup + all repeats, as in training, so --steps * --repeats
     batches cross several epoch boundaries when the pipeline's steps_per_epoch (N // B where
     epochs drop their last partial batch, N / B where batches run on across epochs) is small.
     For eval, every pass builds its pipeline anew, so the first batch of each pass plays the
     boundary's role (informational; the 1.5x target is for train);
   * the process CPU seconds spent during each fetch (`*_fetch_cpu_s`): on a shared machine
     wall times stretch with other people's load, while the work done at a boundary
     (building a pipeline, refilling a shuffle buffer) shows in CPU seconds all the same.

JSON layout (`schema` "conadv_jax.benchmark_input/1"; keys are only ever added):
  {"schema", "command", "timestamp_utc",
   "machine": {"hostname", "platform", "cpu_model", "cpu_count", "memory_gib", "python",
               "tensorflow", "tensorflow_datasets", "jax", "loadavg_before", "loadavg_after"},
   "code": {"git_commit", "git_dirty_paths", "input_pipeline_path", "input_pipeline_sha256",
            "input_pipeline_is_head"},
   "dataset": {"data_dir", "written_by_script", "written_now", "write_s", "num_train",
               "num_eval", "num_shards", "width_range", "height_range", "jpeg_quality",
               "mean_jpeg_bytes"},
   "config": {"preset", "image_size", "batch_size_per_host", "global_batch_size",
              "eval_batch_size_per_host", "process_index", "process_count",
              "steps_per_epoch", "steps", "warmup", "repeats", "shuffle_buffer_size",
              "cache", "augment", "aug_branch"},
   "results": {NAME: {"pipeline", "images", "batches", "images_per_sec",
                      "images_per_sec_repeats", "cpu_sec_per_image",
                      "cpu_sec_per_image_repeats", "cpu_cores_busy", "median_fetch_s",
                      "p90_fetch_s", "max_fetch_s", "median_fetch_cpu_s", "boundary_steps",
                      "boundary_fetch_s", "boundary_fetch_cpu_s", "boundary_ratio",
                      "meets_target", "batch"}},
   "skipped": {NAME: reason}}
The "input_pipeline_*" code keys cover every module of conadv_jax/data: the folder, the sha256 of
  their names and bytes, and whether none differs from HEAD.
NAME is "train", "eval" and "train_aug" (the augmented branch). `images` counts real images
(eval: mask 1) over all timed repeats; `batch` maps each key of a batch to [shape, dtype].
`boundary_steps` are the global steps (train) or pass numbers (eval) of `boundary_fetch_s`;
`meets_target` is null for eval and when there was no boundary.

Example (the run in docs/performance.md):
  python scripts/benchmark_input.py --num_train=512 --num_eval=256 --batch_size=32 \
      --steps=64 --repeats=3 --out=docs/bench_input.json
To measure one commit while others edit the working tree, run it in a clean clone, so that
`code` names exactly what ran:
  git clone -q --shared --no-checkout . /tmp/at && git -C /tmp/at checkout -q COMMIT
  cd /tmp/at && python scripts/benchmark_input.py ...
"""
import dataclasses
import datetime
import fractions
import hashlib
import json
import math
import os
import pathlib
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For configs/.
from configs import imagenet_resnet50  # pylint: disable=g-import-not-at-top,wrong-import-position
from conadv_jax.data import datasets, pipeline, prepare  # pylint: disable=g-import-not-at-top,wrong-import-position
from conadv_jax.method import optim  # pylint: disable=g-import-not-at-top,wrong-import-position

SCHEMA = "conadv_jax.benchmark_input/1"
MARKER = "conadv_benchmark_input.json"  # In the prepared folder: what this script wrote there.
Batch = dict[str, np.ndarray]
# Target for the worst epoch-boundary batch fetch time over the median fetch time: the stream
# must not stall when an epoch ends (docs/performance.md, "Input pipeline").
BOUNDARY_TARGET = 1.5
JPEG_QUALITY = 90

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_train", 512, "Training images to write.")
flags.DEFINE_integer("num_eval", 256, "Validation images to write.")
flags.DEFINE_string("data_dir", None,
                    "TFDS data dir; the dataset is written there unless it already is. Default: "
                    "a folder in the temp dir named after the dataset flags, reused by later runs.")
flags.DEFINE_list("width_range", ["300", "500"], "Min and max JPEG width (inclusive).")
flags.DEFINE_list("height_range", ["250", "450"], "Min and max JPEG height (inclusive).")
flags.DEFINE_integer("num_shards", 8, "TFRecord shards per split (capped at the split size).")
flags.DEFINE_string("preset", "conadv_32k", "Preset of configs/imagenet_resnet50.py.")
flags.DEFINE_integer("image_size", 224, "Model input side (config.image_size).")
flags.DEFINE_integer("batch_size", 32, "Training images per batch on this host.")
flags.DEFINE_integer("eval_batch_size", None, "Eval images per batch on this host "
                     "(default: --batch_size).")
flags.DEFINE_integer("process_count", 1, "Hosts of the simulated job; this one reads its share.")
flags.DEFINE_integer("process_index", 0, "Which host of --process_count this one is.")
flags.DEFINE_integer("steps", 64, "Timed training batches per repeat.")
flags.DEFINE_integer("warmup", 4, "Untimed training batches before the first repeat (>= 1: the "
                     "first batch builds the pipeline).")
flags.DEFINE_integer("repeats", 3, "Timed repeats (train: --steps batches; eval: one pass).")
flags.DEFINE_string("aug_branch", "autoaugment",
                    "config.aug_branch of the augmented train run, if the config has that field "
                    "(default: the AutoAugment view of the *_aa_* ImageNet presets; '' or "
                    "'none': skip it).")
flags.DEFINE_integer("seed", 0, "Seed of the written data and of config.seed.")
flags.DEFINE_integer("shuffle_buffer_size", None, "config.shuffle_buffer_size (default: the "
                     "preset's). The window is filled from the files at each epoch's start.")
flags.DEFINE_string("out", None, "If set, write the JSON report to this path.")


# ------------------------------------------------------------------------------------------------
# The dataset.


def _range(values: Sequence[str], name: str) -> tuple[int, int]:
  low, high = (int(v) for v in values) if len(values) == 2 else (0, -1)
  if not 1 <= low <= high:
    raise app.UsageError(f"--{name} must be MIN,MAX with 1 <= MIN <= MAX, got {values}.")
  return low, high


def _resize(array: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  return tf.image.resize(array[None], [height, width], method=method)[0].numpy()


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """An (height, width, 3) uint8 image that JPEG-compresses like a photo (~100 KB at 400x350).

  Smooth colour fields and a ramp give the low frequencies, flat shapes give sharp edges, and
  noise at 1/4 resolution and per pixel gives the texture that makes real JPEGs large; the
  noise levels are chosen so that quality-90 files average about 100 KB at ImageNet's sizes.
  """
  low = rng.uniform(0, 255, (rng.integers(3, 8), rng.integers(3, 8), 3)).astype(np.float32)
  image = _resize(low, height, width, "bicubic")
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height
  image += ramp[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
  for _ in range(rng.integers(1, 4)):  # Ellipses of flat colour.
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image[inside] = rng.uniform(0, 255, 3)
  mid = rng.normal(0, 24, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
  image += _resize(mid, height, width, "bilinear")
  image += rng.normal(0, 36, (height, width, 3)).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def _params() -> dict[str, Any]:
  """What the written data depends on: a dataset is reused only if these match."""
  return {"num_train": FLAGS.num_train, "num_eval": FLAGS.num_eval,
          "width_range": list(_range(FLAGS.width_range, "width_range")),
          "height_range": list(_range(FLAGS.height_range, "height_range")),
          "num_shards": FLAGS.num_shards, "seed": FLAGS.seed, "jpeg_quality": JPEG_QUALITY}


def _write_split(builder: tfds.core.DatasetBuilder, folder: pathlib.Path, split: str,
                 count: int, rng: np.random.Generator, params: dict[str, Any]
                 ) -> tuple[tfds.core.SplitInfo, int]:
  """Writes one split's shards with TFDS's own writer; returns its SplitInfo and JPEG bytes."""
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer, file_adapters, writer
  from tensorflow_datasets.core.utils import shard_utils
  # pylint: enable=g-import-not-at-top
  features = builder.info.features
  template = tfds.core.ShardedFileTemplate(
      data_dir=folder, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=builder.name, split=split, filetype_suffix="tfrecord")
  split_writer = writer.Writer(
      serializer=example_serializer.ExampleSerializer(features.get_serialized_info()),
      filename_template=template, hash_salt=split, disable_shuffling=False,
      example_writer=writer.ExampleWriter(file_adapters.FileFormat.TFRECORD),
      shard_config=shard_utils.ShardConfig(num_shards=max(1, min(params["num_shards"], count))))
  jpeg_bytes = 0
  for i in range(count):
    height = int(rng.integers(params["height_range"][0], params["height_range"][1] + 1))
    width = int(rng.integers(params["width_range"][0], params["width_range"][1] + 1))
    encoded = tf.io.encode_jpeg(synthetic_photo(rng, height, width),
                                quality=params["jpeg_quality"]).numpy()
    jpeg_bytes += len(encoded)
    example = {"image": encoded, "label": int(rng.integers(0, 1000)),
               "file_name": f"bench_{split}_{i:07d}_{width}x{height}.JPEG"}
    split_writer.write(i, features.encode_example(example))
  shard_lengths, num_bytes = split_writer.finalize()
  return tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=num_bytes,
                             filename_template=template), jpeg_bytes


def prepare_dataset(data_dir: str) -> dict[str, Any]:
  """Makes sure data_dir holds a prepared imagenet2012; writes the benchmark's one if needed.

  Written into a side folder and renamed into place at the end, so that an interrupted write
  is never mistaken for a prepared copy by a later run.

  Raises:
    app.UsageError: data_dir holds a dataset this script wrote with other flags, or an
      unprepared imagenet2012 folder.
  """
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  final = pathlib.Path(builder.data_path)
  params = _params()
  if final.exists() and builder.is_prepared():
    marker = final / MARKER
    if not marker.exists():  # Someone else's prepared copy, e.g. the real ImageNet: read it.
      splits = builder.info.splits
      return {"written_by_script": False, "written_now": False, "write_s": None,
              "num_train": splits["train"].num_examples,
              "num_eval": splits["validation"].num_examples,
              "num_shards": splits["train"].num_shards, "width_range": None,
              "height_range": None, "jpeg_quality": None, "mean_jpeg_bytes": None}
    written = json.loads(marker.read_text())
    if written["params"] != params:
      raise app.UsageError(
          f"{final} holds a benchmark dataset written with {written['params']}, not {params}: "
          "pass another --data_dir or delete that folder.")
    return dict(written["summary"], written_now=False)
  if final.exists():
    raise app.UsageError(f"{final} exists but is no prepared imagenet2012 (an interrupted "
                         "build?): delete it or pass another --data_dir.")

  start = time.perf_counter()
  partial = final.with_name(final.name + ".incomplete")
  if partial.exists():
    for path in partial.iterdir():
      path.unlink()
  partial.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(params["seed"])
  splits, jpeg_bytes = [], 0
  for split, count in (("train", params["num_train"]), ("validation", params["num_eval"])):
    info, split_bytes = _write_split(builder, partial, split, count, rng, params)
    splits.append(info)
    jpeg_bytes += split_bytes
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(partial)
  summary = {"written_by_script": True, "write_s": time.perf_counter() - start,
             "num_train": params["num_train"], "num_eval": params["num_eval"],
             "num_shards": params["num_shards"], "width_range": params["width_range"],
             "height_range": params["height_range"], "jpeg_quality": params["jpeg_quality"],
             "mean_jpeg_bytes": jpeg_bytes / (params["num_train"] + params["num_eval"])}
  (partial / MARKER).write_text(json.dumps({"params": params, "summary": summary}, indent=1))
  partial.rename(final)
  return dict(summary, written_now=True)


# ------------------------------------------------------------------------------------------------
# Measurement.


def _cpu_s() -> float:
  """User + system CPU seconds of this process so far, all threads (tf.data's included)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _batch_layout(batch: Batch) -> dict[str, list[Any]]:
  return {key: [list(value.shape), str(value.dtype)] for key, value in sorted(batch.items())}


def _num_real(batch: Batch) -> int:
  """Real (unpadded) images of a batch: its mask's sum if it has one."""
  if "mask" in batch:
    return round(float(np.sum(batch["mask"])))
  return len(batch["label"])


@dataclasses.dataclass
class _Timings:
  """What one pipeline's timed repeats measured (per repeat, per fetch, per boundary)."""
  repeat_images: list[int] = dataclasses.field(default_factory=list)
  repeat_wall_s: list[float] = dataclasses.field(default_factory=list)
  repeat_cpu_s: list[float] = dataclasses.field(default_factory=list)
  fetch_s: list[float] = dataclasses.field(default_factory=list)
  fetch_cpu_s: list[float] = dataclasses.field(default_factory=list)
  boundary_steps: list[int] = dataclasses.field(default_factory=list)
  boundary_fetch_s: list[float] = dataclasses.field(default_factory=list)
  boundary_fetch_cpu_s: list[float] = dataclasses.field(default_factory=list)

  def fetch(self, batches: Iterator[Batch], boundary: int | None) -> Batch:
    """next(batches), timed in wall and process CPU seconds; `boundary`: its step, if one."""
    cpu_start, start = _cpu_s(), time.perf_counter()
    batch = next(batches)
    elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu_start
    self.fetch_s.append(elapsed)
    self.fetch_cpu_s.append(cpu)
    if boundary is not None:
      self.boundary_steps.append(boundary)
      self.boundary_fetch_s.append(elapsed)
      self.boundary_fetch_cpu_s.append(cpu)
    return batch

  def summary(self, name: str, layout: dict[str, list[Any]], has_target: bool) -> dict[str, Any]:
    """One pipeline's result entry (see the module docstring for the layout)."""
    rates = [n / w for n, w in zip(self.repeat_images, self.repeat_wall_s)]
    costs = [c / n for n, c in zip(self.repeat_images, self.repeat_cpu_s)]
    median_fetch = statistics.median(self.fetch_s)
    ratio = (max(self.boundary_fetch_s) / median_fetch
             if self.boundary_fetch_s and median_fetch > 0 else None)
    return {
        "pipeline": name,
        "images": sum(self.repeat_images),
        "batches": len(self.fetch_s),
        "images_per_sec": statistics.median(rates),
        "images_per_sec_repeats": rates,
        "cpu_sec_per_image": statistics.median(costs),
        "cpu_sec_per_image_repeats": costs,
        "cpu_cores_busy": sum(self.repeat_cpu_s) / sum(self.repeat_wall_s),
        "median_fetch_s": median_fetch,
        "p90_fetch_s": float(np.percentile(self.fetch_s, 90)),
        "max_fetch_s": max(self.fetch_s),
        "median_fetch_cpu_s": statistics.median(self.fetch_cpu_s),
        "boundary_steps": self.boundary_steps,
        "boundary_fetch_s": self.boundary_fetch_s,
        "boundary_fetch_cpu_s": self.boundary_fetch_cpu_s,
        "boundary_ratio": ratio,
        "meets_target": (ratio <= BOUNDARY_TARGET) if has_target and ratio is not None else None,
        "batch": layout,
    }


def _starts_epoch(step: int, steps_per_epoch: float) -> bool:
  """Whether batch `step` holds the first example of an epoch other than the first.

  Pipelines that drop each epoch's last partial batch have a whole number of steps per epoch,
  and epochs start at multiples of it; pipelines that run on across epochs have N / B steps, and
  an epoch may start inside a batch. Exact rationals: N / B has a denominator <= B <= 2**31.
  """
  per_epoch = fractions.Fraction(steps_per_epoch).limit_denominator(2**31)
  epoch = max(math.ceil(step / per_epoch), 1)  # The first epoch starting at or after `step`.
  return epoch * per_epoch < step + 1


class MissingKeyError(Exception):
  """The pipeline's batches lack a key the run needs (a config field it does not implement)."""


def measure_train(name: str, config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                  steps_per_epoch: float, required_key: str = "image") -> dict[str, Any]:
  """Times one continuous train stream: --warmup batches, then --repeats x --steps batches.

  Raises:
    MissingKeyError: the first batch has no `required_key` (checked before any timing).
  """
  batches = pipeline.train_batches(config, info, start_step=0,
                                   process_index=FLAGS.process_index,
                                   process_count=FLAGS.process_count)
  timings = _Timings()
  # The first (untimed) batch builds the pipeline; its layout is checked before any timing.
  batch = next(batches)
  if required_key not in batch:
    raise MissingKeyError(f"its batches have no {required_key!r} (keys: {sorted(batch)})")
  for _ in range(FLAGS.warmup - 1):
    batch = next(batches)
  step = FLAGS.warmup
  for _ in range(FLAGS.repeats):
    images = 0
    cpu_start, wall_start = _cpu_s(), time.perf_counter()
    for _ in range(FLAGS.steps):
      batch = timings.fetch(batches, step if _starts_epoch(step, steps_per_epoch) else None)
      images += len(batch["label"])
      step += 1
    timings.repeat_wall_s.append(time.perf_counter() - wall_start)
    timings.repeat_cpu_s.append(_cpu_s() - cpu_start)
    timings.repeat_images.append(images)
  return timings.summary(name, _batch_layout(batch), has_target=True)


def measure_eval(config: ml_collections.ConfigDict,
                 info: datasets.DatasetInfo) -> dict[str, Any]:
  """Times one untimed and then --repeats full eval passes, each built anew as in training."""
  timings, untimed = _Timings(), _Timings()
  for repeat in range(-1, FLAGS.repeats):  # -1: the warm-up pass.
    record = untimed if repeat < 0 else timings
    images = 0
    cpu_start, wall_start = _cpu_s(), time.perf_counter()
    # Built lazily inside the first fetch, so that building counts as the pass's boundary.
    batches = _lazy(lambda: pipeline.eval_batches(
        config, info, process_index=FLAGS.process_index, process_count=FLAGS.process_count))
    boundary = repeat
    while True:
      try:
        batch = record.fetch(batches, boundary)
      except StopIteration:  # Raised before `fetch` records anything.
        break
      boundary = None
      images += _num_real(batch)
      layout = _batch_layout(batch)
    record.repeat_wall_s.append(time.perf_counter() - wall_start)
    record.repeat_cpu_s.append(_cpu_s() - cpu_start)
    record.repeat_images.append(images)
  return timings.summary("eval", layout, has_target=False)


def _lazy(make: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
  """An iterator that calls make() at its first next(): pipeline building is timed as a fetch."""
  yield from make()


# ------------------------------------------------------------------------------------------------
# Report.


def _git(*args: str) -> bytes | None:
  """git's output in this script's checkout; None where that is no git checkout.

  GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock in a checkout that others may be
  committing in at the same moment.
  """
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True,
                          timeout=30, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0")).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def _code_info() -> dict[str, Any]:
  """Which code was measured: HEAD, uncommitted changes, and the data modules' own hash.

  Others may be editing conadv_jax/data in the same working tree, so the commit alone does not
  say what ran: the hash of the imported modules, and whether they equal HEAD's, do.
  """
  folder = pathlib.Path(pipeline.__file__).resolve().parent
  digest = hashlib.sha256()
  for path in sorted(folder.glob("*.py")):
    digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
  commit = _git("rev-parse", "HEAD")
  dirty = _git("status", "--porcelain", "--", "conadv_jax", "configs")
  data_changes = _git("status", "--porcelain", "--", str(folder))
  return {"git_commit": commit.decode().strip() if commit is not None else None,
          "git_dirty_paths": ([line[3:] for line in dirty.decode().splitlines()]
                              if dirty is not None else None),
          "input_pipeline_path": str(folder),
          "input_pipeline_sha256": digest.hexdigest(),
          "input_pipeline_is_head": (not data_changes.strip()
                                     if data_changes is not None else None)}


def _machine_info() -> dict[str, Any]:
  cpu_model = platform.processor() or None
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu_model)
  except OSError:
    pass
  try:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    memory_gib = None
  import jax  # pylint: disable=g-import-not-at-top
  return {"hostname": socket.gethostname(), "platform": platform.platform(),
          "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
          "python": platform.python_version(), "tensorflow": tf.__version__,
          "tensorflow_datasets": tfds.__version__, "jax": jax.__version__}


def _config(data_dir: str) -> ml_collections.ConfigDict:
  """The preset's config with only data_dir, seed and the batch sizes changed."""
  config = imagenet_resnet50.get_config(FLAGS.preset)
  config.data_dir = data_dir
  config.image_size = FLAGS.image_size
  config.batch_size = FLAGS.batch_size * FLAGS.process_count
  config.eval_batch_size = (FLAGS.eval_batch_size or FLAGS.batch_size) * FLAGS.process_count
  config.seed = FLAGS.seed
  if FLAGS.shuffle_buffer_size is not None:
    config.shuffle_buffer_size = FLAGS.shuffle_buffer_size
  if "aug_branch" in config:  # The plain train run has no augmented view, whatever the preset.
    config.aug_branch = "none"
  return config


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  for name in ("num_train", "num_eval", "batch_size", "steps", "repeats", "process_count"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name} must be positive.")
  if FLAGS.warmup < 1 or not 0 <= FLAGS.process_index < FLAGS.process_count:
    raise app.UsageError("--warmup must be >= 1 and 0 <= --process_index < --process_count.")
  tf.config.set_visible_devices([], "GPU")  # The input side only; leave accelerators alone.
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it constructs.
  loadavg_before = os.getloadavg()
  data_dir = FLAGS.data_dir or os.path.join(
      tempfile.gettempdir(), f"conadv_bench_input_{FLAGS.num_train}_{FLAGS.num_eval}_"
      f"{'-'.join(FLAGS.width_range)}_{'-'.join(FLAGS.height_range)}_s{FLAGS.seed}")
  dataset = dict(prepare_dataset(data_dir), data_dir=data_dir)
  print(f"Dataset in {data_dir}: {dataset}", flush=True)

  config = _config(data_dir)
  info = prepare.get_dataset_info(config)
  steps_per_epoch = optim.steps_per_epoch(config.batch_size, info.num_train_examples)
  results, skipped = {}, {}
  results["train"] = measure_train("train", config, info, steps_per_epoch)
  if "aug_branch" not in config:
    skipped["train_aug"] = ("the config has no aug_branch field: this input pipeline has no "
                            "augmented branch")
  elif FLAGS.aug_branch in ("", "none"):
    skipped["train_aug"] = f"--aug_branch={FLAGS.aug_branch!r}"
  else:
    aug_config = _config(data_dir)
    aug_config.aug_branch = FLAGS.aug_branch
    try:
      results["train_aug"] = measure_train("train_aug", aug_config, info, steps_per_epoch,
                                           required_key="aug_image")
    except MissingKeyError as e:  # The config knows the field before the pipeline does.
      skipped["train_aug"] = f"config.aug_branch={FLAGS.aug_branch!r} is set, but {e}"
  results["eval"] = measure_eval(config, info)

  machine = dict(_machine_info(), loadavg_before=list(loadavg_before),
                 loadavg_after=list(os.getloadavg()))
  report = {
      "schema": SCHEMA,
      "command": " ".join(["python", "scripts/benchmark_input.py", *sys.argv[1:]]),
      "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(
          timespec="seconds"),
      "machine": machine,
      "code": _code_info(),
      "dataset": dataset,
      "config": {
          "preset": FLAGS.preset, "image_size": FLAGS.image_size,
          "batch_size_per_host": FLAGS.batch_size, "global_batch_size": config.batch_size,
          "eval_batch_size_per_host": config.eval_batch_size // FLAGS.process_count,
          "process_index": FLAGS.process_index, "process_count": FLAGS.process_count,
          "steps_per_epoch": steps_per_epoch, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
          "repeats": FLAGS.repeats, "shuffle_buffer_size": config.shuffle_buffer_size,
          "cache": config.cache, "augment": config.augment,
          "aug_branch": FLAGS.aug_branch if "train_aug" in results else None},
      "results": results,
      "skipped": skipped,
  }

  print(f"\n{machine['cpu_count']} x {machine['cpu_model']}; batch {FLAGS.batch_size}/host, "
        f"{steps_per_epoch} steps/epoch, {FLAGS.repeats} repeats; load "
        f"{loadavg_before[0]:.1f} -> {machine['loadavg_after'][0]:.1f}")
  print(f"{'pipeline':<10} {'images/s':>9} {'CPU ms/img':>10} {'median s':>9} "
        f"{'boundary s (max)':>16} {'ratio':>6} {'median CPU s':>12} {'boundary CPU s':>14}")
  for name, r in results.items():
    worst = f"{max(r['boundary_fetch_s']):.4f}" if r["boundary_fetch_s"] else "-"
    worst_cpu = f"{max(r['boundary_fetch_cpu_s']):.4f}" if r["boundary_fetch_cpu_s"] else "-"
    ratio = f"{r['boundary_ratio']:.2f}" if r["boundary_ratio"] is not None else "-"
    print(f"{name:<10} {r['images_per_sec']:>9.1f} {1e3 * r['cpu_sec_per_image']:>10.2f} "
          f"{r['median_fetch_s']:>9.4f} {worst:>16} {ratio:>6} "
          f"{r['median_fetch_cpu_s']:>12.4f} {worst_cpu:>14}")
  for name, reason in skipped.items():
    print(f"{name}: skipped ({reason})")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
