"""L∞ PGD on raw pixels, as a pure jittable function.

Budgets are on the 0-255 scale because models normalise inside. The reference ConAdv attack is
one targeted step (towards a random wrong label) with ε = step = 9 and a random start with
probability 0.8; `num_steps` > 1 gives PGD.
"""
import dataclasses
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


def pgd_linf(loss_fn: LossFn, images: jax.Array, labels: jax.Array, rng: jax.Array,
             config: AttackConfig, num_classes: int) -> jax.Array:
  """Returns adversarial images within `epsilon` (L∞) of `images` and inside [0, 255].

  Untargeted: ascend the loss of the true label. Targeted: descend the loss of a random wrong
  label. The result carries no gradient.
  """
  start_rng, target_rng = jax.random.split(rng)
  if config.targeted:
    attack_labels, direction = random_wrong_labels(target_rng, labels, num_classes), -1.0
  else:
    attack_labels, direction = labels, 1.0
  images = images.astype(jnp.float32)
  lower = jnp.maximum(images - config.epsilon, 0.0)
  upper = jnp.minimum(images + config.epsilon, PIXEL_MAX)

  noise_rng, coin_rng = jax.random.split(start_rng)
  noise = jax.random.uniform(noise_rng, images.shape, jnp.float32, -config.epsilon,
                             config.epsilon)
  use_noise = jax.random.bernoulli(coin_rng, config.random_start_prob,
                                   (images.shape[0],) + (1,) * (images.ndim - 1))
  start = jnp.clip(images + jnp.where(use_noise, noise, 0.0), lower, upper)

  input_grad = jax.grad(lambda x: jnp.sum(loss_fn(x, attack_labels)))

  def pgd_step(_, x):
    x = x + direction * config.step_size * jnp.sign(input_grad(x))
    return jnp.clip(x, lower, upper)

  # The first step is peeled out of the loop: XLA:CPU gives convolutions inside a while loop
  # slow layouts (3-5x on small ResNets). Later steps share one loop body, so compile time does
  # not grow with num_steps.
  adversarial = jax.lax.fori_loop(1, config.num_steps, pgd_step, pgd_step(0, start))
  return jax.lax.stop_gradient(adversarial)
