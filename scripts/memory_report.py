r"""Per-device memory and checkpoint size of a config at pod scale, from shapes and XLA.

Two parts:
* Exact, from the state's shapes (jax.eval_shape, no compilation): parameters, optimizer state,
  BN statistics and the adversarial FIFO, per device and per host, and for comparison what a
  float32 FIFO without labels would take (the compact FIFO stores uint8 images and labels).
* Estimated: the step's working memory (activations, gradients, the accumulator) measured with
  XLA's memory analysis (compiled.memory_analysis().temp_size_in_bytes) at a few small
  per-device micro-batches this machine can compile, fitted as a + b·m (linear in the
  micro-batch m: activations scale with the examples, gradients do not), and projected to the
  target's micro-batch. The batches the step reads (batch t and t+τ, with their augmented
  views, uint8) and the prefetched ones are counted from their shapes.

Example (the numbers in docs/performance.md):
  python scripts/memory_report.py --config=configs/imagenet_resnet50.py:conadv_aa_96k \
      --num_devices=8 --num_hosts=1 --num_devices=1024 --num_hosts=128 \
      --grad_accum_steps=128 --grad_accum_steps=1 --json=docs/memory_conadv_aa_96k.json
(`--num_devices`, `--num_hosts` and `--grad_accum_steps` pair up into layouts, in order.)
"""
import json
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For configs/.
from conadv_jax.data import input_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from conadv_jax.method import experiment, parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (with :preset).", lock_config=False)
flags.DEFINE_multi_integer("num_devices", [8], "Devices of each target layout.")
flags.DEFINE_multi_integer("num_hosts", [1], "Hosts of each target layout.")
flags.DEFINE_multi_integer("grad_accum_steps", [1], "Micro-batches per step of each layout.")
flags.DEFINE_list("measure_micro_batches", ["2", "4", "8"],  # Empty: shapes only.
                  "Per-device micro-batches to compile and measure (one device, k = 2).")
flags.DEFINE_string("json", None, "Write the report here.")

GB = 1e9


def _bytes(tree: Any) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def state_sizes(config) -> dict[str, Any]:
  """Bytes of each part of the state (global, as in a checkpoint), from jax.eval_shape."""
  exp = experiment.build(config, input_config.published_info(config),
                         parallel.make_mesh(jax.devices()[:1]))
  state = exp.state_shape
  fifo = state.adv_fifo or {}
  image = fifo.get("image")
  return {
      "params": _bytes(state.params), "opt_state": _bytes(state.opt_state),
      "batch_stats": _bytes(state.batch_stats), "step_and_rng": _bytes((state.step, state.rng)),
      "fifo_images": _bytes(image), "fifo_labels": _bytes(fifo.get("label")),
      # For comparison: a FIFO of float32 images without labels.
      "fifo_before_float32": 0 if image is None else image.size * 4,
      "image_bytes": int(np.prod(exp.info.image_shape)),  # One uint8 image.
      "staleness": exp.method.staleness, "aug_view": exp.method.aug_view,
  }


def measure_temp(config, micro_batch: int) -> dict[str, float]:
  """XLA's memory analysis of the step on one device at `micro_batch` examples, k = 2."""
  config = config.copy_and_resolve_references()
  config.batch_size = 2 * micro_batch
  config.grad_accum_steps = 2
  config.bn_group_size = min(config.bn_group_size or micro_batch, micro_batch)
  exp = experiment.build(config, input_config.published_info(config),
                         parallel.make_mesh(jax.devices()[:1]))
  batch = {"image": jax.ShapeDtypeStruct(exp.batch_shape, np.uint8),
           "label": jax.ShapeDtypeStruct(exp.batch_shape[:1], np.int32)}
  if exp.method.aug_view:
    batch["aug_image"] = batch["image"]
  started = time.time()
  compiled = exp.train_step.lower(exp.abstract_state(), batch, batch).compile()
  memory = compiled.memory_analysis()
  return {"micro_batch": micro_batch, "temp_bytes": float(memory.temp_size_in_bytes),
          "argument_bytes": float(memory.argument_size_in_bytes),
          "compile_s": time.time() - started}


def project(sizes: dict[str, Any], fit: dict[str, float], config, num_devices: int,
            num_hosts: int, accum: int) -> dict[str, Any]:
  """Per-device memory of one layout: exact parts from shapes, working memory from the fit
  (None without one)."""
  per_device_batch = config.batch_size // num_devices
  micro = per_device_batch // accum
  replicated = sizes["params"] + sizes["opt_state"] + sizes["batch_stats"]
  fifo = (sizes["fifo_images"] + sizes["fifo_labels"]) / num_devices
  views = 2 if sizes["aug_view"] else 1
  one_batch = per_device_batch * (views * sizes["image_bytes"] + 4)
  # On device: batch t, the τ batches of the look-ahead window, and the prefetched ones.
  batches = one_batch * (1 + sizes["staleness"] + config.prefetch_to_device)
  temp = (fit["temp_bytes_intercept"] + fit["temp_bytes_per_example"] * micro) if fit else None
  total = None if temp is None else replicated + fifo + batches + temp
  return {
      "num_devices": num_devices, "num_hosts": num_hosts, "grad_accum_steps": accum,
      "per_device_micro_batch": micro, "state_replicated_gb": replicated / GB,
      "fifo_gb": fifo / GB, "input_batches_gb": batches / GB,
      "working_gb": None if temp is None else temp / GB,
      "total_gb": None if total is None else total / GB,
      "checkpoint_per_host_gb": (sizes["fifo_images"] + sizes["fifo_labels"]) / num_hosts / GB,
      "checkpoint_per_host_before_gb": sizes["fifo_before_float32"] / num_hosts / GB,
  }


def main(argv: Sequence[str]) -> None:
  del argv
  config = FLAGS.config
  if config.task_layout != "shared":
    # Split runs one task per device on twice the rows (2x the FIFO and input bytes) and its
    # working memory is max(task A, task B), which this one-device compilation does not see.
    raise app.UsageError(
        f"memory_report.py models task_layout='shared' only, not {config.task_layout!r}: "
        "rerun with --config.task_layout=shared. In the split layout a device holds twice the "
        "FIFO and input rows of the shared layout and runs one task on them.")
  layouts = list(zip(FLAGS.num_devices, FLAGS.num_hosts, FLAGS.grad_accum_steps, strict=True))
  sizes = state_sizes(config)
  measured = [measure_temp(config, int(m)) for m in FLAGS.measure_micro_batches]
  fit = {}
  if len(measured) >= 2:
    slope, intercept = np.polyfit([m["micro_batch"] for m in measured],
                                  [m["temp_bytes"] for m in measured], 1)
    residual = max(abs(intercept + slope * m["micro_batch"] - m["temp_bytes"]) /
                   m["temp_bytes"] for m in measured)
    fit = {"temp_bytes_intercept": intercept, "temp_bytes_per_example": slope,
           "max_relative_residual": residual}
  report = {
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                  "jax": jax.__version__},
      "state_bytes": sizes, "measured": measured,
      "fit": fit,
      "layouts": [project(sizes, fit, config, *layout) for layout in layouts],
  }
  text = json.dumps(report, indent=2)
  print(text)
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(text + "\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
