"""Model sizes, ghost BN, branch BN, input normalisation, and the two init/padding conventions."""
import dataclasses
import hashlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conadv_jax.data import datasets
from conadv_jax.method import models, norm, parallel
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


# --- Initialisation and padding conventions (model_init). ---


def init_variables(model, image_shape, seed: int = 0):
  """Real (not abstract) variables; jitted, which compiles faster than eager init on CPU."""
  return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros(image_shape),
                                    train=False))()


def digest(tree) -> str:
  """sha256 over every leaf's path and float32 bytes, in path order."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


# Recorded at commit c81da09, before model_init existed, with this venv's JAX 0.10.2 (a JAX
# upgrade that changes its PRNG would need them re-recorded from that commit).
FLAX_INIT_DIGESTS = {
    "SmallResNet": ("6247d27d1b34bdd97189793ba6c139f4d506b88286a0a4a67b7cdaa2d3dc37de",
                    "8fcd348c84c89b70f851e0b964fa1fefc0ff88593f173af0f57d1b10c4cf2a5b"),
    "ResNet18": ("38c9e4184ca34a8c9a7ee44262b1d20cb92d5065f100cc2b6e51d656d0ac340c",
                 "fb8b551b9092213fe742ba2bbd51e55241f0c7d459ba237d3dec487711702110"),
}


@pytest.mark.parametrize("name", sorted(FLAX_INIT_DIGESTS))
def test_flax_init_is_bit_identical_to_before_model_init_existed(name):
  kwargs, shape = ((dict(small_resnet_depth=8, small_resnet_width=4), (2, 8, 8, 3))
                   if name == "SmallResNet" else ({}, (1, 32, 32, 3)))
  assert models.create_model(name, num_classes=10, **stats(), **kwargs).model_init == "flax"
  model = models.create_model(name, num_classes=10, model_init="flax", **stats(), **kwargs)
  variables = init_variables(model, shape)
  assert (digest(variables["params"]),
          digest(variables["batch_stats"])) == FLAX_INIT_DIGESTS[name]


def record_convs(model, variables, x):
  """[(nn.Conv module, its input, its output, its kernel)] for every convolution of a forward."""
  modules = []

  def forward(variables, x):
    arrays = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
        modules.append(context.module.clone(parent=None))  # Its settings, read at trace time.
        arrays.append((args[0], out, context.module.variables["params"]["kernel"]))
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, x, train=False)
    return arrays

  arrays = jax.jit(forward)(variables, x)  # One compile instead of hundreds of eager ops.
  return [(m, *a) for m, a in zip(modules, arrays)]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow/XLA "SAME": output ceil(size/stride), the odd pixel of padding after."""
  total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_by_hand(x, kernel, stride: int, pads: list[tuple[int, int]]):
  """jnp.pad with zeros, then a VALID convolution."""
  padded = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  return jax.lax.conv_general_dilated(padded, kernel, (stride, stride), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ResNet50: ImageNet stem and bottleneck blocks; SmallResNet: basic blocks and the 3x3 stem.
@pytest.mark.parametrize("name", ["ResNet50", "SmallResNet"])
@pytest.mark.parametrize("model_init", models.MODEL_INITS)
def test_every_convolution_pads_as_its_convention_says(name, model_init):
  """Reference: strided convs pad k-1 as ((k-1)//2, rest), then VALID; stride 1: SAME. Flax: SAME.

  Both: the ImageNet stem pads (3, 3). Checked against jnp.pad + VALID on every conv's input.
  """
  kwargs, shape = ((dict(small_resnet_depth=8, small_resnet_width=4), (1, 16, 16, 3))
                   if name == "SmallResNet" else ({}, (1, 32, 32, 3)))
  model = models.create_model(name, num_classes=5, model_init=model_init, **stats(), **kwargs)
  variables = init_variables(model, shape)
  x = np.random.RandomState(0).uniform(0, 255, shape).astype(np.float32)
  calls = record_convs(model, variables, x)
  strided_3x3 = 0
  for module, inputs, output, kernel in calls:
    (k, _), (stride, _) = module.kernel_size, module.strides
    size = inputs.shape[1]
    if module.name == "stem_conv" and k == 7:
      pad = (3, 3)
    elif model_init == "reference" and stride > 1:
      pad = ((k - 1) // 2, (k - 1) - (k - 1) // 2)
    else:
      pad = same_padding(size, k, stride)
    want = conv_by_hand(inputs, kernel, stride, [pad, pad])
    np.testing.assert_allclose(output, want, rtol=1e-4, atol=1e-4, err_msg=module.name)
    if k == 3 and stride == 2:
      strided_3x3 += 1
      assert size % 2 == 0  # Where SAME pads (0, 1) but fixed padding (1, 1): they differ.
      other = (1, 1) if model_init == "flax" else same_padding(size, k, stride)
      assert not np.allclose(output, conv_by_hand(inputs, kernel, stride, [other, other]),
                             atol=1e-3)
  assert strided_3x3 >= 2


def kernels(params):
  """{path: kernel} for every conv kernel (4-d) of a parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves if np.ndim(v) == 4}


def test_reference_init_statistics():
  """Conv kernels: variance_scaling(1, fan_in, truncated normal); head N(0, 0.01), zero bias.

  TensorFlow's variance_scaling draws from a normal of std sqrt(1/fan_in)/c truncated to +-2 of
  its stds, where c is the std of a standard normal truncated to [-2, 2], so the kernel's std is
  sqrt(1/fan_in) and no entry exceeds 2 sqrt(1/fan_in)/c. c comes from scipy here.
  """
  c = scipy.stats.truncnorm(-2, 2).std()
  model = models.create_model("ResNet18", num_classes=1000, model_init="reference", **stats())
  params = init_variables(model, (1, 32, 32, 3))["params"]
  checked = 0
  for path, kernel in kernels(params).items():
    kh, kw, cin, cout = kernel.shape
    fan_in = kh * kw * cin
    if kernel.size < 30_000:  # Too few draws for a 3 % check on the std.
      continue
    np.testing.assert_allclose(kernel.std(), math.sqrt(1 / fan_in), rtol=0.03, err_msg=path)
    assert np.abs(kernel).max() <= 2 * math.sqrt(1 / fan_in) / c * (1 + 1e-6), path
    # An untruncated normal with the same std puts 2.3 % of its mass beyond that bound.
    assert abs(kernel.mean()) < 5 * kernel.std() / math.sqrt(kernel.size), path
    checked += 1
    if fan_in != kh * kw * cout:  # fan_in and fan_out differ: the std tells which one is used.
      assert abs(kernel.std() - math.sqrt(1 / (kh * kw * cout))) > 0.1 * kernel.std(), path
  assert checked >= 8
  head = params["head"]
  np.testing.assert_allclose(head["kernel"].std(), 0.01, rtol=0.01)
  assert abs(float(head["kernel"].mean())) < 5 * 0.01 / math.sqrt(head["kernel"].size)
  np.testing.assert_array_equal(head["bias"], 0)
  block = params["BasicBlock_0"]  # BN: γ = 1, except the last BN of each block (γ = 0).
  np.testing.assert_array_equal(block["BranchBatchNorm_0"]["bn_main"]["scale"], 1)
  np.testing.assert_array_equal(block["BranchBatchNorm_1"]["bn_main"]["scale"], 0)


def test_reference_resnet50_has_the_reference_parameter_count_and_shapes():
  shapes = {}
  for model_init in models.MODEL_INITS:
    model = models.create_model("ResNet50", num_classes=1000, adv_bn="shared",
                                model_init=model_init, **stats())
    shapes[model_init] = jax.tree.map(lambda x: x.shape, init_shapes(model, (224, 224, 3)))
  assert count(init_shapes(model, (224, 224, 3))["params"]) == 25_557_032
  assert shapes["reference"] == shapes["flax"]


def test_unknown_model_init_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="reference"):
    models.create_model("ResNet18", num_classes=10, model_init="tf", **stats())


@pytest.mark.parametrize("model_init", models.MODEL_INITS)
def test_model_from_config_reads_model_init(model_init):
  config = cpu_smoke.get_config("conadv")
  config.model_init = model_init
  model = models.create_model_from_config(config, datasets.get_spec(config), num_devices=1)
  assert model.model_init == model_init


# --- BN branches: main, adv, aug. ---


def bn_sets(variables) -> set[str]:
  """The BN sets of the stem BN (every BranchBatchNorm has the same ones)."""
  return set(variables["params"]["stem_bn"])


# (method, adv_bn, aug_branch) -> the BN sets the model must have, written from the recipe: the
# adversarial examples get their own set only when a method makes some and adv_bn is separate;
# the augmented view always gets its own.
BRANCH_CASES = [
    ("conadv", "separate", "none", {"bn_main", "bn_adv"}),
    ("conadv", "shared", "none", {"bn_main"}),
    ("conadv", "separate", "autoaugment", {"bn_main", "bn_adv", "bn_aug"}),
    ("conadv", "shared", "randaugment", {"bn_main", "bn_aug"}),
    ("disadv", "separate", "autoaugment", {"bn_main", "bn_adv", "bn_aug"}),
    ("vanilla", "separate", "autoaugment", {"bn_main", "bn_aug"}),
    ("vanilla", "separate", "none", {"bn_main"}),
    ("vanilla", "shared", "none", {"bn_main"}),
]


@pytest.mark.parametrize("method,adv_bn,aug_branch,want", BRANCH_CASES,
                         ids=["-".join(c[:3]) for c in BRANCH_CASES])
def test_model_from_config_has_the_bn_sets_its_method_uses(method, adv_bn, aug_branch, want):
  config = cpu_smoke.get_config("conadv")
  config.method, config.adv_bn, config.aug_branch = method, adv_bn, aug_branch
  config.staleness = 1 if method == "conadv" else 0
  model = models.create_model_from_config(config, datasets.get_spec(config), num_devices=1)
  variables = init_shapes(model, (16, 16, 3))
  assert bn_sets(variables) == want
  assert set(variables["batch_stats"]["stem_bn"]) == want


def test_aug_set_adds_exactly_one_bn_set_to_resnet50():
  counts = {}
  for adv_bn in models.ADV_BN_MODES:
    for aug in (False, True):
      model = models.create_model("ResNet50", num_classes=1000, adv_bn=adv_bn, aug_bn=aug,
                                  **stats())
      counts[adv_bn, aug] = count(init_shapes(model, (224, 224, 3))["params"])
  one_bn_set = 53_120  # 2 x the 26,560 BN channels of ResNet-50.
  assert counts["shared", False] == 25_557_032
  assert counts["shared", True] == counts["separate", False] == 25_557_032 + one_bn_set
  assert counts["separate", True] == 25_557_032 + 2 * one_bn_set


def swap_bn_sets(tree, a: str, b: str):
  """`tree` with BN sets `a` and `b` exchanged in every BranchBatchNorm."""
  if not isinstance(tree, dict):
    return tree
  out = {k: swap_bn_sets(v, a, b) for k, v in tree.items()}
  if f"bn_{a}" in out and f"bn_{b}" in out:
    out[f"bn_{a}"], out[f"bn_{b}"] = out[f"bn_{b}"], out[f"bn_{a}"]
  return out


def test_aug_branch_uses_its_own_scale_bias_and_statistics():
  model = models.create_model("SmallResNet", num_classes=3, aug_bn=True, **stats("synthetic"),
                              small_resnet_depth=8, small_resnet_width=4)
  x = np.random.RandomState(0).uniform(0, 255, (8, 8, 8, 3)).astype(np.float32)
  variables = init_variables(model, (8, 8, 8, 3))
  # Give the aug set values of its own, so that using another set would show.
  rng = np.random.RandomState(1)
  def perturb(path, leaf):
    if "bn_aug" not in jax.tree_util.keystr(path):
      return leaf
    return leaf + rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(perturb, variables)
  swapped = swap_bn_sets(variables, "main", "aug")

  # Training: aug's scale and bias; only aug's running averages move.
  logits, updated = model.apply(variables, x, train=True, branch="aug", mutable=["batch_stats"])
  want, _ = model.apply(swapped, x, train=True, branch="main", mutable=["batch_stats"])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  old, new = variables["batch_stats"]["stem_bn"], updated["batch_stats"]["stem_bn"]
  for b in ("bn_main", "bn_adv"):
    np.testing.assert_array_equal(new[b]["mean"], old[b]["mean"])
  assert not np.allclose(new["bn_aug"]["mean"], old["bn_aug"]["mean"])
  # Inference on branch aug reads aug's running averages; evaluation (main) ignores them.
  np.testing.assert_allclose(model.apply(variables, x, train=False, branch="aug"),
                             model.apply(swapped, x, train=False), rtol=1e-5, atol=1e-5)
  assert not np.allclose(model.apply(variables, x, train=False, branch="aug"),
                         model.apply(variables, x, train=False), atol=1e-3)
  perturbed = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                model.apply(perturbed, x, train=False))


def test_branch_without_a_bn_set_is_refused_except_adv_which_shares_main():
  model = models.create_model("SmallResNet", num_classes=3, adv_bn="shared", **stats("synthetic"),
                              small_resnet_depth=8, small_resnet_width=4)
  x = np.random.RandomState(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
  variables = init_variables(model, (4, 8, 8, 3))
  np.testing.assert_array_equal(model.apply(variables, x, train=False, branch="adv"),
                                model.apply(variables, x, train=False, branch="main"))
  with pytest.raises(ValueError, match="'aug'.*models.bn_branches"):
    model.apply(variables, x, train=False, branch="aug")


# --- MLP. ---


def mlp_param_count(in_dim: int, widths, num_classes: int, bn_sets: int) -> int:
  """Hidden Dense kernels (no bias), a scale and a bias per unit per BN set, and the head."""
  count_, previous = 0, in_dim
  for width in widths:
    count_ += previous * width + 2 * bn_sets * width
    previous = width
  return count_ + previous * num_classes + num_classes


@pytest.mark.parametrize("widths,adv_bn,aug,bn_sets", [
    ((32, 16), "separate", False, 2), ((32, 16), "shared", False, 1), ((8,), "separate", True, 3),
    ((64, 32, 16), "shared", True, 2)])
def test_mlp_shapes_and_parameter_count(widths, adv_bn, aug, bn_sets):
  model = models.create_model("MLP", num_classes=10, mlp_widths=widths, adv_bn=adv_bn,
                              aug_bn=aug, **stats("fashion_mnist"))
  variables = init_shapes(model, (28, 28, 1))
  assert count(variables["params"]) == mlp_param_count(28 * 28, widths, 10, bn_sets)
  assert count(variables["batch_stats"]) == 2 * bn_sets * sum(widths)
  assert variables["params"]["head"]["kernel"].shape == (widths[-1], 10)


def numpy_mlp(params, batch_stats, x, spec, widths, *, branch: str, group: int | None):
  """The MLP by hand: normalise, flatten, per layer x W, BN (per group, or running), ReLU; head."""
  h = ((x - np.array(spec.pixel_mean)) / np.array(spec.pixel_std)).reshape(len(x), -1)
  for i in range(len(widths)):
    h = h @ np.asarray(params[f"hidden_{i}"]["kernel"])
    bn, running = params[f"hidden_{i}_bn"][f"bn_{branch}"], batch_stats[f"hidden_{i}_bn"][
        f"bn_{branch}"]
    if group is None:
      mean, var = np.asarray(running["mean"]), np.asarray(running["var"])
    else:
      g = h.reshape(-1, group, h.shape[-1])
      mean = np.repeat(g.mean(1), group, axis=0)
      var = np.repeat(g.var(1), group, axis=0)
    h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    h = np.maximum(h, 0)
  return h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])


@pytest.mark.parametrize("branch", ["main", "adv", "aug"])
def test_mlp_through_linen_forward_matches_a_numpy_mlp(branch):
  """forward(params, batch_stats, images, train=..., branch=...) as the train step calls it."""
  from conadv_jax.method import conadv  # pylint: disable=g-import-not-at-top
  spec = datasets.DATASETS["fashion_mnist"]
  widths, group = (24, 12), 4
  model = models.create_model("MLP", num_classes=10, mlp_widths=widths, aug_bn=True,
                              bn_group_size=group, pixel_mean=spec.pixel_mean,
                              pixel_std=spec.pixel_std)
  rng = np.random.RandomState(0)
  x = rng.uniform(0, 255, (8, 28, 28, 1)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  # Every BN set gets its own scale, bias and running averages, so a wrong set would show.
  variables = jax.tree.map(lambda v: v + rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
                           if v.ndim == 1 else v, variables)
  params, batch_stats = variables["params"], variables["batch_stats"]
  forward = conadv.linen_forward(model)

  logits, same_stats = forward(params, batch_stats, x, train=False, branch=branch)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert same_stats is batch_stats
  np.testing.assert_allclose(
      logits, numpy_mlp(params, batch_stats, x, spec, widths, branch=branch, group=None),
      rtol=1e-4, atol=1e-4)

  logits, new_stats = forward(params, batch_stats, x, train=True, branch=branch)
  np.testing.assert_allclose(
      logits, numpy_mlp(params, batch_stats, x, spec, widths, branch=branch, group=group),
      rtol=1e-4, atol=1e-4)
  for b in ("main", "adv", "aug"):
    moved = not np.allclose(new_stats["hidden_0_bn"][f"bn_{b}"]["mean"],
                            batch_stats["hidden_0_bn"][f"bn_{b}"]["mean"])
    assert moved == (b == branch), b


def test_mlp_from_config_reads_its_widths():
  config = cpu_smoke.get_config("conadv")
  config.model, config.mlp_widths = "MLP", (20, 10)
  model = models.create_model_from_config(config, datasets.get_spec(config), num_devices=1)
  assert isinstance(model, models.MLP) and tuple(model.widths) == (20, 10)
  variables = init_shapes(model, (16, 16, 3))
  assert count(variables["params"]) == mlp_param_count(16 * 16 * 3, (20, 10), 10, 2)


@pytest.mark.parametrize("widths", [(), (256, 0), (-1,), (2.5,), (True,), 256])
def test_mlp_rejects_bad_widths(widths):
  assert not models.valid_mlp_widths(widths)
  with pytest.raises(ValueError, match="mlp_widths"):
    models.create_model("MLP", num_classes=10, mlp_widths=widths, **stats())
