"""Every config file and preset loads, passes validation and builds its model."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from conadv_jax import config_validation, datasets, input_pipeline, models
from configs import common, imagenet_resnet50

METHOD_PRESETS = ["vanilla", "disadv", "conadv", "conadv2"]
CASES = ([("default", None)] + [(f, p) for f in ("fashion_mnist", "cpu_smoke", "cifar10")
                                for p in METHOD_PRESETS] +
         [("imagenet_resnet50", f"{m}_{b}") for m in common.METHOD_PRESETS
          for b in imagenet_resnet50.BATCH_SIZES])
IMAGE_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "imagenet2012": (224, 224, 3)}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagenet2012": 1000}


def load(name, preset):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(preset) if preset else module.get_config()


@pytest.mark.parametrize("name,preset", CASES)
def test_config_validates_and_builds_its_model(name, preset):
  config = load(name, preset)
  config_validation.validate(config, num_devices=4)
  image_shape = (IMAGE_SHAPES.get(config.dataset)
                 or (config.image_size or 32, config.image_size or 32, 3))
  num_classes = NUM_CLASSES.get(config.dataset, config.synthetic_num_classes)
  model = models.create_model_from_config(config, datasets.get_spec(config), num_devices=4)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
  assert variables["params"]["head"]["kernel"].shape == (
      variables["params"]["head"]["kernel"].shape[0], num_classes)
  if preset and preset.startswith("conadv"):
    assert config.method == "conadv" and config.staleness >= 1
  if name == "imagenet_resnet50":
    assert config.batch_size == imagenet_resnet50.BATCH_SIZES[preset.split("_")[1]]


def test_imagenet_presets_follow_the_reference_recipe_table():
  expected = {"1k": (10.0, 5), "4k": (10.0, 5), "8k": (10.0, 5), "16k": (25.0, 5),
              "32k": (31.2, 25), "64k": (43.0, 41), "96k": (43.0, 41)}
  for batch, (lr, warmup) in expected.items():
    config = imagenet_resnet50.get_config(f"conadv_{batch}")
    assert (config.learning_rate, config.warmup_epochs) == (lr, warmup)
    assert config.optimizer == "lars" and config.lr_decay_power == 1.6
  assert imagenet_resnet50.get_config("vanilla_96k").num_train_steps == 1_301


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match="conadv"):
    imagenet_resnet50.get_config("conadv_3k")


def test_cpu_smoke_data_is_available_offline():
  info = input_pipeline.get_dataset_info(load("cpu_smoke", "conadv"))
  assert info.num_train_examples == 256 and info.image_shape == (16, 16, 3)
