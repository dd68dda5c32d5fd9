"""Power iteration against exact Hessians (jax.hessian + numpy eigvalsh) of small models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conadv_jax.method import conadv, losses, models, sharpness


def top_by_magnitude(matrix: np.ndarray) -> float:
  """The eigenvalue of largest magnitude of a symmetric matrix, in float64."""
  eigenvalues = np.linalg.eigvalsh(np.asarray(matrix, np.float64))
  return float(eigenvalues[np.argmax(np.abs(eigenvalues))])


def exact_hessian(loss_fn, params) -> np.ndarray:
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda f: loss_fn(unravel(f)))(flat))


def quadratic(spectrum, seed: int = 0):
  """(loss, params): 0.5 θᵀAθ + cᵀθ over a two-leaf pytree, A = Q diag(spectrum) Qᵀ."""
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(len(spectrum), len(spectrum)))
  a = (q * np.asarray(spectrum)) @ q.T
  c = rng.randn(len(spectrum))
  params = {"w": jnp.asarray(rng.randn(3), jnp.float32),
            "m": jnp.asarray(rng.randn(2, (len(spectrum) - 3) // 2), jnp.float32)}

  def loss(p):
    flat, _ = ravel_pytree(p)
    return 0.5 * flat @ jnp.asarray(a, jnp.float32) @ flat + jnp.asarray(c, jnp.float32) @ flat

  return loss, params, a


@pytest.mark.parametrize("spectrum", [
    [3.0, -1.5, 1.0, 0.5, 0.2, -0.1, 0.05],  # Positive top eigenvalue.
    [-4.0, 2.0, 1.0, 0.5, 0.3, -0.2, 0.1],  # The largest magnitude is negative.
])
def test_quadratic_top_eigenvalue(spectrum):
  loss, params, a = quadratic(spectrum)
  hessian = exact_hessian(loss, params)
  np.testing.assert_allclose(hessian, a, rtol=1e-4, atol=1e-5)  # The test's own premise.
  want = top_by_magnitude(hessian)
  assert want == pytest.approx(max(spectrum, key=abs), rel=1e-5)
  result = sharpness.top_hessian_eigenvalue(loss, params, num_iterations=300,
                                            rng=jax.random.PRNGKey(0), tolerance=1e-7)
  assert result.eigenvalue == pytest.approx(want, rel=1e-3)
  assert result.num_iterations <= 300 and result.relative_change < 1e-7


def tiny_mlp():
  """An MLP with 57 parameters (4 inputs, 6 hidden units, 3 classes), its data and ForwardFn."""
  model = models.create_model("MLP", num_classes=3, mlp_widths=(6,), adv_bn="shared",
                              pixel_mean=(100.0,), pixel_std=(60.0,))
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (64, 2, 2, 1)).astype(np.uint8)
  labels = rng.randint(0, 3, 64)
  variables = model.init(jax.random.PRNGKey(0), images.astype(np.float32), train=False)
  # Running averages unlike the initial 0 and 1, so inference mode visibly uses them.
  batch_stats = jax.tree.map(lambda v: v + rng.uniform(0.2, 0.8, v.shape).astype(np.float32),
                             variables["batch_stats"])
  return model, variables["params"], batch_stats, images, labels


def direct_loss(model, batch_stats, images, labels):
  """Mean cross-entropy of the whole set in one inference-mode call, written without the helper."""
  def loss(params):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         images.astype(np.float32), train=False)
    return losses.cross_entropy(logits, labels).mean()
  return loss


def test_mlp_training_loss_top_eigenvalue_matches_the_exact_hessian():
  model, params, batch_stats, images, labels = tiny_mlp()
  assert sum(x.size for x in jax.tree.leaves(params)) == 57
  loss = sharpness.make_training_loss(conadv.linen_forward(model), batch_stats, images, labels,
                                      chunk_size=24)  # 3 chunks, the last padded.
  hessian = exact_hessian(direct_loss(model, batch_stats, images, labels), params)
  np.testing.assert_allclose(exact_hessian(loss, params), hessian, rtol=1e-4, atol=1e-5)
  want = top_by_magnitude(hessian)
  result = sharpness.top_hessian_eigenvalue(loss, params, num_iterations=500,
                                            rng=jax.random.PRNGKey(1), tolerance=1e-6)
  assert result.eigenvalue == pytest.approx(want, rel=1e-3)
  assert result.num_iterations < 500 and result.relative_change < 1e-6


@pytest.mark.parametrize("chunk_size", [1, 7, 24, 64, 1000])
def test_chunking_does_not_change_the_loss(chunk_size):
  model, params, batch_stats, images, labels = tiny_mlp()
  loss = sharpness.make_training_loss(conadv.linen_forward(model), batch_stats, images, labels,
                                      chunk_size=chunk_size)
  np.testing.assert_allclose(loss(params), direct_loss(model, batch_stats, images, labels)(params),
                             rtol=1e-6)


def test_loss_uses_bn_running_averages_so_examples_do_not_interact():
  """Inference-mode BN: the loss of a set is the size-weighted mean of its parts' losses."""
  model, params, batch_stats, images, labels = tiny_mlp()
  forward = conadv.linen_forward(model)
  whole = sharpness.make_training_loss(forward, batch_stats, images, labels)(params)
  first = sharpness.make_training_loss(forward, batch_stats, images[:16], labels[:16])(params)
  rest = sharpness.make_training_loss(forward, batch_stats, images[16:], labels[16:])(params)
  np.testing.assert_allclose(whole, (16 * first + 48 * rest) / 64, rtol=1e-6)
  moved = jax.tree.map(lambda v: v + 1.0, batch_stats)
  assert not np.isclose(sharpness.make_training_loss(forward, moved, images, labels)(params),
                        whole)


