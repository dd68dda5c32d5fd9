r"""Times one train step of vanilla, DisAdv and ConAdv training on synthetic data.

For each method the step is built exactly as training builds it (mesh over all local devices,
sharded state, donated state), compiled ahead of time, warmed up and then timed step by step
with a device sync after every step. Methods take turns (round-robin) within each repeat, so
slow drift of the machine affects all of them alike. Reported per method: the median ms/step,
clean images/s, compile seconds, the executable's memory and XLA's FLOP count.

--task_layout=split|both also times ConAdv with tasks A and B on two halves of the devices
(task_layout="split", reported as "conadv_split"; it needs an even number of local devices).
Vanilla and DisAdv have one task and always run in the shared layout.

--task_costs compiles each task alone for one device, at the rows a device holds in each layout
(B/N shared, 2B/N split, or --task_cost_rows), and reports XLA's cost analysis (FLOPs and bytes
accessed) of: the vanilla gradient, task A (clean + adversarial gradient), task B (the attack)
and the optimizer update. --roofline=tpu_v3 turns those into step-time projections from a
stated roofline model (ROOFLINES below; docs/performance.md); --notime skips the timing, e.g.
to get ResNet-50 costs at 224 pixels on a CPU.

Examples:
  python scripts/benchmark_step.py --model=SmallResNet --image_size=28 --batch_size=256 \
      --repeats=30 --json=docs/bench_small_resnet.json
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/benchmark_step.py \
      --task_layout=both --task_costs --json=docs/bench_split_small_resnet.json
  python scripts/benchmark_step.py --model=ResNet50 --image_size=224 --num_classes=1000 \
      --dtype=bfloat16 --notime --task_costs --task_cost_rows=4,8 --roofline=tpu_v3 \
      --roofline_cores=128 --json=docs/bench_split_resnet50_projection.json
"""
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For configs/.
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from conadv_jax.method import conadv, experiment, models, parallel, split_layout  # pylint: disable=g-import-not-at-top,wrong-import-position

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
flags.DEFINE_enum("task_layout", "shared", ["shared", "split", "both"],
                  "Layout(s) ConAdv is timed in: shared (every device runs tasks A and B), split "
                  "(tasks A and B on two halves of the devices, 'conadv_split') or both.")
flags.DEFINE_bool("time", True, "Time the steps; --notime only compiles for the task costs.")
flags.DEFINE_bool("task_costs", False,
                  "Report XLA's FLOPs and bytes of each task compiled alone for one device.")
flags.DEFINE_list("task_cost_rows", [],
                  "Rows per device for --task_costs; default: batch_size/N and 2*batch_size/N, "
                  "what a device holds in the shared and split layouts.")
flags.DEFINE_enum("roofline", None, ["tpu_v3"], "Project step times from the task costs with "
                  "this hardware's roofline (needs --task_costs and two --task_cost_rows r, 2r).")
flags.DEFINE_integer("roofline_cores", 128, "Cores of the projected run (the paper's speed "
                     "comparisons: batch 512 on TPU v3-128, 4 images per core).")


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


def _cost(compiled: Any, key: str) -> float | None:
  """One entry ("flops", "bytes accessed") of XLA's cost analysis, if the backend gives it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost[key]) if cost and key in cost else None


def _flops(compiled: Any) -> float | None:
  """XLA's FLOP estimate of a compiled executable, if the backend gives one."""
  return _cost(compiled, "flops")


def _executable_bytes(memory: Any) -> int | None:
  """Device bytes an executable needs: arguments + outputs + temporaries − donated aliases."""
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def benchmark_config(method: str, layout: str = "shared", batch_size: int | None = None,
                     bn_group_size: int | None = None) -> ml_collections.ConfigDict:
  """A synthetic-data config of the flags' model and batch, LARS at a constant 0.1."""
  batch_size = batch_size or FLAGS.batch_size
  config = default.get_config()
  config.update(dict(
      dataset="synthetic", synthetic_num_classes=FLAGS.num_classes, image_size=FLAGS.image_size,
      synthetic_num_examples=batch_size, model=FLAGS.model, dtype=FLAGS.dtype,
      small_resnet_depth=FLAGS.small_resnet_depth, small_resnet_width=FLAGS.small_resnet_width,
      bn_group_size=FLAGS.bn_group_size if bn_group_size is None else bn_group_size,
      batch_size=batch_size, optimizer="lars",
      learning_rate=0.1, end_learning_rate=0.1, warmup_epochs=0.0, num_train_steps=10**6,
      momentum=0.9, seed=FLAGS.seed, method=method,
      staleness=FLAGS.staleness if method == "conadv" else 0, task_layout=layout))
  return config


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """An experiment.DataShape for uniform 0-255 noise: mean 127.5, std 255/sqrt(12)."""
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  pixel_mean: tuple[float, ...] = (127.5,)
  pixel_std: tuple[float, ...] = (73.6,)


