"""The train step of vanilla, DisAdv and ConAdv: one code path (Algorithm 1 of the paper).

At step t, reading only θ_t:
  task A: the weight gradient on clean batch t (main BN) plus the adversarial version of batch t
          that was made τ steps earlier (adversarial BN), and the batch's AutoAugment view (aug BN)
          when the recipe has one;
  task B: the adversarial version of batch t+τ, kept in a FIFO until step t+τ.
Neither task reads the other's output, so XLA can run them side by side: the critical path of a
step is one forward/backward instead of two.

The FIFO holds τ adversarial batches as a ring buffer: slot t mod τ holds batch t's. Batch t+τ
goes into the very slot batch t leaves, since t+τ ≡ t (mod τ). With τ = 0 there is no FIFO and
the attack on batch t feeds the gradient directly: that is DisAdv, two sequential passes.
Vanilla skips the attack. The FIFO stores 8-bit images (the attack's output rounded, as every
method's is) with the labels they were attacked for, so task A never pairs them with another
batch's labels. Randomness comes from (seed, batch index, row), so runs are reproducible and
resumable, and do not depend on the device count or on gradient accumulation.

With grad_accum_steps = k, each global batch is k micro-batches (the i-th chunk of every
device's rows), processed one after another in a lax.scan: task B attacks micro-batch i of batch
t+τ and task A takes the gradient on micro-batch i of batch t; the gradients, metrics and BN
running averages are averaged and θ is updated once.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from conadv_jax import errors
from conadv_jax.method import attacks, losses
from conadv_jax.method.norm import ADV, AUG, MAIN

METHODS = ("vanilla", "disadv", "conadv")
LOSS_WEIGHTINGS = ("sum", "mean")  # Branch losses summed (Algorithm 1) or averaged (reference).
# "image": [B, H, W, C] pixels 0-255 (uint8 or float), "label": [B] int, and with an augmented
# view "aug_image" like "image".
Batch = dict[str, jax.Array]
# forward(params, batch_stats, images, train=..., branch=...) -> (logits, new batch_stats).
ForwardFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """What the step computes; `staleness` is τ (ConAdv only).

  `aug_view`: batches carry "aug_image", trained through the "aug" BN with weight 1.
  `loss_weighting`: "sum" adds the weighted branch losses (Algorithm 1); "mean" divides that sum
  by the number of branches, as the reference's one concatenated batch does.
  Its fields are checked here, where they are read: errors.ConfigError names config.FIELD.
  """
  method: str
  num_classes: int
  staleness: int = 0
  attack: attacks.AttackConfig = attacks.AttackConfig()
  clean_weight: float = 1.0
  adv_weight: float = 1.0
  label_smoothing: float = 0.0
  aug_view: bool = False
  loss_weighting: str = "sum"
  grad_accum_steps: int = 1

  def __post_init__(self):
    errors.check_value("method", self.method, lambda v: v in METHODS,
                       f"choose one of {', '.join(METHODS)}")
    errors.check_value("staleness", self.staleness, lambda v: v >= 0, "it must be >= 0")
    errors.check_value("staleness", self.staleness,
                       lambda v: self.method == "conadv" or v == 0,
                       f"staleness > 0 needs method='conadv' (method is {self.method!r}); set "
                       "--config.staleness=0 or --config.method=conadv")
    errors.check_value("staleness", self.staleness,
                       lambda v: self.method != "conadv" or v >= 1,
                       "conadv needs staleness >= 1 (staleness 0 is method='disadv')")
    for field in ("clean_weight", "adv_weight"):
      errors.check_value(field, getattr(self, field), *errors.at_least(0))
    errors.check_value("label_smoothing", self.label_smoothing, lambda v: 0 <= v < 1,
                       "it must be in [0, 1)")
    errors.check_value("loss_weighting", self.loss_weighting, lambda v: v in LOSS_WEIGHTINGS,
                       f"choose one of {', '.join(LOSS_WEIGHTINGS)}")
    errors.check_value("grad_accum_steps", self.grad_accum_steps, lambda v: v >= 1,
                       "it must be >= 1")

  @property
  def adversarial(self) -> bool:
    return self.method != "vanilla"


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; checkpointing it makes resume exact."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  # {"image": [τ, B, H, W, C] uint8, "label": [τ, B] int32}: slot i holds the adversarial batch
  # of a step ≡ i mod τ and its labels; None when τ = 0.
  adv_fifo: Batch | None
  rng: jax.Array  # Root key of the attacks; the attack on batch i uses fold_in(rng, i).

  @classmethod
  def create(cls, *, params, batch_stats, tx: optax.GradientTransformation, staleness: int,
             batch_shape: tuple[int, ...], rng: jax.Array) -> "TrainState":
    """A step-0 state; `batch_shape` is one global batch of images, (B, H, W, C)."""
    fifo = None
    if staleness:
      fifo = {"image": jnp.zeros((staleness, *batch_shape), jnp.uint8),
              "label": jnp.zeros((staleness, batch_shape[0]), jnp.int32)}
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), rng=rng, adv_fifo=fifo)


def linen_forward(module, has_branches: bool = True) -> ForwardFn:
  """A ForwardFn for a linen module called as module(x, train=..., [branch=...])."""

  def forward(params, batch_stats, images, *, train: bool, branch: str = MAIN):
    variables = {"params": params, "batch_stats": batch_stats}
    kwargs = {"branch": branch} if has_branches else {}
    images = images.astype(jnp.float32)  # uint8 from the host; the model normalises.
    if not train:
      return module.apply(variables, images, train=False, **kwargs), batch_stats
    logits, updated = module.apply(variables, images, train=True, mutable=["batch_stats"],
                                   **kwargs)
    return logits, updated["batch_stats"]

  return forward


def split_micro(x: jax.Array, k: int, num_shards: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch i is the i-th chunk of each of the shards' rows.

  Taking a chunk from every shard keeps each micro-batch spread over all devices, and a BN group
  that divides the chunk is a group of the whole batch too.
  """
  if k == 1:
    return x[None]
  x = x.reshape(num_shards, k, x.shape[0] // (num_shards * k), *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(k, -1, *x.shape[3:])


def merge_micro(x: jax.Array, num_shards: int) -> jax.Array:
  """The inverse of split_micro."""
  k = x.shape[0]
  if k == 1:
    return x[0]
  x = x.reshape(k, num_shards, x.shape[1] // num_shards, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])


def scan_micro(fn: Callable, micro: Any) -> tuple[Any, Any]:
  """Runs fn over the micro-batches of `micro` (leading axis k) one after another.

  fn(micro_batch) -> (summed, stacked): returns (the sum of `summed` over micro-batches, the
  `stacked` outputs on a leading axis k). Summing in the loop's carry keeps one gradient in
  memory whatever k is.
  """
  first = jax.tree.map(lambda x: x[0], micro)
  if jax.tree.leaves(micro)[0].shape[0] == 1:
    # No loop for one micro-batch: XLA:CPU gives convolutions inside loops slow layouts.
    summed, stacked = fn(first)
    return summed, jax.tree.map(lambda x: x[None], stacked)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, first)[0])

  def body(total, micro_batch):
    summed, stacked = fn(micro_batch)
    return jax.tree.map(jnp.add, total, summed), stacked

  return jax.lax.scan(body, zeros, micro)


