"""The geometric image ops of AutoAugment and RandAugment, each reproducing Pillow.

  Rotate        Image.rotate: counter-clockwise degrees about the centre.
  ShearX/Y      Image.transform(AFFINE, (1, s, 0, 0, 1, 0)) / (1, 0, 0, s, 1, 0).
  TranslateX/Y  Image.transform(AFFINE, (1, 0, p, 0, 1, 0)) / (1, 0, 0, 0, 1, p): the content
                moves by -p pixels.
  Cutout        (no PIL op) a (2 * pad_size)-sided square at a random centre, clipped to the
                image, is set to the fill value.

Nearest-neighbour sampling (no bilinear), PIL's pixel-centre convention and PIL's 16.16
fixed-point source coordinates; uncovered pixels get image_ops.FILL_VALUE (128) in every channel,
as the reference TPU implementation does. Images as in `image_ops`.
"""
from collections.abc import Sequence
import math

import tensorflow as tf

from conadv_jax.data.image_ops import FILL_VALUE, Number, no_autograph, as_seed, check_image

_FIXED_ONE = 65536  # PIL's nearest-neighbour affine transform works in 16.16 fixed point.


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


@no_autograph
def rotate(image: tf.Tensor, degrees: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the image centre (Image.rotate, NEAREST)."""
  image = check_image(image, "rotate")
  radians = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  shape = tf.cast(tf.shape(image), tf.float64)
  center_x, center_y = shape[1] / 2.0, shape[0] / 2.0
  # PIL's inverse map: rotate about the origin, with the centre moved there and back.
  offset_x = cos * -center_x + sin * -center_y + center_x
  offset_y = -sin * -center_x + cos * -center_y + center_y
  return _affine(image, (cos, sin, offset_x, -sin, cos, offset_y), _check_fill(fill))


@no_autograph
def shear_x(image: tf.Tensor, shear: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + shear * y, y), in pixel centres."""
  image = check_image(image, "shear_x")
  return _affine(image, (1.0, shear, 0.0, 0.0, 1.0, 0.0), _check_fill(fill))


@no_autograph
def shear_y(image: tf.Tensor, shear: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x, y + shear * x), in pixel centres."""
  image = check_image(image, "shear_y")
  return _affine(image, (1.0, 0.0, 0.0, shear, 1.0, 0.0), _check_fill(fill))


@no_autograph
def translate_x(image: tf.Tensor, pixels: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + pixels, y): content moves left for pixels > 0."""
  image = check_image(image, "translate_x")
  return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), _check_fill(fill))


@no_autograph
def translate_y(image: tf.Tensor, pixels: Number, fill: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x, y + pixels): content moves up for pixels > 0."""
  image = check_image(image, "translate_y")
  return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), _check_fill(fill))


@no_autograph
def cutout_at(image: tf.Tensor, center_y: Number, center_x: Number, pad_size: Number,
              fill: int = FILL_VALUE) -> tf.Tensor:
  """Sets rows [cy - pad, cy + pad) x columns [cx - pad, cx + pad), clipped, to `fill`."""
  image = check_image(image, "cutout")
  shape = tf.shape(image)
  center_y, center_x, pad_size = (tf.cast(v, tf.int32) for v in (center_y, center_x, pad_size))
  rows = tf.range(shape[0])
  cols = tf.range(shape[1])
  in_rows = (rows >= center_y - pad_size) & (rows < center_y + pad_size)
  in_cols = (cols >= center_x - pad_size) & (cols < center_x + pad_size)
  inside = in_rows[:, tf.newaxis, tf.newaxis] & in_cols[tf.newaxis, :, tf.newaxis]
  return tf.where(inside, tf.constant(_check_fill(fill), tf.uint8), image)


@no_autograph
def cutout(image: tf.Tensor, pad_size: Number, seed: tf.Tensor,
           fill: int = FILL_VALUE) -> tf.Tensor:
  """Cutout: a (2 * pad_size)-sided square, centred on a uniformly random pixel, set to `fill`.

  The square is clipped at the image border, so it can be smaller near the edges.
  """
  image = check_image(image, "cutout")
  shape = tf.shape(image)
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num=2))
  center_y = tf.random.stateless_uniform([], seed_y, 0, shape[0], dtype=tf.int32)
  center_x = tf.random.stateless_uniform([], seed_x, 0, shape[1], dtype=tf.int32)
  return cutout_at(image, center_y, center_x, pad_size, fill)
