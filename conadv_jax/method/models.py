"""ResNets (v1.5) for ImageNet, a CIFAR-style ResNet and an MLP for small images, in Flax linen.

Why linen: ConAdv keeps several things per step that all read the same weights (the clean and the
adversarial forward, the attack), and DisAdv/ConAdv comparisons want parameter versions side by
side. Linen keeps parameters and BN statistics as plain pytrees outside the module, so they can
be passed, stacked, sharded and checkpointed as data; NNX's mutable objects would have to be
split back into exactly that form for every `jit` and `grad` here.

Every model takes raw pixels on the 0-255 scale and normalises inside, so attack budgets are in
pixels. Calls take `train` (batch statistics vs running averages) and `branch` (which BN set).

Two initialisation and padding conventions (`model_init`):
* "flax": the Flax examples' ResNet: kernels variance_scaling(2.0, "fan_out", "normal"), every
  strided convolution padded "SAME" (for a 3x3 kernel at stride 2 on an even size: 0 before, 1
  after), Flax's default (LeCun normal) head.
* "reference": the tensorflow/tpu ResNet that the paper's released reference code forks:
  strided convolutions pad k-1 explicitly, (k-1)//2 before and the rest after,
  then convolve VALID ("fixed padding"); stride-1 convolutions use SAME; kernels
  variance_scaling(1.0, "fan_in", "truncated_normal"); head kernel N(0, 0.01), bias 0. Under
  LARS the initial weight norms act as per-layer learning rates, so the LR table of the paper
  assumes these.
Both start the last BN of each residual block at γ = 0, and have the same parameter shapes.
"""
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from conadv_jax import errors
from conadv_jax.method import norm

MODEL_INITS = ("flax", "reference")  # See the module docstring.


def fixed_padding(kernel_size: Sequence[int]) -> list[tuple[int, int]]:
  """The reference's padding of a strided convolution: k-1 in all, (k-1)//2 of it before.

  Unlike "SAME", it does not depend on the input size, so a 3x3 stride-2 convolution sees the
  same border on every side (SAME puts the whole pixel after on even sizes).
  """
  return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size]


def conv_factory(model_init: str, dtype: Any) -> Callable[..., nn.Conv]:
  """conv(features, kernel_size, strides=1, *, padding=None, name=None) -> nn.Conv.

  `padding` None picks the convention's padding: fixed padding for strided convolutions under
  "reference", "SAME" otherwise.
  """
  if model_init not in MODEL_INITS:
    raise ValueError(f"model_init={model_init!r}: choose one of {MODEL_INITS}.")
  if model_init == "reference":
    kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  else:
    kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  def conv(features: int, kernel_size: Sequence[int], strides: int | Sequence[int] = 1, *,
           padding: Any = None, name: str | None = None) -> nn.Conv:
    strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
    if padding is None:
      padding = (fixed_padding(kernel_size) if model_init == "reference" and max(strides) > 1
                 else "SAME")
    return nn.Conv(features, tuple(kernel_size), strides, padding=padding, use_bias=False,
                   dtype=dtype, kernel_init=kernel_init, name=name)

  return conv


def head_factory(model_init: str, num_classes: int, dtype: Any) -> nn.Dense:
  """The classifier: Flax's default init, or the reference's N(0, 0.01) kernel and zero bias."""
  if model_init == "reference":
    return nn.Dense(num_classes, dtype=dtype, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name="head")
  return nn.Dense(num_classes, dtype=dtype, name="head")


