"""Evaluation with the main BN: top-1/top-5, loss, accuracy under the training attack, and
robust accuracy under a standard untargeted PGD.

Batches carry a `mask`; padded examples count for nothing, so every example is scored exactly
once whatever the number of hosts and devices. The step returns sums; the host divides once. The
attacks on an example are keyed by the example's index in the split, so adv_top1 and robust_top1
do not depend on eval_batch_size either.

Two adversarial numbers, for two questions:
  adv_top1     the attack the model was trained against (by default one targeted step): how
               well the training objective holds on unseen data;
  robust_top1  untargeted L∞ PGD with `eval_pgd_steps` steps of 2.5·ε/steps from a random start
               in the ε-ball (Madry et al.'s recipe): a model-independent yardstick, so methods
               trained with different attacks (or none) are compared under the same threat.
"""
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from conadv_jax.method import attacks, losses
from conadv_jax.method.conadv import Batch, ForwardFn, MethodConfig, TrainState
from conadv_jax.method.norm import MAIN

# Folded into the state's key to give the root of the evaluation attacks; far from any training
# batch index (the training attack on batch i uses fold_in(rng, i)).
_EVAL_RNG_OFFSET = 2**30
# The root of the robust (PGD) evaluation's random starts: another stream than the eval attack's.
_ROBUST_RNG_OFFSET = 2**30 + 2**29
# Madry et al.'s step rule: 2.5·ε/steps lets a walk reach the ε-ball's far side from the random
# start with room to spare, whatever the number of steps.
PGD_STEP_FACTOR = 2.5


def example_indices(batch: Batch, batch_index: jax.Array) -> jax.Array:
  """Each row's index in the eval split: batch['index'], else its position in the batch stream.

  The eval pipeline gives 'index', the same for any number of processes and devices.
  The fallback batch_index * batch_size + row, for hand-made batches, equals it when one process
  reads the split in order in equal batches.
  """
  if "index" in batch:
    return batch["index"].astype(jnp.int32)
  size = batch["label"].shape[0]
  return batch_index * size + jnp.arange(size, dtype=jnp.int32)


def make_main_bn_attack(forward: ForwardFn, num_classes: int, attack_config: attacks.AttackConfig,
                        rng_offset: int):
  """attack(state, batch, batch_index) -> adversarial images against the deployed model.

  The deployed model is the main BN with its running averages. Each example's random start and
  target come from (state.rng, `rng_offset`, its index in the split) alone, and in eval mode its
  loss sees no other example, so its adversarial image does not depend on eval_batch_size, the
  device count or the padding.
  """

  def attack(state: TrainState, batch: Batch, batch_index: jax.Array) -> jax.Array:
    def loss_fn(images, labels):
      logits = forward(state.params, state.batch_stats, images, train=False, branch=MAIN)[0]
      return losses.cross_entropy(logits, labels)

    keys = _example_keys(state, rng_offset, batch, batch_index)
    return attacks.pgd_linf(loss_fn, batch["image"], batch["label"], keys, attack_config,
                            num_classes, rng_per_example=True)

  return attack


def make_eval_attack(forward: ForwardFn, cfg: MethodConfig):
  """The training attack against the deployed model: what adv_top1 measures."""
  return make_main_bn_attack(forward, cfg.num_classes, cfg.attack, _EVAL_RNG_OFFSET)


def _example_keys(state: TrainState, offset: int, batch: Batch,
                  batch_index: jax.Array) -> jax.Array:
  """One key per row, from (state.rng, offset, the row's index in the split) only."""
  root = jax.random.fold_in(state.rng, offset)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, example_indices(batch, batch_index))


def robust_attack_config(epsilon: float, num_steps: int) -> attacks.AttackConfig:
  """Untargeted L∞ PGD: `num_steps` steps of 2.5·ε/steps, random start in the ε-ball always."""
  return attacks.AttackConfig(epsilon=float(epsilon),
                              step_size=PGD_STEP_FACTOR * float(epsilon) / num_steps,
                              num_steps=int(num_steps), random_start_prob=1.0, targeted=False)


def make_robust_attack(forward: ForwardFn, num_classes: int, pgd: attacks.AttackConfig):
  """Untargeted PGD against the deployed model, from its own stream of keys: robust_top1."""
  return make_main_bn_attack(forward, num_classes, pgd, _ROBUST_RNG_OFFSET)


def make_robust_eval_step(forward: ForwardFn, num_classes: int, pgd: attacks.AttackConfig):
  """robust_step(state, batch, batch_index) -> {"count", "robust_top1"}: masked sums.

  A separate step (not a key of make_eval_step's) so that the periodic evals do not pay for
  PGD's num_steps extra forward/backward passes; the final eval runs both.
  """
  attack = make_robust_attack(forward, num_classes, pgd)

  def robust_step(state: TrainState, batch: Batch, batch_index: jax.Array):
    mask = batch["mask"].astype(jnp.float32)
    adv = attack(state, batch, batch_index)
    logits = forward(state.params, state.batch_stats, adv, train=False, branch=MAIN)[0]
    return {"count": mask.sum(),
            "robust_top1": (losses.topk_correct(logits, batch["label"], 1) * mask).sum()}

  return robust_step


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


