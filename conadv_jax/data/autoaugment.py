"""AutoAugment ("v0" ImageNet policy) and RandAugment as stateless TensorFlow ops for tf.data.

ConAdv's ResNet-50/ImageNet recipe at batch 96K adds an AutoAugment branch. Everything here is a
pure graph-mode TF function of an image and a seed, so it runs inside `tf.data.Dataset.map`, and
an example's augmentation depends only on its seed (shape [2], int32/int64, as the
`tf.random.experimental.stateless_*` ops take): resumed runs and multi-host runs reproduce it.

Images are [H, W, C] uint8 tensors with C = 3 (RGB) or C = 1 (grayscale); H and W may be dynamic,
C must be static. The policy functions (`autoaugment`, `autoaugment_v0`, `randaugment`) also take
floating images in [0, 255]: they are clipped and rounded to uint8 first (the ops are defined on
integer levels) and cast back to the input dtype at the end.

Each op reproduces Pillow exactly (pixel for pixel, see tests/test_autoaugment.py), so the policy
behaves like the PIL code AutoAugment was designed with:

  AutoContrast  ImageOps.autocontrast: per channel, stretch [min, max] to [0, 255].
  Equalize      ImageOps.equalize: per-channel histogram equalisation.
  Invert        ImageOps.invert.
  Posterize     ImageOps.posterize: keep the `bits` most significant bits of each channel.
  Solarize      ImageOps.solarize: invert each channel value >= threshold.
  SolarizeAdd   (no PIL op) add `addition` (clipped) to each channel value < threshold.
  Color         ImageEnhance.Color: blend with the ITU-R 601-2 luma image. Needs RGB.
  Contrast      ImageEnhance.Contrast: blend with the mean luma (rounded) as a flat image.
  Brightness    ImageEnhance.Brightness: blend with black.
  Sharpness     ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (border pixels kept).
  Rotate        Image.rotate: counter-clockwise degrees about the centre.
  ShearX/Y      Image.transform(AFFINE, (1, s, 0, 0, 1, 0)) / (1, 0, 0, s, 1, 0).
  TranslateX/Y  Image.transform(AFFINE, (1, 0, p, 0, 1, 0)) / (1, 0, 0, 0, 1, p): the content
                moves by -p pixels.
  Cutout        (no PIL op) a (2 * pad_size)-sided square at a random centre, clipped to the
                image, is set to the fill value.
  Identity      the image unchanged.

Geometric ops use nearest-neighbour sampling (no bilinear), PIL's pixel-centre convention and
PIL's 16.16 fixed-point source coordinates, and fill uncovered pixels with 128 in every channel,
as the reference TPU implementation does. Point ops act on each channel independently, so they
mean the same on grayscale. Color on a grayscale image has no meaning: `color` raises, and the
policies treat it as Identity there (which is what PIL's ImageEnhance.Color does on mode "L").

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
import math

import tensorflow as tf

from conadv_jax.data import datasets

# The top of the level scale. Its one definition is in the registry, which imports no TensorFlow,
# so config validation can bound config.randaugment_magnitude before TensorFlow is loaded.
MAX_LEVEL = datasets.RANDAUGMENT_MAX_MAGNITUDE
FILL_VALUE = 128  # Grey for pixels a geometric op or Cutout leaves uncovered, in every channel.

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
_SOLARIZE_ADD_THRESHOLD = 128
_FIXED_ONE = 65536  # PIL's nearest-neighbour affine transform works in 16.16 fixed point.

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

Number = int | float | tf.Tensor

# Public functions use explicit tf.cond / tf.switch_case, never Python control flow on tensors,
# so AutoGraph has nothing to convert: skipping it makes tracing in tf.data.Dataset.map faster.
_no_autograph = tf.autograph.experimental.do_not_convert


# ------------------------------------------------------------------------------------------------
# Checks and shared helpers.


def _check_image(image: tf.Tensor, op: str) -> tf.Tensor:
  """Fails early, at trace time, on inputs the ops are not defined for."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f"{op} expects a uint8 image, got {image.dtype.name}; the policy functions "
                    "convert float images in [0, 255] themselves.")
  if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"{op} expects an [H, W, C] image with static C = 1 or 3, got shape "
                     f"{image.shape}.")
  return image


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Number) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor): float32 interpolation, truncated to uint8.

  The arithmetic order is PIL's (difference of integers, times a float32 factor, plus the
  degenerate value), so results agree bit for bit; factors outside [0, 1] extrapolate.
  """
  factor = tf.cast(factor, tf.float32)
  difference = tf.cast(tf.cast(image, tf.int32) - tf.cast(degenerate, tf.int32), tf.float32)
  blended = tf.cast(degenerate, tf.float32) + factor * difference
  return tf.cast(tf.clip_by_value(tf.floor(blended), 0.0, 255.0), tf.uint8)


def _luma(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 1] ITU-R 601-2 luma of an RGB image, in PIL's rounded 16-bit fixed point."""
  r, g, b = tf.unstack(tf.cast(image, tf.int32), axis=-1)
  luma = tf.bitwise.right_shift(r * 19595 + g * 38470 + b * 7471 + 32768, 16)
  return tf.cast(luma, tf.uint8)[..., tf.newaxis]


