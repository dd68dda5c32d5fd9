"""AutoAugment ("v0" ImageNet policy) and RandAugment as stateless TensorFlow ops for tf.data.

ConAdv's ResNet-50/ImageNet recipe at batch 96K adds an AutoAugment branch. Everything here is a
pure graph-mode TF function of an image and a seed, so it runs inside `tf.data.Dataset.map`, and
an example's augmentation depends only on its seed (shape [2], int32/int64, as the
`tf.random.experimental.stateless_*` ops take): resumed runs and multi-host runs reproduce it.
The image ops themselves, each matching Pillow, are in `image_ops`; this module holds the
policies, their tables and the magnitude scale.

Images are [H, W, C] with C = 3 (RGB) or C = 1 (grayscale). The policy functions (`autoaugment`,
`autoaugment_v0`, `randaugment`) take uint8 or floating images in [0, 255]: floats are clipped
and rounded to uint8 first (the ops are defined on integer levels) and cast back at the end.

Typical use, in a tf.data map after cropping and resizing (float or uint8 image, seed [2]):
  image = autoaugment_v0(image, seed)                      # or
  image = randaugment(image, seed, num_layers=2, magnitude=9)

Magnitude levels are in [0, MAX_LEVEL = 10]; `level_to_arg` maps them to op arguments with the
reference TPU formulas (table in its docstring), and Rotate/Shear/Translate get a random sign.
Where that reference differs from PIL, PIL wins: Contrast uses the true mean luma (the
reference's "mean" is the pixel count / 256), Sharpness rounds the smoothed image (the reference
truncates), and shears use PIL's pixel centres (the reference's sample up to 0.15 px away).
"""
from collections.abc import Callable, Sequence

import tensorflow as tf

from conadv_jax.data import datasets, geometric_ops, image_ops

# The top of the level scale. Its one definition is in the registry, which imports no TensorFlow,
# so config validation can bound config.randaugment_magnitude before TensorFlow is loaded.
MAX_LEVEL = datasets.RANDAUGMENT_MAX_MAGNITUDE

# Arguments of the AutoAugment policy of the reference TPU implementation for ImageNet, and of
# its RandAugment (which uses smaller translations and cutouts).
AUTOAUGMENT_TRANSLATE_CONST = 250.0
AUTOAUGMENT_CUTOUT_CONST = 100
RANDAUGMENT_TRANSLATE_CONST = 100.0
RANDAUGMENT_CUTOUT_CONST = 40

_ROTATE_MAX_DEGREES = 30.0
_SHEAR_MAX = 0.3
_ENHANCE_MIN, _ENHANCE_SPAN = 0.1, 1.8  # Enhance factors in [0.1, 1.9].
_POSTERIZE_MAX_BITS = 4
_SOLARIZE_MAX_THRESHOLD = 256
_SOLARIZE_ADD_MAX = 110

# Ops whose argument gets a random sign (a symmetric range around the identity).
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
            "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Cutout", "Identity")

# One sub-policy: ((op, probability, level), (op, probability, level)).
SubPolicy = tuple[tuple[str, float, int], ...]

# AutoAugment's ImageNet policy "v0" (as in the reference TPU EfficientNet code): one of the 25
# sub-policies is drawn uniformly per image, and each of its two ops is applied with its
# probability, at its level.
POLICY_V0: tuple[SubPolicy, ...] = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)

# The ops RandAugment draws from, as in the reference TPU implementation behind the published
# ImageNet numbers (no Identity; pass `ops=` to `randaugment` to change the list).
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                   "TranslateY", "Cutout", "SolarizeAdd")

Number = image_ops.Number

# No Python control flow on tensors here either (see image_ops): AutoGraph is skipped.
_no_autograph = tf.autograph.experimental.do_not_convert


# ------------------------------------------------------------------------------------------------
# Magnitudes.