def _synthetic_data(config: ml_collections.ConfigDict, channels: int) -> SyntheticData:
  return SyntheticData(num_classes=config.synthetic_num_classes,
                       image_shape=(config.image_size, config.image_size, channels),
                       num_train_examples=config.synthetic_num_examples)


def build(method: str, mesh: jax.sharding.Mesh, channels: int) -> Bench:
  """Builds (experiment.build, as training does), fills (ConAdv) and AOT-compiles one step.

  `method` "conadv_split" is ConAdv in the split task layout (mesh: a ("task", "data") one).
  """
  layout = parallel.layout_of(mesh)
  config = benchmark_config(method.removesuffix("_split"), layout)
  exp = experiment.build(config, _synthetic_data(config, channels), mesh)
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


def _experiment(method: str, rows: int, channels: int, group: int) -> experiment.Experiment:
  """An Experiment on the first device alone, with a batch of `rows` (one device's share)."""
  config = benchmark_config(method, batch_size=rows, bn_group_size=group)
  return experiment.build(config, _synthetic_data(config, channels),
                          parallel.make_mesh(jax.local_devices()[:1]))


def task_costs(rows: int, channels: int, group: int) -> dict[str, dict[str, float | None]]:
  """XLA's FLOPs and bytes of each task compiled alone for one device holding `rows` rows.

  vanilla: the clean gradient; task_a: the clean + adversarial gradient with the BN changes
  (split_layout.make_task_a, what a task-A device runs); task_b: the attack (make_task_b);
  update: the optimizer step on the gradients. A DisAdv step, and a shared-layout ConAdv step,
  run task_b and task_a one after the other on every device.
  """
  conadv_exp = _experiment("conadv", rows, channels, group)
  vanilla_exp = _experiment("vanilla", rows, channels, group)
  shape = (rows, *conadv_exp.info.image_shape)
  image = jax.ShapeDtypeStruct(shape, np.uint8)
  label = jax.ShapeDtypeStruct((rows,), np.int32)
  batch = {"image": image, "label": label}
  state = conadv_exp.state_shape
  vanilla_loss = conadv.make_loss_fn(vanilla_exp.forward, vanilla_exp.method)
  task_a = split_layout.make_task_a(conadv_exp.forward, conadv_exp.method, 1)
  task_b = split_layout.make_task_b(conadv_exp.forward, conadv_exp.method, 1)
  tx = conadv_exp.tx
  functions = {
      "vanilla": (lambda s, b: jax.grad(vanilla_loss, has_aux=True)(
          s.params, s.batch_stats, b, None), (vanilla_exp.state_shape, batch)),
      "task_a": (task_a, (state, batch, batch)),
      "task_b": (lambda s, b: task_b(s, b, s.step, jnp.arange(rows, dtype=jnp.int32)),
                 (state, batch)),
      "update": (lambda s: optax.apply_updates(s.params, tx.update(s.params, s.opt_state,
                                                                   s.params)[0]), (state,)),
  }
  costs = {}
  for name, (fn, args) in functions.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    costs[name] = {"flops": _cost(compiled, "flops"),
                   "bytes_accessed": _cost(compiled, "bytes accessed"),
                   "compile_s": time.perf_counter() - start}
    print(f"task costs, {rows} rows per device, {name}: {costs[name]['flops'] or 0:.4g} FLOP, "
          f"{costs[name]['bytes_accessed'] or 0:.4g} bytes", flush=True)
  costs["gradient_bytes"] = {"flops": None, "bytes_accessed": float(sum(
      leaf.size * 4 for leaf in jax.tree.leaves(state.params))), "compile_s": None}
  return costs


# Per core; sources in docs/performance.md (Cloud TPU v3 system architecture page).
ROOFLINES = {
    "tpu_v3": {
        "peak_flops_per_s": 123e12 / 2,  # 123 TFLOP/s bf16 per chip, 2 TensorCores per chip.
        "hbm_bytes_per_s": 900e9 / 2,  # 900 GB/s per chip.
        # All-reduce bandwidth per pod 340 TB/s over 1,024 chips: 332 GB/s per chip.
        "allreduce_bytes_per_s_per_chip": 340e12 / 1024,
        "cores_per_chip": 2,
    },
}


