r"""Times ConAdv's tasks A and B (and the vanilla gradient and the update) alone on one device.

With one accelerator the split layout cannot run (it needs an even number of devices), but its
step time on two devices is max(task A, task B) on that device's rows plus the update and the
gradient all-reduce, so timing the tasks alone at r and 2r rows measures what the roofline
model in docs/performance.md only projects. Reuses scripts/benchmark_step.py (its flags, its
_experiment builder, the same task functions as its --task_costs, and roofline_projection).

  python3 scripts/benchmark_tasks.py --model=ResNet50 --image_size=224 \
      --num_classes=1000 --dtype=bfloat16 --task_rows=4,8 --json=$OUT/tasks.json

Per task and row count: median ms with a sync after every call (as benchmark_step times
steps), mean ms of back-to-back calls with one sync at the end (dispatch hidden), compile s,
XLA's cost analysis (FLOPs, bytes accessed: this backend's fusion) and memory analysis. Then a
measured projection of the layouts, and benchmark_step's TPU v3 roofline recomputed from these
costs. The JSON is rewritten after every task, so a timeout keeps what was done.
"""
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(os.environ.get("CONADV_REPO", pathlib.Path(__file__).resolve().parents[1]))
_spec = importlib.util.spec_from_file_location("benchmark_step",
                                               REPO / "scripts" / "benchmark_step.py")
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)  # Defines benchmark_step's flags (--model, --image_size, ...).

from conadv_jax.method import conadv, split_layout  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("task_rows", ["4", "8"], "Rows per device to time the tasks at: r and 2r.")
flags.DEFINE_integer("task_repeats", 30, "Timed calls per task.")
flags.DEFINE_integer("task_warmup", 5, "Untimed calls per task first.")
flags.DEFINE_float("deadline_s", 1e9, "Stop starting new compilations after this many seconds.")
flags.DEFINE_float("link_bytes_per_s", 450e9,
                   "Per-direction GPU-GPU bandwidth for the 2-GPU all-reduce estimate (H200 "
                   "NVLink 4: 900 GB/s bidirectional per GPU by the datasheet, a lead).")

START = time.monotonic()