def make_attack_fn(forward: ForwardFn, cfg: MethodConfig):
  """attack(params, batch_stats, rng, batch, batch_index, rows) -> adversarial batch.

  Returns {"image": uint8 adversarial images, "label": the labels they were made for}. The
  attack sees the adversarial BN with the attacked (micro-)batch's own statistics; the running
  averages that forward pass computes are dropped, so the attack changes no state. Example
  `rows[j]` (its row in the global batch) is keyed by (rng, batch_index, rows[j]); with
  random_start="per_batch" the whole batch shares one coin from (rng, batch_index).
  """

  def attack(params, batch_stats, rng, batch: Batch, batch_index, rows) -> Batch:
    def per_example_loss(images, labels):
      logits, _ = forward(params, batch_stats, images, train=True, branch=ADV)
      return losses.cross_entropy(logits, labels)

    coin_key, example_root = jax.random.split(jax.random.fold_in(rng, batch_index))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_root, rows)
    coin = (attacks.start_coin(coin_key, cfg.attack)
            if cfg.attack.random_start == "per_batch" else None)
    adv = attacks.pgd_linf(per_example_loss, batch["image"], batch["label"], keys, cfg.attack,
                           cfg.num_classes, rng_per_example=True, batch_coin=coin)
    return {"image": attacks.quantize(adv, batch["image"], cfg.attack.epsilon),
            "label": batch["label"].astype(jnp.int32)}

  return attack


def make_loss_fn(forward: ForwardFn, cfg: MethodConfig):
  """loss(params, batch_stats, batch, adv) -> (loss, (batch_stats, metrics)): task A's loss."""

  def loss_fn(params, batch_stats, batch: Batch, adv: Batch | None):
    branches = [("clean", MAIN, batch["image"], batch["label"], cfg.clean_weight)]
    if adv is not None:
      branches.append(("adv", ADV, adv["image"], adv["label"], cfg.adv_weight))
    if cfg.aug_view:
      branches.append(("aug", AUG, batch["aug_image"], batch["label"], 1.0))
    loss, metrics = 0.0, {}
    for name, branch, images, labels, weight in branches:
      logits, batch_stats = forward(params, batch_stats, images, train=True, branch=branch)
      branch_loss = losses.cross_entropy(logits, labels, cfg.label_smoothing).mean()
      metrics |= {f"{name}_loss": branch_loss,
                  f"{name}_top1": losses.topk_correct(logits, labels).mean()}
      loss += weight * branch_loss
    if cfg.loss_weighting == "mean":
      loss /= len(branches)
    return loss, (batch_stats, metrics | {"loss": loss})

  return loss_fn