def level_to_arg(name: str, level: float, *,
                 translate_const: float = AUTOAUGMENT_TRANSLATE_CONST,
                 cutout_const: int = AUTOAUGMENT_CUTOUT_CONST) -> int | float | None:
  """The (unsigned) argument of op `name` at magnitude `level` in [0, MAX_LEVEL].

  Linear in level / MAX_LEVEL, as in the reference TPU implementation:
    Rotate                 degrees in [0, 30]             (signed at random: [-30, 30])
    ShearX/Y               shear in [0, 0.3]              (signed at random: [-0.3, 0.3])
    TranslateX/Y           pixels in [0, translate_const] (signed at random)
    Color/Contrast/Brightness/Sharpness   factor in [0.1, 1.9]
    Solarize               threshold int(level / 10 * 256) in [0, 256]
    SolarizeAdd            addition int(level / 10 * 110) in [0, 110]
    Posterize              bits max(int(level / 10 * 4), 1) in [1, 4]
    Cutout                 pad_size int(level / 10 * cutout_const) (square side 2 * pad_size)
    AutoContrast, Equalize, Invert, Identity   no argument (None)
  Posterize: the reference computes int(level / 10 * 4) bits, so levels < 2.5 give 0 bits; it
  then shifts by 8 - 0 = 8, which TF's CPU shift clamps to 7, i.e. it keeps 1 bit. The max(., 1)
  reproduces what the reference does (PIL rejects 0 bits).
  """
  if name not in OP_NAMES:
    raise ValueError(f"Unknown op {name!r}; known ops: {', '.join(OP_NAMES)}.")
  if not 0 <= level <= MAX_LEVEL:
    raise ValueError(f"Magnitude level must be in [0, {MAX_LEVEL:g}], got {level} for {name}.")
  fraction = level / MAX_LEVEL
  if name == "Rotate":
    return fraction * _ROTATE_MAX_DEGREES
  if name in ("ShearX", "ShearY"):
    return fraction * _SHEAR_MAX
  if name in ("TranslateX", "TranslateY"):
    return fraction * float(translate_const)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return fraction * _ENHANCE_SPAN + _ENHANCE_MIN
  if name == "Solarize":
    return int(fraction * _SOLARIZE_MAX_THRESHOLD)
  if name == "SolarizeAdd":
    return int(fraction * _SOLARIZE_ADD_MAX)
  if name == "Posterize":
    return max(int(fraction * _POSTERIZE_MAX_BITS), 1)
  if name == "Cutout":
    return int(fraction * cutout_const)
  return None


def _apply_with_arg(image: tf.Tensor, name: str, arg: Number | None, seed: tf.Tensor) -> tf.Tensor:
  """Op `name` with unsigned argument `arg` (Python or scalar tensor; ignored by argument-free
  ops): the seed signs it for the signed ops and places Cutout. Color on grayscale is Identity."""
  if name in SIGNED_OPS:
    arg = tf.cast(arg, tf.float64)
    arg = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -arg, arg)
  if name == "Cutout":
    return geometric_ops.cutout(image, arg, seed)
  if name in ("AutoContrast", "Equalize", "Invert", "Identity") or (
      name == "Color" and image.shape[-1] == 1):
    return {"AutoContrast": image_ops.autocontrast, "Equalize": image_ops.equalize,
            "Invert": image_ops.invert}.get(name, image_ops.identity)(image)
  ops: dict[str, Callable[[tf.Tensor, Number], tf.Tensor]] = {
      "Rotate": geometric_ops.rotate, "Posterize": image_ops.posterize,
      "Solarize": image_ops.solarize, "SolarizeAdd": image_ops.solarize_add,
      "Color": image_ops.color, "Contrast": image_ops.contrast,
      "Brightness": image_ops.brightness, "Sharpness": image_ops.sharpness,
      "ShearX": geometric_ops.shear_x, "ShearY": geometric_ops.shear_y,
      "TranslateX": geometric_ops.translate_x, "TranslateY": geometric_ops.translate_y,
  }
  return ops[name](image, arg)


