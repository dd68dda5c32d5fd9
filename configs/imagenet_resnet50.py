"""ResNet-50 on ImageNet at large batch: one preset per row of the paper's table.

  python main.py --config=configs/imagenet_resnet50.py:conadv_aa_96k --workdir=gs://BUCKET/r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets --distributed   # on every TPU host

Presets: METHOD_BATCH or METHOD_aa_BATCH (METHOD of configs/common.py; _aa adds the AutoAugment
view; BATCH one of 1k 4k 8k 16k 32k 64k 96k); default conadv_32k. Expected: the paper's top-1,
e.g. 74.3 % (vanilla_96k), 75.3 % (conadv_96k), 76.2 % (conadv_aa_96k); not reproduced here.
Time: not measured (needs a TPU pod or GPU cluster). Settings, differences from the reference and
a shrunken CPU run: docs/optimizers.md; memory on 8 accelerators: docs/performance.md.
"""
import re

from absl import logging
import ml_collections

from configs import common, default

BATCH_SIZES = {"1k": 1_024, "4k": 4_096, "8k": 8_192, "16k": 16_384, "32k": 32_768,
               "64k": 65_536, "96k": 98_304}
# Examples per BN statistics group, fixed so that results do not depend on the hardware: from 32K
# up the per-core batch of the reference's 1,024-core TPU v3 slice (98,304 / 1,024 = 96 is the
# reference's own), below 32K 32 (Goyal et al.'s per-worker batch; smaller groups make BN noisy).
# The AutoAugment and adversarial branches get groups of the same size.
BN_GROUP_SIZES = {"1k": 32, "4k": 32, "8k": 32, "16k": 32, "32k": 32, "64k": 64, "96k": 96}
NUM_EPOCHS = 91.0  # Fractional epochs (N / B steps each): 3,558 steps at 32K, 1,779 at 64K.
NUM_TRAIN_STEPS_96K = 1_301  # The paper's 96K run (≈ 99.8 epochs).
# Pixel levels: the reference's "9" applied to normalised pixels, 9 · (2/255) · σ with σ ≈ 57
# (pixel_std in datasets.py), i.e. 4.1 / 4.0 / 4.0 per channel.
EFFECTIVE_EPSILON = 4.0

# The reference code's ResNet-50/ImageNet optimisation settings (docs/optimizers.md, "ImageNet /
# ResNet-50 recipe"). Keys are config field names.
# LARS, the paper's large-batch runs: (smallest global batch of the bracket, peak LR, warmup
# epochs), largest bracket first.
LARS_BRACKETS = (
    (65_536, 43.0, 41.0),
    (32_768, 31.2, 25.0),
    (16_384, 25.0, 5.0),
    (0, 10.0, 5.0),
)
RECIPE_COMMON = {"momentum": 0.92, "weight_decay": 5e-5, "end_learning_rate": 0.0,
                 "lars_trust_coefficient": 0.001, "lars_eps": 0.0}
LARS_RECIPE = {"optimizer": "lars", "lr_schedule": "polynomial", "lr_decay_power": 1.6,
               "nesterov": False, "label_smoothing": 0.1}
# SGD, the reference's non-LARS path (meant for B < 16K): peak LR 0.1 · B / 256, 5 warmup
# epochs. The reference divides the LR by 10 at 1/3, 2/3 and 8/9 of training; there is no step
# schedule here, so cosine decay to 0 stands in for it.
SGD_RECIPE = {"optimizer": "sgd", "warmup_epochs": 5.0, "lr_schedule": "cosine", "nesterov": True,
              "label_smoothing": 0.0}
SGD_MAX_BATCH = 16_384  # The reference uses SGD only below this batch.


def recipe(batch_size: int, optimizer: str = "lars") -> dict:
  """The reference's settings for `batch_size` (including it): `config.update(recipe(B))`.

  Raises:
    ValueError: for a non-positive batch size or an optimizer other than "lars" or "sgd".
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  settings = {"batch_size": int(batch_size), **RECIPE_COMMON}
  if optimizer == "lars":
    peak_lr, warmup_epochs = next((lr, warmup) for min_batch, lr, warmup in LARS_BRACKETS
                                  if batch_size >= min_batch)
    return {**settings, **LARS_RECIPE, "learning_rate": peak_lr, "warmup_epochs": warmup_epochs}
  if optimizer == "sgd":
    if batch_size >= SGD_MAX_BATCH:
      logging.warning("recipe: the reference uses SGD only below 16K; batch %d should use LARS.",
                      batch_size)
    return {**settings, **SGD_RECIPE, "learning_rate": 0.1 * batch_size / 256}
  raise ValueError(f"No {optimizer!r} recipe; expected 'lars' or 'sgd'.")


_PRESET = re.compile(r"(?P<method>[a-z0-9]+?)(?P<aa>_aa)?_(?P<batch>\d+k)")


def get_config(preset: str = "conadv_32k") -> ml_collections.ConfigDict:
  """The preset's config; names in the module docstring, what each reproduces in
  docs/optimizers.md ("Which preset reproduces which number")."""
  match = _PRESET.fullmatch(preset)
  if (not match or match["method"] not in common.METHOD_PRESETS
      or match["batch"] not in BATCH_SIZES):
    raise ValueError(f"Unknown preset {preset!r}: use METHOD_BATCH or METHOD_aa_BATCH with "
                     f"METHOD in {', '.join(common.METHOD_PRESETS)} and BATCH in "
                     f"{', '.join(BATCH_SIZES)} (e.g. conadv_aa_96k).")
  batch = match["batch"]
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "ResNet50"
  config.model_init = "reference"  # tensorflow/tpu's padding and init; its LR table assumes them.
  config.dtype = "bfloat16"
  config.bn_group_size = BN_GROUP_SIZES[batch]
  config.update(recipe(BATCH_SIZES[batch]))
  config.loss_weighting = "mean"  # Branch losses averaged, as the reference's LR table assumes.
  config.attack.epsilon = EFFECTIVE_EPSILON
  config.attack.step_size = EFFECTIVE_EPSILON
  config.attack.random_start = "per_batch"  # One coin (probability 0.8) per batch.
  common.set_method(config, match["method"])
  if match["aa"]:
    config.aug_branch = "autoaugment"
  if batch == "96k":
    config.num_train_steps = NUM_TRAIN_STEPS_96K
  else:
    config.num_epochs = NUM_EPOCHS
  config.eval_batch_size = min(config.batch_size, 4_096)
  config.eval_every_steps = -1
  config.eval_adversarial = False  # A full attack over 50,000 images per eval: opt in.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200 if config.batch_size >= 65_536 else 500
  config.shuffle_buffer_size = 16_384
  return config
