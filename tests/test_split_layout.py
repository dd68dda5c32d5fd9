"""task_layout="split": tasks A and B on separate devices, same numbers as the shared layout.

On 4 fake CPU devices (conftest.py): the split mesh is ("task", "data") = (2, 2). What is
checked: equality with the shared layout (parameters, BN statistics, optimizer state, metrics,
FIFO), replication on every device, the compiled program's conditional (task B computes no
weight gradient), checkpoints moving between layouts mid-run, a two-process run against one
process, and the validation that refuses a layout that cannot work before anything compiles.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conadv_jax import errors
from conadv_jax.data import prepare
from conadv_jax.method import experiment, losses, parallel
from conadv_jax.run import checkpointing, config_validation, train
from configs import cpu_smoke, imagenet_resnet50
from cpu_env import cpu_env

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH, IMAGE, CLASSES = 16, 8, 5
NUM_STEPS = 4


def tiny_config(preset: str, layout: str, **overrides):
  config = cpu_smoke.get_config(preset)
  config.update(dict(image_size=IMAGE, batch_size=BATCH, optimizer="lars",
                     synthetic_num_classes=CLASSES, model="MLP", mlp_widths=(16,),
                     task_layout=layout))
  config.update(overrides)
  return config


def make_batches(n: int, aug: bool):
  rng = np.random.RandomState(0)
  pixels = lambda: rng.randint(0, 256, (BATCH, IMAGE, IMAGE, 3)).astype(np.uint8)
  return [{"image": pixels(), "label": rng.randint(0, CLASSES, BATCH).astype(np.int32),
           **({"aug_image": pixels()} if aug else {})} for _ in range(n)]


def build(config) -> experiment.Experiment:
  mesh = parallel.make_mesh(jax.devices()[:4], config.task_layout)
  return experiment.build(config, prepare.get_dataset_info(config), mesh)


def run_steps(config, num_steps: int = NUM_STEPS):
  """Fills the FIFO and runs `num_steps` steps: (state as placed on the devices, metrics)."""
  exp = build(config)
  tau = exp.method.staleness
  batches = make_batches(num_steps + tau, aug=config.aug_branch != "none")
  state = exp.fill_fifo(exp.init_state(), batches[:tau])
  history = []
  for t in range(num_steps):
    state, metrics = exp.train_step(state, batches[t], batches[t + tau])
    history.append(jax.device_get(metrics))
  return state, history


def assert_every_copy_agrees(state) -> None:
  """Every device holding the same slice of a leaf holds the same bytes: θ stays replicated."""
  for leaf in jax.tree.leaves(state):
    by_slice = {}
    for shard in leaf.addressable_shards:
      key = tuple((s.start, s.stop) for s in shard.index)
      by_slice.setdefault(key, []).append(np.asarray(shard.data))
    for copies in by_slice.values():
      for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0])


CASES = {
    # name: (preset, overrides). bn_group_size=0 is "the per-device batch" of the shared
    # layout on 4 devices (4 rows): a split-layout device holds 8 rows in two such groups.
    "tau1_per_device_bn": ("conadv", dict(bn_group_size=0)),
    "tau2_bn_groups_of_2": ("conadv2", dict(bn_group_size=2)),
    "tau2_grad_accum_aug_view": ("conadv2", dict(bn_group_size=2, grad_accum_steps=2,
                                                 aug_branch="autoaugment",
                                                 loss_weighting="mean")),
    "tau1_small_resnet": ("conadv", dict(model="SmallResNet", small_resnet_width=4,
                                         bn_group_size=0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_split_equals_shared(case):
  preset, overrides = CASES[case]
  shared, shared_metrics = run_steps(tiny_config(preset, "shared", **overrides))
  split, split_metrics = run_steps(tiny_config(preset, "split", **overrides))
  assert len(split.adv_fifo["image"].sharding.device_set) == 4
  assert_every_copy_agrees(split)
  shared, split = jax.device_get(shared), jax.device_get(split)
  assert int(split.step) == NUM_STEPS
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(close, (split.params, split.batch_stats, split.opt_state),
               (shared.params, shared.batch_stats, shared.opt_state))
  for got, want in zip(split_metrics, shared_metrics):
    assert set(got) == set(want)
    jax.tree.map(close, got, want)
  np.testing.assert_array_equal(split.adv_fifo["label"], shared.adv_fifo["label"])
  differ = np.mean(split.adv_fifo["image"] != shared.adv_fifo["image"])
  assert differ < 1e-3, differ  # A sign(gradient) of ~0 may flip with summation order.
  # The BN running averages moved (a check that compares untouched statistics proves little).
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), split.batch_stats,
                       jax.device_get(build(tiny_config(preset, "split", **overrides))
                                      .init_state().batch_stats))
  assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("layout", ["shared", "split"])
def test_adversarial_loss_uses_the_labels_stored_with_the_fifo(layout):
  """Task A pairs the FIFO's images with the labels stored with them, in both layouts.

  Batch t is given other labels than the batch attacked at t-τ (as a resume on another host
  count could do): adv_loss must be the stored images' loss under the stored labels. The split
  layout pairs them in its own code (split_layout.local_step / make_task_a), so a mix-up there
  would pass tests/test_conadv.py's version of this test, which runs the shared step only.
  """
  config = tiny_config("conadv", layout, bn_group_size=2)
  exp = build(config)
  attacked, later = make_batches(2, aug=False)
  state = exp.fill_fifo(exp.init_state(), [attacked])
  stored, params, stats = jax.device_get((state.adv_fifo, state.params, state.batch_stats))
  np.testing.assert_array_equal(stored["label"][0], attacked["label"])
  relabelled = dict(attacked, label=(attacked["label"] + 1) % CLASSES)
  state, metrics = exp.train_step(state, relabelled, later)

  def adv_loss(labels):
    logits, _ = exp.forward(params, stats, stored["image"][0], train=True, branch="adv")
    return float(losses.cross_entropy(logits, labels, exp.method.label_smoothing).mean())

  np.testing.assert_allclose(metrics["adv_loss"], adv_loss(attacked["label"]), rtol=1e-5)
  assert abs(adv_loss(relabelled["label"]) - adv_loss(attacked["label"])) > 1e-2
  # The slot now holds the attack on batch t+1 with batch t+1's labels.
  np.testing.assert_array_equal(jax.device_get(state.adv_fifo["label"][0]), later["label"])


# --- The compiled program: one conditional, the weight gradient only in task A's branch. ---


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _walk(jaxpr):
  """Every equation of `jaxpr` and of the programs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _sub_jaxprs(eqn):
      yield from _walk(sub)


