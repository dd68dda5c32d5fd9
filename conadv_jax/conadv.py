"""The train step of vanilla, DisAdv and ConAdv: one code path (Algorithm 1 of the paper).

At step t, reading only θ_t:
  task A: the weight gradient on clean batch t (main BN) plus the adversarial version of batch t
          that was made τ steps earlier (adversarial BN);
  task B: the adversarial version of batch t+τ, kept in a FIFO until step t+τ.
Neither task reads the other's output, so XLA can run them side by side: the critical path of a
step is one forward/backward instead of two.

The FIFO holds τ adversarial batches as a ring buffer: slot t mod τ holds batch t's. Batch t+τ
goes into the very slot batch t leaves, since t+τ ≡ t (mod τ). With τ = 0 there is no FIFO and
the attack on batch t feeds the gradient directly: that is DisAdv, two sequential passes.
Vanilla skips the attack. Randomness comes from (seed, batch index), so runs are reproducible
and resumable.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from conadv_jax import attacks
from conadv_jax import losses
from conadv_jax.norm import ADV, MAIN

METHODS = ("vanilla", "disadv", "conadv")
Batch = dict[str, jax.Array]  # "image": [B, H, W, C] pixels 0-255, "label": [B] int.
# forward(params, batch_stats, images, train=..., branch=...) -> (logits, new batch_stats).
ForwardFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """What the step computes; `staleness` is τ (ConAdv only)."""
  method: str
  num_classes: int
  staleness: int = 0
  attack: attacks.AttackConfig = attacks.AttackConfig()
  clean_weight: float = 1.0
  adv_weight: float = 1.0
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}: choose one of {METHODS}.")
    if self.staleness < 0 or (self.staleness > 0) != (self.method == "conadv"):
      raise ValueError(f"staleness={self.staleness} with method={self.method!r}: conadv needs "
                       "staleness >= 1; vanilla and disadv need 0.")


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; checkpointing it makes resume exact."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  # [τ, B, H, W, C]: slot i holds the adversarial batch of a step ≡ i mod τ; None when τ = 0.
  adv_fifo: jax.Array | None
  rng: jax.Array  # Root key of the attacks; the attack on batch i uses fold_in(rng, i).

  @classmethod
  def create(cls, *, params, batch_stats, tx: optax.GradientTransformation, staleness: int,
             batch_shape: tuple[int, ...], rng: jax.Array) -> "TrainState":
    """A step-0 state; `batch_shape` is one global batch of images, (B, H, W, C)."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), rng=rng,
               adv_fifo=jnp.zeros((staleness, *batch_shape), jnp.float32) if staleness else None)


def linen_forward(module, has_branches: bool = True) -> ForwardFn:
  """A ForwardFn for a linen module called as module(x, train=..., [branch=...])."""

  def forward(params, batch_stats, images, *, train: bool, branch: str = MAIN):
    variables = {"params": params, "batch_stats": batch_stats}
    kwargs = {"branch": branch} if has_branches else {}
    if not train:
      return module.apply(variables, images, train=False, **kwargs), batch_stats
    logits, updated = module.apply(variables, images, train=True, mutable=["batch_stats"],
                                   **kwargs)
    return logits, updated["batch_stats"]

  return forward


def fifo_pop_push(fifo: jax.Array | None, step: jax.Array,
                  newest: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Returns (batch `step`'s adversarial examples, the FIFO holding `newest` in their place)."""
  if fifo is None:  # τ = 0 (DisAdv): nothing is pending; use the fresh attack.
    return newest, fifo
  slot = step % fifo.shape[0]
  return fifo[slot], fifo.at[slot].set(newest)


def make_attack_fn(forward: ForwardFn, cfg: MethodConfig):
  """attack(params, batch_stats, rng, batch, batch_index) -> adversarial images.

  The attack sees the adversarial BN with the attacked batch's own statistics; the running
  averages that forward pass computes are dropped, so the attack changes no state.
  """

  def attack(params, batch_stats, rng, batch: Batch, batch_index) -> jax.Array:
    def per_example_loss(images, labels):
      logits, _ = forward(params, batch_stats, images, train=True, branch=ADV)
      return losses.cross_entropy(logits, labels)

    return attacks.pgd_linf(per_example_loss, batch["image"], batch["label"],
                            jax.random.fold_in(rng, batch_index), cfg.attack, cfg.num_classes)

  return attack


def make_train_step(forward: ForwardFn, tx: optax.GradientTransformation, cfg: MethodConfig,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None):
  """train_step(state, batch_t, batch_ahead) -> (state, metrics); batch_ahead is batch t+τ.

  For τ = 0 (vanilla, DisAdv) pass batch t as batch_ahead.
  """
  attack = make_attack_fn(forward, cfg)

  def loss_fn(params, batch_stats, batch: Batch, adv_images: jax.Array | None):
    def branch_loss(images, stats, branch):
      logits, stats = forward(params, stats, images, train=True, branch=branch)
      per_example = losses.cross_entropy(logits, batch["label"], cfg.label_smoothing)
      return per_example.mean(), losses.topk_correct(logits, batch["label"]).mean(), stats

    clean_loss, clean_top1, batch_stats = branch_loss(batch["image"], batch_stats, MAIN)
    metrics = {"clean_loss": clean_loss, "clean_top1": clean_top1}
    loss = cfg.clean_weight * clean_loss
    if adv_images is not None:
      adv_loss, adv_top1, batch_stats = branch_loss(adv_images, batch_stats, ADV)
      metrics |= {"adv_loss": adv_loss, "adv_top1": adv_top1}
      loss += cfg.adv_weight * adv_loss
    return loss, (batch_stats, metrics | {"loss": loss})

  def train_step(state: TrainState, batch: Batch, batch_ahead: Batch):
    adv_images, adv_fifo = None, state.adv_fifo
    if cfg.method != "vanilla":
      # Task B: adversarial examples for batch t+τ with θ_t.
      ahead_adv = attack(state.params, state.batch_stats, state.rng, batch_ahead,
                         state.step + cfg.staleness)
      adv_images, adv_fifo = fifo_pop_push(state.adv_fifo, state.step, ahead_adv)
    # Task A: gradient with θ_t on batch t and its adversarial version made at step t−τ.
    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, adv_images)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics |= {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, adv_fifo=adv_fifo)
    return new_state, metrics

  return train_step


def make_fill_fifo(forward: ForwardFn, cfg: MethodConfig):
  """fill_slot(state, batch, offset) -> state whose FIFO holds the attack on batch step+offset.

  Before the first step of a fresh run the FIFO must hold attacks on batches 0..τ-1; calling
  this for offsets 0..τ-1 fills it with θ_0, one compiled program whatever τ is.
  """
  attack = make_attack_fn(forward, cfg)

  def fill_slot(state: TrainState, batch: Batch, offset: jax.Array) -> TrainState:
    index = state.step + offset
    adv = attack(state.params, state.batch_stats, state.rng, batch, index)
    return state.replace(adv_fifo=state.adv_fifo.at[index % cfg.staleness].set(adv))

  return fill_slot