class _ResidualBlock(nn.Module):
  """What every residual block shares: its fields and the shortcut around its branch."""
  filters: int
  strides: int
  conv: Any
  norm: Any

  def _add_shortcut(self, residual, y, *, train: bool, branch: str):
    """relu(shortcut + y); the shortcut projects (1x1 conv + BN) when the shapes differ."""
    if residual.shape != y.shape:
      residual = self.conv(y.shape[-1], (1, 1), self.strides, name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual, train=train, branch=branch)
    return nn.relu(residual + y)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convolutions (ResNet-18/34 and the small ResNet)."""

  @nn.compact
  def __call__(self, x, *, train: bool, branch: str):
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y, train=train, branch=branch))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y, train=train, branch=branch)
    return self._add_shortcut(x, y, train=train, branch=branch)


class BottleneckBlock(_ResidualBlock):
  """1x1, 3x3 (strided: v1.5), 1x1 with 4x expansion (ResNet-50 and deeper)."""

  @nn.compact
  def __call__(self, x, *, train: bool, branch: str):
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y, train=train, branch=branch))
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = nn.relu(self.norm()(y, train=train, branch=branch))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y, train=train, branch=branch)
    return self._add_shortcut(x, y, train=train, branch=branch)


class ResNet(nn.Module):
  """ResNet v1.5 (ImageNet stem) or CIFAR-style (3x3 stem, no pooling) when `small_inputs`."""
  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  pixel_mean: Sequence[float]  # Per channel, 0-255 scale (the dataset registry's).
  pixel_std: Sequence[float]
  width: int = 64
  small_inputs: bool = False
  bn_branches: Sequence[str] = (norm.MAIN, norm.ADV)
  bn_group_size: int | None = None
  dtype: Any = jnp.float32
  model_init: str = "flax"  # One of MODEL_INITS: initialisation and padding convention.

  @nn.compact
  def __call__(self, x, *, train: bool, branch: str = norm.MAIN):
    conv = conv_factory(self.model_init, self.dtype)
    norm_layer = functools.partial(norm.BranchBatchNorm, branches=tuple(self.bn_branches),
                                   group_size=self.bn_group_size, dtype=self.dtype)
    x = (x - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    x = x.astype(self.dtype)
    if self.small_inputs:
      x = conv(self.width, (3, 3), name="stem_conv")(x)
    else:
      # (3, 3) is also the fixed padding of a 7x7 kernel: the stem is the same in both conventions.
      x = conv(self.width, (7, 7), 2, padding=[(3, 3), (3, 3)], name="stem_conv")(x)
    x = nn.relu(norm_layer(name="stem_bn")(x, train=train, branch=branch))
    if not self.small_inputs:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = self.block_cls(self.width * 2**stage, strides, conv, norm_layer)(
            x, train=train, branch=branch)
    x = jnp.mean(x, axis=(1, 2))
    return head_factory(self.model_init, self.num_classes, self.dtype)(x).astype(jnp.float32)


class MLP(nn.Module):
  """Flatten, then per hidden width Dense -> branch BN -> ReLU, then a Dense head.

  For CPU-scale studies (docs/study.md), where a batch-size sweep of convolutional networks does
  not fit the time. The hidden Dense layers have no bias: the BN after each adds one. Their
  kernels are LeCun normal, Flax's default, which is already the reference's
  variance_scaling(1, fan_in, truncated normal); `model_init` decides only the head. Parameters:
  sum_i(d_{i-1} w_i + 2 b w_i) + w_last K + K, with d_0 = H W C, b BN sets and K classes.
  """
  widths: Sequence[int]
  num_classes: int
  pixel_mean: Sequence[float]  # Per channel, 0-255 scale (the dataset registry's).
  pixel_std: Sequence[float]
  bn_branches: Sequence[str] = (norm.MAIN, norm.ADV)
  bn_group_size: int | None = None
  dtype: Any = jnp.float32
  model_init: str = "flax"

  @nn.compact
  def __call__(self, x, *, train: bool, branch: str = norm.MAIN):
    x = (x - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Dense(width, use_bias=False, dtype=self.dtype, name=f"hidden_{i}")(x)
      x = norm.BranchBatchNorm(branches=tuple(self.bn_branches), group_size=self.bn_group_size,
                               dtype=self.dtype, name=f"hidden_{i}_bn")(x, train=train,
                                                                         branch=branch)
      x = nn.relu(x)
    return head_factory(self.model_init, self.num_classes, self.dtype)(x).astype(jnp.float32)


_IMAGENET_RESNETS = {
    "ResNet18": ([2, 2, 2, 2], BasicBlock),
    "ResNet34": ([3, 4, 6, 3], BasicBlock),
    "ResNet50": ([3, 4, 6, 3], BottleneckBlock),
    "ResNet101": ([3, 4, 23, 3], BottleneckBlock),
    "ResNet152": ([3, 8, 36, 3], BottleneckBlock),
    "ResNet200": ([3, 24, 36, 3], BottleneckBlock),
}
MODEL_NAMES = (*_IMAGENET_RESNETS, "SmallResNet", "MLP")
DTYPES = ("float32", "bfloat16")  # Compute dtypes; parameters stay float32.
ADV_BN_MODES = ("separate", "shared")  # Own BN for adversarial examples, or the clean one.
SMALL_RESNET_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)


def valid_mlp_widths(widths: Any) -> bool:
  """A non-empty tuple (or list, as a config reads back from JSON) of positive ints."""
  return (isinstance(widths, (tuple, list)) and len(widths) > 0 and
          all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths))


def bn_branches(adv_bn: str = "separate", *, adversarial: bool = True,
                aug: bool = False) -> tuple[str, ...]:
  """The BN sets a model needs: main, then adv (own adversarial BN), then aug (augmented view).

  `adversarial` False (vanilla: no attack in training) drops the adv set whatever `adv_bn`
  says: it would never see an example, and evaluation reads main only. Branch "adv" on a model
  without its set uses main (norm.BranchBatchNorm).
  """
  if adv_bn not in ADV_BN_MODES:
    raise ValueError(f"adv_bn={adv_bn!r}: choose one of {ADV_BN_MODES}.")
  return ((norm.MAIN,) + ((norm.ADV,) if adversarial and adv_bn == "separate" else ()) +
          ((norm.AUG,) if aug else ()))


def create_model(name: str, *, num_classes: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], dtype: str = "float32",
                 bn_group_size: int | None = None, adv_bn: str = "separate",
                 adversarial: bool = True, aug_bn: bool = False, small_resnet_depth: int = 20,
                 small_resnet_width: int = 16, mlp_widths: Sequence[int] = (256, 256),
                 model_init: str = "flax") -> ResNet | MLP:
  """Builds a model by name; `bn_group_size` None/0 normalises over the whole batch it sees.

  `model_init` is one of MODEL_INITS (module docstring). The BN sets are
  bn_branches(adv_bn, adversarial=adversarial, aug=aug_bn). `small_resnet_*` apply to
  SmallResNet, `mlp_widths` (hidden widths) to MLP; every argument named after a config field is
  checked whatever the model (errors.ConfigError naming the field).
  """
  _check_model_fields(name=name, dtype=dtype, bn_group_size=bn_group_size, adv_bn=adv_bn,
                      small_resnet_depth=small_resnet_depth,
                      small_resnet_width=small_resnet_width, mlp_widths=mlp_widths,
                      model_init=model_init)
  common = dict(num_classes=num_classes, pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std),
                bn_branches=bn_branches(adv_bn, adversarial=adversarial, aug=aug_bn),
                bn_group_size=bn_group_size or None, dtype=jnp.dtype(dtype), model_init=model_init)
  if name in _IMAGENET_RESNETS:
    stages, block = _IMAGENET_RESNETS[name]
    return ResNet(stage_sizes=stages, block_cls=block, **common)
  if name == "SmallResNet":
    n = (small_resnet_depth - 2) // 6
    return ResNet(stage_sizes=[n, n, n], block_cls=BasicBlock, width=small_resnet_width,
                  small_inputs=True, **common)
  return MLP(widths=tuple(mlp_widths), **common)


def _check_model_fields(**fields: Any) -> None:
  """Checks every model field, also those the named model ignores: a typo in one stays a typo.

  Raises:
    errors.ConfigError: naming the field (config.FIELD=VALUE is not allowed: ...).
  """
  rules = {
      "name": (lambda v: v in MODEL_NAMES, f"choose one of {', '.join(MODEL_NAMES)}"),
      "dtype": (lambda v: v in DTYPES, f"choose one of {', '.join(DTYPES)}"),
      "bn_group_size": (lambda v: v is None or v >= 0, "it must be >= 0 (0: per device)"),
      "adv_bn": (lambda v: v in ADV_BN_MODES, f"choose one of {', '.join(ADV_BN_MODES)}"),
      "small_resnet_depth": (lambda v: v in SMALL_RESNET_DEPTHS,
                             f"it must be 6n+2, one of {', '.join(map(str, SMALL_RESNET_DEPTHS))}"),
      "small_resnet_width": (lambda v: v >= 1, "it must be >= 1"),
      "mlp_widths": (valid_mlp_widths, "use a non-empty tuple of positive ints, e.g. (256, 256)"),
      "model_init": (lambda v: v in MODEL_INITS, f"choose one of {', '.join(MODEL_INITS)}"),
  }
  for field, (ok, allowed) in rules.items():
    errors.check_value("model" if field == "name" else field, fields[field], ok, allowed)


def per_device_bn_group_size(bn_group_size: int | None, global_batch: int,
                             num_devices: int) -> int:
  """Resolves the config's bn_group_size: 0/None means the whole per-device batch."""
  return bn_group_size or global_batch // num_devices


def create_model_from_config(config: Any, data: Any, num_devices: int) -> ResNet | MLP:
  """The model a config describes for `data` (its num_classes and pixel statistics, e.g. an
  experiment.DataShape), with BN groups resolved for `num_devices`.

  Its BN sets are the ones the config's method uses: no adv set for vanilla, an aug set when
  config.aug_branch is on (bn_branches).
  """
  return create_model(
      config.model, num_classes=data.num_classes, pixel_mean=data.pixel_mean,
      pixel_std=data.pixel_std, dtype=config.dtype,
      bn_group_size=per_device_bn_group_size(config.bn_group_size,
                                             config.batch_size // config.grad_accum_steps,
                                             num_devices),
      adv_bn=config.adv_bn, adversarial=config.method != "vanilla",  # conadv.METHODS.
      aug_bn=config.aug_branch != "none", small_resnet_depth=config.small_resnet_depth,
      small_resnet_width=config.small_resnet_width, mlp_widths=tuple(config.mlp_widths),
      model_init=config.model_init)
