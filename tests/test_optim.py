"""Tests of conadv_jax.method.optim: masks, LARS/SGD/LAMB updates, schedules, building from the
ImageNet recipe of configs/imagenet_resnet50.py (its table is pinned in tests/test_configs.py).

Expected updates are recomputed here by hand in numpy, from the formulas in the module docstring,
so a change of optax's behaviour (or of our wiring of it) shows up as a failure.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conadv_jax.method import optim
from configs import default, imagenet_resnet50

LR = 0.5
WD = 0.3  # Large, so that a decay applied to the wrong tensor cannot hide in the tolerance.
COEFF = 0.02
KERNELS = (("conv", "kernel"), ("head", "kernel"))
NON_DECAYED = (("bn_main", "scale"), ("bn_main", "bias"), ("bn_adv", "scale"),
               ("bn_adv", "bias"), ("head", "bias"))


def _config(**overrides) -> ml_collections.ConfigDict:
  """A constant-LR config (end LR = peak, no warmup) unless overridden."""
  fields = dict(optimizer="lars", learning_rate=LR, warmup_epochs=0.0, lr_schedule="polynomial",
                lr_decay_power=2.0, end_learning_rate=LR, weight_decay=WD, momentum=0.0,
                nesterov=False, lars_trust_coefficient=COEFF, lars_eps=0.0, batch_size=256,
                num_epochs=1.0, num_train_steps=-1)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {"conv": {"kernel": (3, 3, 3, 8)},
            "bn_main": {"scale": (8,), "bias": (8,)},
            "bn_adv": {"scale": (8,), "bias": (8,)},
            "head": {"kernel": (8, 10), "bias": (10,)}}
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _get(tree, path):
  return np.asarray(tree[path[0]][path[1]], np.float64)


def _close(actual, expected):
  """float32 result vs float64 hand value; elements near 0 (after g + wd*w cancels) get atol."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _updates(config, params, grads_seq):
  """Runs the optimizer built from `config` over the gradients; returns each step's updates."""
  tx, _ = optim.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, state = jax.jit(tx.update)(grads, state, params)
    out.append(updates)
  return out


def test_decay_mask_marks_only_kernels():
  mask = optim.decay_mask(_tree(0))
  for path in KERNELS:
    assert mask[path[0]][path[1]] is True
  for path in NON_DECAYED:
    assert mask[path[0]][path[1]] is False
  # Shapes only (as from jax.eval_shape) work too.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
  assert optim.decay_mask(abstract) == mask


def test_lars_update_matches_hand_computation():
  params, grads = _tree(0), _tree(1)
  (updates,) = _updates(_config(optimizer="lars"), params, [grads])
  for path in NON_DECAYED:  # Plain SGD step: no decay, no trust ratio.
    _close(_get(updates, path), -LR * _get(grads, path))
  for path in KERNELS:
    w, g = _get(params, path), _get(grads, path)
    u = g + WD * w
    trust = COEFF * np.linalg.norm(w) / np.linalg.norm(u)
    _close(_get(updates, path), -LR * trust * u)
    # The TF/MLPerf trust ratio differs, so the test tells the two formulas apart.
    tf_trust = COEFF * np.linalg.norm(w) / (np.linalg.norm(g) + WD * np.linalg.norm(w))
    assert not np.allclose(_get(updates, path), -LR * tf_trust * u, rtol=1e-3)


def test_lars_momentum_accumulates_scaled_steps():
  params, g1, g2 = _tree(0), _tree(1), _tree(2)
  momentum = 0.9
  _, second = _updates(_config(optimizer="lars", momentum=momentum), params, [g1, g2])
  for path in KERNELS:
    w = _get(params, path)
    steps = []
    for g in (_get(g1, path), _get(g2, path)):
      u = g + WD * w
      steps.append(LR * COEFF * np.linalg.norm(w) / np.linalg.norm(u) * u)
    _close(_get(second, path), -(momentum * steps[0] + steps[1]))
  for path in NON_DECAYED:
    expected = -LR * (momentum * _get(g1, path) + _get(g2, path))
    _close(_get(second, path), expected)


def test_lars_zero_norm_kernel_falls_back_to_trust_one():
  params, grads = _tree(0), _tree(1)
  params["head"]["kernel"] = np.zeros_like(params["head"]["kernel"])
  (updates,) = _updates(_config(optimizer="lars"), params, [grads])
  _close(_get(updates, ("head", "kernel")), -LR * _get(grads, ("head", "kernel")))


def test_sgd_masked_weight_decay():
  params, grads = _tree(0), _tree(1)
  (updates,) = _updates(_config(optimizer="sgd", momentum=0.0), params, [grads])
  for path in NON_DECAYED:
    _close(_get(updates, path), -LR * _get(grads, path))
  for path in KERNELS:
    expected = -LR * (_get(grads, path) + WD * _get(params, path))
    _close(_get(updates, path), expected)


def test_sgd_nesterov_momentum():
  params, g1, g2 = _tree(0), _tree(1), _tree(2)
  m = 0.9
  first, second = _updates(_config(optimizer="sgd", momentum=m, nesterov=True), params, [g1, g2])
  for path in KERNELS + NON_DECAYED:
    wd = WD if path in KERNELS else 0.0
    u1 = _get(g1, path) + wd * _get(params, path)
    u2 = _get(g2, path) + wd * _get(params, path)
    t1 = u1
    t2 = u2 + m * t1
    _close(_get(first, path), -LR * (u1 + m * t1))
    _close(_get(second, path), -LR * (u2 + m * t2))