def _conv_outputs(jaxpr) -> list[tuple[int, ...]]:
  return [tuple(e.outvars[0].aval.shape) for e in _walk(jaxpr)
          if e.primitive.name == "conv_general_dilated"]


def _dot_outputs(jaxpr) -> list[tuple[int, ...]]:
  return [tuple(e.outvars[0].aval.shape) for e in _walk(jaxpr)
          if e.primitive.name == "dot_general"]


def _hlo_computations(hlo: str) -> dict[str, str]:
  """{computation name: its text} of an HLO module's text."""
  computations, name, lines = {}, None, []
  for line in hlo.splitlines():
    if name is None:
      if line.endswith("{") and not line.startswith(" "):
        name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        lines = []
    elif line == "}":
      computations[name] = "\n".join(lines)
      name = None
    else:
      lines.append(line)
  return computations


def _reachable(computations: dict[str, str], roots: list[str]) -> set[str]:
  """The computations `roots` run, directly or through calls, fusions, loops and branches."""
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", computations[name])
    for group in re.findall(r"branch_computations=\{([^}]*)\}", computations[name]):
      todo += [b.strip().lstrip("%") for b in group.split(",")]
  return seen


def _hlo_conv_shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",")) for dims in
          re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} convolution\(", text)]


def test_compiled_program_runs_each_task_behind_the_conditional():
  config = tiny_config("conadv", "split", model="SmallResNet", small_resnet_width=4)
  exp = build(config)
  kernels = {tuple(leaf.shape) for path, leaf in
             jax.tree_util.tree_flatten_with_path(exp.state_shape.params)[0]
             if "kernel" in jax.tree_util.keystr(path) and leaf.ndim == 4}
  heads = [tuple(leaf.shape) for path, leaf in
           jax.tree_util.tree_flatten_with_path(exp.state_shape.params)[0]
           if "kernel" in jax.tree_util.keystr(path) and leaf.ndim == 2]
  assert len(heads) == 1
  head_grads = {heads[0], heads[0][::-1]}  # The gradient may come out transposed.
  batch = make_batches(1, aug=False)[0]
  args = (exp.abstract_state(), batch, batch)

  # The traced program: one cond whose index is axis_index("task") == 0 (lax.cond's branches
  # are [false, true]: branch 1 is task A). Weight gradients (convolutions whose output has a
  # kernel's shape) only in branch 1; task B's branch has convolutions (forward and input
  # gradient) but none of them; none outside the cond.
  closed = jax.make_jaxpr(exp.train_step)(*args)
  conds = [e for e in _walk(closed.jaxpr) if e.primitive.name == "cond"]
  assert len(conds) == 1
  task_b, task_a = (b.jaxpr for b in conds[0].params["branches"])
  assert any(e.primitive.name == "axis_index" and e.params["axis_name"] == "task"
             for e in _walk(closed.jaxpr))
  assert kernels <= set(_conv_outputs(task_a))
  assert _conv_outputs(task_b) and not kernels & set(_conv_outputs(task_b))
  assert len(_conv_outputs(closed.jaxpr)) == (len(_conv_outputs(task_a)) +
                                              len(_conv_outputs(task_b)))  # None outside.
  # The dense head likewise: its kernel's gradient (a dot_general of the kernel's shape) is
  # computed in task A only, though task B runs the head forward and backward to the input.
  assert head_grads & set(_dot_outputs(task_a))
  assert _dot_outputs(task_b) and not head_grads & set(_dot_outputs(task_b))

  # The compiled program keeps the conditional (both tasks are not run and selected from).
  hlo = exp.train_step.lower(*args).compile().as_text()
  computations = _hlo_computations(hlo)
  conditionals = [line for text in computations.values() for line in text.splitlines()
                  if " conditional(" in line]
  assert len(conditionals) == 1, conditionals
  branches = [b.strip().lstrip("%") for b in
              re.search(r"branch_computations=\{([^}]*)\}", conditionals[0])[1].split(",")]
  assert len(branches) == 2
  in_branch = [_reachable(computations, [b]) for b in branches]
  convs = [[s for name in names for s in _hlo_conv_shapes(computations[name])]
           for names in in_branch]
  entry = next(n for n in computations if hlo.count(f"ENTRY %{n} ") == 1)
  elsewhere = _reachable(computations, [entry]) - in_branch[0] - in_branch[1]
  assert not [s for name in elsewhere for s in _hlo_conv_shapes(computations[name])]
  assert convs[0] and not kernels & set(convs[0])  # Branch 0, task B: no weight gradient.
  assert kernels <= set(convs[1])  # Branch 1, task A: every kernel's gradient.
  # The new adversarial batch crosses over "task" as uint8 (logical devices {0,2} = d0, d1).
  assert re.search(r"u8\[[\d,]+\]\{[\d,]*\} all-reduce\(.*replica_groups=\{\{0,2\},\{1,3\}\}",
                   hlo)


# --- Checkpoints move between layouts; runs resume in the other layout. ---


def _final_params(workdir: str, step: int):
  """(params, batch_stats, FIFO labels) of a checkpoint, read onto this process's first device.

  With an explicit target, so that a checkpoint written by other processes (other device ids)
  reads too.
  """
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "record": ocp.JsonCheckpointHandler()})
  metadata = manager.item_metadata(step)["state"]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                        getattr(metadata, "tree", metadata))
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  manager.close()
  return jax.device_get((state["params"], state["batch_stats"], state["adv_fifo"]["label"]))


