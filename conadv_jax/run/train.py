"""The training loop: data, state, checkpoints, logging and evaluation around the jitted step.

The loop does not know the method. It hands the step (batch t, batch t+τ) from `with_lookahead`;
vanilla and DisAdv have τ = 0 and get batch t twice. A run is: create or restore the state
(`_create_or_restore`), step until done or preempted (`_train`), evaluate and record (`_finish`).
The run record (run_record.RunRecord), saved with every checkpoint, tells a resume what is done.
"""
import collections
import dataclasses
import hashlib
import itertools
import json
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath

from conadv_jax import errors
from conadv_jax.data import order, pipeline, prepare
from conadv_jax.method import experiment, parallel
from conadv_jax.run import (checkpointing, config_history, config_validation, evaluate,
                            jsonl_writer, lock as locks, preflight, run_record,
                            workdir as workdirs)

T = TypeVar("T")


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """Training produced a NaN or Inf."""


def param_fingerprint(params: Any) -> str:
  """SHA-256 of the parameters' bytes, leaves in flattening (sorted key) order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def with_lookahead(batches: Iterable[T], staleness: int) -> Iterator[tuple[T, T]]:
  """Yields (batch t, batch t+τ) for t = 0, 1, ...; with τ = 0, (batch t, batch t)."""
  batches = iter(batches)
  window = collections.deque(itertools.islice(batches, staleness))
  for newest in batches:
    window.append(newest)
    yield window.popleft(), newest


class _StopSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between steps.

  Single-process runs only: with jax.distributed up, JAX's preemption service owns SIGTERM and
  makes every process agree on the step (Checkpointer.reached_preemption). A second Ctrl-C
  interrupts at once.
  """

  def __init__(self):
    self.requested = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:  # The next Ctrl-C is a KeyboardInterrupt again.
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Run:
  """The state being trained and what the loop needs to know about where it came from."""
  state: Any
  step: int
  resumed: bool
  record: run_record.RunRecord  # Saved with every checkpoint.


def _check_fifo_memory(exp: experiment.Experiment) -> None:
  """Refuses a staleness whose memory cannot fit, before anything is compiled or allocated.

  What grows with τ on each device: the FIFO (τ adversarial batches) and the τ input batches
  that `with_lookahead` holds beyond batch t.
  """
  fifo = exp.fifo_bytes_per_device()
  if not fifo:
    return
  tau = exp.method.staleness
  lookahead = tau * exp.batch_bytes_per_device()
  limit = exp.config.fifo_memory_limit_gib * 2**30
  source = f"config.fifo_memory_limit_gib={exp.config.fifo_memory_limit_gib}"
  if not limit:
    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU.
    limit = stats.get("bytes_limit", 0) / 2
    source = "half of the device's memory"
  mib = 2**20
  logging.info("Adversarial FIFO: %d batches of %s, %.1f MiB per device, and %.1f MiB of "
               "look-ahead input batches.", tau, exp.batch_shape, fifo / mib, lookahead / mib)
  if limit and fifo + lookahead > limit:
    raise errors.ConfigError(
        f"config.staleness={tau} is not allowed: it needs {(fifo + lookahead) / mib:.3f} MiB "
        f"per device, more than {limit / mib:.3f} MiB ({source}): the adversarial FIFO "
        f"({fifo / mib:.3f} MiB: {tau} x {exp.batch_shape} uint8 images and their int32 labels "
        f"over {parallel.num_batch_shards(exp.mesh)} batch shards) and the {tau} look-ahead "
        f"input batches ({lookahead / mib:.3f} MiB). Lower staleness or batch_size, use more "
        "devices, or raise config.fifo_memory_limit_gib.")


def _create_or_restore(exp: experiment.Experiment,
                       checkpointer: checkpointing.Checkpointer) -> _Run:
  """The newest checkpoint's state if there is one, else a fresh state; config changes said."""
  current = config_history.flatten(exp.config)
  data_order = order.data_order_key(exp.config, exp.info)
  restored = checkpointer.restore_latest(exp.abstract_state(), current)
  if restored is None:
    return _Run(exp.init_state(), 0, False,
                run_record.RunRecord(config=current, history=[], data_order=data_order))
  record = restored.record
  saved_order = record.data_order
  if saved_order != data_order:
    raise checkpointing.CheckpointMismatchError(
        f"The checkpoint in {checkpointer.directory} (step {restored.step}) was trained with the "
        f"data read as {saved_order or 'one global order'}, but this run would read it as "
        f"{data_order or 'one global order'}: batch t would hold other examples, and steps "
        "would be repeated or skipped. Resume with the same number of processes as before, or "
        "set config.cache=True from the start of a run (one global order for any number of "
        "processes; see docs/reliability.md), or start in a new --workdir.")
  if restored.step > exp.total_steps:
    raise checkpointing.CheckpointMismatchError(
        f"The checkpoint in {checkpointer.directory} is at step {restored.step}, past this run's "
        f"{exp.total_steps} steps. Set config.num_train_steps (or num_epochs) to at least "
        f"{restored.step} to continue it, or start in a new --workdir.")
  _, accepted = config_history.compare(record.config, current)
  for change in accepted:
    logging.warning("Resuming with a changed setting: %s.", change.describe())
  record.config = current
  if accepted:  # The saved final eval, if any, was made under the old settings.
    record.history = [*record.history, config_history.history_entry(restored.step, accepted)]
    record.final_eval = None
  return _Run(restored.state, restored.step, True, record)


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(step: int, metrics: dict[str, float],
                  checkpointer: checkpointing.Checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"Non-finite training metrics by step {step}: {bad}. The state is not checkpointed; "
        f"the last good checkpoint is step {checkpointer.latest_step()} in "
        f"{checkpointer.directory}. Lower learning_rate or check the data.")


