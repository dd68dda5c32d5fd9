"""Per-example preprocessing and augmentation: pure TF functions, all randomness stateless.

Kept apart from the pipeline plumbing (sharding, shuffling, resuming) so that recipes can be
read, tested and extended on their own. A recipe is a pair of functions named in `RECIPES`:
`train(example, seed)` augments, `eval(example)` only brings the image to the model's size; the
registry (`datasets.DatasetSpec.augmentation`) says which recipe a dataset uses. Both take and
return {'image', 'label'} dicts and return float32 images in [0, 255] of side `image_size`.

`aug_view_fn` makes the second, policy-augmented view of an example (config.aug_branch): an
independent crop and flip with the dataset's train recipe, then AutoAugment or RandAugment.
"""
from collections.abc import Callable
import functools
import math

import tensorflow as tf

from conadv_jax.data import autoaugment, datasets

Example = dict[str, tf.Tensor]
TrainFn = Callable[[Example, tf.Tensor], Example]
EvalFn = Callable[[Example], Example]

SMALL_IMAGE_PADDING = 4  # Pixels of reflect padding before the random crop (CIFAR recipe).
CROP_PADDING = 32  # ImageNet eval: crop image_size / (image_size + 32) of the shorter side.
RRC_AREA_RANGE = (0.08, 1.0)
RRC_ASPECT_RANGE = (3 / 4, 4 / 3)
RRC_MAX_ATTEMPTS = 10
# fold_in data turning an example's seed into its augmented view's seed: the main view keeps
# using the example's seed untouched, so turning the branch on does not change it.
AUG_VIEW_SALT = 0x61756776  # "augv"
# Side the policies' pixel constants (translation, cutout) were set for; scaled to other sides.
POLICY_REFERENCE_SIZE = 224


def center_crop_window(image_shape: tf.Tensor, image_size: int,
                       crop_padding: int = CROP_PADDING) -> tf.Tensor:
  """Returns [offset_y, offset_x, height, width] of the ImageNet eval center crop.

  The square crop covers image_size / (image_size + crop_padding) of the shorter side, so that
  resizing it to image_size matches the usual "resize to 256, crop 224".
  """
  height, width = image_shape[0], image_shape[1]
  fraction = image_size / (image_size + crop_padding)
  crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  return tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])


def random_resized_crop_window(image_shape: tf.Tensor,
                               seed: tf.Tensor,
                               image_size: int,
                               area_range: tuple[float, float] = RRC_AREA_RANGE,
                               aspect_range: tuple[float, float] = RRC_ASPECT_RANGE,
                               max_attempts: int = RRC_MAX_ATTEMPTS) -> tf.Tensor:
  """Returns [offset_y, offset_x, height, width] of an Inception-style random crop.

  Tries `max_attempts` (area fraction, log-uniform aspect ratio) draws at once and keeps the first
  whose integer crop fits in the image and still satisfies both ranges; if none does, falls back
  to `center_crop_window`. Deterministic given `seed` (shape [2]).
  """
  height, width = image_shape[0], image_shape[1]
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area_seed, aspect_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  area = tf.random.stateless_uniform([max_attempts], area_seed, *area_range) * h * w
  log_aspect = tf.random.stateless_uniform(
      [max_attempts], aspect_seed, math.log(aspect_range[0]), math.log(aspect_range[1]))
  aspect = tf.exp(log_aspect)  # width / height
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  # Judge the rounded crop, so the returned window itself satisfies both ranges.
  area_fraction = crop_h * crop_w / (h * w)
  real_aspect = crop_w / tf.maximum(crop_h, 1.0)
  valid = ((crop_h >= 1) & (crop_w >= 1) & (crop_h <= h) & (crop_w <= w) &
           (area_fraction >= area_range[0]) & (area_fraction <= area_range[1]) &
           (real_aspect >= aspect_range[0]) & (real_aspect <= aspect_range[1]))
  first = tf.argmax(tf.cast(valid, tf.int32))  # First valid attempt (0 when none is).
  crop_h = tf.cast(tf.gather(crop_h, first), tf.int32)
  crop_w = tf.cast(tf.gather(crop_w, first), tf.int32)
  crop_h = tf.clip_by_value(crop_h, 1, height)
  crop_w = tf.clip_by_value(crop_w, 1, width)
  offset_y = tf.random.stateless_uniform([], y_seed, 0, height - crop_h + 1, dtype=tf.int32)
  offset_x = tf.random.stateless_uniform([], x_seed, 0, width - crop_w + 1, dtype=tf.int32)
  window = tf.stack([offset_y, offset_x, crop_h, crop_w])
  return tf.where(tf.reduce_any(valid), window, center_crop_window(image_shape, image_size))


def resize(image: tf.Tensor, image_size: int, method: str) -> tf.Tensor:
  """Resizes to image_size x image_size, clipped to [0, 255] because bicubic overshoots."""
  image = tf.image.resize(image, [image_size, image_size], method=method)
  return tf.clip_by_value(image, 0.0, 255.0)