@_no_autograph
def apply_op(image: tf.Tensor, name: str, level: float, seed: tf.Tensor, *,
             translate_const: float = AUTOAUGMENT_TRANSLATE_CONST,
             cutout_const: int = AUTOAUGMENT_CUTOUT_CONST) -> tf.Tensor:
  """Applies op `name` at magnitude `level` to a uint8 image, always.

  `seed` draws the sign of the signed ops (each sign with probability 1/2) and Cutout's centre.
  Color on a grayscale image is Identity.
  """
  image = image_ops.check_image(image, name)
  arg = level_to_arg(name, level, translate_const=translate_const, cutout_const=cutout_const)
  return _apply_with_arg(image, name, arg, image_ops.as_seed(seed))


def _arg_table(ops: Sequence[tuple[str, float]], translate_const: float,
               cutout_const: int) -> tf.Tensor:
  """float64 [len(ops)] unsigned arguments of (name, level) pairs; 0 for argument-free ops."""
  args = [level_to_arg(name, level, translate_const=translate_const, cutout_const=cutout_const)
          for name, level in ops]
  return tf.constant([0.0 if arg is None else float(arg) for arg in args], tf.float64)


def _switch_op(image: tf.Tensor, names: Sequence[str], which: tf.Tensor, arg: tf.Tensor,
               seed: tf.Tensor) -> tf.Tensor:
  """Applies names[which] with the (unsigned, float64) argument `arg`: one branch per op name,
  levels being data, which keeps the graph small and quick to trace."""
  branches = [lambda name=name: _apply_with_arg(image, name, arg, seed) for name in names]
  return tf.ensure_shape(tf.switch_case(which, branches), image.shape)


# ------------------------------------------------------------------------------------------------
# Policies.


