"""Evaluation with the main BN: top-1/top-5, loss and accuracy under the training attack.

Batches carry a `mask`; padded examples count for nothing, so every example is scored exactly
once whatever the number of hosts and devices. The step returns sums; the host divides once. The
attack on an example is keyed by the example's index in the split, so adv_top1 does not depend on
eval_batch_size either.
"""
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from conadv_jax import attacks, losses
from conadv_jax.conadv import Batch, ForwardFn, MethodConfig, TrainState
from conadv_jax.norm import MAIN

# Folded into the state's key to give the root of the evaluation attacks; far from any training
# batch index (the training attack on batch i uses fold_in(rng, i)).
_EVAL_RNG_OFFSET = 2**30


def example_indices(batch: Batch, batch_index: jax.Array) -> jax.Array:
  """Each row's index in the eval split: batch['index'], else its position in the batch stream.

  The fallback batch_index * batch_size + row is the split index when one process reads the split
  in order in equal batches, padding only at the end (input_pipeline.eval_batches). With several
  processes it is still one distinct number per example, but depends on the layout; an 'index'
  from the input pipeline removes that dependence.
  """
  if "index" in batch:
    return batch["index"].astype(jnp.int32)
  size = batch["label"].shape[0]
  return batch_index * size + jnp.arange(size, dtype=jnp.int32)


def make_eval_attack(forward: ForwardFn, cfg: MethodConfig):
  """attack(state, batch, batch_index) -> the batch's adversarial images against the main BN.

  The deployed model (main BN, running averages) under the attack used in training. Each
  example's random start and target come from (state.rng, its index in the split) alone, and in
  eval mode its loss sees no other example, so its adversarial image, hence adv_top1, does not
  depend on eval_batch_size, the device count or the padding.
  """

  def attack(state: TrainState, batch: Batch, batch_index: jax.Array) -> jax.Array:
    def loss_fn(images, labels):
      logits = forward(state.params, state.batch_stats, images, train=False, branch=MAIN)[0]
      return losses.cross_entropy(logits, labels)

    eval_rng = jax.random.fold_in(state.rng, _EVAL_RNG_OFFSET)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        eval_rng, example_indices(batch, batch_index))
    return attacks.pgd_linf(loss_fn, batch["image"], batch["label"], keys, cfg.attack,
                            cfg.num_classes, rng_per_example=True)

  return attack


def make_eval_step(forward: ForwardFn, cfg: MethodConfig, adversarial: bool):
  """eval_step(state, batch, batch_index) -> dict of masked sums over the batch.

  `batch` may carry 'index' (int, each row's index in the eval split) to key the attack; see
  example_indices for what happens without it.
  """
  attack = make_eval_attack(forward, cfg)

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
      adv = attack(state, batch, batch_index)
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