def roofline_projection(costs: dict[int, dict[str, dict]], name: str, cores: int,
                        image_bytes: int) -> dict[str, Any]:
  """Step-time projections (ms) of vanilla, DisAdv and ConAdv in both layouts; see the doc.

  A task on one core takes max(FLOPs / peak, bytes / HBM bandwidth) (the roofline bound: no
  latency, perfect overlap of compute and memory within the task); "steps_flops_only" keeps the
  FLOP term alone, since the bytes are those of this backend's compiled program (a CPU's fuses
  far less than a TPU's). Tasks on one core run one after the other. The f32 gradient
  all-reduce takes 2·G / (all-reduce bandwidth per chip) (a ring: each chip sends and receives
  ~2G; the two cores of a chip add on chip first) and is not overlapped with compute. The
  update runs on every core after it.
  """
  hw = ROOFLINES[name]
  r, r2 = sorted(costs)
  if r2 != 2 * r:
    raise app.UsageError(f"--roofline needs --task_cost_rows=r,2r; got {r},{r2}.")

  def task_ms(rows: int, task: str, memory: bool = True) -> float:
    c = costs[rows][task]
    compute = c["flops"] / hw["peak_flops_per_s"]
    return 1e3 * (max(compute, c["bytes_accessed"] / hw["hbm_bytes_per_s"]) if memory else
                  compute)

  allreduce_ms = 1e3 * 2 * costs[r]["gradient_bytes"]["bytes_accessed"] / (
      hw["allreduce_bytes_per_s_per_chip"])
  # The adversarial batch (uint8) from each task-B core to its task-A partner, at the same
  # per-chip bandwidth: an upper bound (the pair shares a chip).
  exchange_ms = lambda rows: 1e3 * rows * image_bytes / hw["allreduce_bytes_per_s_per_chip"]

  def steps(memory: bool) -> dict[str, dict[str, float]]:
    t = lambda rows, task: task_ms(rows, task, memory)
    common = allreduce_ms + t(r, "update")
    rows = {
        "vanilla": (cores, r, t(r, "vanilla") + common),
        "disadv": (cores, r, t(r, "task_b") + t(r, "task_a") + common),
        "conadv_shared": (cores, r, t(r, "task_b") + t(r, "task_a") + common),
        "conadv_split": (cores, r2, max(t(r2, "task_a"), t(r2, "task_b")) + common +
                         exchange_ms(r2)),
        "conadv_split_2x_cores": (2 * cores, r, max(t(r, "task_a"), t(r, "task_b")) + common +
                                  exchange_ms(r)),
    }
    table = {k: {"cores": c, "rows_per_task_core": n, "ms": ms} for k, (c, n, ms) in rows.items()}
    for entry in table.values():
      entry["x_vanilla"] = entry["ms"] / table["vanilla"]["ms"]
    return table

  tasks = ("vanilla", "task_a", "task_b", "update")
  return {"hardware": name, "constants": hw, "global_batch": r * cores,
          "task_ms": {str(n): {t: task_ms(n, t) for t in tasks} for n in (r, r2)},
          "task_ms_flops_only": {str(n): {t: task_ms(n, t, False) for t in tasks}
                                 for n in (r, r2)},
          "allreduce_ms": allreduce_ms, "exchange_ms": {str(n): exchange_ms(n) for n in (r, r2)},
          "steps": steps(memory=True), "steps_flops_only": steps(memory=False)}


