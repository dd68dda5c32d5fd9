"""Tests for conadv_jax.data.datasets: the registry that owns every per-dataset fact."""
import dataclasses
import pathlib
import subprocess
import sys

import pytest

from conadv_jax import errors
from conadv_jax.data import augment, datasets
from conadv_jax.run import config_validation
from configs import default


def _config(**overrides):
  config = default.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


def test_entries_are_consistent():
  assert set(augment.RECIPES) == set(datasets.AUGMENTATIONS)
  for name, spec in datasets.DATASETS.items():
    assert spec.name == name
    assert spec.native_image_size > 0 and spec.num_classes > 0
    assert spec.num_train_examples > 0 and spec.num_eval_examples > 0
    assert all(s > 0 for s in spec.pixel_std)
    assert spec.train_split != spec.eval_split
    # Every recipe named resolves to preprocessing functions.
    assert callable(augment.train_fn(spec.augmentation, spec.native_image_size))
    assert callable(augment.eval_fn(spec.augmentation, spec.native_image_size))


@pytest.mark.parametrize("change", [
    dict(source="hdf5"),
    dict(augmentation="mixup"),
    dict(augmentation="inception_crop"),  # cifar10 is not JPEG-encoded.
    dict(augmentation="none"),  # Only generated data goes unaugmented.
    dict(channels=2),
    dict(pixel_mean=(1.0, 2.0)),
])
def test_inconsistent_entries_are_rejected(change):
  with pytest.raises(ValueError, match="cifar10"):
    dataclasses.replace(datasets.DATASETS["cifar10"], **change)


def test_aug_branches_name_the_policies_of_augment():
  """config validation reads AUG_BRANCHES here (no TensorFlow); augment.py must serve each."""
  from conadv_jax.data import autoaugment  # pylint: disable=g-import-not-at-top
  assert datasets.AUG_BRANCHES[0] == "none"  # The default: no second view.
  for branch in datasets.AUG_BRANCHES[1:]:
    assert callable(augment.policy_fn(branch, 224))
  assert datasets.RANDAUGMENT_MAX_MAGNITUDE == autoaugment.MAX_LEVEL
  with pytest.raises(ValueError, match="autoaugment, randaugment"):
    augment.policy_fn("mixup", 224)


def test_get_spec_returns_the_entry():
  assert datasets.get_spec(_config(dataset="cifar10")) is datasets.DATASETS["cifar10"]


def test_get_spec_fills_generated_data_sizes_from_the_config():
  spec = datasets.get_spec(_config(dataset="synthetic", synthetic_num_examples=21,
                                   synthetic_num_classes=3))
  assert (spec.num_classes, spec.num_train_examples, spec.num_eval_examples) == (3, 21, 5)
  assert spec.pixel_mean == datasets.DATASETS["synthetic"].pixel_mean


def test_unknown_dataset_is_a_user_error_listing_the_registered_names(monkeypatch):
  monkeypatch.setitem(datasets.DATASETS, "tiny", dataclasses.replace(
      datasets.DATASETS["cifar10"], name="tiny"))
  assert datasets.get_spec(_config(dataset="tiny")).name == "tiny"
  config_validation.validate(_config(dataset="tiny"), num_devices=1)  # One entry is enough.
  with pytest.raises(datasets.UnknownDatasetError) as error:
    datasets.get_spec(_config(dataset="mnist"))
  assert isinstance(error.value, errors.UserError) and isinstance(error.value, ValueError)
  assert str(error.value) == ("config.dataset='mnist' is unknown; choose one of fashion_mnist, "
                              "cifar10, imagenet2012, synthetic, tiny.")


def test_registry_imports_no_tensorflow():
  """Config validation reads the registry before TensorFlow is imported (seconds)."""
  code = ("import sys; import conadv_jax.data.datasets; "
          "assert not any(m.split('.')[0] in ('tensorflow', 'jax') for m in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])