def make_train_step(forward: ForwardFn, tx: optax.GradientTransformation, cfg: MethodConfig,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None, *,
                    num_shards: int = 1):
  """train_step(state, batch_t, batch_ahead) -> (state, metrics); batch_ahead is batch t+τ.

  For τ = 0 (vanilla, DisAdv) pass batch t as batch_ahead. `num_shards` is the number of
  devices the batch is split over (only gradient accumulation needs it).
  """
  attack = make_attack_fn(forward, cfg)
  loss_fn = make_loss_fn(forward, cfg)
  k = cfg.grad_accum_steps

  def micro_step(state: TrainState, batch: Batch, ahead: Batch, pending: Batch | None, rows):
    """Tasks A and B on one micro-batch: ((gradients, BN statistics, metrics), new adv batch)."""
    new_adv = None
    if cfg.adversarial:
      # Task B: adversarial examples for batch t+τ with θ_t.
      new_adv = attack(state.params, state.batch_stats, state.rng, ahead,
                       state.step + cfg.staleness, rows)
    # Task A: gradient with θ_t on batch t and its adversarial version made at step t−τ.
    adv = new_adv if cfg.staleness == 0 else pending
    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, adv)
    if k > 1:  # Average the running averages' changes: a branch left alone stays bit-exact.
      batch_stats = jax.tree.map(jnp.subtract, batch_stats, state.batch_stats)
    return (grads, batch_stats, metrics), new_adv

  def train_step(state: TrainState, batch: Batch, batch_ahead: Batch):
    pending = None
    if state.adv_fifo is not None:
      pending = jax.tree.map(lambda f: f[state.step % cfg.staleness], state.adv_fifo)
    rows = jnp.arange(batch["label"].shape[0], dtype=jnp.int32)
    split = lambda tree: jax.tree.map(lambda x: split_micro(x, k, num_shards), tree)
    micro = (split(batch), split(batch_ahead), split(pending), split(rows))
    summed, new_adv = scan_micro(lambda xs: micro_step(state, *xs), micro)
    # Equal micro-batches: the means of their means are the whole batch's means.
    grads, batch_stats, metrics = jax.tree.map(lambda x: x / k, summed)
    if k > 1:
      batch_stats = jax.tree.map(jnp.add, state.batch_stats, batch_stats)
    adv_fifo = state.adv_fifo
    if adv_fifo is not None:
      new_adv = jax.tree.map(lambda x: merge_micro(x, num_shards), new_adv)
      adv_fifo = jax.tree.map(lambda f, n: f.at[state.step % cfg.staleness].set(n), adv_fifo,
                              new_adv)
    return apply_update(state, tx, grads, batch_stats, adv_fifo, metrics, learning_rate_fn)

  return train_step


def apply_update(state: TrainState, tx: optax.GradientTransformation, grads: Any,
                 batch_stats: Any, adv_fifo: Batch | None, metrics: dict[str, jax.Array],
                 learning_rate_fn: Callable[[jax.Array], jax.Array] | None):
  """The end of every step, whatever the layout: one optimizer update and the step's metrics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics |= {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, adv_fifo=adv_fifo)
  return new_state, metrics


def make_fill_fifo(forward: ForwardFn, cfg: MethodConfig, *, num_shards: int = 1):
  """fill_slot(state, batch, offset) -> state whose FIFO holds the attack on batch step+offset.

  Before the first step of a fresh run the FIFO must hold attacks on batches 0..τ-1; calling
  this for offsets 0..τ-1 fills it with θ_0, one compiled program whatever τ is. With gradient
  accumulation the attack runs micro-batch by micro-batch, as in the step.
  """
  attack = make_attack_fn(forward, cfg)
  k = cfg.grad_accum_steps

  def fill_slot(state: TrainState, batch: Batch, offset: jax.Array) -> TrainState:
    index = state.step + offset
    rows = jnp.arange(batch["label"].shape[0], dtype=jnp.int32)
    micro = jax.tree.map(lambda x: split_micro(x, k, num_shards), (batch, rows))
    _, adv = scan_micro(lambda xs: ((), attack(state.params, state.batch_stats, state.rng, xs[0],
                                               index, xs[1])), micro)
    adv = jax.tree.map(lambda x: merge_micro(x, num_shards), adv)
    return state.replace(adv_fifo=jax.tree.map(lambda f, a: f.at[index % cfg.staleness].set(a),
                                               state.adv_fifo, adv))

  return fill_slot
