"""CIFAR-10 with a ResNet-20 (CIFAR-style), for small studies on one host.

  python main.py --config=configs/cifar10.py:conadv --workdir=/tmp/cifar10_conadv

Presets: vanilla, disadv, conadv (default; τ = 1), conadv2 (τ = 2). Needs TFDS `cifar10`
(downloaded by TFDS when online, or prepared elsewhere and passed with --config.data_dir).
Expected: results.json with a test top-1 well above chance (10 %); no run is measured in the
README or docs/ yet. Time: not measured.
"""
import ml_collections

from configs import common, default


def get_config(preset: str = "conadv") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "SmallResNet"
  config.small_resnet_depth = 20
  config.small_resnet_width = 16
  config.batch_size = 512
  config.num_epochs = 30.0
  config.optimizer = "sgd"
  config.learning_rate = 0.4
  config.warmup_epochs = 2.0
  config.lr_schedule = "cosine"
  config.weight_decay = 5e-4
  config.bn_group_size = 128
  config.label_smoothing = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return common.set_method(config, preset)
