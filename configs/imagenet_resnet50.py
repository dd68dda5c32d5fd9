"""ResNet-50 on ImageNet at large batch: each row of the paper's table as one preset.

  python main.py --config=configs/imagenet_resnet50.py:conadv_aa_96k --workdir=gs://BUCKET/r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets --distributed   # on every TPU host

Presets are METHOD_BATCH or METHOD_aa_BATCH: METHOD a preset of configs/common.py (vanilla |
disadv | conadv | conadv2), `_aa` adds the AutoAugment view (a third branch with its own BN),
BATCH one of 1k 4k 8k 16k 32k 64k 96k. The default is conadv_32k.

| paper (ResNet-50, top-1 %)            | preset          | paper's number |
|---------------------------------------|-----------------|----------------|
| LARS 4K / 8K / 16K / 32K / 64K / 96K  | vanilla_<batch> | 76.9 / 76.6 / 76.6 / 76.6 / 75.3 / 74.3 |
| ConAdv 96K                            | conadv_96k      | 75.3           |
| ConAdv + AutoAugment 96K              | conadv_aa_96k   | 76.2           |
| (baseline: LARS + AutoAugment)        | vanilla_aa_96k  | not in the table |
Not reproduced here: they need a TPU pod or GPU cluster and a prepared imagenet2012.

The settings are those of the run behind the paper's numbers (the paper's released reference
code, in TensorFlow; docs/optimizers.md, "ImageNet / ResNet-50 recipe" and "Which preset
reproduces which number", lists them and what still differs):
* LARS (trust 0.001, eps 0, momentum 0.92, weight decay 5e-5, none of either on BN parameters
  and biases), peak LR and warmup by batch bracket, polynomial decay with power 1.6 to 0, label
  smoothing 0.1, bfloat16. Schedules in fractional epochs (N / B steps per epoch): 91 epochs
  (3,558 steps at 32K, 1,779 at 64K); the 96K run has 1,301 steps.
* loss_weighting="mean": the branch losses are averaged (1/2 each, 1/3 each with AutoAugment),
  as the reference's one concatenated batch does; its LR table was tuned for that.
* The attack that really trained the published models: one targeted step, ε = step = 4 pixel
  levels (the reference's "9" was applied to normalised pixels: 9·(2/255)·σ ≈ 4.0-4.1 levels),
  random start with probability 0.8 drawn once per batch, clipped to [0, 255].
* model_init="reference": tensorflow/tpu's ResNet conventions (fixed padding of strided convs,
  fan-in truncated-normal kernels, N(0, 0.01) head).
* BN statistics over fixed groups (bn_group_size), so results do not depend on the hardware:
  96 at 96K is the reference's per-core batch (98,304 over 1,024 TPU v3 cores); 64 at 64K and 32
  at 32K are the per-core batches of the same 1,024-core slice; below 32K, 32 (the per-worker
  batch of Goyal et al.; smaller groups make BN noisy). The AutoAugment and adversarial branches
  get groups of the same size, as each third of the reference's per-core batch did.

Differences from the reference that remain: ε is one number (4) for every channel rather than
9·(2/255)·σ_c per channel (4.1 / 4.0 / 4.0); ConAdv uses the stale parameters of Algorithm 1
(the reference builds them but attacks with the current ones); the loss of each branch is
computed in its own forward pass rather than one concatenated batch (the same mean); one
random-start coin per global batch, where the reference's per-core model_fn most likely drew one
per core (96 examples); optax's LARS trust ratio rather than TF's; AutoAugment ops that follow
PIL where the reference's TF ops differ (Contrast, Sharpness, shears). docs/optimizers.md lists
them per row of the table.

With 8 accelerators, gradient accumulation keeps the 96K recipe's batch and BN groups:
`--config.grad_accum_steps=128` (96 examples per device per micro-batch). XLA:GPU's buffer
assignment (compiled on an H200 at micro-batches of 4 and 8, extrapolated linearly to 96)
projects 32.9 GB per device on 8 devices and 16.4 GB on 1,024; no such run has been trained.
docs/performance.md ("Memory and checkpoint size at pod scale") gives the commands, the scaling
rule, XLA:CPU's upper bound (84.5 GB), the settings that fit even by that bound, and how to
measure on the target device.

A shrunken copy runs on one CPU device (synthetic data, 32-pixel images, a few steps;
tests/test_main.py runs these). With more devices the batch of 16 is spread too thin for BN
groups of 4: validation refuses grad_accum_steps=2 from 4 devices up (micro-batches of 2 per
device) and k=1 from 8 up:
  python main.py --config=configs/imagenet_resnet50.py:conadv_aa_96k --workdir=/tmp/r50 \
      --config.dataset=synthetic --config.image_size=32 --config.batch_size=16 \
      --config.bn_group_size=4 --config.num_train_steps=3 --config.eval_batch_size=16 \
      --config.synthetic_num_examples=64 --config.synthetic_num_classes=10 \
      --config.eval_pgd_steps=0 [--config.grad_accum_steps=2]
The ConAdv presets take `--config.task_layout=split` as well, on an even number of devices (on a
CPU, XLA_FLAGS=--xla_force_host_platform_device_count=2 makes two).
"""
import re

import ml_collections

from configs import common, default
from conadv_jax.method import optim

BATCH_SIZES = {"1k": 1_024, "4k": 4_096, "8k": 8_192, "16k": 16_384, "32k": 32_768,
               "64k": 65_536, "96k": 98_304}
# Examples per BN statistics group; see the module docstring.
BN_GROUP_SIZES = {"1k": 32, "4k": 32, "8k": 32, "16k": 32, "32k": 32, "64k": 64, "96k": 96}
NUM_EPOCHS = 91.0
NUM_TRAIN_STEPS_96K = 1_301  # The paper's 96K run (≈ 99.8 epochs).
EFFECTIVE_EPSILON = 4.0  # Pixel levels: 9 · (2/255) · σ, σ ≈ 57 (pixel_std in datasets.py).
_PRESET = re.compile(r"(?P<method>[a-z0-9]+?)(?P<aa>_aa)?_(?P<batch>\d+k)")


def get_config(preset: str = "conadv_32k") -> ml_collections.ConfigDict:
  """The preset's config; see the module docstring for the names and what each reproduces."""
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
  config.model_init = "reference"
  config.dtype = "bfloat16"
  config.bn_group_size = BN_GROUP_SIZES[batch]
  config.update(optim.imagenet_recipe(BATCH_SIZES[batch]))
  config.loss_weighting = "mean"
  config.attack.epsilon = EFFECTIVE_EPSILON
  config.attack.step_size = EFFECTIVE_EPSILON
  config.attack.random_start = "per_batch"
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
