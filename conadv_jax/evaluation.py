"""Evaluation with the main BN: top-1/top-5, loss and accuracy under the training attack.

Batches carry a `mask`; padded examples count for nothing, so every example is scored exactly
once whatever the number of hosts and devices. The step returns sums; the host divides once.
"""
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from conadv_jax import attacks, losses
from conadv_jax.conadv import Batch, ForwardFn, MethodConfig, TrainState
from conadv_jax.norm import MAIN

# Keys of the attacks made at evaluation; far from any training batch index.
_EVAL_RNG_OFFSET = 2**30


def make_eval_step(forward: ForwardFn, cfg: MethodConfig, adversarial: bool):
  """eval_step(state, batch, batch_index) -> dict of masked sums over the batch."""

  def eval_step(state: TrainState, batch: Batch, batch_index: jax.Array):
    mask = batch["mask"].astype(jnp.float32)

    def logits_of(images):
      return forward(state.params, state.batch_stats, images, train=False, branch=MAIN)[0]

    logits = logits_of(batch["image"])
    sums = {
        "count": mask.sum(),
        "loss": (losses.cross_entropy(logits, batch["label"]) * mask).sum(),
        "top1": (losses.topk_correct(logits, batch["label"], 1) * mask).sum(),
    }
    if cfg.num_classes > 5:
      sums["top5"] = (losses.topk_correct(logits, batch["label"], 5) * mask).sum()
    if adversarial:
      # The deployed model (main BN, running averages) under the attack used in training.
      adv = attacks.pgd_linf(
          lambda x, y: losses.cross_entropy(logits_of(x), y), batch["image"], batch["label"],
          jax.random.fold_in(state.rng, _EVAL_RNG_OFFSET + batch_index), cfg.attack,
          cfg.num_classes)
      sums["adv_top1"] = (losses.topk_correct(logits_of(adv), batch["label"]) * mask).sum()
    return sums

  return eval_step


def evaluate(eval_step: Callable, state: TrainState, batches: Iterable[Batch]) -> dict[str, float]:
  """Runs one pass; returns means over real examples plus `num_examples`."""
  totals = None
  for index, batch in enumerate(batches):
    sums = eval_step(state, batch, jnp.int32(index))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  if count == 0:
    raise ValueError("Evaluation saw no examples; check the eval split and eval_batch_size.")
  means = {k: float(np.asarray(v)) / count for k, v in totals.items()}
  return means | {"num_examples": int(count)}
