"""The training loop: data, state, checkpoints, logging and evaluation around the jitted step.

The loop is the same for all three methods and for 1 CPU or a pod. For ConAdv it keeps a
look-ahead of τ batches: at step t it hands the step batch t and batch t+τ.
"""
import collections
import hashlib
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath

from conadv_jax import (attacks, checkpointing, conadv, config_validation, evaluation,
                        input_pipeline, models, optim, parallel)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf."""


def param_fingerprint(params: Any) -> str:
  """SHA-256 of the parameters' bytes, leaves in flattening (sorted key) order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _logged_by(line: str, resume_step: int) -> bool:
  try:
    return json.loads(line)["step"] <= resume_step
  except (ValueError, KeyError, TypeError):  # Blank, or cut short by a killed run.
    return False


class MetricsLog:
  """metrics.jsonl: one JSON object per logged step or eval; process 0 writes."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = epath.Path(workdir) / "metrics.jsonl"  # epath: also gs://.
    self._enabled = jax.process_index() == 0
    if self._enabled and self.path.exists():
      # Lines from after the restored checkpoint will be written again: drop them.
      kept = [line for line in self.path.read_text().splitlines(keepends=True)
              if _logged_by(line, resume_step)]
      self.path.write_text("".join(kept))

  def write(self, step: int, kind: str, values: dict[str, float]) -> None:
    if self._enabled:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (single-process runs).

  With jax.distributed up, JAX's preemption service owns SIGTERM and makes every process agree
  on the step (Checkpointer.reached_preemption); a Python handler would displace it.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(step: int, metrics: dict[str, float], checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"Non-finite training metrics by step {step}: {bad}. The state is not checkpointed; "
        f"the last good checkpoint is step {checkpointer.latest_step()} in "
        f"{checkpointer.directory}. Lower learning_rate or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, writes results.json."""
  config_validation.validate(config, num_devices=jax.device_count())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  start_time = time.time()
  info = input_pipeline.get_dataset_info(config)
  config_validation.validate_against_data(config, info)
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)
  total_steps = optim.total_train_steps(config, steps_per_epoch)
  tx, learning_rate_fn = optim.create_optimizer(config, steps_per_epoch, total_steps)
  mesh = parallel.make_mesh()
  model = models.create_model_from_config(config, info.num_classes, jax.device_count())
  forward = conadv.linen_forward(model)
  method = conadv.MethodConfig(
      method=config.method, num_classes=info.num_classes, staleness=config.staleness,
      attack=attacks.AttackConfig.from_config(config.attack), clean_weight=config.clean_weight,
      adv_weight=config.adv_weight, label_smoothing=config.label_smoothing)

  def init_state() -> conadv.TrainState:
    init_rng, attack_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = model.init(init_rng, jnp.zeros((1, *info.image_shape)), train=False)
    return conadv.TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx,
        fifo_shape=(method.staleness, config.batch_size, *info.image_shape), rng=attack_rng)

  state_shape = jax.eval_shape(init_state)
  shardings = parallel.state_sharding(mesh, state_shape)
  checkpointer = checkpointing.Checkpointer(workdir, config)
  state = checkpointer.restore_latest(jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, shardings))
  resumed = state is not None
  if not resumed:
    state = parallel.create_sharded_state(init_state, mesh)
  start_step = int(jax.device_get(state.step))

  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  metrics_log = MetricsLog(workdir, start_step)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
  logging.info("%s %s, %d steps (%d per epoch), %s from step %d on %d devices.", config.method,
               config.model, total_steps, steps_per_epoch,
               "resuming" if resumed else "starting", start_step, jax.device_count())

  train_step = parallel.jit_train_step(
      conadv.make_train_step(forward, tx, method, learning_rate_fn), mesh, state_shape)
  eval_step = jax.jit(evaluation.make_eval_step(forward, method, config.eval_adversarial))
  batches = input_pipeline.shard_and_prefetch(
      input_pipeline.train_batches(config, start_step=start_step),
      parallel.batch_sharding(mesh), config.prefetch_to_device)
  lookahead = collections.deque(next(batches) for _ in range(method.staleness))
  if method.staleness and not resumed:
    fill_fifo = parallel.jit_fill_fifo(conadv.make_fill_fifo(forward, method), mesh, state_shape)
    state = fill_fifo(state, tuple(lookahead))

  def run_eval(step: int) -> dict[str, float]:
    eval_batches = input_pipeline.shard_and_prefetch(
        input_pipeline.eval_batches(config), parallel.batch_sharding(mesh),
        config.prefetch_to_device)
    results = evaluation.evaluate(eval_step, state, eval_batches)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    metrics_log.write(step, "eval", results)
    return results

  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  preemption = _Preemption()
  pending, train_summary, eval_results = [], {}, None
  step = start_step
  last_log = (step, time.time())
  try:
    while step < total_steps:
      if method.staleness:
        batch = lookahead.popleft()
        lookahead.append(next(batches))
        batch_ahead = lookahead[-1]
      else:
        batch = batch_ahead = next(batches)
      state, metrics = train_step(state, batch, batch_ahead)
      pending.append(metrics)
      step += 1
      report_progress(step)
      stop = preemption.requested or checkpointer.reached_preemption(step)
      save = checkpointer.should_save(step) or stop
      if pending and (step % config.log_every_steps == 0 or save or step == total_steps):
        train_summary = _mean_metrics(pending)
        pending = []
        _check_finite(step, train_summary, checkpointer)
        now = time.time()
        train_summary["images_per_sec_per_device"] = (
            (step - last_log[0]) * config.batch_size / (now - last_log[1]) / jax.device_count())
        last_log = (step, now)
        writer.write_scalars(step, {f"train/{k}": v for k, v in train_summary.items()})
        metrics_log.write(step, "train", train_summary)
      if save:
        checkpointer.save(step, state, force=stop)
      if step % eval_every == 0 or step == total_steps:
        eval_results = run_eval(step)
        last_log = (step, time.time())  # Keep eval time out of the throughput.
      if stop:
        checkpointer.wait_until_finished()
        logging.warning("Preempted: saved a checkpoint at step %d; the same command resumes.",
                        step)
        return {"preempted_at_step": step}
    if eval_results is None:  # Resumed at the very end.
      eval_results = run_eval(step)
    checkpointer.save(step, state, force=True)
    checkpointer.wait_until_finished()
  finally:
    preemption.restore()
    writer.flush()

  results = {
      "config": config.to_dict(),
      "final_step": step,
      "eval": {k: eval_results.get(k) for k in ("top1", "top5", "loss", "adv_top1",
                                                 "num_examples") if k in eval_results},
      "train": {"loss": train_summary.get("loss"), "top1": train_summary.get("clean_top1")},
      "wall_time_s": time.time() - start_time,
      "param_fingerprint": param_fingerprint(state.params),
  }
  if is_chief:
    (epath.Path(workdir) / "results.json").write_text(json.dumps(results, indent=2, default=str))
  logging.info("Final eval at step %d: %s", step, results["eval"])
  return results
