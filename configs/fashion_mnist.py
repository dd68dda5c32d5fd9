"""Fashion-MNIST with a small ResNet on CPU: the README's main command.

  python main.py --config=configs/fashion_mnist.py:conadv --workdir=/tmp/fmnist_conadv

Presets: vanilla, disadv, conadv (default; τ = 1), conadv2 (τ = 2). Expected (README, Results):
ConAdv reaches 87.87 % test top-1 after 2 epochs (468 steps). Time: 13 min 28 s on a 2-core CPU
that was also running other jobs; a little less on an idle machine.
"""
import ml_collections

from configs import common, default


def get_config(preset: str = "conadv") -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST config for a method preset of configs/common.py."""
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.model = "SmallResNet"
  config.small_resnet_depth = 8
  config.small_resnet_width = 16
  config.batch_size = 256
  config.num_epochs = 2.0
  config.augment = False  # Two epochs are too few for pad-and-crop to pay off.
  config.optimizer = "sgd"
  config.learning_rate = 0.2
  config.warmup_epochs = 0.25
  config.lr_schedule = "cosine"
  config.weight_decay = 5e-4
  config.bn_group_size = 64
  config.eval_batch_size = 1_000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return common.set_method(config, preset)

