"""The train step in the variants test_conadv.py does not reach.

bfloat16 compute, branch weights with label smoothing, a shared adversarial BN, per-device BN
groups (read off the compiled program's collectives) and the rate of random starts.
"""
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conadv_jax.method import attacks, conadv, models, parallel
from conadv_jax.method.norm import ADV, MAIN

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 3)
LR = 0.1
# XLA:CPU spends most of a compile in LLVM code generation; level 0 skips its optimisation. The
# HLO passes (SPMD partitioning, collective combining, fusion) run as usual: the collectives
# counted below are the same at the default level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# One untargeted step from the clean image, no random start: easy to write by hand.
FGSM = attacks.AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1, random_start_prob=0.0,
                            targeted=False)


def make_state(params, batch_stats, tx: optax.GradientTransformation, *, staleness: int,
               batch_size: int) -> conadv.TrainState:
  """The only place this file builds a TrainState."""
  return conadv.TrainState.create(params=params, batch_stats=batch_stats, tx=tx,
                                  staleness=staleness, batch_shape=(batch_size, *IMAGE_SHAPE),
                                  rng=jax.random.PRNGKey(1))


def tiny_model(**kwargs) -> models.ResNet:
  return models.create_model("SmallResNet", num_classes=NUM_CLASSES, pixel_mean=(127.5,),
                             pixel_std=(73.6,), small_resnet_depth=8, small_resnet_width=4,
                             **kwargs)


