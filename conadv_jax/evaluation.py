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
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conadv_jax import attacks, input_pipeline, losses, parallel, sharpness
from conadv_jax.conadv import Batch, ForwardFn, MethodConfig, TrainState
from conadv_jax.norm import MAIN

# Folded into the state's key to give the root of the evaluation attacks; far from any training
# batch index (the training attack on batch i uses fold_in(rng, i)).
_EVAL_RNG_OFFSET = 2**30
# The root of the robust (PGD) evaluation's random starts: another stream than the eval attack's.
_ROBUST_RNG_OFFSET = 2**30 + 2**29
# The power iteration's starting vector: fixed, so every run's sharpness is measured alike.
_SHARPNESS_START_SEED = 0
# Madry et al.'s step rule: 2.5·ε/steps lets a walk reach the ε-ball's far side from the random
# start with room to spare, whatever the number of steps.
PGD_STEP_FACTOR = 2.5


def example_indices(batch: Batch, batch_index: jax.Array) -> jax.Array:
  """Each row's index in the eval split: batch['index'], else its position in the batch stream.

  input_pipeline.eval_batches gives 'index', the same for any number of processes and devices.
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


def robust_top1(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                mesh: jax.sharding.Mesh, forward: ForwardFn, state: TrainState) -> float | None:
  """Top-1 on the whole eval split under config's PGD; None when eval_pgd_steps is 0 (off)."""
  if not config.eval_pgd_steps:
    return None
  pgd = robust_attack_config(config.eval_pgd_epsilon, config.eval_pgd_steps)
  step = jax.jit(make_robust_eval_step(forward, info.num_classes, pgd))
  batches = input_pipeline.shard_and_prefetch(
      input_pipeline.eval_batches(config, info), parallel.batch_sharding(mesh),
      config.prefetch_to_device)
  return evaluate(step, state, batches)["robust_top1"]


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


def train_subset(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
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
  for batch in input_pipeline.eval_batches(config, as_eval, process_index=0, process_count=1):
    real = batch["mask"] > 0
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
    count += int(real.sum())
    if count >= num_examples:
      break
  return {"image": np.concatenate(images)[:num_examples],
          "label": np.concatenate(labels)[:num_examples]}


def final_sharpness(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
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