def imagenet_train(example: Example, seed: tf.Tensor, image_size: int) -> Example:
  """Inception crop of an encoded JPEG plus horizontal flip; decodes only the crop (fast)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  encoded = example["image"]
  window = random_resized_crop_window(tf.image.extract_jpeg_shape(encoded), crop_seed, image_size)
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = resize(image, image_size, "bicubic")
  return {"image": tf.ensure_shape(image, [image_size, image_size, 3]), "label": example["label"]}


def imagenet_eval(example: Example, image_size: int) -> Example:
  """Center crop of an encoded JPEG (`center_crop_window`), resized to image_size."""
  encoded = example["image"]
  window = center_crop_window(tf.image.extract_jpeg_shape(encoded), image_size)
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = resize(image, image_size, "bicubic")
  return {"image": tf.ensure_shape(image, [image_size, image_size, 3]), "label": example["label"]}


def small_train(example: Example, seed: tf.Tensor, image_size: int) -> Example:
  """Reflect-pad-and-crop plus horizontal flip of decoded pixels (the CIFAR recipe)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image = example["image"]
  pad = SMALL_IMAGE_PADDING
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  image = tf.image.stateless_random_crop(padded, image.shape, crop_seed)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return small_eval({"image": image, "label": example["label"]}, image_size)


def small_eval(example: Example, image_size: int) -> Example:
  """Decoded pixels as float32, bilinearly resized only when not already image_size."""
  image = tf.cast(example["image"], tf.float32)
  if image.shape[:2] != (image_size, image_size):
    image = resize(image, image_size, "bilinear")
  return {"image": tf.ensure_shape(image, [image_size, image_size, image.shape[-1]]),
          "label": example["label"]}


def identity_train(example: Example, seed: tf.Tensor, image_size: int) -> Example:
  """No augmentation, for generated data that is already float32 at the model's size."""
  del seed, image_size
  return example


def identity_eval(example: Example, image_size: int) -> Example:
  """No preprocessing, for generated data that is already float32 at the model's size."""
  del image_size
  return example


# name: (train(example, seed, image_size), eval(example, image_size)).
RECIPES: dict[str, tuple[Callable[..., Example], Callable[..., Example]]] = {
    "inception_crop": (imagenet_train, imagenet_eval),  # Needs JPEG-encoded images.
    "pad_crop": (small_train, small_eval),
    "none": (identity_train, identity_eval),
}


def train_fn(recipe: str, image_size: int) -> TrainFn:
  """The training preprocessing `recipe` (a key of RECIPES) at side `image_size`."""
  return functools.partial(_recipe(recipe)[0], image_size=image_size)


def eval_fn(recipe: str, image_size: int) -> EvalFn:
  """The eval preprocessing `recipe` (a key of RECIPES) at side `image_size`."""
  return functools.partial(_recipe(recipe)[1], image_size=image_size)


def _recipe(recipe: str) -> tuple[Callable[..., Example], Callable[..., Example]]:
  if recipe not in RECIPES:
    raise ValueError(f"Unknown augmentation recipe {recipe!r}; use one of {', '.join(RECIPES)}.")
  return RECIPES[recipe]


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Pixels as sent to the device: rounded and clipped to [0, 255] uint8 (4x fewer bytes)."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


PolicyFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def policy_fn(aug_branch: str, image_size: int, *, randaugment_num_layers: int = 2,
              randaugment_magnitude: float = 9.0) -> PolicyFn:
  """policy(uint8 image, seed) -> uint8 image for config.aug_branch (not 'none').

  The policies' translations and cutout sizes are pixel counts chosen for 224-pixel ImageNet
  inputs; they are scaled by image_size / 224 so that small images keep the same relative
  strength (a 250-pixel shift would blank a 32-pixel image). At 224 they are the reference's.
  Grayscale images work as in PIL's mode "L": Color is the identity, every other op acts on the
  one channel as it would on each channel of an RGB image.
  """
  scale = image_size / POLICY_REFERENCE_SIZE
  if aug_branch == "autoaugment":
    return functools.partial(
        autoaugment.autoaugment_v0,
        translate_const=autoaugment.AUTOAUGMENT_TRANSLATE_CONST * scale,
        cutout_const=autoaugment.AUTOAUGMENT_CUTOUT_CONST * scale)
  if aug_branch == "randaugment":
    return functools.partial(
        autoaugment.randaugment, num_layers=randaugment_num_layers,
        magnitude=randaugment_magnitude,
        translate_const=autoaugment.RANDAUGMENT_TRANSLATE_CONST * scale,
        cutout_const=autoaugment.RANDAUGMENT_CUTOUT_CONST * scale)
  raise ValueError(f"Unknown aug_branch {aug_branch!r} for a policy; use one of "
                   f"{', '.join(b for b in datasets.AUG_BRANCHES if b != 'none')}.")


def aug_view_seeds(example_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(crop and flip seed, policy seed) of the augmented view of the example with this seed."""
  seed = tf.random.experimental.stateless_fold_in(example_seed,
                                                  tf.constant(AUG_VIEW_SALT, tf.int64))
  crop_seed, policy_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  return crop_seed, policy_seed


def aug_view_fn(recipe: str, image_size: int,
                policy: PolicyFn) -> Callable[[Example, tf.Tensor], tf.Tensor]:
  """view(example, example_seed) -> uint8 image: the augmented view of config.aug_branch.

  An independent random crop and flip with the train `recipe` (Inception crop for JPEGs,
  pad-and-crop for small images), resized to image_size, then `policy` on the uint8 pixels.
  Its seeds come from the example's seed through `aug_view_seeds`.
  """
  train = train_fn(recipe, image_size)

  def view(example: Example, example_seed: tf.Tensor) -> tf.Tensor:
    crop_seed, policy_seed = aug_view_seeds(example_seed)
    image = to_uint8(train(example, crop_seed)["image"])
    return policy(image, policy_seed)

  return view