def init_variables(model: models.ResNet, seed: int = 0) -> tuple[Any, Any]:
  """(params, batch_stats): He-normal kernels, unit BN scales, zero biases, from numpy.

  Not model.init: that compiles one random-number kernel per parameter shape (~10 s on the
  shared CPU). Unit scales everywhere (model.init zeroes each block's last one) give every
  weight a gradient, so comparisons of updated parameters are not trivially equal zeros.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, *IMAGE_SHAPE)))
  rng = np.random.RandomState(seed)

  def value(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  variables = jax.tree_util.tree_map_with_path(value, shapes)
  return variables["params"], variables["batch_stats"]


def make_batches(num: int, batch_size: int, seed: int = 0) -> list[conadv.Batch]:
  rng = np.random.RandomState(seed)
  return [{"image": rng.randint(0, 256, (batch_size, *IMAGE_SHAPE)).astype(np.uint8),
           "label": rng.randint(0, NUM_CLASSES, batch_size).astype(np.int32)}
          for _ in range(num)]


def fast_compile(jitted, *args):
  """`jitted` compiled for `args` with FAST_COMPILE; call the result like `jitted`."""
  return jitted.lower(*args).compile(FAST_COMPILE)


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trees_close(got, want, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got, want)


# --- bfloat16 end to end. ---


def run_conadv(dtype: str, batches: list[conadv.Batch], num_steps: int):
  """ConAdv τ=1 on 4 devices through parallel.jit_train_step, from init_variables' init.

  The FIFO starts as TrainState.create leaves it (zeros) rather than filled, which saves a
  compile; from step 2 on the adversarial branch trains on attacks the step made itself.
  """
  model = tiny_model(dtype=dtype, bn_group_size=4)
  params, stats = init_variables(tiny_model(bn_group_size=4))
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=1)
  tx = optax.sgd(LR, momentum=0.9)
  mesh = parallel.make_mesh(jax.devices()[:4])
  state = make_state(params, stats, tx, staleness=1, batch_size=len(batches[0]["label"]))
  state = jax.device_put(state, parallel.state_sharding(mesh, state))
  jitted = parallel.jit_train_step(conadv.make_train_step(conadv.linen_forward(model), tx, cfg),
                                   mesh, state)
  step = fast_compile(jitted, state, batches[0], batches[1])
  history = []
  for t in range(num_steps):
    state, metrics = step(state, batches[t], batches[t + 1])
    history.append(jax.device_get(metrics))
  return params, jax.device_get(state), history


def test_bfloat16_step_keeps_float32_state_and_tracks_float32():
  bf16_shapes = jax.eval_shape(functools.partial(tiny_model(dtype="bfloat16").init, train=False),
                               jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16_shapes)} == {jnp.dtype(jnp.float32)}
  batches = make_batches(4, 16)
  init, f32_state, f32_history = run_conadv("float32", batches, 3)
  _, bf16_state, bf16_history = run_conadv("bfloat16", batches, 3)

  stored = (bf16_state.params, bf16_state.batch_stats, bf16_state.opt_state)
  assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {np.dtype(np.float32)}
  # The FIFO holds 8-bit images and their labels whatever the compute dtype.
  assert jax.tree.map(lambda x: x.dtype, bf16_state.adv_fifo) == {"image": np.uint8,
                                                                  "label": np.int32}
  for metrics in bf16_history:
    assert all(np.isfinite(v) for v in metrics.values()), metrics
  # bfloat16 keeps 8 significant bits (rounding <= 2^-9 = 0.2% per operation); over ~10 layers
  # the losses moved by <= 0.4% in measurements, so 2% leaves a 5x margin.
  keys = ("loss", "clean_loss", "adv_loss")
  for got, want in zip(bf16_history, f32_history):
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=2e-2)
  # The updates differ more: the attack keeps only sign(input gradient), rounding flips the sign
  # of small components (~15% of the adversarial pixels here), and that moves the adversarial
  # gradient: measured 0.08 relative to the float32 update. 0.3 leaves a 4x margin; a broken
  # path (overflow, NaN, a lost update) gives O(1).
  f32_update = jax.tree.map(lambda p, p0: p - p0, f32_state.params, init)
  bf16_update = jax.tree.map(lambda p, p0: p - p0, bf16_state.params, init)
  gap = optax.tree.norm(jax.tree.map(jnp.subtract, bf16_update, f32_update))
  relative_gap = float(gap / optax.tree.norm(f32_update))
  assert relative_gap < 0.3
  # Float32 runs repeat exactly (and agree to ~1e-5 across device counts): a gap this size
  # means the bfloat16 compute was really used.
  assert relative_gap > 1e-3


# --- Branch weights, label smoothing and the shared adversarial BN against hand-written steps. ---


def smoothed_cross_entropy(logits, labels, smoothing: float):
  """-Σ_k t_k log softmax(logits)_k with t = (1 - s) one_hot(label) + s / K, per example."""
  num_classes = logits.shape[-1]
  log_probs = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  one_hot = (labels[:, None] == jnp.arange(num_classes)).astype(jnp.float32)
  targets = (1.0 - smoothing) * one_hot + smoothing / num_classes
  return -jnp.sum(targets * log_probs, axis=-1)


def reference_disadv_step(forward, params, stats, batch, clean_weight, adv_weight, smoothing,
                          *, adv_branch: str):
  """DisAdv by hand: FGSM on `adv_branch` (train mode, statistics dropped), jax.grad, plain SGD.

  Returns (params, batch_stats, metrics) after the step, and batch_stats after its clean pass.
  """
  x, y = batch["image"].astype(jnp.float32), batch["label"]

  def attack_loss(images):
    logits, _ = forward(params, stats, images, train=True, branch=adv_branch)
    return smoothed_cross_entropy(logits, y, 0.0).sum()  # The attack's loss is not smoothed.

  eps = FGSM.epsilon
  x_adv = x + FGSM.step_size * jnp.sign(jax.grad(attack_loss)(x))
  x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 255.0)
  x_adv = jnp.round(x_adv)  # Adversarial images are 8-bit images (ε is a whole number here).

  def loss_fn(p):
    logits, clean_stats = forward(p, stats, x, train=True, branch=MAIN)
    clean = smoothed_cross_entropy(logits, y, smoothing).mean()
    adv_logits, s = forward(p, clean_stats, x_adv, train=True, branch=adv_branch)
    adv = smoothed_cross_entropy(adv_logits, y, smoothing).mean()
    return clean_weight * clean + adv_weight * adv, (s, clean_stats, clean, adv)

  (loss, (new_stats, clean_stats, clean, adv)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  new_params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  metrics = {"loss": loss, "clean_loss": clean, "adv_loss": adv}
  return new_params, new_stats, metrics, clean_stats


def library_disadv_step(model: models.ResNet, cfg: conadv.MethodConfig, params, stats, batch):
  tx = optax.sgd(LR)
  state = make_state(params, stats, tx, staleness=0, batch_size=len(batch["label"]))
  step = fast_compile(jax.jit(conadv.make_train_step(conadv.linen_forward(model), tx, cfg)),
                      state, batch, batch)
  return jax.device_get(step(state, batch, batch))


def reference_step_fn(model: models.ResNet, adv_branch: str, params, stats, batch):
  """reference_disadv_step compiled once; weights and smoothing are traced arguments."""
  fn = jax.jit(functools.partial(reference_disadv_step, conadv.linen_forward(model),
                                 adv_branch=adv_branch))
  args = (params, stats, batch, 1.0, 1.0, 0.0)
  compiled = fast_compile(fn, *args)
  return lambda cw, aw, s: jax.device_get(compiled(params, stats, batch, cw, aw, s))


def test_branch_weights_and_label_smoothing_match_hand_written_loss():
  model = tiny_model(bn_group_size=4)
  params, stats = init_variables(model)
  batch = make_batches(1, 8)[0]
  reference = reference_step_fn(model, ADV, params, stats, batch)
  updated = {}
  for adv_weight in (0.7, 0.2):
    cfg = conadv.MethodConfig(method="disadv", num_classes=NUM_CLASSES, attack=FGSM,
                              clean_weight=0.3, adv_weight=adv_weight, label_smoothing=0.1)
    state, metrics = library_disadv_step(model, cfg, params, stats, batch)
    want_params, want_stats, want_metrics, _ = reference(0.3, adv_weight, 0.1)
    for key, want in want_metrics.items():
      np.testing.assert_allclose(metrics[key], want, rtol=1e-5, err_msg=key)
    assert_trees_close(state.params, want_params)
    assert_trees_close(state.batch_stats, want_stats)
    updated[adv_weight] = state.params
  # The weight is wired: another adversarial weight moves the parameters elsewhere.
  assert max_abs_diff(updated[0.7], updated[0.2]) > 1e-3


def test_shared_adversarial_bn_uses_and_updates_the_main_statistics():
  model = tiny_model(bn_group_size=4, adv_bn="shared")
  params, stats = init_variables(model)
  keys = {k.key for tree in (params, stats)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree) for k in path}
  assert f"bn_{MAIN}" in keys and f"bn_{ADV}" not in keys
  batch = make_batches(1, 8, seed=1)[0]
  cfg = conadv.MethodConfig(method="disadv", num_classes=NUM_CLASSES, attack=FGSM)
  state, metrics = library_disadv_step(model, cfg, params, stats, batch)
  # Reference: the attack and the adversarial forward explicitly on the main BN.
  want_params, want_stats, want_metrics, clean_only = reference_step_fn(
      model, MAIN, params, stats, batch)(1.0, 1.0, 0.0)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-5, err_msg=key)
  assert_trees_close(state.params, want_params)
  assert_trees_close(state.batch_stats, want_stats)
  # Both passes fed the main running averages: after the clean pass alone they would differ.
  assert max_abs_diff(state.batch_stats, clean_only) > 1e-4


# --- Per-device BN groups keep the statistics local: read off the compiled program. ---


def count_all_reduces(hlo_text: str) -> int:
  """All-reduce ops in compiled HLO text: `all-reduce(` or, where async, `all-reduce-start(`.

  Operand references (`%all-reduce.3`) and the `-done` halves of async pairs are not counted.
  """
  return len(re.findall(r"\ball-reduce(?:-start)?\(", hlo_text))


def compiled_step_text(bn_group_size: int | None) -> str:
  model = tiny_model(bn_group_size=bn_group_size)
  cfg = conadv.MethodConfig(method="conadv", num_classes=NUM_CLASSES, staleness=1)
  tx = optax.sgd(LR, momentum=0.9)
  params, stats = init_variables(model)
  state = jax.eval_shape(lambda: make_state(params, stats, tx, staleness=1, batch_size=16))
  mesh = parallel.make_mesh(jax.devices()[:4])
  jitted = parallel.jit_train_step(conadv.make_train_step(conadv.linen_forward(model), tx, cfg),
                                   mesh, state)
  batch = {"image": jax.ShapeDtypeStruct((16, *IMAGE_SHAPE), jnp.float32),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
  return fast_compile(jitted, state, batch, batch).as_text()


def test_per_device_bn_groups_leave_one_all_reduce():
  """ConAdv τ=1, batch 16 over 4 devices, BN groups of 4 = the per-device batch.

  The one all-reduce sums the gradients, the metrics and the running-average updates (those
  average the per-group statistics over all groups, so they do cross devices, but nothing in
  the step waits for them and XLA combines them with the gradients). A BN that needed the other
  devices' statistics to normalise would add an all-reduce per layer that cannot be combined,
  since everything after it depends on it: global statistics (bn_group_size=None) show that.
  """
  local = count_all_reduces(compiled_step_text(bn_group_size=4))
  global_stats = count_all_reduces(compiled_step_text(bn_group_size=None))
  assert local == 1
  # One per BN layer at least (stem, 2 per block, 2 projections = 9) in the clean forward alone.
  assert global_stats >= 9


# --- How often the attack starts from noise. ---


@pytest.mark.parametrize("rng_per_example", [False, True])
def test_fraction_of_random_starts(rng_per_example):
  """A loss with zero input gradient leaves every example at its start (sign(0) = 0)."""
  n, center, eps = 4000, 127.0, 9.0
  images = jnp.full((n, 2, 2, 1), center)
  labels = jnp.zeros((n,), jnp.int32)
  rng = jax.random.PRNGKey(3)
  if rng_per_example:
    rng = jax.random.split(rng, n)

  def attack(prob):  # `prob` is traced: one compile serves every probability.
    config = attacks.AttackConfig(epsilon=eps, step_size=eps, num_steps=1,
                                  random_start_prob=prob)
    flat_loss = lambda x, y: 0.0 * jnp.sum(x, axis=(1, 2, 3))
    return attacks.pgd_linf(flat_loss, images, labels, rng, config, NUM_CLASSES,
                            rng_per_example=rng_per_example)

  attack = fast_compile(jax.jit(attack), 0.5)
  for prob in (0.0, 0.8, 1.0):
    offsets = np.asarray(attack(prob)) - center
    assert np.abs(offsets).max() <= eps
    moved = np.any(offsets != 0.0, axis=(1, 2, 3))
    # Binomial: within 5 standard deviations (p = 0.8: ±0.032), exact for p in {0, 1}.
    assert abs(moved.mean() - prob) <= 5 * np.sqrt(prob * (1 - prob) / n), prob
    if prob:  # Noise starts are spread over the ball, not a few fixed points.
      assert np.unique(offsets[moved]).size > 0.9 * offsets[moved].size