def _gray(image: tf.Tensor) -> tf.Tensor:
  return image if image.shape[-1] == 1 else _luma(image)


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Maps channel c of `image` through lut[c] ([C, 256], values in [0, 255])."""
  channels = image.shape[-1]
  offsets = tf.range(channels, dtype=tf.int32) * 256
  flat_lut = tf.reshape(tf.cast(lut, tf.uint8), [-1])
  return tf.gather(flat_lut, tf.cast(image, tf.int32) + offsets)


def _channel_histograms(image: tf.Tensor) -> tf.Tensor:
  """[C, 256] int64 counts of each value per channel."""
  per_channel = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, image.shape[-1]]))
  return tf.math.bincount(per_channel, minlength=256, maxlength=256, dtype=tf.int64, axis=-1)


# ------------------------------------------------------------------------------------------------
# Point ops.


@_no_autograph
def identity(image: tf.Tensor) -> tf.Tensor:
  """The image unchanged (RandAugment's "do nothing" choice)."""
  return tf.identity(_check_image(image, "identity"))


@_no_autograph
def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - x per channel (ImageOps.invert)."""
  image = _check_image(image, "invert")
  return tf.constant(255, tf.uint8) - image


@_no_autograph
def posterize(image: tf.Tensor, bits: int | tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` (in [1, 8]) most significant bits of every channel (ImageOps.posterize)."""
  image = _check_image(image, "posterize")
  if isinstance(bits, int) and not 1 <= bits <= 8:
    raise ValueError(f"posterize bits must be in [1, 8], got {bits}.")
  low_bits = 8 - tf.cast(bits, tf.int32)
  mask = 256 - tf.bitwise.left_shift(1, low_bits)  # Clears the low 8 - bits bits.
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


@_no_autograph
def solarize(image: tf.Tensor, threshold: Number = 128) -> tf.Tensor:
  """Inverts channel values >= threshold (ImageOps.solarize); 0 inverts all, 256 none."""
  image = _check_image(image, "solarize")
  values = tf.cast(image, tf.int32)
  return tf.where(values < tf.cast(threshold, tf.int32), image, 255 - image)


@_no_autograph
def solarize_add(image: tf.Tensor, addition: Number,
                 threshold: Number = _SOLARIZE_ADD_THRESHOLD) -> tf.Tensor:
  """Adds `addition` (clipped to [0, 255]) to channel values < threshold; others stay."""
  image = _check_image(image, "solarize_add")
  values = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(values + tf.cast(addition, tf.int32), 0, 255), tf.uint8)
  return tf.where(values < tf.cast(threshold, tf.int32), added, image)