def test_lamb_masks_decay_and_trust_ratio():
  params, grads = _tree(0), _tree(1)
  b1, b2, eps = 0.9, 0.999, 1e-6
  (updates,) = _updates(_config(optimizer="lamb", momentum=b1), params, [grads])
  for path in KERNELS + NON_DECAYED:
    w, g = _get(params, path), _get(grads, path)
    mu_hat = (1 - b1) * g / (1 - b1)  # Bias-corrected first step of Adam.
    nu_hat = (1 - b2) * g**2 / (1 - b2)
    adam = mu_hat / (np.sqrt(nu_hat) + eps)
    if path in KERNELS:
      u = adam + WD * w
      expected = -LR * np.linalg.norm(w) / np.linalg.norm(u) * u
    else:
      expected = -LR * adam
    _close(_get(updates, path), expected)


def test_unknown_optimizer_names_the_allowed_ones():
  with pytest.raises(ValueError, match="lars.*sgd.*lamb"):
    optim.create_optimizer(_config(optimizer="adam"), steps_per_epoch=10, total_steps=100)


# Schedules: peak 2, end 0.01, 10 steps per epoch, 1.5 warmup epochs (15 steps), 100 steps.
PEAK, END, WARMUP, TOTAL = 2.0, 0.01, 15, 100


def _schedule(kind: str, warmup_epochs: float = 1.5, power: float = 1.6):
  config = _config(learning_rate=PEAK, end_learning_rate=END, warmup_epochs=warmup_epochs,
                   lr_schedule=kind, lr_decay_power=power)
  return optim.create_learning_rate_schedule(config, steps_per_epoch=10, total_steps=TOTAL)


def _value(schedule, step: int) -> float:
  return float(schedule(jnp.asarray(step, jnp.int32)))


@pytest.mark.parametrize("kind", ["polynomial", "cosine"])
def test_warmup_is_linear_from_zero_to_peak(kind):
  schedule = _schedule(kind)
  assert _value(schedule, 0) == 0.0
  for step in (1, 7, 14):
    assert math.isclose(_value(schedule, step), PEAK * step / WARMUP, rel_tol=1e-6)
  assert math.isclose(_value(schedule, WARMUP), PEAK, rel_tol=1e-6)
  assert math.isclose(_value(schedule, TOTAL), END, rel_tol=1e-5)
  assert math.isclose(_value(schedule, TOTAL + 50), END, rel_tol=1e-5)


def test_polynomial_decay_matches_formula():
  power = 1.6
  schedule = _schedule("polynomial", power=power)
  decay_steps = TOTAL - WARMUP
  for k in (1, 20, 42, 84):
    expected = (PEAK - END) * (1 - k / decay_steps) ** power + END
    assert math.isclose(_value(schedule, WARMUP + k), expected, rel_tol=1e-5)


def test_cosine_decay_matches_formula():
  schedule = _schedule("cosine")
  decay_steps = TOTAL - WARMUP
  for k in (1, 20, 42, 84):
    expected = END + (PEAK - END) * 0.5 * (1 + math.cos(math.pi * k / decay_steps))
    assert math.isclose(_value(schedule, WARMUP + k), expected, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["polynomial", "cosine"])
def test_zero_warmup_starts_at_peak(kind):
  schedule = _schedule(kind, warmup_epochs=0.0)
  assert math.isclose(_value(schedule, 0), PEAK, rel_tol=1e-6)
  assert _value(schedule, 50) < PEAK
  assert math.isclose(_value(schedule, TOTAL), END, rel_tol=1e-5)


def test_warmup_longer_than_the_run_is_clamped_to_it(caplog):
  config = _config(learning_rate=PEAK, warmup_epochs=5.0)  # 50 warmup steps, 3-step run.
  with caplog.at_level("WARNING"):
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=10, total_steps=3)
  assert "Warmup (50 steps) is longer than the run (3 steps)" in caplog.text
  assert [round(_value(schedule, s), 6) for s in range(4)] == [
      0.0, round(PEAK / 3, 6), round(PEAK * 2 / 3, 6), PEAK]


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="cosine"):
    _schedule("step")


def test_total_train_steps():
  assert optim.total_train_steps(_config(num_train_steps=123, num_epochs=90.0), 1000) == 123
  assert optim.total_train_steps(_config(num_train_steps=-1, num_epochs=2.5), 39) == 98
  # The 96K run: ~100 epochs of 1,281,167 images at 98,304 per step.
  assert optim.total_train_steps(_config(num_epochs=99.83), 1_281_167 / 98_304) == 1301
  with pytest.raises(ValueError, match="num_train_steps"):
    optim.total_train_steps(_config(num_train_steps=0, num_epochs=0.0), 100)
  with pytest.raises(ValueError, match="num_train_steps"):
    optim.total_train_steps(_config(num_train_steps=-1, num_epochs=5.0), 0)


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_recipe_updates_the_default_config_and_builds(optimizer):
  config = default.get_config()
  config.update(imagenet_resnet50.recipe(8_192, optimizer))  # Field names and types must match.
  steps_per_epoch = 1_281_167 // config.batch_size
  total = optim.total_train_steps(config, steps_per_epoch)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, total)
  params = _tree(0)
  updates, _ = tx.update(_tree(1), tx.init(params), params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))
  assert float(schedule(5 * steps_per_epoch)) == pytest.approx(config.learning_rate)
  assert isinstance(tx, optax.GradientTransformation)