def _versions():
  out = {"argv": sys.argv, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections"):
    try:
      out[name] = __import__(name).__version__
    except Exception as e:  # pylint: disable=broad-except
      out[name] = repr(e)
  d = jax.local_devices()[0]
  out |= {"platform": d.platform, "device_kind": d.device_kind, "device": str(d),
          "num_local_devices": jax.local_device_count()}
  return out


def _time(compiled, args, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  synced = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    synced.append(1e3 * (time.perf_counter() - t))
  t = time.perf_counter()
  outs = [compiled(*args) for _ in range(repeats)]
  jax.block_until_ready(outs)
  pipelined = 1e3 * (time.perf_counter() - t) / repeats
  del outs
  return {"ms_median": statistics.median(synced), "ms_min": min(synced), "ms_max": max(synced),
          "ms_pipelined_mean": pipelined, "ms_all": synced}


class _Tasks:
  """The tasks of benchmark_step.task_costs with concrete random inputs (never zeros).

  One model and state serve every row count: the BN group is the smallest row count (as
  benchmark_step's --task_costs takes it), so 2r rows are two groups, as on a split-layout
  device; the tasks do not read the state's FIFO.
  """

  def __init__(self, rows_list, channels):
    self.group = FLAGS.bn_group_size or rows_list[0]
    self.channels = channels
    self.rng = np.random.RandomState(FLAGS.seed)
    self._exps, self._states, self._batches = {}, {}, {}

  def _exp(self, method):
    if method not in self._exps:
      exp = bs._experiment(method, self.group, self.channels, self.group)  # pylint: disable=protected-access
      self._exps[method], self._states[method] = exp, exp.init_state()
    return self._exps[method], self._states[method]

  def _batch(self, rows, which):
    if (rows, which) not in self._batches:
      exp, _ = self._exp("conadv")
      self._batches[rows, which] = jax.device_put(
          {"image": self.rng.randint(0, 256, (rows, *exp.info.image_shape)).astype(np.uint8),
           "label": self.rng.randint(0, FLAGS.num_classes, rows).astype(np.int32)})
    return self._batches[rows, which]

  @property
  def gradient_bytes(self):
    _, state = self._exp("conadv")
    return float(sum(leaf.size * 4 for leaf in jax.tree.leaves(state.params)))

  def get(self, name, rows):
    """(function, args) of task `name` on `rows` rows."""
    if name == "vanilla":
      exp, state = self._exp("vanilla")
      loss = conadv.make_loss_fn(exp.forward, exp.method)
      return (lambda s, b: jax.grad(loss, has_aux=True)(s.params, s.batch_stats, b, None),
              (state, self._batch(rows, "clean")))
    exp, state = self._exp("conadv")
    if name == "task_a":
      return (split_layout.make_task_a(exp.forward, exp.method, 1),
              (state, self._batch(rows, "clean"), self._batch(rows, "adv")))
    if name == "task_b":
      task_b = split_layout.make_task_b(exp.forward, exp.method, 1)
      return (lambda s, b, r: task_b(s, b, s.step, r),
              (state, self._batch(rows, "clean"), jnp.arange(rows, dtype=jnp.int32)))
    if name == "update":
      tx = exp.tx
      return (lambda s: optax.apply_updates(s.params, tx.update(s.params, s.opt_state,
                                                                s.params)[0]), (state,))
    raise ValueError(name)


def _projection(tasks, link, r, r2):
  """Step times from the measured tasks (ms, sync after each call)."""
  t = lambda rows, name: tasks[str(rows)][name]["ms_median"]
  have = lambda rows, *names: all(n in tasks.get(str(rows), {}) for n in names)
  update = t(r, "update") if have(r, "update") else 0.0
  out = {"rule": "sequential tasks add; split's two tasks run on two devices, max(); + update; "
                 "+ the 2-GPU f32 gradient all-reduce G/link (a ring of 2 sends G each way), "
                 "not overlapped; the uint8 exchange is left out (KB)",
         "link_bytes_per_s": FLAGS.link_bytes_per_s, "allreduce_ms_2gpu": link, "update_ms": update}
  if have(r, "vanilla"):
    out["vanilla_1dev"] = t(r, "vanilla") + update
  if have(r, "task_a", "task_b"):
    out["conadv_shared_1dev (= disadv)"] = t(r, "task_a") + t(r, "task_b") + update
    out["conadv_split_2x_devices (A on r, B on r)"] = max(t(r, "task_a"), t(r, "task_b")) + \
        update + link
  if have(r2, "task_a", "task_b"):
    out["conadv_shared_2dev (each r rows, A then B)"] = (t(r, "task_a") + t(r, "task_b") + update
                                                         + link) if have(r, "task_a", "task_b") \
        else None
    out["conadv_split_2dev (A on 2r, B on 2r)"] = max(t(r2, "task_a"), t(r2, "task_b")) + \
        update + link
  for name in ("vanilla", "task_a", "task_b"):
    if have(r, name) and have(r2, name):
      out[f"{name}_ms_{r2}_over_{r}_rows"] = t(r2, name) / t(r, name)
  return out


def main(argv):
  del argv
  channels = FLAGS.channels or (1 if FLAGS.image_size <= 28 else 3)
  rows_list = sorted(int(r) for r in FLAGS.task_rows)
  report = {"env": _versions(), "tasks": {}, "task_costs": {}, "skipped": []}

  def write():
    report["elapsed_s"] = time.monotonic() - START
    if FLAGS.json:
      pathlib.Path(FLAGS.json).write_text(json.dumps(report, indent=1) + "\n")

  write()
  tasks = _Tasks(rows_list, channels)
  r, r2 = rows_list[0], rows_list[-1]
  # Most valuable first: what the split projection needs, then the vanilla reference.
  order = [("task_a", r), ("task_b", r), ("update", r), ("task_a", r2), ("task_b", r2),
           ("vanilla", r), ("vanilla", r2)]
  order = list(dict.fromkeys(order))  # One row count given: no repeats.
  for name, rows in order:
    if time.monotonic() - START > FLAGS.deadline_s:
      report["skipped"].append(f"{name}@{rows}")
      print(f"deadline: skipped {name} at {rows} rows", flush=True)
      continue
    fn, args = tasks.get(name, rows)
    started = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    entry = {"compile_s": compile_s, "flops": bs._cost(compiled, "flops"),  # pylint: disable=protected-access
             "bytes_accessed": bs._cost(compiled, "bytes accessed"),  # pylint: disable=protected-access
             "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
    entry |= _time(compiled, args, FLAGS.task_repeats, FLAGS.task_warmup)
    report["tasks"].setdefault(str(rows), {})[name] = entry
    report["task_costs"].setdefault(str(rows), {})[name] = {
        k: entry[k] for k in ("flops", "bytes_accessed", "compile_s")}
    print(f"{rows:>4} rows {name:<8} {entry['ms_median']:9.3f} ms (min {entry['ms_min']:.3f}, "
          f"pipelined {entry['ms_pipelined_mean']:.3f}), compile {compile_s:5.1f} s, "
          f"{(entry['flops'] or 0) / 1e9:8.2f} GFLOP, {(entry['bytes_accessed'] or 0) / 1e9:7.3f}"
          f" GB", flush=True)
    write()
    del compiled
  gradient_bytes = tasks.gradient_bytes
  link = 1e3 * gradient_bytes / FLAGS.link_bytes_per_s if gradient_bytes else 0.0
  if len(rows_list) == 2:
    report["measured_projection_ms"] = _projection(report["tasks"], link, rows_list[0], rows_list[-1])
    costs = {}
    for rows in rows_list:
      c = dict(report["task_costs"].get(str(rows), {}))
      c.setdefault("update", report["task_costs"].get(str(rows_list[0]), {}).get("update"))
      c["gradient_bytes"] = {"flops": None, "bytes_accessed": gradient_bytes, "compile_s": None}
      costs[rows] = c
    try:  # Needs every task at both row counts (KeyError/TypeError otherwise).
      report["tpu_v3_roofline_from_this_backends_costs"] = bs.roofline_projection(
          costs, "tpu_v3", FLAGS.roofline_cores, FLAGS.image_size ** 2 * channels + 4)
    except Exception as e:  # pylint: disable=broad-except
      report["tpu_v3_roofline_from_this_backends_costs"] = repr(e)
    print(json.dumps(report["measured_projection_ms"], indent=1), flush=True)
  write()


if __name__ == "__main__":
  app.run(main)
