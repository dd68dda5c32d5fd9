"""Checks a config before anything is compiled, so a typo costs seconds, not pod time.

Each error names the field, the bad value and what is allowed.
"""
import math

import ml_collections

from conadv_jax import conadv, models

DATASETS = ("fashion_mnist", "cifar10", "imagenet2012", "synthetic")
OPTIMIZERS = ("lars", "sgd", "lamb")


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for the first invalid field; needs no data and compiles nothing."""
  _require(config.model in models.MODEL_NAMES, "model", config.model,
           f"choose one of {', '.join(models.MODEL_NAMES)}")
  _require(config.dataset in DATASETS, "dataset", config.dataset,
           f"choose one of {', '.join(DATASETS)}")
  _require(config.method in conadv.METHODS, "method", config.method,
           f"choose one of {', '.join(conadv.METHODS)}")
  _require(config.optimizer in OPTIMIZERS, "optimizer", config.optimizer,
           f"choose one of {', '.join(OPTIMIZERS)}")
  _require(config.adv_bn in ("separate", "shared"), "adv_bn", config.adv_bn,
           "use 'separate' or 'shared'")
  _require(config.dtype in ("float32", "bfloat16"), "dtype", config.dtype,
           "use 'float32' or 'bfloat16'")
  _require(config.staleness >= 0, "staleness", config.staleness, "it must be >= 0")
  _require(config.method == "conadv" or config.staleness == 0, "staleness", config.staleness,
           f"staleness > 0 needs method='conadv' (method is {config.method!r}); "
           "set --config.staleness=0 or --config.method=conadv")
  _require(config.method != "conadv" or config.staleness >= 1, "staleness", config.staleness,
           "conadv needs staleness >= 1 (staleness 0 is method='disadv')")

  _require(config.batch_size > 0 and config.batch_size % num_devices == 0, "batch_size",
           config.batch_size, f"it must be a positive multiple of the {num_devices} devices")
  per_device = config.batch_size // num_devices
  group = config.bn_group_size or 0
  _require(group >= 0, "bn_group_size", config.bn_group_size, "it must be >= 0 (0: per device)")
  _require(group <= per_device, "bn_group_size", config.bn_group_size,
           f"it must not exceed the per-device batch of {per_device} "
           f"(batch_size {config.batch_size} over {num_devices} devices)")
  _require(group == 0 or config.batch_size % group == 0, "bn_group_size", config.bn_group_size,
           f"it must divide batch_size={config.batch_size}")
  _require(group == 0 or per_device % group == 0, "bn_group_size", config.bn_group_size,
           f"it must divide the per-device batch of {per_device} so groups stay on one device")
  if config.model == "SmallResNet":
    _require(config.small_resnet_depth in models.SMALL_RESNET_DEPTHS, "small_resnet_depth",
             config.small_resnet_depth, f"use one of {models.SMALL_RESNET_DEPTHS} (6n+2)")

  attack = config.attack
  _require(attack.epsilon >= 0, "attack.epsilon", attack.epsilon, "it must be >= 0 (pixels)")
  _require(attack.step_size > 0, "attack.step_size", attack.step_size, "it must be > 0 (pixels)")
  _require(attack.num_steps >= 1, "attack.num_steps", attack.num_steps, "it must be >= 1")
  _require(0.0 <= attack.random_start_prob <= 1.0, "attack.random_start_prob",
           attack.random_start_prob, "it is a probability, in [0, 1]")

  lr = config.learning_rate
  _require(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "learning_rate", lr,
           "it must be positive and finite")
  _require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", config.num_epochs,
           "set a positive num_epochs, or a positive num_train_steps "
           f"(num_train_steps={config.num_train_steps})")
  _require(config.warmup_epochs >= 0, "warmup_epochs", config.warmup_epochs, "it must be >= 0")
  _require(config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
           "eval_batch_size", config.eval_batch_size,
           f"it must be a positive multiple of the {num_devices} devices")
  _require(config.log_every_steps > 0, "log_every_steps", config.log_every_steps,
           "it must be > 0")
  _require(config.checkpoint_every_steps > 0, "checkpoint_every_steps",
           config.checkpoint_every_steps, "it must be > 0")


def validate_against_data(config: ml_collections.ConfigDict, info) -> None:
  """Checks that need the dataset's size: the warmup must fit in the run."""
  steps_per_epoch = info.num_train_examples // config.batch_size
  _require(steps_per_epoch >= 1, "batch_size", config.batch_size,
           f"it exceeds the {info.num_train_examples} training examples")
  total = (config.num_train_steps if config.num_train_steps > 0
           else round(config.num_epochs * steps_per_epoch))
  _require(config.warmup_epochs * steps_per_epoch <= total, "warmup_epochs",
           config.warmup_epochs,
           f"the warmup ({config.warmup_epochs} epochs = "
           f"{round(config.warmup_epochs * steps_per_epoch)} steps) must not exceed the run "
           f"({total} steps)")
