"""A tiny run of every part of the loop, for CI and for checking an install.

  python main.py --config=configs/cpu_smoke.py:conadv --workdir=/tmp/smoke

Synthetic data, a width-4 SmallResNet, 12 steps with a checkpoint every 4 and evals at 6 and 12.
Expected: finishes and writes results.json; accuracy is chance level (the labels are random).
Time: about a minute on a CPU (README). Presets: vanilla, disadv, conadv (default), conadv2, and
conadv_aa: ConAdv with the AutoAugment view (three branches, losses averaged as in the ImageNet
recipe).
"""
import ml_collections

from configs import common, default


def get_config(preset: str = "conadv") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "synthetic"
  config.synthetic_num_examples = 256
  config.synthetic_num_classes = 10
  config.image_size = 16
  config.model = "SmallResNet"
  config.small_resnet_depth = 8
  config.small_resnet_width = 4
  config.batch_size = 32
  config.eval_batch_size = 24  # 64 eval examples: the last batch is padded.
  config.bn_group_size = 8
  config.num_epochs = -1.0
  config.num_train_steps = 12
  config.warmup_epochs = 0.25
  config.learning_rate = 0.05
  config.log_every_steps = 2
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 4
  config.shuffle_buffer_size = 256
  if preset == "conadv_aa":
    config.aug_branch = "autoaugment"
    config.loss_weighting = "mean"
    preset = "conadv"
  return common.set_method(config, preset)