def test_iterations_and_relative_change_are_reported():
  loss, params, _ = quadratic([1.0, 0.99, 0.5, 0.1, 0.1, 0.1, 0.1])  # Slow: λ₂/λ₁ = 0.99.
  once = sharpness.top_hessian_eigenvalue(loss, params, num_iterations=1, rng=jax.random.PRNGKey(0))
  assert once.num_iterations == 1 and math.isinf(once.relative_change)
  capped = sharpness.top_hessian_eigenvalue(loss, params, num_iterations=5,
                                            rng=jax.random.PRNGKey(0), tolerance=0.0)
  assert capped.num_iterations == 5 and capped.relative_change > 0
  with pytest.raises(ValueError, match="num_iterations"):
    sharpness.top_hessian_eigenvalue(loss, params, num_iterations=0, rng=jax.random.PRNGKey(0))


def test_a_flat_loss_has_eigenvalue_zero():
  params = {"w": jnp.ones(4)}
  result = sharpness.top_hessian_eigenvalue(lambda p: 3.0 * p["w"].sum(), params,
                                            num_iterations=10, rng=jax.random.PRNGKey(0))
  assert result.eigenvalue == 0.0 and result.num_iterations == 2


def test_memory_of_a_product_does_not_grow_with_the_number_of_chunks():
  """Each chunk is rematerialised: 8 chunks need about the temporary memory of 1."""
  model = models.create_model("SmallResNet", num_classes=10, small_resnet_depth=8,
                              small_resnet_width=8, pixel_mean=(100.0,), pixel_std=(60.0,))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)),
                                                train=False))
  temp = {}
  for num_examples in (32, 256):
    def hvp(params, batch_stats, images, labels, vector):
      loss = sharpness.make_training_loss(conadv.linen_forward(model), batch_stats, images,
                                          labels, chunk_size=32)
      return sharpness.hessian_vector_product(loss, params, vector)
    compiled = jax.jit(hvp).lower(
        variables["params"], variables["batch_stats"],
        jax.ShapeDtypeStruct((num_examples, 16, 16, 1), jnp.uint8),
        jax.ShapeDtypeStruct((num_examples,), jnp.int32), variables["params"]).compile()
    temp[num_examples] = compiled.memory_analysis().temp_size_in_bytes
  # Without the rematerialisation, 8 chunks take about 7 times the memory of 1.
  assert temp[256] < 1.5 * temp[32], temp


def test_examples_are_inputs_of_the_compiled_product_not_constants():
  """4,096 Fashion-MNIST-sized images (3.2 MB) must not be copied into the program text."""
  model, _, batch_stats, _, _ = tiny_mlp()
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (4096, 28, 28, 1)).astype(np.uint8)
  labels = rng.randint(0, 3, 4096)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))["params"]
  loss = sharpness.make_training_loss(conadv.linen_forward(model), batch_stats, images, labels,
                                      chunk_size=512)
  text = jax.jit(sharpness.hessian_vector_product).lower(loss, params, params).as_text()
  assert len(text) < 200_000, len(text)