def _metrics(workdir: str, kind: str) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {m["step"]: m for m in lines if m["kind"] == kind}


def test_resume_in_the_other_layout_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  """split 0→5 (the FIFO filled in split), shared 5→9, split 9→12, against shared 0→12.

  The eval at step 6 runs in the shared leg, the final eval (with robust_top1) in split.
  """
  def config(layout):
    c = cpu_smoke.get_config("conadv")
    c.update(dict(model="MLP", mlp_widths=(16,), log_every_steps=1, task_layout=layout))
    return c

  reference_dir = str(tmp_path / "shared")
  reference = train.train_and_evaluate(config("shared"), reference_dir)
  workdir = str(tmp_path / "mixed")
  for layout, stop in (("split", 5), ("shared", 9), ("split", None)):
    with monkeypatch.context() as patch:
      patch.setattr(checkpointing.Checkpointer, "reached_preemption",
                    lambda self, step, stop=stop: step == stop)
      result = train.train_and_evaluate(config(layout), workdir)
    if stop is not None:
      assert result == {"stopped_at_step": stop, "reason": "preemption notice"}

  assert result["final_step"] == 12
  assert result["config_history"] == [
      {"step": 5, "changes": {"task_layout": ["split", "shared"]}},
      {"step": 9, "changes": {"task_layout": ["shared", "split"]}}]
  for key in ("top1", "loss", "adv_top1", "robust_top1"):
    assert abs(result["eval"][key] - reference["eval"][key]) <= 1e-4, key
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  got, want = _metrics(workdir, "train"), _metrics(reference_dir, "train")
  assert sorted(got) == list(range(1, 13))
  for step in range(1, 13):
    for key in ("loss", "clean_loss", "adv_loss", "grad_norm", "param_norm"):
      close(got[step][key], want[step][key])
  for key in ("top1", "loss", "adv_top1"):  # The step-6 eval ran in the shared leg.
    close(_metrics(workdir, "eval")[6][key], _metrics(reference_dir, "eval")[6][key])
  jax.tree.map(close, _final_params(workdir, 12), _final_params(reference_dir, 12))


