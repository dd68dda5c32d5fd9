r"""Times one train step of vanilla, DisAdv and ConAdv training on synthetic data.

For each method the step is built exactly as training builds it (mesh over all local devices,
sharded state, donated state), compiled ahead of time, warmed up and then timed step by step
with a device sync after every step. Methods take turns (round-robin) within each repeat, so
slow drift of the machine affects all of them alike. Reported per method: the median ms/step,
clean images/s, compile seconds, the executable's memory and XLA's FLOP count.

Example:
  python scripts/benchmark_step.py --model=SmallResNet --image_size=28 --batch_size=256 \
      --repeats=30 --json=docs/bench_small_resnet.json
"""
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For configs/.
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from conadv_jax import (conadv, config_validation, experiment, input_pipeline,  # pylint: disable=g-import-not-at-top,wrong-import-position
                        models, parallel)

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "SmallResNet", list(models.MODEL_NAMES), "Model to time.")
flags.DEFINE_integer("batch_size", 256, "Clean examples per step (global, over all devices).")
flags.DEFINE_integer("image_size", 28, "Height and width of the synthetic images.")
flags.DEFINE_integer("channels", None, "Image channels; default 1 if image_size <= 28 else 3.")
flags.DEFINE_integer("num_classes", 10, "Number of classes.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the model.")
flags.DEFINE_list("methods", ["vanilla", "disadv", "conadv"], "Methods to time.")
flags.DEFINE_integer("staleness", 1, "ConAdv staleness τ (FIFO length).")
flags.DEFINE_integer("repeats", 20, "Timed steps per method.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per method before timing.")
flags.DEFINE_integer("small_resnet_depth", 8, "Depth of SmallResNet (6n+2).")
flags.DEFINE_integer("small_resnet_width", 16, "Width of SmallResNet's first stage.")
flags.DEFINE_integer("bn_group_size", 0, "BN group size; 0 = the whole per-device batch.")
flags.DEFINE_string("json", None, "If set, write the results to this JSON file.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and synthetic data.")


