"""Sharpness: the top eigenvalue of the training loss's Hessian, by power iteration.

The paper's third claim is that ConAdv finds flatter minima than vanilla large-batch training. The
usual measure (Keskar et al. 2017; Yao et al. 2018) is the largest eigenvalue of the Hessian of
the training loss at the final parameters. A network's Hessian has as many rows as parameters,
so it is never formed: power iteration needs only Hessian-vector products, and
H v = d/dε ∇L(θ + ε v) at ε = 0 is one forward-mode derivative (`jax.jvp`) of the reverse-mode
gradient (`jax.grad`), "forward over reverse", at about the cost of two gradients.

The loss is the one the network is trained on, restricted to the parts that depend only on the
parameters and a fixed set of examples: mean cross-entropy, main BN in inference mode (running
averages). In training mode each example's loss would depend on the others in its BN group,
and the result on how the subset is grouped and chunked. Weight decay is left out (it adds its
coefficient to every eigenvalue).

Usage (what results.json's sharpness.top_hessian_eigenvalue holds):

  loss = make_training_loss(forward, state.batch_stats, images, labels, chunk_size=256)
  result = top_hessian_eigenvalue(loss, state.params, num_iterations=20, rng=key)
  result.eigenvalue, result.num_iterations, result.relative_change
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from conadv_jax.method import losses
from conadv_jax.method.conadv import ForwardFn
from conadv_jax.method.norm import MAIN

LossFn = Callable[[Any], jax.Array]  # params -> scalar loss.


class PowerIterationResult(NamedTuple):
  """What power iteration found, and how settled it was when it stopped.

  Attributes:
    eigenvalue: the Rayleigh quotient vᵀHv of the last unit vector v: the estimate of the
      eigenvalue of largest magnitude (negative if that one is; at a minimum it is the largest).
    num_iterations: Hessian-vector products computed (<= the num_iterations asked for).
    relative_change: |λ_k − λ_{k−1}| / max(|λ_k|, |λ_{k−1}|) at the last iteration; inf after
      a single one. A value far above the tolerance means the estimate had not settled: the top
      two eigenvalues are close in magnitude, and more iterations are needed.
  """
  eigenvalue: float
  num_iterations: int
  relative_change: float


def hessian_vector_product(loss_fn: LossFn, params: Any, vector: Any) -> Any:
  """H(params) @ vector for the Hessian of `loss_fn`, by forward-over-reverse differentiation."""
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _random_unit_vector(rng: jax.Array, params: Any) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  vector = [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.vdot(v, v) for v in vector))
  # jax.jvp wants tangents of the parameters' own dtypes.
  return treedef.unflatten([(v / norm).astype(jnp.result_type(x)) for v, x in zip(vector, leaves)])


def top_hessian_eigenvalue(loss_fn: LossFn, params: Any, *, num_iterations: int,
                           rng: jax.Array, tolerance: float = 1e-4) -> PowerIterationResult:
  """The eigenvalue of largest magnitude of the Hessian of `loss_fn` at `params`.

  Power iteration from a random unit vector (from `rng`): v ← Hv/‖Hv‖, with the estimate
  λ = vᵀHv (a Rayleigh quotient: its error shrinks like (λ₂/λ₁)^{2k}, twice as fast as v's).
  Stops after `num_iterations` products, or earlier once the estimate changes by less than
  `tolerance` relative to itself (0: never earlier). Each product is one jitted call, so the host
  sees every estimate; its memory is that of about two gradients of `loss_fn` (chunked by
  make_training_loss).

  Args:
    loss_fn: params -> scalar, differentiable twice (e.g. make_training_loss). Arrays it
      closes over become constants of the compiled program; hold large ones as the arguments
      of a jax.tree_util.Partial (as make_training_loss does) instead.
    params: the point (a pytree of float arrays) where the Hessian is taken.
    num_iterations: the most Hessian-vector products to compute (>= 1).
    rng: key of the starting vector.
    tolerance: relative change of the estimate below which it counts as settled.

  Returns:
    PowerIterationResult(eigenvalue, num_iterations used, last relative change).
  """
  if num_iterations < 1:
    raise ValueError(f"num_iterations={num_iterations}: power iteration needs at least 1.")
  # Passed to jit as an argument: a Partial's arrays (make_training_loss's examples) are then
  # inputs of the program, not constants copied into it.
  if not isinstance(loss_fn, jax.tree_util.Partial):
    loss_fn = jax.tree_util.Partial(loss_fn)

  @jax.jit
  def step(loss_fn, params, vector):
    product = hessian_vector_product(loss_fn, params, vector)
    eigenvalue = _tree_vdot(vector, product)
    norm = jnp.sqrt(_tree_vdot(product, product))
    # A zero product (a flat direction everywhere) keeps v: the estimate stays 0 and settles.
    safe = jnp.where(norm > 0, norm, 1.0)
    next_vector = jax.tree.map(lambda p, v: jnp.where(norm > 0, p / safe, v), product, vector)
    return eigenvalue, next_vector

  vector = _random_unit_vector(rng, params)
  previous, relative_change = None, float("inf")
  for iteration in range(1, num_iterations + 1):
    eigenvalue, vector = step(loss_fn, params, vector)
    eigenvalue = float(eigenvalue)
    if previous is not None:
      scale = max(abs(eigenvalue), abs(previous))
      relative_change = abs(eigenvalue - previous) / scale if scale > 0 else 0.0
      if relative_change < tolerance:
        break
    previous = eigenvalue
  return PowerIterationResult(eigenvalue, iteration, relative_change)


def make_training_loss(forward: ForwardFn, batch_stats: Any, images: jax.Array,
                       labels: jax.Array, *, chunk_size: int = 256,
                       label_smoothing: float = 0.0) -> jax.tree_util.Partial:
  """loss(params): mean cross-entropy over (images, labels), main BN in inference mode.

  The loss is a jax.tree_util.Partial holding the examples and `batch_stats` as pytree leaves,
  so a jitted function that takes it as an argument reads them as inputs; closed over, they
  would be copied into the compiled program as constants (hundreds of MB for ImageNet).

  The examples are split into chunks of `chunk_size` (the last one padded with weight 0), whose
  losses are summed by `lax.scan` with each chunk rematerialised (`jax.checkpoint`): the
  gradient, and the Hessian-vector product through it, then hold one chunk's activations at a
  time, so a fixed subset of several thousand examples fits where one batch does. With BN in
  inference mode every example's loss is independent of the others, so the chunking does not
  change the value.

  Args:
    forward: forward(params, batch_stats, images, train=..., branch=...) (conadv.ForwardFn).
    batch_stats: the BN running averages to evaluate with.
    images: [N, H, W, C] pixels on the 0-255 scale (any dtype; uint8 saves memory).
    labels: [N] integer labels.
    chunk_size: examples per forward pass.
    label_smoothing: as in training, if the sharpness of the smoothed loss is wanted.
  """
  num_examples = images.shape[0]
  if num_examples < 1 or labels.shape[:1] != (num_examples,):
    raise ValueError(f"images {images.shape} and labels {labels.shape} must hold the same "
                     "positive number of examples.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1.")
  chunk_size = min(chunk_size, num_examples)
  num_chunks = -(-num_examples // chunk_size)
  pad = num_chunks * chunk_size - num_examples
  weights = jnp.concatenate([jnp.ones(num_examples, jnp.float32), jnp.zeros(pad, jnp.float32)])
  images = jnp.concatenate([jnp.asarray(images), jnp.zeros((pad, *images.shape[1:]),
                                                           images.dtype)])
  labels = jnp.concatenate([jnp.asarray(labels, jnp.int32), jnp.zeros(pad, jnp.int32)])
  chunks = (images.reshape(num_chunks, chunk_size, *images.shape[1:]),
            labels.reshape(num_chunks, chunk_size), weights.reshape(num_chunks, chunk_size))

  def loss(chunks, batch_stats, params) -> jax.Array:
    @jax.checkpoint
    def chunk_loss(chunk):
      chunk_images, chunk_labels, chunk_weights = chunk
      logits, _ = forward(params, batch_stats, chunk_images.astype(jnp.float32), train=False,
                          branch=MAIN)
      per_example = losses.cross_entropy(logits, chunk_labels, label_smoothing)
      return jnp.sum(per_example * chunk_weights)

    def body(total, chunk):
      return total + chunk_loss(chunk), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total / num_examples

  return jax.tree_util.Partial(loss, chunks, batch_stats)
