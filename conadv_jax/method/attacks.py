"""L∞ PGD on raw pixels, as a pure jittable function.

Budgets are on the 0-255 scale because models normalise inside. The reference ConAdv attack is
one targeted step (towards a random wrong label) with ε = step = 9 "pixels" and a random start
with probability 0.8, drawn once per batch; `num_steps` > 1 gives PGD. (The reference applies its
budget to normalised inputs, so what trained its models was ε ≈ 4 pixel levels: see
configs/imagenet_resnet50.py.) `quantize` turns adversarial images into 8-bit images, as the clean
ones are, so they can be stored compactly.
"""
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from conadv_jax import errors

PIXEL_MAX = 255.0
RANDOM_STARTS = ("per_example", "per_batch")  # Who shares one random-start coin.

# Per-example losses (shape [batch]) of `images` for `labels`; summing them gives every
# example's input gradient in one backward pass.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The attack of config.attack; each field is checked here, where it is read."""
  epsilon: float = 9.0
  step_size: float = 9.0
  num_steps: int = 1
  random_start_prob: float = 0.8
  targeted: bool = True
  random_start: str = "per_example"

  def __post_init__(self):
    rules = (
        ("epsilon", lambda v: math.isfinite(v) and v >= 0,
         "it must be a finite number of pixels >= 0"),
        # A step of 0 never moves the images; it is the right step only for a zero budget.
        ("step_size", lambda v: math.isfinite(v) and (v > 0 or (v == 0 and self.epsilon == 0)),
         "it must be finite and > 0"),
        ("num_steps", lambda v: v >= 1, "it must be >= 1"),
        ("random_start_prob", lambda v: 0.0 <= v <= 1.0, "it is a probability, in [0, 1]"),
        ("random_start", lambda v: v in RANDOM_STARTS,
         f"choose one of {', '.join(RANDOM_STARTS)}"),
    )
    for name, ok, allowed in rules:
      value = getattr(self, name)
      if not isinstance(value, jax.core.Tracer):  # Traced (one compile for many): no value yet.
        errors.check_value(f"attack.{name}", value, ok, allowed)

  @classmethod
  def from_config(cls, attack_config) -> "AttackConfig":
    """From config.attack (a ConfigDict with these fields)."""
    return cls(epsilon=attack_config.epsilon, step_size=attack_config.step_size,
               num_steps=attack_config.num_steps,
               random_start_prob=attack_config.random_start_prob,
               targeted=attack_config.targeted, random_start=attack_config.random_start)


def random_wrong_labels(rng: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """A uniformly random label different from each true label."""
  offset = jax.random.randint(rng, labels.shape, 1, num_classes)
  return (labels + offset) % num_classes


def start_coin(rng: jax.Array, config: AttackConfig) -> jax.Array:
  """One batch's random-start coin (True: start from noise) for random_start="per_batch"."""
  return jax.random.bernoulli(rng, config.random_start_prob)


def _random_start_and_targets(rng: jax.Array, images: jax.Array, labels: jax.Array,
                              coin: jax.Array | None, config: AttackConfig,
                              num_classes: int) -> tuple[jax.Array, jax.Array]:
  """(offset of the random start, labels to attack) drawn from one key.

  Shapes follow `labels`: a batch ([B] labels) or, under vmap, one example ([] label). `coin`,
  if given, decides the random start instead of a coin drawn here.
  """
  start_rng, target_rng = jax.random.split(rng)
  attack_labels = (random_wrong_labels(target_rng, labels, num_classes) if config.targeted
                   else labels)
  noise_rng, coin_rng = jax.random.split(start_rng)
  noise = jax.random.uniform(noise_rng, images.shape, jnp.float32, -config.epsilon,
                             config.epsilon)
  if coin is None:
    coin = jax.random.bernoulli(coin_rng, config.random_start_prob,
                                labels.shape + (1,) * (images.ndim - labels.ndim))
  return jnp.where(coin, noise, 0.0), attack_labels


def pgd_linf(loss_fn: LossFn, images: jax.Array, labels: jax.Array, rng: jax.Array,
             config: AttackConfig, num_classes: int, *, rng_per_example: bool = False,
             batch_coin: jax.Array | None = None) -> jax.Array:
  """Returns adversarial images within `epsilon` (L∞) of `images` and inside [0, 255].

  Untargeted: ascend the loss of the true label. Targeted: descend the loss of a random wrong
  label. The result carries no gradient.

  `rng` is one key for the whole batch, or with `rng_per_example` one key per example (leading
  axis = batch): then an example's random start and target depend on its own key only, not on
  which batch or micro-batch it is in or where. The random-start coin is per example, or with
  random_start="per_batch" one for the whole batch: `batch_coin` if given (the caller keeps it
  the same across a batch's micro-batches), else drawn from a one-key `rng`. With per-example
  keys and no `batch_coin` (evaluation scores examples alone) the coins stay per example.
  """
  images = images.astype(jnp.float32)
  if batch_coin is None and config.random_start == "per_batch" and not rng_per_example:
    rng, coin_rng = jax.random.split(rng)
    batch_coin = start_coin(coin_rng, config)
  draw = functools.partial(_random_start_and_targets, coin=batch_coin, config=config,
                           num_classes=num_classes)
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


def quantize(adversarial: jax.Array, images: jax.Array, epsilon: float) -> jax.Array:
  """`adversarial` rounded to uint8 pixels that stay within `epsilon` of `images`.

  Rounding moves a pixel by at most 0.5; the bounds are rounded inwards, so for integral clean
  pixels (what the input pipeline delivers) the result stays inside the L∞ ball and [0, 255].
  """
  images = images.astype(jnp.float32)
  lower = jnp.ceil(jnp.maximum(images - epsilon, 0.0))
  upper = jnp.floor(jnp.minimum(images + epsilon, PIXEL_MAX))
  return jnp.clip(jnp.round(adversarial), lower, upper).astype(jnp.uint8)