@dataclasses.dataclass
class Bench:
  """One method's compiled step, its live state and its timings."""
  method: str
  step: Callable[..., Any]
  state: conadv.TrainState
  batch: dict[str, jax.Array]
  batch_ahead: dict[str, jax.Array]
  lower_s: float
  compile_s: float
  memory: Any
  flops: float | None
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self) -> float:
    """Runs one step, waits for the new state and returns the wall time in seconds."""
    start = time.perf_counter()
    self.state, _ = self.step(self.state, self.batch, self.batch_ahead)
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def _synthetic_batch(rng: np.random.RandomState, shape: Sequence[int], num_classes: int,
                     sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """A random batch of 0-255 pixels and labels, placed on the devices."""
  batch = {"image": rng.uniform(0, 255, shape).astype(np.float32),
           "label": rng.randint(0, num_classes, shape[0]).astype(np.int32)}
  return jax.device_put(batch, sharding)


def _flops(compiled: Any) -> float | None:
  """XLA's FLOP estimate of a compiled executable, if the backend gives one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _executable_bytes(memory: Any) -> int | None:
  """Device bytes an executable needs: arguments + outputs + temporaries − donated aliases."""
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def benchmark_config(method: str) -> ml_collections.ConfigDict:
  """A synthetic-data config of the flags' model and batch, LARS at a constant 0.1."""
  config = default.get_config()
  config.update(dict(
      dataset="synthetic", synthetic_num_classes=FLAGS.num_classes, image_size=FLAGS.image_size,
      synthetic_num_examples=FLAGS.batch_size, model=FLAGS.model, dtype=FLAGS.dtype,
      small_resnet_depth=FLAGS.small_resnet_depth, small_resnet_width=FLAGS.small_resnet_width,
      bn_group_size=FLAGS.bn_group_size, batch_size=FLAGS.batch_size, optimizer="lars",
      learning_rate=0.1, end_learning_rate=0.1, warmup_epochs=0.0, num_train_steps=10**6,
      momentum=0.9, seed=FLAGS.seed, method=method,
      staleness=FLAGS.staleness if method == "conadv" else 0))
  return config


def build(method: str, mesh: jax.sharding.Mesh, channels: int) -> Bench:
  """Builds (experiment.build, as training does), fills (ConAdv) and AOT-compiles one step."""
  config = benchmark_config(method)
  config_validation.validate(config, num_devices=mesh.size)
  info = input_pipeline.get_dataset_info(config)
  info = dataclasses.replace(info, image_shape=(*info.image_shape[:2], channels))
  exp = experiment.build(config, info, mesh)
  state = exp.init_state()
  rng = np.random.RandomState(FLAGS.seed)
  sharding = parallel.batch_sharding(mesh)
  batch = _synthetic_batch(rng, exp.batch_shape, FLAGS.num_classes, sharding)
  batch_ahead = batch
  if exp.method.staleness:
    batch_ahead = _synthetic_batch(rng, exp.batch_shape, FLAGS.num_classes, sharding)
    # Attacks on the τ batches the first steps train on (all the same synthetic batch here).
    state = jax.block_until_ready(exp.fill_fifo(state, [batch] * exp.method.staleness))

  start = time.perf_counter()
  lowered = exp.train_step.lower(state, batch, batch_ahead)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    memory = None
  return Bench(method=method, step=compiled, state=state, batch=batch, batch_ahead=batch_ahead,
               lower_s=lower_s, compile_s=compile_s, memory=memory, flops=_flops(compiled))


def _device_peak_bytes() -> int | None:
  """Process-wide peak bytes of the first local device (None where unsupported, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  for method in FLAGS.methods:
    if method not in conadv.METHODS:
      raise app.UsageError(f"--methods: {method!r} is not one of {conadv.METHODS}.")
  channels = FLAGS.channels or (1 if FLAGS.image_size <= 28 else 3)
  image_shape = (FLAGS.image_size, FLAGS.image_size, channels)
  devices = jax.local_devices()
  if FLAGS.batch_size % len(devices):
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} must divide over {len(devices)} "
                         "devices.")
  mesh = parallel.make_mesh(devices)

  benches = []
  for method in FLAGS.methods:
    bench = build(method, mesh, channels)
    print(f"{method}: lowered in {bench.lower_s:.1f} s, compiled in {bench.compile_s:.1f} s",
          flush=True)
    benches.append(bench)
  for _ in range(FLAGS.warmup):
    for bench in benches:
      bench.run()
  for _ in range(FLAGS.repeats):  # Round-robin: drift hits every method alike.
    for bench in benches:
      bench.times.append(bench.run())

  results = []
  for bench in benches:
    median_s = statistics.median(bench.times)
    results.append({
        "method": bench.method,
        "ms_per_step": 1e3 * median_s,
        "images_per_sec": FLAGS.batch_size / median_s,
        "compile_s": bench.compile_s,
        "lower_s": bench.lower_s,
        "peak_bytes": _executable_bytes(bench.memory),
        "peak_bytes_source": "compiled.memory_analysis (argument + output + temp - alias)",
        "flops": bench.flops,
        "ms_min": 1e3 * min(bench.times),
        "ms_max": 1e3 * max(bench.times),
        "ms_all": [1e3 * t for t in bench.times],
    })
  by_method = {r["method"]: r for r in results}
  ratios = {}
  for num, den in (("conadv", "disadv"), ("conadv", "vanilla"), ("disadv", "vanilla")):
    if num in by_method and den in by_method:
      ratios[f"{num}/{den}"] = by_method[num]["ms_per_step"] / by_method[den]["ms_per_step"]
      if by_method[num]["flops"] and by_method[den]["flops"]:
        ratios[f"{num}/{den} flops"] = by_method[num]["flops"] / by_method[den]["flops"]

  vanilla_ms = by_method.get("vanilla", {}).get("ms_per_step")
  print(f"\n{FLAGS.model}, batch {FLAGS.batch_size}, {image_shape}, {FLAGS.dtype}, "
        f"{len(devices)} x {devices[0]}, median of {FLAGS.repeats} steps")
  print(f"{'method':<8} {'ms/step':>9} {'images/s':>9} {'compile s':>9} {'peak MB':>9} "
        f"{'GFLOP':>9} {'x vanilla':>9}")
  for r in results:
    ratio = f"{r['ms_per_step'] / vanilla_ms:.3f}" if vanilla_ms else "-"
    peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
    gflop = f"{r['flops'] / 1e9:.2f}" if r["flops"] is not None else "-"
    print(f"{r['method']:<8} {r['ms_per_step']:>9.2f} {r['images_per_sec']:>9.1f} "
          f"{r['compile_s']:>9.1f} {peak:>9} {gflop:>9} {ratio:>9}")
  for name, value in ratios.items():
    print(f"{name}: {value:.3f}")

  if FLAGS.json:
    config = {name: FLAGS[name].value for name in (
        "model", "batch_size", "image_size", "num_classes", "dtype", "methods", "staleness",
        "repeats", "warmup", "small_resnet_depth", "small_resnet_width", "bn_group_size",
        "seed")}
    config["channels"] = channels
    report = {"results": results, "ratios": ratios, "config": config,
              "device": str(devices[0]), "num_devices": len(devices),
              "device_peak_bytes_in_use": _device_peak_bytes(),
              "jax_version": jax.__version__}
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
    print(f"Wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
