"""Evaluation over the data: the eval split through the method's eval steps, and the
measurements at the final parameters (robust top-1, the Hessian's top eigenvalue).

The steps themselves (masked sums, attacks keyed by example index) are the method's
(method/evaluation.py); this module only feeds them the run's data.
"""
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from conadv_jax.data import datasets, pipeline
from conadv_jax.method import evaluation, experiment, parallel, sharpness
from conadv_jax.method.conadv import Batch, ForwardFn, TrainState

# The power iteration's starting vector: fixed, so every run's sharpness is measured alike.
_SHARPNESS_START_SEED = 0


def _eval_stream(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                 mesh: jax.sharding.Mesh) -> Iterator[Batch]:
  """The eval split as global, sharded, prefetched batches."""
  return pipeline.shard_and_prefetch(pipeline.eval_batches(config, info),
                                     parallel.batch_sharding(mesh), config.prefetch_to_device)


def evaluate(exp: experiment.Experiment, state: TrainState,
             eval_step: Callable | None = None) -> dict[str, float]:
  """One pass over the eval split with `state`'s main BN (exp.eval_step unless given)."""
  return evaluation.evaluate(eval_step or exp.eval_step, state,
                             _eval_stream(exp.config, exp.info, exp.mesh))


def robust_top1(exp: experiment.Experiment, state: TrainState) -> float | None:
  """Top-1 on the whole eval split under config's PGD; None when eval_pgd_steps is 0 (off)."""
  config = exp.config
  if not config.eval_pgd_steps:
    return None
  pgd = evaluation.robust_attack_config(config.eval_pgd_epsilon, config.eval_pgd_steps)
  step = jax.jit(evaluation.make_robust_eval_step(exp.forward, exp.info.num_classes, pgd))
  return evaluate(exp, state, step)["robust_top1"]


def train_subset(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                 num_examples: int) -> Batch:
  """The first `num_examples` of the train split, un-augmented, in split order (numpy).

  A fixed set of training examples, the same for every run, batch size, seed and process count
  (every process reads them all), for measurements of the training loss at the final
  parameters such as its Hessian's top eigenvalue. Read by the eval pipeline pointed at the train
  split: eval preprocessing, no shuffle, no augmentation.

  Raises:
    ValueError: the train split has fewer than `num_examples` examples.
  """
  if num_examples > info.num_train_examples:
    raise ValueError(f"{num_examples} training examples asked for; {config.dataset} has "
                     f"{info.num_train_examples}.")
  as_eval = dataclasses.replace(
      info, spec=dataclasses.replace(info.spec, eval_split=info.spec.train_split),
      # Generated data numbers eval examples after the train ones; start from 0 instead.
      num_train_examples=0, num_eval_examples=info.num_train_examples)
  images, labels, count = [], [], 0
  for batch in pipeline.eval_batches(config, as_eval, process_index=0, process_count=1):
    real = batch["mask"] > 0
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
    count += int(real.sum())
    if count >= num_examples:
      break
  return {"image": np.concatenate(images)[:num_examples],
          "label": np.concatenate(labels)[:num_examples]}


def final_sharpness(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
                    mesh: jax.sharding.Mesh, forward: ForwardFn,
                    state: TrainState) -> dict[str, Any] | None:
  """results.json's "sharpness": the training loss's top Hessian eigenvalue at `state`.

  None when config.sharpness_num_examples is 0 (off). The loss is the training cross-entropy
  (with the run's label smoothing) over train_subset's fixed examples, main BN in inference mode
  (see sharpness.py for why), and power iteration starts from a fixed vector, so two runs are
  measured alike. Every process computes the same number from the same (replicated) inputs.
  """
  num_examples = config.sharpness_num_examples
  if not num_examples:
    return None
  subset = train_subset(config, info, num_examples)
  replicated = parallel.replicated(mesh)
  images, labels = (jax.make_array_from_process_local_data(replicated, subset[key])
                    for key in ("image", "label"))
  loss = sharpness.make_training_loss(forward, state.batch_stats, images, labels,
                                      chunk_size=min(config.eval_batch_size, num_examples),
                                      label_smoothing=config.label_smoothing)
  result = sharpness.top_hessian_eigenvalue(loss, state.params,
                                            num_iterations=config.sharpness_iterations,
                                            rng=jax.random.PRNGKey(_SHARPNESS_START_SEED))
  change = result.relative_change
  return {"top_hessian_eigenvalue": result.eigenvalue, "iterations": result.num_iterations,
          "relative_change": change if np.isfinite(change) else None,
          "num_examples": num_examples}
