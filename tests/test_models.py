"""Model sizes, ghost BN, branch BN, and input normalisation from the dataset registry."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conadv_jax import datasets, models, norm, parallel
from configs import cpu_smoke


def stats(name: str = "imagenet2012") -> dict[str, tuple[float, ...]]:
  """create_model's pixel statistics keywords, from the registry entry `name`."""
  spec = datasets.DATASETS[name]
  return dict(pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def init_shapes(model, image_shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, *image_shape)),
                                           train=False))


def test_resnet50_has_reference_parameter_count():
  variables = init_shapes(
      models.create_model("ResNet50", num_classes=1000, adv_bn="shared", **stats()),
      (224, 224, 3))
  assert count(variables["params"]) == 25_557_032


def test_separate_adv_bn_adds_exactly_one_bn_set():
  shared = init_shapes(
      models.create_model("ResNet50", num_classes=1000, adv_bn="shared", **stats()),
      (224, 224, 3))
  separate = init_shapes(models.create_model("ResNet50", num_classes=1000, **stats()),
                         (224, 224, 3))
  bn_params = count(shared["batch_stats"])  # One scale and bias per running mean and var.
  assert count(separate["params"]) - count(shared["params"]) == bn_params == 53_120
  assert count(separate["batch_stats"]) == 2 * count(shared["batch_stats"])


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_builds(name):
  image = (32, 32, 3) if name == "SmallResNet" else (64, 64, 3)
  variables = init_shapes(models.create_model(name, num_classes=7, **stats()), image)
  assert variables["params"]["head"]["kernel"].shape[-1] == 7


def test_last_bn_of_each_block_starts_at_zero():
  model = models.create_model("ResNet18", num_classes=10, **stats())
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  block = params["BasicBlock_0"]
  assert np.all(block["BranchBatchNorm_1"]["bn_main"]["scale"] == 0)
  assert np.all(block["BranchBatchNorm_1"]["bn_adv"]["scale"] == 0)
  assert np.all(block["BranchBatchNorm_0"]["bn_main"]["scale"] == 1)


def test_unknown_model_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="ResNet50"):
    models.create_model("ResNet51", num_classes=10, **stats())


def test_ghost_bn_normalises_each_group_with_its_own_statistics():
  group, groups = 4, 3
  rng = np.random.RandomState(0)
  # Each group has a very different mean and scale, so pooled statistics would be visibly wrong.
  x = np.concatenate([rng.randn(group, 2, 2, 5) * (i + 1) + 10.0 * i for i in range(groups)])
  bn = norm.GhostBatchNorm(group_size=group)
  variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  y, updated = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  for i in range(groups):
    g = x[i * group:(i + 1) * group]
    want = (g - g.mean((0, 1, 2))) / np.sqrt(g.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(y[i * group:(i + 1) * group], want, rtol=1e-4, atol=1e-4)
  group_means = [x[i * group:(i + 1) * group].mean((0, 1, 2)) for i in range(groups)]
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * np.mean(group_means, 0),
                             rtol=1e-5, atol=1e-5)


def test_ghost_bn_is_the_same_on_one_and_four_devices():
  bn = norm.GhostBatchNorm(group_size=4)
  x = np.random.RandomState(1).randn(16, 3, 3, 2).astype(np.float32) * 5 + np.repeat(
      np.arange(4.0), 4)[:, None, None, None]
  variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  apply = lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

  def run(devices):
    mesh = parallel.make_mesh(devices)
    out = jax.jit(apply, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))(
        variables, x)
    return jax.device_get(out)

  one, four = run(jax.devices()[:1]), run(jax.devices()[:4])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), one, four)


def test_ghost_bn_rejects_a_group_size_that_does_not_divide_the_batch():
  bn = norm.GhostBatchNorm(group_size=3)
  x = jnp.zeros((8, 2, 2, 1))
  variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
  with pytest.raises(ValueError, match="bn_group_size"):
    bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_branches_keep_separate_statistics_and_eval_uses_main():
  model = models.create_model("SmallResNet", num_classes=3, **stats("synthetic"),
                              small_resnet_depth=8, small_resnet_width=4)
  x = np.random.RandomState(0).uniform(0, 255, (8, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  _, updated = model.apply(variables, x, train=True, branch="adv", mutable=["batch_stats"])
  stem_old, stem_new = variables["batch_stats"]["stem_bn"], updated["batch_stats"]["stem_bn"]
  np.testing.assert_array_equal(stem_new["bn_main"]["mean"], stem_old["bn_main"]["mean"])
  assert not np.allclose(stem_new["bn_adv"]["mean"], stem_old["bn_adv"]["mean"])
  # Evaluation reads only the main set: changing the adversarial set changes nothing.
  perturbed = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                model.apply(perturbed, x, train=False))


def test_bfloat16_compute_keeps_float32_parameters():
  model = models.create_model("SmallResNet", num_classes=3, dtype="bfloat16", **stats("synthetic"),
                              small_resnet_depth=8, small_resnet_width=4)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  assert model.apply(variables, jnp.zeros((2, 8, 8, 3)), train=False).dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
def test_model_from_config_takes_classes_and_pixel_stats_from_the_spec(name):
  config = cpu_smoke.get_config("conadv")
  config.dataset = name
  spec = datasets.get_spec(config)
  model = models.create_model_from_config(config, spec, num_devices=1)
  assert model.num_classes == spec.num_classes
  assert tuple(model.pixel_mean) == spec.pixel_mean and tuple(model.pixel_std) == spec.pixel_std


def test_model_normalises_inputs_with_the_spec_statistics():
  """Same parameters: spec stats on raw pixels == unit stats on pixels normalised by hand."""
  config = cpu_smoke.get_config("conadv")
  spec = dataclasses.replace(datasets.DATASETS["cifar10"], pixel_mean=(10.0, 100.0, 200.0),
                             pixel_std=(2.0, 50.0, 4.0))
  model = models.create_model_from_config(config, spec, num_devices=1)
  unit = dataclasses.replace(spec, pixel_mean=(0.0,), pixel_std=(1.0,))
  plain = models.create_model_from_config(config, unit, num_devices=1)
  x = np.random.RandomState(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  normalised = (x - np.array(spec.pixel_mean, np.float32)) / np.array(spec.pixel_std, np.float32)
  np.testing.assert_allclose(model.apply(variables, x, train=False),
                             plain.apply(variables, normalised, train=False), rtol=1e-5, atol=1e-5)
