"""Tests for conadv_jax.data.autoaugment and image_ops: every op against Pillow or numpy,
magnitudes, and randomness.

Tolerances: every op is compared with zero tolerance. That is achievable because the module
repeats PIL's arithmetic: integer LUTs for the point ops (float64 for AutoContrast, as PIL's
Python LUT builder), float32 blend in PIL's operation order for the enhance ops, integer
rounding for the SMOOTH kernel (13 is odd, so no ties), and PIL's 16.16 fixed-point source
coordinates with nearest-neighbour sampling (no bilinear) for the geometric ops. A looser bound
would hide off-by-one-pixel or off-by-one-level bugs.

The random tests use fixed seeds, so they are deterministic; their bounds (5 binomial standard
deviations per cell, chi-square at p = 0.001) only say how far a correct sampler could land.
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from conadv_jax.data import autoaugment as aa, geometric_ops, image_ops

_FILL = 128
# chi2.ppf(0.999, df): critical values of a chi-square goodness-of-fit test at p = 0.001.
_CHI2_999 = {15: 37.697, 24: 51.179}


def _structured_image(height: int, width: int, seed: int) -> np.ndarray:
  """Gradients, flat shapes and a noise patch: edges, smooth ramps and every level."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y * 7) % 256], -1)
  image[height // 8:height // 3, width // 5:width // 2] = (200, 30, 90)
  circle = (y - height * 0.7) ** 2 + (x - width * 0.3) ** 2 < (min(height, width) / 5) ** 2
  image[circle] = (20, 240, 128)
  image[height // 2:, 2 * width // 3:] = rng.integers(0, 256, (height - height // 2,
                                                                width - 2 * width // 3, 3))
  return image.astype(np.uint8)


_RGB = _structured_image(37, 53, seed=0)
_IMAGES = {
    "structured": _RGB,
    "square": _structured_image(32, 32, seed=1),  # PIL's 90-degree fast path needs a square.
    "low_contrast": (_RGB // 5 + 97).astype(np.uint8),  # Inexact AutoContrast scales.
    "few_pixels": np.array([[[0, 9, 9], [255, 9, 9]], [[7, 9, 200], [7, 9, 9]]], np.uint8),
    "flat": np.full((6, 5, 3), 77, np.uint8),
}


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image) -> np.ndarray:
  array = np.asarray(image)
  return array[..., np.newaxis] if array.ndim == 2 else array


def _gray(image: np.ndarray) -> np.ndarray:
  return _from_pil(_to_pil(image).convert("L"))


def _pil_affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.NEAREST,
                         fillcolor=(_FILL,) * len(image.getbands()))


def _solarize_add_numpy(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  values = image.astype(np.int64)
  return np.where(values < threshold, np.clip(values + addition, 0, 255), values).astype(np.uint8)


# (name, our op, its reference). Each reference is PIL, except SolarizeAdd (numpy): PIL has none.
_POINT_CASES = (
    [("invert", image_ops.invert, ImageOps.invert),
     ("autocontrast", image_ops.autocontrast, ImageOps.autocontrast),
     ("equalize", image_ops.equalize, ImageOps.equalize)]
    + [(f"posterize_{b}", lambda t, b=b: image_ops.posterize(t, b),
        lambda im, b=b: ImageOps.posterize(im, b)) for b in range(1, 9)]
    + [(f"solarize_{t}", lambda x, t=t: image_ops.solarize(x, t),
        lambda im, t=t: ImageOps.solarize(im, t))
       for t in (0, 1, 77, 128, 255, 256)]
)
_ENHANCERS = {"color": (image_ops.color, ImageEnhance.Color),
              "contrast": (image_ops.contrast, ImageEnhance.Contrast),
              "brightness": (image_ops.brightness, ImageEnhance.Brightness),
              "sharpness": (image_ops.sharpness, ImageEnhance.Sharpness)}
_ENHANCE_CASES = [
    (f"{name}_{factor}", lambda t, op=op, f=factor: op(t, f),
     lambda im, cls=cls, f=factor: cls(im).enhance(f))
    for name, (op, cls) in _ENHANCERS.items() for factor in (0.0, 0.1, 0.37, 1.0, 1.42, 1.9, 3.0)
]
_GEOMETRIC_CASES = (
    [(f"rotate_{d}", lambda t, d=d: geometric_ops.rotate(t, d),
      lambda im, d=d: im.rotate(d, Image.Resampling.NEAREST, fillcolor=(_FILL,) * len(im.mode)))
     for d in (-30.0, -13.7, 0.0, 2.5, 30.0, 90.0, 180.0)]
    + [(f"shear_x_{s}", lambda t, s=s: geometric_ops.shear_x(t, s),
        lambda im, s=s: _pil_affine(im, (1, s, 0, 0, 1, 0))) for s in (-0.3, -0.11, 0.05, 0.3)]
    + [(f"shear_y_{s}", lambda t, s=s: geometric_ops.shear_y(t, s),
        lambda im, s=s: _pil_affine(im, (1, 0, 0, s, 1, 0))) for s in (-0.3, -0.11, 0.05, 0.3)]
    + [(f"translate_x_{p}", lambda t, p=p: geometric_ops.translate_x(t, p),
        lambda im, p=p: _pil_affine(im, (1, 0, p, 0, 1, 0))) for p in (-25, -7, 3, 10.5, 250)]
    + [(f"translate_y_{p}", lambda t, p=p: geometric_ops.translate_y(t, p),
        lambda im, p=p: _pil_affine(im, (1, 0, 0, 0, 1, p))) for p in (-25, -7, 3, 10.5, 250)]
)
_OTHER_CASES = [
    (f"solarize_add_{a}_{t}", lambda x, a=a, t=t: image_ops.solarize_add(x, a, t),
     lambda im, a=a, t=t: _solarize_add_numpy(_from_pil(im), a, t))
    for a, t in ((0, 128), (33, 128), (110, 128), (-40, 200))
] + [("identity", image_ops.identity, lambda im: im)]
_ALL_CASES = _POINT_CASES + _ENHANCE_CASES + _GEOMETRIC_CASES + _OTHER_CASES


def _case_ids(cases):
  return [name for name, _, _ in cases]


@pytest.mark.parametrize("image_name", ["structured", "low_contrast", "few_pixels", "flat"])
@pytest.mark.parametrize("name,op,reference", _POINT_CASES, ids=_case_ids(_POINT_CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_point_ops_match_pil_exactly(name, op, reference, image_name, channels):
  """Exact: integer LUTs (AutoContrast's built in float64, as PIL does), per channel."""
  image = _IMAGES[image_name] if channels == 3 else _gray(_IMAGES[image_name])
  expected = _from_pil(reference(_to_pil(image)))
  np.testing.assert_array_equal(op(tf.constant(image)).numpy(), expected, err_msg=name)


# Color needs RGB: test_color_rejects_grayscale_and_policies_treat_it_as_identity covers C = 1.
_ENHANCE_PARAMS = [pytest.param(*case, channels, id=f"{channels}-{case[0]}")
                   for case in _ENHANCE_CASES for channels in (3, 1)
                   if channels == 3 or not case[0].startswith("color")]


@pytest.mark.parametrize("image_name", ["structured", "low_contrast", "few_pixels"])
@pytest.mark.parametrize("name,op,reference,channels", _ENHANCE_PARAMS)
def test_enhance_ops_match_pil_exactly(name, op, reference, image_name, channels):
  """Exact: same float32 blend as PIL, same operation order, truncation and clipping."""
  image = _IMAGES[image_name] if channels == 3 else _gray(_IMAGES[image_name])
  expected = _from_pil(reference(_to_pil(image)))
  np.testing.assert_array_equal(op(tf.constant(image)).numpy(), expected, err_msg=name)


@pytest.mark.parametrize("image_name", ["structured", "square"])
@pytest.mark.parametrize("name,op,reference", _GEOMETRIC_CASES, ids=_case_ids(_GEOMETRIC_CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_geometric_ops_match_pil_nearest_exactly(name, op, reference, image_name, channels):
  """Exact against PIL's NEAREST resampling with fill 128 (no bilinear anywhere): the op computes
  source pixels in PIL's 16.16 fixed point, so not even ties at pixel boundaries differ."""
  image = _IMAGES[image_name] if channels == 3 else _gray(_IMAGES[image_name])
  expected = _from_pil(reference(_to_pil(image)))
  np.testing.assert_array_equal(op(tf.constant(image)).numpy(), expected, err_msg=name)


@pytest.mark.parametrize("name,op,reference", _OTHER_CASES, ids=_case_ids(_OTHER_CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_solarize_add_and_identity_match_numpy(name, op, reference, channels):
  image = _RGB if channels == 3 else _gray(_RGB)
  expected = _from_pil(reference(_to_pil(image)))
  np.testing.assert_array_equal(op(tf.constant(image)).numpy(), expected, err_msg=name)


def test_all_ops_match_references_in_graph_mode():
  """The same exact agreement inside tf.data (graph mode, Grappler-optimised), not only eager:
  one case per op family, to keep the trace small."""
  wanted = ("invert", "autocontrast", "equalize", "posterize_3", "solarize_77", "color_0.37",
            "contrast_1.42", "brightness_1.9", "sharpness_0.1", "rotate_-13.7", "shear_x_0.3",
            "shear_y_-0.11", "translate_x_10.5", "translate_y_-25", "solarize_add_33_128",
            "identity")
  cases = [case for case in _ALL_CASES if case[0] in wanted]
  assert len(cases) == len(wanted)
  dataset = tf.data.Dataset.from_tensors(tf.constant(_RGB)).map(
      lambda image: tuple(op(image) for _, op, _ in cases))
  outputs = next(iter(dataset))
  for (name, _, reference), output in zip(cases, outputs):
    np.testing.assert_array_equal(output.numpy(), _from_pil(reference(_to_pil(_RGB))),
                                  err_msg=name)


def test_color_rejects_grayscale_and_policies_treat_it_as_identity():
  gray = tf.constant(_gray(_RGB))
  with pytest.raises(ValueError, match="needs an RGB image"):
    image_ops.color(gray, 0.5)
  out = aa.apply_op(gray, "Color", 9, tf.constant([0, 1], tf.int64))
  np.testing.assert_array_equal(out.numpy(), gray.numpy())


@pytest.mark.parametrize("center_y,center_x,pad", [(0, 0, 3), (36, 52, 5), (18, 26, 4), (5, 9, 0),
                                                   (10, 40, 100)])
def test_cutout_at_matches_numpy(center_y, center_x, pad):
  expected = _RGB.copy()
  expected[max(center_y - pad, 0):center_y + pad, max(center_x - pad, 0):center_x + pad] = _FILL
  out = geometric_ops.cutout_at(tf.constant(_RGB), center_y, center_x, pad)
  np.testing.assert_array_equal(out.numpy(), expected)


def test_cutout_centres_are_uniform_and_seeded():
  """With pad 1 the square's last row/column is its centre, so the centre can be read back."""
  height, width, num_seeds = 5, 7, 3500
  image = np.zeros((height, width, 1), np.uint8)
  seeds = np.stack([np.arange(num_seeds), np.full(num_seeds, 17)], -1).astype(np.int64)
  outs = np.stack(list(tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: geometric_ops.cutout(tf.constant(image), 1, s)).as_numpy_iterator()))
  covered = outs[..., 0] == _FILL
  rows_hit = covered.any(axis=2)
  cols_hit = covered.any(axis=1)
  center_y = height - 1 - np.argmax(rows_hit[:, ::-1], axis=1)
  center_x = width - 1 - np.argmax(cols_hit[:, ::-1], axis=1)
  for k in (0, 1, num_seeds - 1):  # The square is the one cutout_at draws at that centre.
    expected = geometric_ops.cutout_at(tf.constant(image), center_y[k], center_x[k], 1).numpy()
    np.testing.assert_array_equal(outs[k], expected)
    np.testing.assert_array_equal(geometric_ops.cutout(tf.constant(image), 1, seeds[k]).numpy(),
                                  outs[k])
  joint = np.bincount(center_y * width + center_x, minlength=height * width)
  expected_count = num_seeds / (height * width)
  chi2 = ((joint - expected_count) ** 2 / expected_count).sum()
  assert chi2 < 58.3, (chi2, joint)  # chi2.ppf(0.999, 34) = 58.3.


# ------------------------------------------------------------------------------------------------
# Magnitudes.

# Published arguments at levels 0 and 10: AutoAugment (Cubuk et al. 2019, Table 6) for Rotate,
# Shear, the enhance factors and Solarize; the reference TPU code for the rest (translations and
# cutouts in pixels for 224-pixel ImageNet, SolarizeAdd, and Posterize's bits as it effectively
# applies them).
_PUBLISHED = {
    "Rotate": (0.0, 30.0), "ShearX": (0.0, 0.3), "ShearY": (0.0, 0.3),
    "TranslateX": (0.0, 250.0), "TranslateY": (0.0, 250.0),
    "Color": (0.1, 1.9), "Contrast": (0.1, 1.9), "Brightness": (0.1, 1.9), "Sharpness": (0.1, 1.9),
    "Solarize": (0, 256), "SolarizeAdd": (0, 110), "Posterize": (1, 4), "Cutout": (0, 100),
    "AutoContrast": (None, None), "Equalize": (None, None), "Invert": (None, None),
    "Identity": (None, None),
}


@pytest.mark.parametrize("name", aa.OP_NAMES)
def test_level_to_arg_spans_the_published_range(name):
  low, high = _PUBLISHED[name]
  args = [aa.level_to_arg(name, level) for level in range(11)]
  if low is None:
    assert args == [None] * 11
    return
  assert args[0] == pytest.approx(low) and args[10] == pytest.approx(high)
  assert all(a <= b for a, b in zip(args, args[1:])), args
  if isinstance(low, float):  # Continuous arguments are linear in the level.
    np.testing.assert_allclose(args, np.linspace(low, high, 11), rtol=1e-12, atol=1e-12)
  else:
    assert all(isinstance(a, int) for a in args)


def test_level_to_arg_integer_arguments_and_constants():
  assert [aa.level_to_arg("Posterize", lv) for lv in range(11)] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4]
  assert [aa.level_to_arg("Solarize", lv) for lv in (0, 3, 5, 7, 10)] == [0, 76, 128, 179, 256]
  assert [aa.level_to_arg("SolarizeAdd", lv) for lv in (3, 7)] == [33, 77]
  assert aa.level_to_arg("TranslateX", 9, translate_const=100) == pytest.approx(90.0)
  assert aa.level_to_arg("Cutout", 9, cutout_const=40) == 36
  assert aa.level_to_arg("Rotate", 2.5) == pytest.approx(7.5)  # Fractional levels are fine.
  assert aa.SIGNED_OPS == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
  for bad in (-0.5, 10.5):
    with pytest.raises(ValueError, match="Magnitude level"):
      aa.level_to_arg("Rotate", bad)
  with pytest.raises(ValueError, match="Unknown op"):
    aa.level_to_arg("SamplePairing", 3)


def test_posterize_floor_of_one_bit_is_what_the_reference_shift_does():
  """The reference posterizes with x >> (8 - bits) << (8 - bits); at bits = 0 TF clamps the
  8-bit shift to 7, which is exactly posterize(x, 1): why level_to_arg floors bits at 1."""
  x = tf.constant(np.arange(256, dtype=np.uint8))
  eight = tf.constant(8, tf.uint8)
  reference = tf.bitwise.left_shift(tf.bitwise.right_shift(x, eight), eight)
  one_bit = image_ops.posterize(x[:, tf.newaxis, tf.newaxis], 1).numpy()[:, 0, 0]
  np.testing.assert_array_equal(reference.numpy(), one_bit)


@pytest.mark.parametrize("name,level,plain", [
    ("TranslateX", 1, lambda t, a: geometric_ops.translate_x(t, a)),
    ("TranslateY", 1, lambda t, a: geometric_ops.translate_y(t, a)),
    ("Rotate", 3, lambda t, a: geometric_ops.rotate(t, a)),
    ("ShearX", 5, lambda t, a: geometric_ops.shear_x(t, a)),
    ("ShearY", 5, lambda t, a: geometric_ops.shear_y(t, a)),
])
def test_signed_ops_negate_half_the_time(name, level, plain):
  """apply_op gives the op at +arg or -arg, each for about half the seeds, and nothing else."""
  image = tf.constant(_RGB)
  arg = aa.level_to_arg(name, level)
  positive, negative = plain(image, arg).numpy(), plain(image, -arg).numpy()
  assert not np.array_equal(positive, negative)
  num_seeds = 600
  seeds = np.stack([np.arange(num_seeds), np.full(num_seeds, 3)], -1).astype(np.int64)
  outs = np.stack(list(tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: aa.apply_op(image, name, level, s)).as_numpy_iterator()))
  is_positive = (outs == positive).all(axis=(1, 2, 3))
  is_negative = (outs == negative).all(axis=(1, 2, 3))
  assert (is_positive ^ is_negative).all()
  assert abs(is_positive.sum() - num_seeds / 2) < 5 * math.sqrt(num_seeds / 4), is_positive.sum()


# ------------------------------------------------------------------------------------------------
# Policies.


def test_policy_v0_table():
  assert len(aa.POLICY_V0) == 25
  for sub_policy in aa.POLICY_V0:
    assert len(sub_policy) == 2
    for name, probability, level in sub_policy:
      assert name in aa.OP_NAMES and name != "Identity"
      assert 0.0 <= probability <= 1.0 and isinstance(level, int) and 0 <= level <= 10
  assert aa.POLICY_V0[0] == (("Equalize", 0.8, 1), ("ShearY", 0.8, 4))
  assert aa.POLICY_V0[15] == (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9))
  assert aa.POLICY_V0[24] == (("Color", 0.8, 6), ("Rotate", 0.4, 5))
  assert len(aa.RANDAUGMENT_OPS) == 16 and set(aa.RANDAUGMENT_OPS) <= set(aa.OP_NAMES)


def _seeds(num: int, salt: int) -> np.ndarray:
  return np.stack([np.arange(num), np.full(num, salt)], -1).astype(np.int64)


def _batched(fn, seeds: np.ndarray):
  """fn mapped over seeds with tf.data (graph mode), as one batch of numpy arrays."""
  dataset = tf.data.Dataset.from_tensor_slices(seeds).map(fn).batch(len(seeds))
  return tf.nest.map_structure(lambda x: x.numpy(), next(iter(dataset)))


@pytest.fixture(scope="module")
def v0_choices():
  seeds = _seeds(10000, salt=5)
  index, applied, _ = _batched(aa.autoaugment_choices, seeds)
  return seeds, index, applied


def test_sub_policies_are_drawn_uniformly(v0_choices):
  _, index, _ = v0_choices
  counts = np.bincount(index, minlength=25)
  assert counts.size == 25
  expected = len(index) / 25
  sigma = math.sqrt(len(index) * (1 / 25) * (24 / 25))
  assert (np.abs(counts - expected) < 5 * sigma).all(), counts
  assert ((counts - expected) ** 2 / expected).sum() < _CHI2_999[24], counts


def test_probability_gates_apply_at_the_stated_rates(v0_choices):
  _, index, applied = v0_choices
  for k, sub_policy in enumerate(aa.POLICY_V0):
    rows = applied[index == k]
    for j, (name, probability, _) in enumerate(sub_policy):
      n = len(rows)
      sigma = math.sqrt(n * probability * (1 - probability))
      hits = rows[:, j].sum()
      assert abs(hits - n * probability) <= 5 * sigma, (k, name, probability, hits, n)
      if probability in (0.0, 1.0):
        assert hits == n * probability
  # Over all sub-policies, op j's gate matches the mean of its probabilities more tightly.
  for j in range(2):
    probs = np.array([sub[j][1] for sub in aa.POLICY_V0])[index]
    sigma = math.sqrt((probs * (1 - probs)).sum())
    assert abs(applied[:, j].sum() - probs.sum()) < 5 * sigma


def test_gate_rate_end_to_end():
  """Black box: a one-op policy (Invert, p = 0.3) inverts about 30 % of images, else none."""
  policy = ((("Invert", 0.3, 0),),)
  image = tf.constant(_RGB)
  seeds = _seeds(1500, salt=11)
  outs = _batched(lambda s: aa.autoaugment(image, s, policy), seeds)
  inverted = (outs == 255 - _RGB).all(axis=(1, 2, 3))
  assert (inverted | (outs == _RGB).all(axis=(1, 2, 3))).all()
  assert abs(inverted.sum() - 450) < 5 * math.sqrt(1500 * 0.3 * 0.7), inverted.sum()


def test_randaugment_ops_are_drawn_uniformly_per_layer():
  seeds = _seeds(8000, salt=7)
  indices, op_seeds = _batched(lambda s: aa.randaugment_choices(s, 2), seeds)
  assert indices.shape == (8000, 2) and op_seeds.shape == (8000, 2, 2)
  expected = 8000 / 16
  for layer in range(2):
    counts = np.bincount(indices[:, layer], minlength=16)
    assert ((counts - expected) ** 2 / expected).sum() < _CHI2_999[15], counts
  same = (indices[:, 0] == indices[:, 1]).sum()  # Layers draw independently: 1/16 agree.
  assert abs(same - 500) < 5 * math.sqrt(8000 / 16 * 15 / 16), same


def _expected_autoaugment(image: np.ndarray, seed: np.ndarray) -> np.ndarray:
  """What the choices say should happen, applied op by op in eager mode."""
  index, applied, op_seeds = aa.autoaugment_choices(tf.constant(seed))
  out = tf.constant(image)
  for k, (name, _, level) in enumerate(aa.POLICY_V0[int(index)]):
    if applied[k]:
      out = aa.apply_op(out, name, level, op_seeds[k])
  return out.numpy()


def test_autoaugment_v0_applies_exactly_its_choices(v0_choices):
  """For every sub-policy, a seed with both ops applied and one with a single op: the output in
  graph mode is the eager composition of the chosen ops (dtype, shape kept)."""
  seeds, index, applied = v0_choices
  picked = []
  for k in range(25):
    for pattern in ([True, True], [True, False], [False, True]):
      where = np.flatnonzero((index == k) & (applied == pattern).all(axis=1))
      if where.size:
        picked.append(where[0])
        break
  picked = np.array(picked)
  image = tf.constant(_RGB)
  outs = _batched(lambda s: aa.autoaugment_v0(image, s), seeds[picked])
  assert outs.dtype == np.uint8 and outs.shape == (len(picked),) + _RGB.shape
  changed = 0
  for seed, out in zip(seeds[picked], outs):
    np.testing.assert_array_equal(out, _expected_autoaugment(_RGB, seed))
    changed += not np.array_equal(out, _RGB)
  assert len(picked) == 25
  assert changed >= 20  # Not vacuous (a few applied ops are no-ops, e.g. Rotate at level 0).


def test_randaugment_applies_exactly_its_choices():
  seeds = _seeds(12, salt=13)
  image = tf.constant(_RGB)
  outs = _batched(lambda s: aa.randaugment(image, s, num_layers=2, magnitude=9), seeds)
  for seed, out in zip(seeds, outs):
    indices, op_seeds = aa.randaugment_choices(tf.constant(seed), 2)
    expected = image
    for layer in range(2):
      expected = aa.apply_op(expected, aa.RANDAUGMENT_OPS[int(indices[layer])], 9,
                             op_seeds[layer], translate_const=100, cutout_const=40)
    np.testing.assert_array_equal(out, expected.numpy())


@pytest.mark.parametrize("policy", ["autoaugment_v0", "randaugment"])
def test_same_seed_same_output_and_seeds_differ(policy):
  """Eager, again, with an int32 seed, and in tf.data: one output per seed; 40 seeds give many."""
  fn = getattr(aa, policy)
  image = tf.constant(_RGB)
  first = fn(image, tf.constant([123, 456], tf.int64)).numpy()
  np.testing.assert_array_equal(fn(image, tf.constant([123, 456], tf.int64)).numpy(), first)
  np.testing.assert_array_equal(fn(image, tf.constant([123, 456], tf.int32)).numpy(), first)
  seeds = np.concatenate([[[123, 456]], _seeds(40, salt=99)]).astype(np.int64)
  outs = _batched(lambda s: fn(image, s), seeds)
  np.testing.assert_array_equal(outs[0], first)
  distinct = {out.tobytes() for out in outs[1:]}
  assert len(distinct) >= 20, len(distinct)


@pytest.mark.parametrize("policy", ["autoaugment_v0", "randaugment"])
@pytest.mark.parametrize("dtype,channels", [(tf.uint8, 3), (tf.float32, 1)])
def test_dtype_shape_and_range_are_preserved_with_dynamic_shapes(policy, dtype, channels):
  """Inside tf.data with unknown H and W (as after JPEG decoding), for RGB and grayscale images;
  float inputs come back as floats holding integer levels in [0, 255]."""
  fn = getattr(aa, policy)
  images = [_RGB, _IMAGES["square"], _structured_image(20, 9, seed=4)]
  if channels == 1:
    images = [_gray(image) for image in images]
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(images), output_signature=tf.TensorSpec([None, None, channels], tf.uint8))
  dataset = dataset.map(lambda image: tf.cast(image, dtype))
  seeds = tf.data.Dataset.from_tensor_slices(_seeds(len(images), salt=21))
  outs = list(tf.data.Dataset.zip(dataset, seeds).map(fn).as_numpy_iterator())
  for k, out in enumerate(outs):
    source = images[k % len(images)]
    assert out.dtype == dtype.as_numpy_dtype and out.shape == source.shape
    assert out.min() >= 0 and out.max() <= 255 and np.array_equal(out, np.round(out))
    seed = _seeds(len(images), salt=21)[k % len(images)]
    np.testing.assert_array_equal(out.astype(np.uint8), fn(tf.constant(source), seed).numpy())


def test_grayscale_runs_every_v0_sub_policy(v0_choices):
  """Each sub-policy, Color included (as Identity), runs on a grayscale image (eagerly: the
  graph-mode grayscale run is in the dynamic-shape test)."""
  seeds, index, applied = v0_choices
  picked = [np.flatnonzero((index == k) & applied.any(axis=1))[0] for k in range(25)]
  gray = tf.constant(_gray(_RGB))
  for seed in seeds[picked]:
    out = aa.autoaugment_v0(gray, tf.constant(seed))
    assert out.shape == gray.shape and out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), _expected_autoaugment(gray.numpy(), seed))


def test_float_input_is_rounded_and_clipped():
  noisy = _RGB.astype(np.float32) + np.float32(0.3)
  noisy[0, 0] = [-4.0, 300.0, 254.6]
  seed = tf.constant([8, 9], tf.int64)
  out = aa.randaugment(tf.constant(noisy), seed).numpy()
  assert out.dtype == np.float32
  rounded = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(out, aa.randaugment(tf.constant(rounded), seed).numpy())


def test_randaugment_arguments():
  image = tf.constant(_RGB)
  seed = tf.constant([1, 2], tf.int64)
  np.testing.assert_array_equal(aa.randaugment(image, seed, num_layers=0).numpy(), _RGB)
  only_invert = aa.randaugment(image, seed, num_layers=3, magnitude=0, ops=("Invert",))
  np.testing.assert_array_equal(only_invert.numpy(), 255 - _RGB)  # Three inversions.
  with pytest.raises(ValueError, match="Magnitude level"):
    aa.randaugment(image, seed, magnitude=11)
  with pytest.raises(ValueError, match="Unknown op"):
    aa.randaugment(image, seed, ops=("Rotate", "Blur"))
  with pytest.raises(ValueError, match="num_layers"):
    aa.randaugment(image, seed, num_layers=-1)


def test_invalid_inputs_raise_clearly():
  seed = tf.constant([1, 2], tf.int64)
  with pytest.raises(TypeError, match="uint8"):
    image_ops.invert(tf.constant(_RGB, tf.int32))
  with pytest.raises(TypeError, match="uint8 or floating"):
    aa.autoaugment_v0(tf.constant(_RGB, tf.int32), seed)
  with pytest.raises(ValueError, match="C = 1 or 3"):
    aa.autoaugment_v0(tf.zeros([8, 8, 4], tf.uint8), seed)
  with pytest.raises(ValueError, match="C = 1 or 3"):
    image_ops.equalize(tf.zeros([8, 8], tf.uint8))
  with pytest.raises(ValueError, match="seed"):
    aa.autoaugment_v0(tf.constant(_RGB), tf.constant([1, 2, 3], tf.int64))
  with pytest.raises(ValueError, match="bits"):
    image_ops.posterize(tf.constant(_RGB), 0)
  with pytest.raises(ValueError, match="Probability"):
    aa.autoaugment(tf.constant(_RGB), seed, ((("Invert", 1.5, 0),),))
