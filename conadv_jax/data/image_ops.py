"""The image ops of AutoAugment and RandAugment, each reproducing Pillow pixel for pixel.

Pure graph-mode TF functions, so they run inside `tf.data.Dataset.map`; the one random op
(`geometric_ops.cutout`) takes a stateless seed. Images are [H, W, C] uint8 tensors with C = 3 (RGB) or C = 1
(grayscale); H and W may be dynamic, C must be static. Matching Pillow exactly (see
tests/test_autoaugment.py) makes the policies (`autoaugment`) behave like the PIL code
AutoAugment was designed with:

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
  Identity      the image unchanged.

The geometric ops (Rotate, Shear, Translate, Cutout) are in `geometric_ops`. Point ops act on each channel independently, so they
mean the same on grayscale. Color on a grayscale image has no meaning: `color` raises, and the
policies treat it as Identity there (which is what PIL's ImageEnhance.Color does on mode "L").
"""
import tensorflow as tf

FILL_VALUE = 128  # Grey for pixels a geometric op or Cutout leaves uncovered, in every channel.
_SOLARIZE_ADD_THRESHOLD = 128

Number = int | float | tf.Tensor

# Public functions use explicit tf.cond / tf.switch_case, never Python control flow on tensors,
# so AutoGraph has nothing to convert: skipping it makes tracing in tf.data.Dataset.map faster.
no_autograph = tf.autograph.experimental.do_not_convert


# ------------------------------------------------------------------------------------------------
# Checks and shared helpers.


def check_image(image: tf.Tensor, op: str) -> tf.Tensor:
  """`image` as a tensor; fails early, at trace time, on inputs the ops are not defined for."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f"{op} expects a uint8 image, got {image.dtype.name}; the policy functions "
                    "convert float images in [0, 255] themselves.")
  if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"{op} expects an [H, W, C] image with static C = 1 or 3, got shape "
                     f"{image.shape}.")
  return image


def as_seed(seed: tf.Tensor) -> tf.Tensor:
  """`seed` as an int64 [2] tensor; fails at trace time on any other dtype or shape."""
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} "
                     f"{seed.shape}.")
  return tf.cast(seed, tf.int64)


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


@no_autograph
def identity(image: tf.Tensor) -> tf.Tensor:
  """The image unchanged (RandAugment's "do nothing" choice)."""
  return tf.identity(check_image(image, "identity"))


@no_autograph
def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - x per channel (ImageOps.invert)."""
  image = check_image(image, "invert")
  return tf.constant(255, tf.uint8) - image


@no_autograph
def posterize(image: tf.Tensor, bits: int | tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` (in [1, 8]) most significant bits of every channel (ImageOps.posterize)."""
  image = check_image(image, "posterize")
  if isinstance(bits, int) and not 1 <= bits <= 8:
    raise ValueError(f"posterize bits must be in [1, 8], got {bits}.")
  low_bits = 8 - tf.cast(bits, tf.int32)
  mask = 256 - tf.bitwise.left_shift(1, low_bits)  # Clears the low 8 - bits bits.
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


@no_autograph
def solarize(image: tf.Tensor, threshold: Number = 128) -> tf.Tensor:
  """Inverts channel values >= threshold (ImageOps.solarize); 0 inverts all, 256 none."""
  image = check_image(image, "solarize")
  values = tf.cast(image, tf.int32)
  return tf.where(values < tf.cast(threshold, tf.int32), image, 255 - image)


@no_autograph
def solarize_add(image: tf.Tensor, addition: Number,
                 threshold: Number = _SOLARIZE_ADD_THRESHOLD) -> tf.Tensor:
  """Adds `addition` (clipped to [0, 255]) to channel values < threshold; others stay."""
  image = check_image(image, "solarize_add")
  values = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(values + tf.cast(addition, tf.int32), 0, 255), tf.uint8)
  return tf.where(values < tf.cast(threshold, tf.int32), added, image)


@no_autograph
def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (ImageOps.autocontrast, no cutoff).

  Like PIL, builds a 256-entry LUT per channel in float64 (level * scale + offset, truncated),
  so levels agree exactly; a flat channel is left as it is.
  """
  image = check_image(image, "autocontrast")
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, tf.newaxis]  # [C, 1]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, tf.newaxis]
  flat = hi <= lo
  scale = 255.0 / tf.where(flat, tf.ones_like(hi), hi - lo)
  offset = -lo * scale
  levels = tf.range(256, dtype=tf.float64)
  lut = tf.where(flat, levels, tf.clip_by_value(tf.floor(levels * scale + offset), 0.0, 255.0))
  return _apply_lut(image, lut)


@no_autograph
def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram-equalises each channel on its own (ImageOps.equalize).

  As in PIL, a channel whose histogram has one non-empty bin, or too few pixels outside its
  brightest bin (step = 0), is left as it is.
  """
  image = check_image(image, "equalize")
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


@no_autograph
def color(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """Saturation (ImageEnhance.Color): blends with the luma image. Needs an RGB image."""
  image = check_image(image, "color")
  if image.shape[-1] != 3:
    raise ValueError("color needs an RGB image (C = 3): a grayscale image has no saturation to "
                     "change. The policies treat Color as Identity on grayscale images.")
  return _blend(tf.tile(_luma(image), [1, 1, 3]), image, factor)


@no_autograph
def contrast(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Contrast: blends with a flat image at the mean luma (rounded half up)."""
  image = check_image(image, "contrast")
  gray = tf.cast(_gray(image), tf.int64)
  mean = tf.cast(tf.reduce_sum(gray), tf.float64) / tf.cast(tf.size(gray), tf.float64)
  level = tf.cast(tf.floor(mean + 0.5), tf.uint8)
  return _blend(tf.fill(tf.shape(image), level), image, factor)


@no_autograph
def brightness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Brightness: blends with black."""
  image = check_image(image, "brightness")
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


@no_autograph
def sharpness(image: tf.Tensor, factor: Number) -> tf.Tensor:
  """ImageEnhance.Sharpness: blends with the SMOOTH-filtered image (factor > 1 sharpens)."""
  image = check_image(image, "sharpness")
  return _blend(_smooth(image), image, factor)
