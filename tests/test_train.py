"""The training loop: every method end to end, exact resume, results and metrics files."""
import copy
import dataclasses
import hashlib
import itertools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conadv_jax import errors
from conadv_jax.data import pipeline, prepare
from conadv_jax.method import experiment
from conadv_jax.run import checkpointing, config_validation, run_record, train, workdir as workdirs
from configs import cpu_smoke

PRESETS = ["vanilla", "disadv", "conadv", "conadv2"]


def smoke_config(preset, **overrides):
  config = cpu_smoke.get_config(preset)
  config.update(overrides)
  return config


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One complete cpu_smoke run per preset, shared by the tests below."""
  runs = {}
  for preset in PRESETS:
    workdir = str(tmp_path_factory.mktemp(f"full_{preset}"))
    runs[preset] = (workdir, train.train_and_evaluate(smoke_config(preset), workdir))
  return runs


@pytest.mark.parametrize("preset", PRESETS)
def test_cpu_smoke_trains_and_writes_results(uninterrupted, preset):
  workdir, results = uninterrupted[preset]
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["final_step"] == 12 and saved["config"]["method"] == smoke_config(preset).method
  assert saved["eval"]["num_examples"] == 64
  assert set(saved["eval"]) >= {"top1", "loss", "adv_top1", "num_examples"}
  assert saved["param_fingerprint"] == results["param_fingerprint"]
  assert len(saved["param_fingerprint"]) == 64 and np.isfinite(saved["train"]["loss"])
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  lines = read_jsonl(workdir)
  assert [l["step"] for l in lines if l["kind"] == "train"] == list(range(2, 13, 2))
  assert [l["step"] for l in lines if l["kind"] == "eval"] == [6, 12]
  # clu's progress reports (steps_per_sec, uptime) get a kind of their own, never an empty name.
  assert {l["kind"] for l in lines} <= {"train", "eval", "progress"}
  assert all("" not in l for l in lines)
  train_keys = set(lines[0])
  assert {"loss", "clean_loss", "grad_norm", "param_norm", "learning_rate"} <= train_keys
  assert ("adv_loss" in train_keys) == (preset != "vanilla")


def test_methods_train_differently(uninterrupted):
  fingerprints = {uninterrupted[p][1]["param_fingerprint"] for p in PRESETS}
  assert len(fingerprints) == len(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_stop_and_restart_is_bit_identical(uninterrupted, preset, tmp_path, monkeypatch):
  stop_at = 5  # Between checkpoints (every 4): the restart must redo steps 5..12 from step 5.
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, "reached_preemption",
                  lambda self, step: step == stop_at)
    stopped = train.train_and_evaluate(smoke_config(preset), str(tmp_path))
  assert stopped == {"stopped_at_step": stop_at, "reason": "preemption notice"}
  assert not os.path.exists(tmp_path / "results.json")
  resumed = train.train_and_evaluate(smoke_config(preset), str(tmp_path))
  assert resumed["param_fingerprint"] == uninterrupted[preset][1]["param_fingerprint"]
  assert resumed["eval"] == uninterrupted[preset][1]["eval"]
  steps = [l["step"] for l in read_jsonl(str(tmp_path)) if l["kind"] == "train"]
  assert sorted(steps) == sorted(set(steps)), "a step was logged twice"
  assert 5 in steps  # The stop step's metrics were logged before its checkpoint.


@pytest.mark.parametrize("stop_at", [6, 8])
def test_no_eval_at_the_preemption_step_and_every_eval_once(uninterrupted, stop_at, tmp_path,
                                                            monkeypatch):
  """Stopped at an eval step (6) the eval runs after the resume; stopped at a checkpoint step
  (8, after the eval at 6 was checkpointed) nothing is evaluated twice."""
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, "reached_preemption",
                  lambda self, step: step == stop_at)
    train.train_and_evaluate(smoke_config("conadv"), str(tmp_path))
  evals = [l["step"] for l in read_jsonl(str(tmp_path)) if l["kind"] == "eval"]
  assert evals == [6] * (stop_at > 6)  # Not at the stop step itself.
  resumed = train.train_and_evaluate(smoke_config("conadv"), str(tmp_path))
  assert resumed["param_fingerprint"] == uninterrupted["conadv"][1]["param_fingerprint"]
  lines = read_jsonl(str(tmp_path))
  assert [l for l in lines if l["kind"] == "eval"] == [
      l for l in read_jsonl(uninterrupted["conadv"][0]) if l["kind"] == "eval"]


@pytest.mark.parametrize("accum", [1, 2])
def test_three_branches_stop_and_restart_is_bit_identical(accum, tmp_path, monkeypatch):
  """The AutoAugment view and gradient accumulation keep exact resume."""
  config = lambda: smoke_config("conadv_aa", grad_accum_steps=accum, bn_group_size=4)
  full = train.train_and_evaluate(config(), str(tmp_path / "full"))
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, "reached_preemption",
                  lambda self, step: step == 7)
    assert train.train_and_evaluate(config(), str(tmp_path / "stopped"))["stopped_at_step"] == 7
  resumed = train.train_and_evaluate(config(), str(tmp_path / "stopped"))
  assert resumed["param_fingerprint"] == full["param_fingerprint"]
  assert resumed["eval"] == full["eval"]
  assert "aug_loss" in read_jsonl(str(tmp_path / "full"))[0]


def test_restart_after_a_crash_drops_metrics_past_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  # Pretend a crash at step 11: checkpoints up to 8 survive, metrics went up to step 10.
  train.train_and_evaluate(smoke_config("conadv", num_train_steps=10), workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  os.rename(os.path.join(checkpoints, "10"), os.path.join(workdir, "lost_10"))
  train.train_and_evaluate(smoke_config("conadv"), workdir)
  steps = [l["step"] for l in read_jsonl(workdir) if l["kind"] == "train"]
  assert steps == list(range(2, 13, 2))


def test_a_different_experiment_in_the_workdir_is_refused(uninterrupted, tmp_path):
  workdir, _ = uninterrupted["disadv"]
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"method: 'disadv' in the checkpoint, 'conadv' now: refused"):
    train.train_and_evaluate(smoke_config("conadv"), workdir)


def test_resume_with_another_data_layout_is_refused(tmp_path, monkeypatch):
  """ImageNet without cache reads per-process file slices: its checkpoint records the layout,
  and a resume that would read the data in another layout is refused, not mixed."""
  layouts = iter(["imagenet2012: TFDS file slices over 2 processes",
                  "imagenet2012: TFDS file slices over 1 process"])
  monkeypatch.setattr(train.order, "data_order_key",
                      lambda config, info, process_count=None: next(layouts))
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config("vanilla", num_train_steps=4), workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"over 2 processes, but this run would read it as .*over 1 process"):
    train.train_and_evaluate(smoke_config("vanilla", num_train_steps=6), workdir)


def test_config_and_workdir_are_checked_once_and_the_record_is_typed(tmp_path, monkeypatch):
  """train_and_evaluate validates and prepares once; the record saved with a checkpoint holds
  every RunRecord field and reads back unchanged; one that lacks a field (or has an unknown one)
  is refused by name, and nothing in the workdir is moved."""
  with pytest.raises(errors.ConfigError, match=r"config\.batch_size"):
    train.train_and_evaluate(smoke_config("vanilla", batch_size=0), str(tmp_path / "bad"))
  calls = []
  for module, name in ((config_validation, "validate"), (workdirs, "prepare")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: (
        calls.append(name), real(*a, **k))[1])
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(smoke_config("vanilla", num_train_steps=4), workdir)
  assert calls == ["validate", "prepare"]

  record_file = tmp_path / "run" / "checkpoints" / "4" / "record" / "metadata"
  saved = json.loads(record_file.read_text())
  assert set(saved) == {f.name for f in dataclasses.fields(run_record.RunRecord)}
  assert set(saved["final_eval"]) == {"step", "results", "sharpness"}
  assert run_record.RunRecord.from_json(saved).to_json() == saved
  edits = [(lambda r: r.pop("data_order"), "no field data_order"),
           (lambda r: r["final_eval"].pop("sharpness"), "no field final_eval.sharpness"),
           (lambda r: r.update(notes="x"), "unknown field notes")]
  for edit, named in edits:
    record = copy.deepcopy(saved)
    edit(record)
    record_file.write_text(json.dumps(record))
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=rf"step 4 in \S+ has a run record this code cannot use \({named}\)"
                       r".* Start this run in a new --workdir"):
      train.train_and_evaluate(smoke_config("vanilla", num_train_steps=4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints_finite(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config("conadv", num_train_steps=8), workdir)
  # Resume from step 8 with an absurd learning rate: the loss blows up by the next log (10).
  config = smoke_config("conadv", learning_rate=1e30)
  with pytest.raises(train.NonFiniteLossError,
                     match=r"by step 10: .*last good checkpoint is step 8"):
    train.train_and_evaluate(config, workdir)
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "record"))
  assert manager.latest_step() == 8
  restored = manager.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = jax.tree.leaves(restored.state)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_with_lookahead_pairs_each_batch_with_the_one_tau_later():
  for tau in (0, 1, 3):
    pairs = list(train.with_lookahead(iter(range(10)), tau))
    assert pairs == [(t, t + tau) for t in range(10 - tau)]


def _fingerprint(array) -> str:
  return hashlib.sha256(np.asarray(jax.device_get(array)).tobytes()).hexdigest()


@pytest.mark.parametrize("preset", ["conadv2", "disadv"])
def test_the_step_gets_batch_t_and_batch_t_plus_tau(preset, tmp_path, monkeypatch):
  """Through the real loop: across an epoch boundary (8 steps per epoch) and a resume at 5. The
  images reach the jitted step as uint8 device arrays (cast and normalised inside it)."""
  config = smoke_config(preset)
  tau = config.staleness
  info = prepare.get_dataset_info(config)
  expected = [_fingerprint(b["image"]) for b in
              itertools.islice(pipeline.train_batches(config, info), 12 + tau)]
  seen = {}
  real_train_step = experiment.Experiment.train_step

  def spying_train_step(self):
    step_fn = real_train_step.func(self)

    def step(state, batch, batch_ahead):
      seen[int(jax.device_get(state.step))] = (_fingerprint(batch["image"]),
                                               _fingerprint(batch_ahead["image"]))
      for image in (batch["image"], batch_ahead["image"]):
        assert isinstance(image, jax.Array) and image.dtype == np.uint8, image.dtype
      return step_fn(state, batch, batch_ahead)

    return step

  monkeypatch.setattr(experiment.Experiment, "train_step", property(spying_train_step))
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpointer, "reached_preemption",
                  lambda self, step: step == 5)
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(seen) == list(range(5))  # Stopped after step 5, with a checkpoint there.
  train.train_and_evaluate(config, str(tmp_path))
  assert sorted(seen) == list(range(12))
  for t in range(12):
    assert seen[t] == (expected[t], expected[t + tau]), f"step {t}"


def test_checkpoint_managers_are_closed_at_the_end_and_on_an_error(tmp_path, monkeypatch,
                                                                    caplog):
  """Every orbax CheckpointManager a run opens (the writer and restore's reader) is closed, when
  the run finishes and when it stops with an error. The finishing run is also too short for its
  profile window, which must be said, not skipped silently."""
  opened, closed = [], []
  real_init, real_close = ocp.CheckpointManager.__init__, ocp.CheckpointManager.close

  def init(self, *args, **kwargs):
    opened.append(self)
    real_init(self, *args, **kwargs)

  def close(self):
    closed.append(self)
    real_close(self)

  monkeypatch.setattr(ocp.CheckpointManager, "__init__", init)
  monkeypatch.setattr(ocp.CheckpointManager, "close", close)
  workdir = str(tmp_path)
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(smoke_config("vanilla", num_train_steps=2, profile_steps=1), workdir)
  assert "profile_steps=1: no profiler trace will be written, because the trace starts at step 3 " \
         "and this run ends at step 2; use a longer run." in caplog.text
  assert opened and all(any(c is m for c in closed) for m in opened), (opened, closed)

  opened.clear()
  closed.clear()
  # Resumed from step 2 with an absurd learning rate: non-finite metrics at the log of step 4.
  with pytest.raises(train.NonFiniteLossError):
    train.train_and_evaluate(smoke_config("vanilla", num_train_steps=4, learning_rate=1e30),
                             workdir)
  assert opened and all(any(c is m for c in closed) for m in opened), (opened, closed)


@pytest.mark.parametrize("preset", ["conadv2", "conadv_aa"])
def test_the_memory_check_counts_the_fifo_and_the_look_ahead_batches(preset):
  """What grows with τ on a device: τ adversarial batches and τ look-ahead input batches (with
  their AutoAugment view when there is one). A limit between the FIFO alone and both refuses."""
  config = smoke_config(preset)
  exp = experiment.build(config, prepare.get_dataset_info(config))
  tau, shards = exp.method.staleness, exp.mesh.devices.size
  rows, pixels = exp.batch_shape[0], np.prod(exp.batch_shape[1:])
  views = 2 if preset == "conadv_aa" else 1
  fifo = tau * rows * (pixels + 4) // shards  # uint8 images and int32 labels, hand-counted.
  lookahead = tau * rows * (views * pixels + 4) // shards
  assert exp.fifo_bytes_per_device() == fifo
  assert tau * exp.batch_bytes_per_device() == lookahead
  for limit_bytes, refused in ((fifo + lookahead // 2, True), (fifo + lookahead, False)):
    exp.config.fifo_memory_limit_gib = limit_bytes / 2**30
    if refused:
      with pytest.raises(errors.ConfigError, match="look-ahead input batches"):
        train._check_fifo_memory(exp)  # pylint: disable=protected-access
    else:
      train._check_fifo_memory(exp)  # pylint: disable=protected-access