def _prepare(image: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
  """uint8 view of `image` and the function that casts a result back to the input dtype."""
  image = tf.convert_to_tensor(image)
  dtype = image.dtype
  if dtype == tf.uint8:
    return image_ops.check_image(image, "augmentation"), lambda out: out
  if not dtype.is_floating:
    raise TypeError(f"Augmentation expects a uint8 or floating image in [0, 255], got "
                    f"{dtype.name}.")
  as_uint8 = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
  return image_ops.check_image(as_uint8, "augmentation"), lambda out: tf.cast(out, dtype)


def _check_policy(policy: Sequence[SubPolicy]) -> None:
  if not policy:
    raise ValueError("An AutoAugment policy needs at least one sub-policy.")
  lengths = {len(sub_policy) for sub_policy in policy}
  if len(lengths) != 1 or 0 in lengths:
    raise ValueError("All sub-policies must have the same, non-zero number of ops.")
  for sub_policy in policy:
    for name, probability, level in sub_policy:
      level_to_arg(name, level)  # Raises on an unknown op or a level out of range.
      if not 0.0 <= probability <= 1.0:
        raise ValueError(f"Probability of {name} must be in [0, 1], got {probability}.")


@_no_autograph
def autoaugment_choices(seed: tf.Tensor, policy: Sequence[SubPolicy] = POLICY_V0
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The random decisions `autoaugment(image, seed, policy)` makes, without an image.

  Returns (index: int32 [], the sub-policy drawn uniformly; applied: bool [K], whether each of
  its K ops passes its probability gate; op_seeds: int64 [K, 2], the seed `apply_op` gets for
  each op). Exposed so that tests, logging or a debugger can see what was chosen.
  """
  _check_policy(policy)
  num_ops = len(policy[0])
  choice_seed, gate_seed, op_seed = tf.unstack(
      tf.random.experimental.stateless_split(image_ops.as_seed(seed), num=3))
  index = tf.random.stateless_uniform([], choice_seed, 0, len(policy), dtype=tf.int32)
  probabilities = tf.constant([[p for _, p, _ in sub] for sub in policy], tf.float32)
  gates = tf.random.stateless_uniform([num_ops], gate_seed)
  applied = gates < tf.gather(probabilities, index)
  op_seeds = tf.random.experimental.stateless_split(op_seed, num=num_ops)
  return index, applied, op_seeds


@_no_autograph
def autoaugment(image: tf.Tensor, seed: tf.Tensor, policy: Sequence[SubPolicy] = POLICY_V0, *,
                translate_const: float = AUTOAUGMENT_TRANSLATE_CONST,
                cutout_const: int = AUTOAUGMENT_CUTOUT_CONST) -> tf.Tensor:
  """AutoAugment with `policy`: one uniformly drawn sub-policy, each op gated by its probability.

  Deterministic in `seed`; same dtype and shape as `image` (uint8, or float in [0, 255]).
  """
  image, restore = _prepare(image)
  index, applied, op_seeds = autoaugment_choices(seed, policy)
  out = image
  for k in range(len(policy[0])):
    # Position k of the drawn sub-policy: one of the op names used there, or Identity when its
    # gate is closed; its argument looked up by sub-policy.
    names = sorted({sub_policy[k][0] for sub_policy in policy} | {"Identity"})
    which = tf.constant([names.index(sub_policy[k][0]) for sub_policy in policy], tf.int32)
    args = _arg_table([(sub_policy[k][0], sub_policy[k][2]) for sub_policy in policy],
                      translate_const, cutout_const)
    which = tf.where(applied[k], tf.gather(which, index), names.index("Identity"))
    out = _switch_op(out, names, which, tf.gather(args, index), op_seeds[k])
  return restore(out)


@_no_autograph
def autoaugment_v0(image: tf.Tensor, seed: tf.Tensor, *,
                   translate_const: float = AUTOAUGMENT_TRANSLATE_CONST,
                   cutout_const: int = AUTOAUGMENT_CUTOUT_CONST) -> tf.Tensor:
  """AutoAugment with the ImageNet policy "v0" (POLICY_V0)."""
  return autoaugment(image, seed, POLICY_V0, translate_const=translate_const,
                     cutout_const=cutout_const)


def _check_randaugment(num_layers: int, magnitude: float, ops: Sequence[str]) -> None:
  if not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}.")
  if not ops:
    raise ValueError("RandAugment needs at least one op.")
  for name in ops:
    level_to_arg(name, magnitude)  # Raises on an unknown op or a magnitude out of range.


@_no_autograph
def randaugment_choices(seed: tf.Tensor, num_layers: int = 2,
                        num_ops: int = len(RANDAUGMENT_OPS)) -> tuple[tf.Tensor, tf.Tensor]:
  """The random decisions `randaugment(image, seed, num_layers, ops=...)` makes, without an image.

  Returns (op_indices: int32 [num_layers], each uniform in [0, num_ops); op_seeds: int64
  [num_layers, 2], the seed `apply_op` gets in each layer).
  """
  choice_seed, op_seed = tf.unstack(
      tf.random.experimental.stateless_split(image_ops.as_seed(seed), num=2))
  op_indices = tf.random.stateless_uniform([num_layers], choice_seed, 0, num_ops, dtype=tf.int32)
  op_seeds = tf.random.experimental.stateless_split(op_seed, num=num_layers)
  return op_indices, op_seeds


@_no_autograph
def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2, magnitude: float = 9, *,
                translate_const: float = RANDAUGMENT_TRANSLATE_CONST,
                cutout_const: int = RANDAUGMENT_CUTOUT_CONST,
                ops: Sequence[str] = RANDAUGMENT_OPS) -> tf.Tensor:
  """RandAugment: `num_layers` ops, each drawn uniformly from `ops`, applied at `magnitude`.

  Every drawn op is applied (no probability gate, as in the reference); signed ops get a random
  sign. Deterministic in `seed`; same dtype and shape as `image` (uint8, or float in [0, 255]).
  """
  _check_randaugment(num_layers, magnitude, ops)
  image, restore = _prepare(image)
  op_indices, op_seeds = randaugment_choices(seed, num_layers, len(ops))
  args = _arg_table([(name, magnitude) for name in ops], translate_const, cutout_const)
  out = image
  for layer in range(num_layers):
    which = op_indices[layer]
    out = _switch_op(out, ops, which, tf.gather(args, which), op_seeds[layer])
  return restore(out)
