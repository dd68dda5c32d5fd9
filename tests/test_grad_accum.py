"""Gradient accumulation: k micro-batches give the step of one whole batch.

With the same BN groups, a step over k micro-batches must equal the step over the whole batch
(up to float summation order), for every method, on one device and on several, and the FIFO must
still hold whole global batches.
"""
import jax
import numpy as np
import pytest

from conadv_jax.data import prepare
from conadv_jax.method import experiment, parallel
from configs import cpu_smoke

BATCH, IMAGE = 16, 8


def make_config(preset: str, accum: int):
  config = cpu_smoke.get_config(preset)
  config.update(dict(image_size=IMAGE, batch_size=BATCH, bn_group_size=2, optimizer="lars",
                     grad_accum_steps=accum, synthetic_num_classes=5))
  config.attack.random_start = "per_batch"
  return config


def make_batches(n: int, aug_view: bool = False):
  rng = np.random.RandomState(0)
  pixels = lambda: rng.randint(0, 256, (BATCH, IMAGE, IMAGE, 3)).astype(np.uint8)
  return [{"image": pixels(), "label": rng.randint(0, 5, BATCH).astype(np.int32),
           **({"aug_image": pixels()} if aug_view else {})} for _ in range(n)]


def run(preset: str, accum: int, num_devices: int, num_steps: int = 2):
  config = make_config(preset, accum)
  info = prepare.get_dataset_info(config)
  exp = experiment.build(config, info, parallel.make_mesh(jax.devices()[:num_devices]))
  tau = exp.method.staleness
  batches = make_batches(num_steps + tau, aug_view=config.aug_branch != "none")
  state = exp.init_state()
  if tau:
    state = exp.fill_fifo(state, batches[:tau])
  history = []
  for t in range(num_steps):
    state, metrics = exp.train_step(state, batches[t], batches[t + tau])
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, exp


@pytest.mark.parametrize("preset,num_devices", [("vanilla", 2), ("disadv", 1), ("conadv", 4),
                                                ("conadv2", 2), ("conadv_aa", 2)])
def test_two_micro_batches_equal_one_batch(preset, num_devices):
  whole, whole_metrics, _ = run(preset, 1, num_devices)
  split, split_metrics, _ = run(preset, 2, num_devices)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(close, (split.params, split.batch_stats, split.opt_state),
               (whole.params, whole.batch_stats, whole.opt_state))
  for got, want in zip(split_metrics, whole_metrics):
    jax.tree.map(close, got, want)
  if whole.adv_fifo is not None:  # Whole global batches, rows in place, labels with them.
    np.testing.assert_array_equal(split.adv_fifo["label"], whole.adv_fifo["label"])
    differ = np.mean(split.adv_fifo["image"] != whole.adv_fifo["image"])
    assert differ < 1e-3, differ  # A sign(gradient) of ~0 may flip with summation order.


def test_micro_batches_move_no_data_between_devices():
  """Each micro-batch takes a chunk of every device's rows: no all-to-all or gather is needed."""
  config = make_config("conadv", 2)
  exp = experiment.build(config, prepare.get_dataset_info(config),
                         parallel.make_mesh(jax.devices()[:4]))
  batch = make_batches(1)[0]
  hlo = exp.train_step.lower(exp.abstract_state(), batch, batch).compile().as_text()
  assert "all-to-all" not in hlo and "all-gather" not in hlo
  assert "all-reduce" in hlo  # The gradient's mean over devices is still there.
