"""The dataset registry: every per-dataset fact in one entry.

The input pipeline reads splits, sizes, channels, where the data comes from and how to augment it
from here, the models their pixel statistics and config validation the names, so adding a
dataset means adding one `DatasetSpec`. Counts here are the published ones, used before any data
is read (validation, step arithmetic in docs); the run itself uses the counts of the prepared data
(`DatasetInfo`, from `prepare.get_dataset_info`). This module imports no TensorFlow, so
validation stays fast.
"""
import dataclasses
from typing import Any

from conadv_jax import errors

SOURCES = ("tfds", "fashion_mnist", "synthetic")  # See DatasetSpec.source.
AUGMENTATIONS = ("inception_crop", "pad_crop", "none")  # The keys of augment.RECIPES.
# config.aug_branch: no second view, or one augmented with AutoAugment "v0" or RandAugment
# (`augment.policy_fn`). Kept here, not in augment.py, so validation needs no TensorFlow.
AUG_BRANCHES = ("none", "autoaugment", "randaugment")
# The top of AutoAugment's magnitude scale; autoaugment.MAX_LEVEL is defined as this.
RANDAUGMENT_MAX_MAGNITUDE = 10.0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What is known about a dataset without reading it.

  Attributes:
    name: the value of config.dataset.
    num_classes: label count (synthetic: from config.synthetic_num_classes).
    native_image_size: model input side when config.image_size is 0.
    channels: 1 (grayscale) or 3 (RGB).
    pixel_mean: per-channel mean on the 0-255 scale; the model subtracts it.
    pixel_std: per-channel standard deviation on the 0-255 scale; the model divides by it.
    train_split: TFDS split trained on.
    eval_split: TFDS split evaluated on.
    num_train_examples: examples in train_split.
    num_eval_examples: examples in eval_split.
    jpeg_encoded: images stay encoded until the crop (decode and crop are fused).
    source: where examples come from, one of SOURCES: 'tfds' (TFDS builder `name`, downloaded
      and prepared on first use unless `manual_download` says it cannot be), 'fashion_mnist'
      (`fashion_mnist.get_builder`: prepared copy, local IDX files or download), 'synthetic'
      (uniform noise generated from the seed; sizes and classes from the config).
    augmentation: preprocessing recipe, a key of `augment.RECIPES` (one of AUGMENTATIONS):
      'inception_crop' (needs jpeg_encoded), 'pad_crop' (small decoded images) or 'none'
      (generated data, which is made at the model's size).
    manual_download: for datasets TFDS cannot download, which files to put in
      DATA_DIR/downloads/manual and from where; empty when TFDS downloads it.
    fits_in_memory: small enough for every process to hold the whole train split in RAM, which
      makes global batch t the same examples for any process count (see
      order.data_order_key); others do so only with config.cache.
  """
  name: str
  num_classes: int
  native_image_size: int
  channels: int
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]
  train_split: str
  eval_split: str
  num_train_examples: int
  num_eval_examples: int
  jpeg_encoded: bool = False
  source: str = "tfds"
  augmentation: str = "pad_crop"
  manual_download: str = ""
  fits_in_memory: bool = False

  def __post_init__(self):
    # Registry mistakes are bugs, not user errors: fail at import, before any run starts.
    if self.source not in SOURCES:
      raise ValueError(f"{self.name}: source={self.source!r} is not one of {SOURCES}.")
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f"{self.name}: augmentation={self.augmentation!r} is not one of "
                       f"{AUGMENTATIONS}.")
    if (self.augmentation == "inception_crop") != self.jpeg_encoded:
      raise ValueError(f"{self.name}: augmentation 'inception_crop' and jpeg_encoded go together.")
    if (self.source == "synthetic") != (self.augmentation == "none"):
      raise ValueError(f"{self.name}: generated data, and only it, uses augmentation 'none'.")
    if self.channels not in (1, 3):
      raise ValueError(f"{self.name}: channels={self.channels} is not 1 or 3.")
    for stats in (self.pixel_mean, self.pixel_std):
      if len(stats) not in (1, self.channels):
        raise ValueError(f"{self.name}: pixel statistics {stats} need 1 or {self.channels} "
                         "values.")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (
        DatasetSpec("fashion_mnist", num_classes=10, native_image_size=28, channels=1,
                    pixel_mean=(72.94,), pixel_std=(90.02,), train_split="train",
                    eval_split="test", num_train_examples=60_000, num_eval_examples=10_000,
                    source="fashion_mnist", fits_in_memory=True),  # 47 MB of pixels.
        DatasetSpec("cifar10", num_classes=10, native_image_size=32, channels=3,
                    pixel_mean=(125.31, 122.95, 113.87), pixel_std=(62.99, 62.09, 66.70),
                    train_split="train", eval_split="test", num_train_examples=50_000,
                    num_eval_examples=10_000, fits_in_memory=True),  # 154 MB of pixels.
        DatasetSpec("imagenet2012", num_classes=1000, native_image_size=224, channels=3,
                    pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
                    train_split="train", eval_split="validation", num_train_examples=1_281_167,
                    num_eval_examples=50_000, jpeg_encoded=True,
                    augmentation="inception_crop",
                    manual_download="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "image-net.org"),
        # Uniform 0-255 noise; classes and counts come from the config (see `get_spec`).
        DatasetSpec("synthetic", num_classes=10, native_image_size=32, channels=3,
                    pixel_mean=(127.5,), pixel_std=(73.6,), train_split="train",
                    eval_split="test", num_train_examples=4_096, num_eval_examples=1_024,
                    source="synthetic", augmentation="none"),
    )
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset, resolved once per run.

  Attributes:
    spec: the registry entry; its num_classes and pixel statistics are what the model uses.
    num_classes: label count of the prepared data (equal to spec.num_classes, checked).
    image_shape: (H, W, C) of model inputs after preprocessing.
    num_train_examples: examples in the prepared train split.
    num_eval_examples: examples in the prepared eval split.
    builder: the prepared TFDS builder (None for generated data), kept so that the pipelines
      neither resolve nor re-read it.
  """
  spec: DatasetSpec
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: int
  builder: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def pixel_mean(self) -> tuple[float, ...]:
    return self.spec.pixel_mean

  @property
  def pixel_std(self) -> tuple[float, ...]:
    return self.spec.pixel_std


class UnknownDatasetError(errors.ConfigError):
  """config.dataset names no registry entry."""


def synthetic_num_eval_examples(num_train_examples: int) -> int:
  """Synthetic eval split size: a quarter of the train split, at least one example."""
  return max(num_train_examples // 4, 1)


def get_spec(config: Any) -> DatasetSpec:
  """The spec of config.dataset, with generated data's config-given sizes filled in.

  `config` is a ConfigDict or an `input_config.InputConfig`: only dataset and the synthetic_*
  fields are read.

  Raises:
    UnknownDatasetError: config.dataset is not in DATASETS (the message lists the names).
  """
  spec = DATASETS.get(config.dataset)
  if spec is None:
    raise UnknownDatasetError(f"config.dataset={config.dataset!r} is unknown; choose one of "
                              f"{', '.join(DATASETS)}.")
  if spec.source == "synthetic":
    spec = dataclasses.replace(
        spec, num_classes=config.synthetic_num_classes,
        num_train_examples=config.synthetic_num_examples,
        num_eval_examples=synthetic_num_eval_examples(config.synthetic_num_examples))
  return spec