def _device_peak_bytes() -> int | None:
  """Process-wide peak bytes of the first local device (None where unsupported, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _layouts() -> list[str]:
  return ["shared", "split"] if FLAGS.task_layout == "both" else [FLAGS.task_layout]


def time_steps(devices: Sequence[jax.Device], channels: int) -> tuple[list[dict], dict]:
  """Builds and times every (method, layout); returns (results, ratios)."""
  meshes = {"shared": parallel.make_mesh(devices)}
  names = []
  for method in FLAGS.methods:
    layouts = _layouts() if method == "conadv" else ["shared"]
    names += [method if layout == "shared" else f"{method}_split" for layout in layouts]
  if any(name.endswith("_split") for name in names):
    meshes["split"] = parallel.make_mesh(devices, "split")
  benches = []
  for name in names:
    bench = build(name, meshes["split" if name.endswith("_split") else "shared"], channels)
    print(f"{name}: lowered in {bench.lower_s:.1f} s, compiled in {bench.compile_s:.1f} s",
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
        "task_layout": "split" if bench.method.endswith("_split") else "shared",
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
  for num, den in (("conadv", "disadv"), ("conadv", "vanilla"), ("disadv", "vanilla"),
                   ("conadv_split", "conadv"), ("conadv_split", "vanilla")):
    if num in by_method and den in by_method:
      ratios[f"{num}/{den}"] = by_method[num]["ms_per_step"] / by_method[den]["ms_per_step"]
      if by_method[num]["flops"] and by_method[den]["flops"]:
        ratios[f"{num}/{den} flops"] = by_method[num]["flops"] / by_method[den]["flops"]

  vanilla_ms = by_method.get("vanilla", {}).get("ms_per_step")
  print(f"\n{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.image_size}x{FLAGS.image_size}x"
        f"{channels}, {FLAGS.dtype}, {len(devices)} x {devices[0]}, median of {FLAGS.repeats} "
        "steps")
  print(f"{'method':<13} {'ms/step':>9} {'images/s':>9} {'compile s':>9} {'peak MB':>9} "
        f"{'GFLOP':>9} {'x vanilla':>9}")
  for r in results:
    ratio = f"{r['ms_per_step'] / vanilla_ms:.3f}" if vanilla_ms else "-"
    peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
    gflop = f"{r['flops'] / 1e9:.2f}" if r["flops"] is not None else "-"
    print(f"{r['method']:<13} {r['ms_per_step']:>9.2f} {r['images_per_sec']:>9.1f} "
          f"{r['compile_s']:>9.1f} {peak:>9} {gflop:>9} {ratio:>9}")
  for name, value in ratios.items():
    print(f"{name}: {value:.3f}")
  return results, ratios


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  for method in FLAGS.methods:
    if method not in conadv.METHODS:
      raise app.UsageError(f"--methods: {method!r} is not one of {conadv.METHODS}.")
  channels = FLAGS.channels or (1 if FLAGS.image_size <= 28 else 3)
  devices = jax.local_devices()
  if FLAGS.batch_size % len(devices):
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} must divide over {len(devices)} "
                         "devices.")
  if FLAGS.time and FLAGS.task_layout != "shared" and len(devices) % 2:
    raise app.UsageError(f"--task_layout={FLAGS.task_layout} needs an even number of local "
                         f"devices, not {len(devices)} (on a CPU: XLA_FLAGS="
                         "--xla_force_host_platform_device_count=2).")
  if FLAGS.roofline and not FLAGS.task_costs:
    raise app.UsageError("--roofline projects from the task costs: add --task_costs.")

  results, ratios = time_steps(devices, channels) if FLAGS.time else ([], {})
  costs, projection = {}, None
  if FLAGS.task_costs:
    per_device = FLAGS.batch_size // len(devices)
    rows = sorted({int(r) for r in FLAGS.task_cost_rows} or {per_device, 2 * per_device})
    group = FLAGS.bn_group_size or rows[0]
    costs = {r: task_costs(r, channels, group) for r in rows}
    if FLAGS.roofline:
      projection = roofline_projection(costs, FLAGS.roofline, FLAGS.roofline_cores,
                                       FLAGS.image_size ** 2 * channels + 4)
      print(f"\nRoofline projection ({FLAGS.roofline}, {FLAGS.roofline_cores} cores, "
            f"global batch {projection['global_batch']}):")
      flops_only = projection["steps_flops_only"]
      for name, step in projection["steps"].items():
        print(f"{name:<22} {step['cores']:>5} cores {step['rows_per_task_core']:>4} rows "
              f"{step['ms']:>8.3f} ms {step['x_vanilla']:>6.2f} x vanilla; FLOPs alone "
              f"{flops_only[name]['ms']:>7.3f} ms {flops_only[name]['x_vanilla']:>6.2f} x")

  if FLAGS.json:
    config = {name: FLAGS[name].value for name in (
        "model", "batch_size", "image_size", "num_classes", "dtype", "methods", "staleness",
        "repeats", "warmup", "small_resnet_depth", "small_resnet_width", "bn_group_size",
        "seed", "task_layout", "time", "task_costs", "task_cost_rows", "roofline",
        "roofline_cores")}
    config["channels"] = channels
    report = {"results": results, "ratios": ratios, "config": config,
              "task_costs": {str(r): c for r, c in costs.items()},
              "task_costs_source": "compiled.cost_analysis() of each task jitted alone for one "
                                   f"device of this backend ({devices[0].platform})",
              "roofline_projection": projection,
              "device": str(devices[0]), "device_kind": devices[0].device_kind,
              "platform": devices[0].platform, "num_devices": len(devices),
              "device_peak_bytes_in_use": _device_peak_bytes(),
              "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "argv": sys.argv}
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
    print(f"Wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