# --- Two processes x 2 devices (gloo on 127.0.0.1) against one process x 4 devices. ---


def test_two_processes_match_one_process(tmp_path):
  import test_reliability as rel  # pylint: disable=g-import-not-at-top
  flags = ("--config.task_layout=split",)
  one = tmp_path / "one"
  rel._run(tmp_path / "one.log", one, *flags)  # pylint: disable=protected-access
  two = tmp_path / "two"
  processes = rel._start_two_processes(tmp_path, two, *flags)  # pylint: disable=protected-access
  assert rel._wait(processes) == [0, 0], "\n".join(  # pylint: disable=protected-access
      p.output[-5000:] for p in processes)
  assert "Process 1 of 2; 2 local / 4 global devices" in processes[1].output
  one_results = rel._results(one)  # pylint: disable=protected-access
  two_results = rel._results(two)  # pylint: disable=protected-access
  assert one_results["config"]["task_layout"] == two_results["config"]["task_layout"] == "split"
  assert two_results["final_step"] == 12
  # The eval attacks are keyed by each example's 'index' in the split, so the adversarial and
  # robust accuracies do not depend on the process count either.
  for key in ("top1", "loss", "adv_top1", "robust_top1"):
    assert abs(two_results["eval"][key] - one_results["eval"][key]) <= 1e-4, key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _final_params(str(two), 12), _final_params(str(one), 12))
  # Each process saved its own part of the FIFO (its devices' rows), as in the shared layout.
  parts = two / "checkpoints" / "12" / "state"
  assert (parts / "ocdbt.process_0").is_dir() and (parts / "ocdbt.process_1").is_dir()


