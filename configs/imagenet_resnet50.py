"""ResNet-50 on ImageNet at large batch: the paper's LARS recipe, per method and batch size.

  python main.py --config=configs/imagenet_resnet50.py:conadv_96k --workdir=gs://BUCKET/r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets --distributed   # on every TPU host

Presets are METHOD_BATCH with METHOD a preset of configs/common.py (vanilla | disadv | conadv |
conadv2) and BATCH in
1k 4k 8k 16k 32k 64k 96k (e.g. `vanilla_32k`, `conadv_96k`); the default is conadv_32k.
Settings follow the authors' released TensorFlow code (see docs/optimizers.md): LARS (trust 0.001, momentum 0.92, weight decay
5e-5, no decay or trust ratio on BN and biases), peak LR and warmup by batch-size bracket,
polynomial decay with power 1.6 to 0, label smoothing 0.1, bfloat16, one targeted FGSM step
(ε = step = 9 pixels, random start 0.8), separate adversarial BN. 96K runs 1,301 steps (about
100 epochs); the others 91 epochs.
Expected top-1 (paper, TPU v3): vanilla LARS 76.9 (4K) ... 74.3 (96K); ConAdv 75.3 at 96K.
Not reproduced here: needs a TPU pod or GPU cluster and a prepared imagenet2012.
"""
import ml_collections

from configs import common, default
from conadv_jax import optim

BATCH_SIZES = {"1k": 1_024, "4k": 4_096, "8k": 8_192, "16k": 16_384, "32k": 32_768,
               "64k": 65_536, "96k": 98_304}


def get_config(preset: str = "conadv_32k") -> ml_collections.ConfigDict:
  method, _, batch = preset.partition("_")
  if method not in common.METHOD_PRESETS or batch not in BATCH_SIZES:
    raise ValueError(f"Unknown preset {preset!r}: use METHOD_BATCH with METHOD in "
                     f"{', '.join(common.METHOD_PRESETS)} and BATCH in {', '.join(BATCH_SIZES)}.")
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.model = "ResNet50"
  config.dtype = "bfloat16"
  # 0 = per-device statistics, as the reference code's per-core BN; set e.g. 64 to make
  # results independent of the number of devices.
  config.bn_group_size = 0
  config.update(optim.imagenet_recipe(BATCH_SIZES[batch]))
  common.set_method(config, method)
  if batch == "96k":
    config.num_train_steps = 1_301
  else:
    config.num_epochs = 91.0
  config.eval_batch_size = min(config.batch_size, 4_096)
  config.eval_every_steps = -1
  config.eval_adversarial = False  # A full attack over 50,000 images per eval: opt in.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200 if config.batch_size >= 65_536 else 500
  config.shuffle_buffer_size = 16_384
  return config