def _periodic_eval(exp: experiment.Experiment, run: _Run,
                   writer: metric_writers.MetricWriter) -> None:
  """Evaluates at run.step and notes it in the record, so a resume knows it was done."""
  results = evaluate.evaluate(exp, run.state)
  writer.write_scalars(run.step, {f"eval/{k}": v for k, v in results.items()})
  run.record.last_eval_step = run.step


def _fill_fifo(exp: experiment.Experiment, state: Any, first: list[Any]) -> Any:
  """Attacks on the first τ batches with θ_0, with progress for large τ."""
  started = time.time()
  every = max(len(first) // 10, 1)

  def progress(offset: int, filled: Any) -> None:
    if (offset + 1) % every == 0 or offset + 1 == len(first):
      jax.block_until_ready(filled.adv_fifo)
      logging.info("Filled %d of %d FIFO slots (%.0f s).", offset + 1, len(first),
                   time.time() - started)

  logging.info("Filling the adversarial FIFO with attacks on the first %d batches.", len(first))
  return exp.fill_fifo(state, first, progress)


def _train(exp: experiment.Experiment, run: _Run, checkpointer: checkpointing.Checkpointer,
           writer: metric_writers.MetricWriter, lock: locks.RunLock) -> str | None:
  """Steps `run` to the end or to a stop request; returns the stop reason, None if finished."""
  config = exp.config
  batches = pipeline.shard_and_prefetch(
      pipeline.train_batches(config, exp.info, start_step=run.step),
      parallel.batch_sharding(exp.mesh), config.prefetch_to_device)
  if exp.method.staleness and not run.resumed:
    first = list(itertools.islice(batches, exp.method.staleness))
    run.state = _fill_fifo(exp, run.state, first)
    batches = itertools.chain(first, batches)
  stream = with_lookahead(batches, exp.method.staleness)

  eval_every = exp.eval_every_steps
  report_progress = periodic_actions.ReportProgress(num_train_steps=exp.total_steps,
                                                    writer=writer)
  hooks = [report_progress]
  if config.profile_steps > 0 and jax.process_index() == 0:
    # Starts after two steps of this (re)start, so compilation stays out of the trace.
    hooks.append(periodic_actions.Profile(
        logdir=checkpointer.workdir, num_profile_steps=config.profile_steps,
        first_profile=run.step + 3, every_secs=None, profile_duration_ms=None))
    # The trace is written when it stops, at step first_profile + profile_steps at the earliest.
    room = exp.total_steps - (run.step + 3)
    if config.profile_steps > room:
      logging.warning("profile_steps=%d: no profiler trace will be written, because the trace "
                      "starts at step %d and this run ends at step %d; %s.", config.profile_steps,
                      run.step + 3, exp.total_steps,
                      f"use profile_steps <= {room}" if room > 0 else "use a longer run")
  # A preempted run skips the eval of its last step (the deadline is near); it runs here.
  if (run.resumed and run.step % eval_every == 0 and 0 < run.step < exp.total_steps
      and run.record.last_eval_step != run.step):
    _periodic_eval(exp, run, writer)
  signals = _StopSignals()
  pending = []
  last_log = (run.step, time.time())
  try:
    while run.step < exp.total_steps:
      batch, batch_ahead = next(stream)
      run.state, metrics = exp.train_step(run.state, batch, batch_ahead)
      pending.append(metrics)
      run.step += 1
      for hook in hooks:
        hook(run.step)
      checkpointer.check_for_errors()
      stop = signals.requested or (
          "preemption notice" if checkpointer.reached_preemption(run.step) else None)
      last = run.step == exp.total_steps
      # The last step's checkpoint is _finish's, saved with the final eval in its record.
      save = (checkpointer.should_save(run.step) and not last) or stop
      if pending and (run.step % config.log_every_steps == 0 or save or last):
        summary = _mean_metrics(pending)
        pending = []
        _check_finite(run.step, summary, checkpointer)
        now = time.time()
        summary["images_per_sec_per_device"] = (
            (run.step - last_log[0]) * config.batch_size / (now - last_log[1]) /
            jax.device_count())
        last_log = (run.step, now)
        writer.write_scalars(run.step, {f"train/{k}": v for k, v in summary.items()})
        run.record.last_train = summary
        lock.heartbeat()
      # The last step's eval is _finish's. Evaluating before the save records it in the
      # checkpoint, so a resume from this step neither repeats nor skips it.
      if run.step % eval_every == 0 and not last and not stop:
        _periodic_eval(exp, run, writer)
        last_log = (run.step, time.time())  # Keep eval time out of the throughput.
      if save:
        checkpointer.save(run.step, run.state, run.record, force=bool(stop))
      if stop:
        checkpointer.wait_until_finished()
        logging.warning("Stopped by %s: saved a checkpoint at step %d; the same command resumes.",
                        stop, run.step)
        return stop
  finally:
    signals.restore()
  return None


def _finish(exp: experiment.Experiment, run: _Run, checkpointer: checkpointing.Checkpointer,
            writer: metric_writers.MetricWriter, start_time: float) -> dict[str, Any]:
  """Final eval (unless the final checkpoint holds it: a rerun), last checkpoint, results.json."""
  final = run.record.final_eval
  if final is None or final.step != run.step:  # Alike on every process: the checkpoint's record.
    eval_results = evaluate.evaluate(exp, run.state)
    # PGD only here: periodic evals keep their cost; robust_top1 is a final-parameters number.
    robust = evaluate.robust_top1(exp, run.state)
    if robust is not None:
      eval_results["robust_top1"] = robust
    writer.write_scalars(run.step, {f"eval/{k}": v for k, v in eval_results.items()})
    sharpness = evaluate.final_sharpness(exp.config, exp.info, exp.mesh, exp.forward, run.state)
    final = run.record.final_eval = run_record.FinalEval(run.step, eval_results, sharpness)
    run.record.last_eval_step = run.step  # A longer rerun must not evaluate this step again.
  eval_results = final.results
  checkpointer.save(run.step, run.state, run.record, force=True)
  checkpointer.wait_until_finished()
  train_summary = run.record.last_train or {}
  results = {
      "config": exp.config.to_dict(),
      "config_history": run.record.history,
      "final_step": run.step,
      "eval": {k: eval_results.get(k) for k in ("top1", "top5", "loss", "adv_top1",
                                                 "robust_top1", "num_examples")
               if k in eval_results},
      "train": {"loss": train_summary.get("loss"), "top1": train_summary.get("clean_top1")},
      "sharpness": final.sharpness,  # None when config.sharpness_num_examples is 0.
      "wall_time_s": time.time() - start_time,
      "param_fingerprint": param_fingerprint(run.state.params),
  }
  if jax.process_index() == 0:
    workdirs.write_atomically(epath.Path(checkpointer.workdir) / "results.json",
                              json.dumps(results, indent=2, default=str))
  logging.info("Final eval at step %d: %s", run.step, results["eval"])
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, writes results.json.

  Checks the config and the workdir first (preflight.check), then trains (`run_checked`). Returns
  results.json's contents, or {"stopped_at_step": k, "reason": ...} after SIGTERM, SIGINT or a
  preemption notice (a checkpoint at step k is saved; the same call resumes).
  """
  return run_checked(preflight.check(config, workdir))


def run_checked(checked: preflight.Checked) -> dict[str, Any]:
  """train_and_evaluate for a config and workdir that preflight.check has passed."""
  start_time = time.time()
  config, path = checked.config, checked.workdir
  with locks.RunLock(path) as lock:
    info = prepare.get_dataset_info(config)
    config_validation.validate_against_data(config, info)
    exp = experiment.build(config, info)
    _check_fifo_memory(exp)
    is_chief = jax.process_index() == 0
    with checkpointing.Checkpointer(path, every=config.checkpoint_every_steps,
                                    keep=config.keep_checkpoints) as checkpointer:
      run = _create_or_restore(exp, checkpointer)
      if is_chief:  # Only once a resume is accepted: a refused one leaves the workdir as it was.
        workdirs.write_atomically(path / "config.json",
                                  config.to_json_best_effort(indent=2, sort_keys=True))
      writer = metric_writers.MultiWriter(
          [metric_writers.create_default_writer(path, just_logging=not is_chief)] +
          ([jsonl_writer.JsonlWriter(path, run.step)] if is_chief else []))
      try:
        if not run.resumed:
          parameter_overview.log_parameter_overview(run.state.params)
        logging.info("%s %s, %d steps (%.2f per epoch), %s from step %d on %d devices "
                     "(mesh %s).", config.method, config.model, exp.total_steps,
                     exp.steps_per_epoch, "resuming" if run.resumed else "starting", run.step,
                     jax.device_count(), dict(exp.mesh.shape))
        stop = _train(exp, run, checkpointer, writer, lock)
        if stop:
          return {"stopped_at_step": run.step, "reason": stop}
        return _finish(exp, run, checkpointer, writer, start_time)
      finally:
        writer.close()