@_no_autograph
def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (ImageOps.autocontrast, no cutoff).

  Like PIL, builds a 256-entry LUT per channel in float64 (level * scale + offset, truncated),
  so levels agree exactly; a flat channel is left as it is.
  """
  image = _check_image(image, "autocontrast")
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, tf.newaxis]  # [C, 1]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, tf.newaxis]
  flat = hi <= lo
  scale = 255.0 / tf.where(flat, tf.ones_like(hi), hi - lo)
  offset = -lo * scale
  levels = tf.range(256, dtype=tf.float64)
  lut = tf.where(flat, levels, tf.clip_by_value(tf.floor(levels * scale + offset), 0.0, 255.0))
  return _apply_lut(image, lut)


@_no_autograph
def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram-equalises each channel on its own (ImageOps.equalize).

  As in PIL, a channel whose histogram has one non-empty bin, or too few pixels outside its
  brightest bin (step = 0), is left as it is.
  """
  image = _check_image(image, "equalize")
  histo = _channel_histograms(image)  # [C, 256]
  levels = tf.range(256, dtype=tf.int64)
  last_level = tf.reduce_max(tf.where(histo > 0, levels, -1), axis=-1)
  last_count = tf.gather(histo, last_level, batch_dims=1)
  step = (tf.reduce_sum(histo, axis=-1) - last_count) // 255  # [C]
  safe_step = tf.maximum(step, 1)[:, tf.newaxis]
  below = tf.cumsum(histo, axis=-1, exclusive=True)  # Pixels darker than each level.
  lut = tf.clip_by_value((safe_step // 2 + below) // safe_step, 0, 255)
  lut = tf.where((step > 0)[:, tf.newaxis], lut, levels)
  return _apply_lut(image, lut)


# ------------------------------------------------------------------------------------------------
# Enhance ops (PIL ImageEnhance): factor 1 is the identity, 0 the degenerate image.


@_no_autograph
def color(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """Saturation (ImageEnhance.Color): blends with the luma image. Needs an RGB image."""
  image = _check_image(image, "color")
  if image.shape[-1] != 3:
    raise ValueError("color needs an RGB image (C = 3): a grayscale image has no saturation to "
                     "change. The policies treat Color as Identity on grayscale images.")
  return _blend(tf.tile(_luma(image), [1, 1, 3]), image, factor)


@_no_autograph
def contrast(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Contrast: blends with a flat image at the mean luma (rounded half up)."""
  image = _check_image(image, "contrast")
  gray = tf.cast(_gray(image), tf.int64)
  mean = tf.cast(tf.reduce_sum(gray), tf.float64) / tf.cast(tf.size(gray), tf.float64)
  level = tf.cast(tf.floor(mean + 0.5), tf.uint8)
  return _blend(tf.fill(tf.shape(image), level), image, factor)


@_no_autograph
def brightness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Brightness: blends with black."""
  image = _check_image(image, "brightness")
  return _blend(tf.zeros_like(image), image, factor)


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """ImageFilter.SMOOTH: 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded half up.

  Border pixels keep their value, as in PIL; images narrower than 3 pixels stay as they are. In
  integers: 13 is odd, so n / 13 is never a tie and round(n / 13) = (2n + 13) // 26.
  """
  shape = tf.shape(image)

  def smoothed() -> tf.Tensor:
    values = tf.cast(image, tf.int32)
    rows = values[:-2] + values[1:-1] + values[2:]  # The 3x3 box sum, separably.
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    total = box + 4 * values[1:-1, 1:-1]  # Centre weight 5 = 1 (in the box) + 4.
    inner = tf.cast((2 * total + 13) // 26, tf.uint8)
    is_inner = tf.pad(tf.ones_like(inner, tf.bool), [[1, 1], [1, 1], [0, 0]])
    return tf.where(is_inner, tf.pad(inner, [[1, 1], [1, 1], [0, 0]]), image)

  return tf.cond((shape[0] >= 3) & (shape[1] >= 3), smoothed, lambda: image)


@_no_autograph
def sharpness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Sharpness: blends with the SMOOTH-filtered image (factor > 1 sharpens)."""
  image = _check_image(image, "sharpness")
  return _blend(_smooth(image), image, factor)


# ------------------------------------------------------------------------------------------------
# Geometric ops: nearest neighbour, PIL's conventions, uncovered pixels set to `fill`.


def _fixed(value: tf.Tensor) -> tf.Tensor:
  """PIL's FIX(): float64 to 16.16 fixed point, rounded half up."""
  return tf.cast(tf.floor(value * _FIXED_ONE + 0.5), tf.int64)


def _affine(image: tf.Tensor, matrix: Sequence[Number], fill: int) -> tf.Tensor:
  """PIL's Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=fill), same size.

  Output pixel (x, y) takes the input pixel at floor(a (x + 0.5) + b (y + 0.5) + c) and
  floor(d (x + 0.5) + e (y + 0.5) + f) for matrix (a, b, c, d, e, f); coordinates are computed in
  16.16 fixed point as PIL does, so sampling matches it pixel for pixel.
  """
  a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in matrix)
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)
  ys, xs = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
  src_x = (_fixed(c + a * 0.5 + b * 0.5) + ys * _fixed(b) + xs * _fixed(a)) // _FIXED_ONE
  src_y = (_fixed(f + d * 0.5 + e * 0.5) + ys * _fixed(e) + xs * _fixed(d)) // _FIXED_ONE
  inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
  indices = tf.stack([tf.clip_by_value(src_y, 0, height - 1),
                      tf.clip_by_value(src_x, 0, width - 1)], axis=-1)
  sampled = tf.gather_nd(image, indices)
  return tf.where(inside[..., tf.newaxis], sampled, tf.constant(fill, tf.uint8))


def _check_fill(fill: int) -> int:
  if not 0 <= fill <= 255:
    raise ValueError(f"fill must be a uint8 value, got {fill}.")
  return fill


@_no_autograph
def rotate(image: tf.Tensor, degrees: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the image centre (Image.rotate, NEAREST)."""
  image = _check_image(image, "rotate")
  radians = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  shape = tf.cast(tf.shape(image), tf.float64)
  center_x, center_y = shape[1] / 2.0, shape[0] / 2.0
  # PIL's inverse map: rotate about the origin, with the centre moved there and back.
  offset_x = cos * -center_x + sin * -center_y + center_x
  offset_y = -sin * -center_x + cos * -center_y + center_y
  return _affine(image, (cos, sin, offset_x, -sin, cos, offset_y), _check_fill(fill))


@_no_autograph
def shear_x(image: tf.Tensor, shear: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + shear * y, y), in pixel centres."""
  image = _check_image(image, "shear_x")
  return _affine(image, (1.0, shear, 0.0, 0.0, 1.0, 0.0), _check_fill(fill))


@_no_autograph
def shear_y(image: tf.Tensor, shear: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x, y + shear * x), in pixel centres."""
  image = _check_image(image, "shear_y")
  return _affine(image, (1.0, 0.0, 0.0, shear, 1.0, 0.0), _check_fill(fill))


@_no_autograph
def translate_x(image: tf.Tensor, pixels: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + pixels, y): content moves left for pixels > 0."""
  image = _check_image(image, "translate_x")
  return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), _check_fill(fill))


@_no_autograph
def translate_y(image: tf.Tensor, pixels: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x, y + pixels): content moves up for pixels > 0."""
  image = _check_image(image, "translate_y")
  return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), _check_fill(fill))


@_no_autograph
def cutout_at(image: tf.Tensor, center_y: Number, center_x: Number, pad_size: Number,
              fill: int = FILL_VALUE) -> tf.Tensor:
  """Sets rows [cy - pad, cy + pad) x columns [cx - pad, cx + pad), clipped, to `fill`."""
  image = _check_image(image, "cutout")
  shape = tf.shape(image)
  center_y, center_x, pad_size = (tf.cast(v, tf.int32) for v in (center_y, center_x, pad_size))
  rows = tf.range(shape[0])
  cols = tf.range(shape[1])
  in_rows = (rows >= center_y - pad_size) & (rows < center_y + pad_size)
  in_cols = (cols >= center_x - pad_size) & (cols < center_x + pad_size)
  inside = in_rows[:, tf.newaxis, tf.newaxis] & in_cols[tf.newaxis, :, tf.newaxis]
  return tf.where(inside, tf.constant(_check_fill(fill), tf.uint8), image)


@_no_autograph
def cutout(image: tf.Tensor, pad_size: Number, seed: tf.Tensor,
           fill: int = FILL_VALUE) -> tf.Tensor:
  """Cutout: a (2 * pad_size)-sided square, centred on a uniformly random pixel, set to `fill`.

  The square is clipped at the image border, so it can be smaller near the edges.
  """
  image = _check_image(image, "cutout")
  shape = tf.shape(image)
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num=2))
  center_y = tf.random.stateless_uniform([], seed_y, 0, shape[0], dtype=tf.int32)
  center_x = tf.random.stateless_uniform([], seed_x, 0, shape[1], dtype=tf.int32)
  return cutout_at(image, center_y, center_x, pad_size, fill)


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


def _as_seed(seed: tf.Tensor) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} "
                     f"{seed.shape}.")
  return tf.cast(seed, tf.int64)


def _apply_with_arg(image: tf.Tensor, name: str, arg: Number | None, seed: tf.Tensor) -> tf.Tensor:
  """Op `name` with unsigned argument `arg` (Python or scalar tensor; ignored by argument-free
  ops): the seed signs it for the signed ops and places Cutout. Color on grayscale is Identity."""
  if name in SIGNED_OPS:
    arg = tf.cast(arg, tf.float64)
    arg = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -arg, arg)
  if name == "Cutout":
    return cutout(image, arg, seed)
  if name in ("AutoContrast", "Equalize", "Invert", "Identity") or (
      name == "Color" and image.shape[-1] == 1):
    return {"AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert}.get(
        name, identity)(image)
  ops: dict[str, Callable[[tf.Tensor, Number], tf.Tensor]] = {
      "Rotate": rotate, "Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add,
      "Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness,
      "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
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
  image = _check_image(image, name)
  arg = level_to_arg(name, level, translate_const=translate_const, cutout_const=cutout_const)
  return _apply_with_arg(image, name, arg, _as_seed(seed))


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
    return _check_image(image, "augmentation"), lambda out: out
  if not dtype.is_floating:
    raise TypeError(f"Augmentation expects a uint8 or floating image in [0, 255], got "
                    f"{dtype.name}.")
  as_uint8 = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
  return _check_image(as_uint8, "augmentation"), lambda out: tf.cast(out, dtype)


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
      tf.random.experimental.stateless_split(_as_seed(seed), num=3))
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
  choice_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num=2))
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
