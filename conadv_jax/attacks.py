"""L∞ PGD on raw pixels, as a pure jittable function.

Budgets are on the 0-255 scale because models normalise inside. The reference ConAdv attack is
one targeted step (towards a random wrong label) with ε = step = 9 and a random start with
probability 0.8; `num_steps` > 1 gives PGD.
"""
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

PIXEL_MAX = 255.0

# Per-example losses (shape [batch]) of `images` for `labels`; summing them gives every
# example's input gradient in one backward pass.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  epsilon: float = 9.0
  step_size: float = 9.0
  num_steps: int = 1
  random_start_prob: float = 0.8
  targeted: bool = True

  @classmethod
  def from_config(cls, attack_config) -> "AttackConfig":
    return cls(epsilon=float(attack_config.epsilon), step_size=float(attack_config.step_size),
               num_steps=int(attack_config.num_steps),
               random_start_prob=float(attack_config.random_start_prob),
               targeted=bool(attack_config.targeted))


def random_wrong_labels(rng: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """A uniformly random label different from each true label."""
  offset = jax.random.randint(rng, labels.shape, 1, num_classes)
  return (labels + offset) % num_classes


def _random_start_and_targets(rng: jax.Array, images: jax.Array, labels: jax.Array,
                              config: AttackConfig,
                              num_classes: int) -> tuple[jax.Array, jax.Array]:
  """(offset of the random start, labels to attack) drawn from one key.

  Shapes follow `labels`: a batch ([B] labels) or, under vmap, one example ([] label).
  """
  start_rng, target_rng = jax.random.split(rng)
  attack_labels = (random_wrong_labels(target_rng, labels, num_classes) if config.targeted
                   else labels)
  noise_rng, coin_rng = jax.random.split(start_rng)
  noise = jax.random.uniform(noise_rng, images.shape, jnp.float32, -config.epsilon,
                             config.epsilon)
  use_noise = jax.random.bernoulli(coin_rng, config.random_start_prob,
                                   labels.shape + (1,) * (images.ndim - labels.ndim))
  return jnp.where(use_noise, noise, 0.0), attack_labels


def pgd_linf(loss_fn: LossFn, images: jax.Array, labels: jax.Array, rng: jax.Array,
             config: AttackConfig, num_classes: int, *,
             rng_per_example: bool = False) -> jax.Array:
  """Returns adversarial images within `epsilon` (L∞) of `images` and inside [0, 255].

  Untargeted: ascend the loss of the true label. Targeted: descend the loss of a random wrong
  label. The result carries no gradient.

  `rng` is one key for the whole batch, or with `rng_per_example` one key per example (leading
  axis = batch): then an example's random start and target depend on its own key only, not on
  which batch it is in or where (evaluation needs that; the train step keys whole batches).
  """
  images = images.astype(jnp.float32)
  draw = functools.partial(_random_start_and_targets, config=config, num_classes=num_classes)
  offset, attack_labels = (jax.vmap(draw) if rng_per_example else draw)(rng, images, labels)
  direction = -1.0 if config.targeted else 1.0
  lower = jnp.maximum(images - config.epsilon, 0.0)
  upper = jnp.minimum(images + config.epsilon, PIXEL_MAX)
  start = jnp.clip(images + offset, lower, upper)

  input_grad = jax.grad(lambda x: jnp.sum(loss_fn(x, attack_labels)))

  def pgd_step(_, x):
    x = x + direction * config.step_size * jnp.sign(input_grad(x))
    return jnp.clip(x, lower, upper)

  # The first step is peeled out of the loop: XLA:CPU gives convolutions inside a while loop
  # slow layouts (3-5x on small ResNets). Later steps share one loop body, so compile time does
  # not grow with num_steps.
  adversarial = jax.lax.fori_loop(1, config.num_steps, pgd_step, pgd_step(0, start))
  return jax.lax.stop_gradient(adversarial)
