"""Evaluation scores every example exactly once, for any device and process count."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conadv_jax import conadv, evaluation, input_pipeline, models, parallel
from configs import cpu_smoke


@pytest.fixture(scope="module")
def setup():
  config = cpu_smoke.get_config("conadv")
  config.eval_batch_size = 24  # 64 eval examples = 2 x 24 + 16: the last batch is padded.
  info = input_pipeline.get_dataset_info(config)
  model = models.create_model_from_config(config, info.spec, num_devices=1)
  forward = conadv.linen_forward(model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)), train=False)
  state = conadv.TrainState.create(params=variables["params"],
                                   batch_stats=variables["batch_stats"],
                                   tx=optax.sgd(0.1), fifo_shape=(0,),
                                   rng=jax.random.PRNGKey(1))
  cfg = conadv.MethodConfig(method="vanilla", num_classes=info.num_classes)
  return config, info, state, jax.jit(evaluation.make_eval_step(forward, cfg, False)), forward


def reference_metrics(config, state, forward):
  """Loss and top-1 over the whole eval split at once, without batching or masks."""
  info = input_pipeline.get_dataset_info(config)
  batches = list(input_pipeline.eval_batches(config, info, process_index=0, process_count=1))
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  logits, _ = forward(state.params, state.batch_stats, images, train=False)
  logp = jax.nn.log_softmax(logits)
  loss = -np.take_along_axis(np.asarray(logp), labels[:, None], axis=1).mean()
  return len(labels), float(loss), float((np.argmax(logits, -1) == labels).mean())


@pytest.mark.parametrize("num_devices", [1, 3])
def test_every_example_once_on_any_device_count(setup, num_devices):
  config, info, state, eval_step, forward = setup
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  batches = input_pipeline.shard_and_prefetch(
      input_pipeline.eval_batches(config, info, process_index=0, process_count=1),
      parallel.batch_sharding(mesh))
  results = evaluation.evaluate(eval_step, jax.device_put(state, parallel.replicated(mesh)),
                                batches)
  count, loss, top1 = reference_metrics(config, state, forward)
  assert results["num_examples"] == count == info.num_eval_examples == 64
  np.testing.assert_allclose([results["loss"], results["top1"]], [loss, top1], rtol=1e-5)


def test_every_example_once_across_three_processes(setup):
  config, info, state, eval_step, forward = setup
  totals = {}
  for process in range(3):  # Each "process" evaluates its own slice; the sums add up.
    results = evaluation.evaluate(eval_step, state, input_pipeline.eval_batches(
        config, info, process_index=process, process_count=3))
    for key in ("loss", "top1"):
      totals[key] = totals.get(key, 0.0) + results[key] * results["num_examples"]
    totals["count"] = totals.get("count", 0) + results["num_examples"]
  count, loss, top1 = reference_metrics(config, state, forward)
  assert totals["count"] == count == 64
  np.testing.assert_allclose([totals["loss"] / count, totals["top1"] / count], [loss, top1],
                             rtol=1e-5)