# --- Mesh arrangement and validation. ---


def test_split_mesh_pairs_neighbouring_devices_and_doubles_the_fifo_share():
  devices = jax.devices()[:4]
  mesh = parallel.make_mesh(devices, "split")
  assert mesh.axis_names == ("task", "data") and mesh.devices.shape == (2, 2)
  # Column j = devices 2j (task A) and 2j+1 (task B): on several hosts, both on one host.
  assert [list(column) for column in mesh.devices.T] == [devices[:2], devices[2:]]
  shared = build(tiny_config("conadv2", "shared"))
  split = build(tiny_config("conadv2", "split"))
  assert split.task_layout == "split" and shared.task_layout == "shared"
  assert split.fifo_bytes_per_device() == 2 * shared.fifo_bytes_per_device()
  assert jax.tree.map(lambda s: (s.shape, s.dtype), split.state_shape) == jax.tree.map(
      lambda s: (s.shape, s.dtype), shared.state_shape)


def test_split_mesh_refuses_a_pair_across_hosts_and_an_odd_count():
  fake = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate([0, 1, 1, 1])]
  with pytest.raises(parallel.LayoutError, match="devices per process: {0: 1, 1: 3}"):
    parallel.make_mesh(fake, "split")
  with pytest.raises(parallel.LayoutError, match=r"even number of devices \(3 here\)"):
    parallel.make_mesh(jax.devices()[:3], "split")
  with pytest.raises(ValueError, match="make it with parallel.make_mesh"):
    experiment.build(tiny_config("conadv", "split"), prepare.get_dataset_info(
        tiny_config("conadv", "split")), parallel.make_mesh(jax.devices()[:4]))


@pytest.mark.parametrize("overrides,num_devices,message", [
    (dict(method="disadv", staleness=0), 4, "needs method='conadv'"),
    (dict(method="vanilla", staleness=0), 4, "needs method='conadv'"),
    (dict(), 3, "needs an even number of devices \\(3 here\\)"),
    (dict(task_layout="diagonal"), 4, "choose one of shared, split"),
])
def test_validation_refuses_what_split_cannot_run(overrides, num_devices, message):
  config = cpu_smoke.get_config("conadv")
  config.update(dict(task_layout="split", batch_size=48, bn_group_size=4, eval_batch_size=48))
  config.update(overrides)
  with pytest.raises(errors.ConfigError, match=f"config.task_layout=.*{message}"):
    config_validation.validate(config, num_devices=num_devices)


def test_main_refuses_split_for_disadv_before_compiling(tmp_path):
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"),
       f"--config={REPO / 'configs' / 'cpu_smoke.py'}:disadv",
       f"--workdir={tmp_path / 'workdir'}", "--config.task_layout=split"],
      cwd=REPO, env=cpu_env(4), capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: config.task_layout='split' is not allowed" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "workdir" / "checkpoints").exists()
  assert time.monotonic() - start < 60


@pytest.mark.parametrize("batch", list(imagenet_resnet50.BATCH_SIZES))
@pytest.mark.parametrize("devices", ["8", "one BN group per device"])
def test_imagenet_presets_accept_split(batch, devices):
  """At 8 devices (the recipes with gradient accumulation) and at the largest device count the
  preset allows (its BN group is then the per-device batch: 1,024 devices at 32K)."""
  base = imagenet_resnet50.get_config(f"conadv_{batch}")
  num_devices = 8 if devices == "8" else base.batch_size // base.bn_group_size
  for method in ("conadv", "conadv_aa", "conadv2"):
    config = imagenet_resnet50.get_config(f"{method}_{batch}")
    config.task_layout = "split"
    config_validation.validate(config, num_devices=num_devices)
  for method in ("vanilla", "disadv"):
    config = imagenet_resnet50.get_config(f"{method}_{batch}")
    config.task_layout = "split"
    with pytest.raises(errors.ConfigError, match="task_layout"):
      config_validation.validate(config, num_devices=num_devices)
