"""The config fields the input pipelines read, checked once and frozen.

`InputConfig.from_config(config)` is built once per call of a pipeline entry point, so the
functions below it take the few values they need instead of the whole ConfigDict. It imports
no TensorFlow: config validation uses it to check the data fields before anything is loaded.
"""
import dataclasses
from collections.abc import Callable
from typing import Any

from conadv_jax import errors
from conadv_jax.data import datasets

# (check, what is allowed); the text may be a function, for a registry's names read at each check.
Check = tuple[Callable[[Any], bool], str | Callable[[], str]]
_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)


_ANY: Check = ((lambda v: True), "")

# field: (accepted types, check). None is accepted only where listed.
FIELD_RULES: dict[str, tuple[tuple[type, ...], Check]] = {
    "dataset": (_STR, ((lambda v: v in datasets.DATASETS),
                       lambda: f"choose one of {', '.join(datasets.DATASETS)}")),
    "data_dir": (_STR + (type(None),),
                 ((lambda v: v is None or bool(v.strip())), "use a folder path, or leave unset")),
    "image_size": (_INT, ((lambda v: 0 <= v <= 4096),
                          "use 0 (the dataset's native size) or a side in pixels up to 4096")),
    "cache": (_BOOL, _ANY),
    "shuffle_buffer_size": (_INT, errors.at_least(1)),
    "augment": (_BOOL, _ANY),
    "aug_branch": (_STR, ((lambda v: v in datasets.AUG_BRANCHES),
                          f"choose one of {', '.join(datasets.AUG_BRANCHES)}")),
    "randaugment_num_layers": (_INT, errors.at_least(0)),
    "randaugment_magnitude": (_FLOAT, (
        (lambda v: 0 <= v <= datasets.RANDAUGMENT_MAX_MAGNITUDE),
        f"it must be in [0, {datasets.RANDAUGMENT_MAX_MAGNITUDE:g}]")),
    "eval_batch_size": (_INT, errors.at_least(1)),
    "batch_size": (_INT, errors.at_least(1)),
    "seed": (_INT, errors.at_least(0)),
    "synthetic_num_examples": (_INT, errors.at_least(1)),
    "synthetic_num_classes": (_INT, errors.at_least(2)),
    "prefetch_to_device": (_INT, errors.at_least(0)),
}


def check_field(field: str, value: Any) -> None:
  """Raises errors.ConfigError ("config.FIELD=VALUE is not allowed: ...") unless FIELD_RULES allow.

  An unknown config.dataset raises the subclass datasets.UnknownDatasetError, as
  datasets.get_spec does, so that callers catch one type for it.
  """
  types, (ok, allowed) = FIELD_RULES[field]
  # bool is an int to Python; a flag for a number must not pass as one.
  errors.check_value(field, value,
                     lambda v: isinstance(v, types) and (bool in types or not isinstance(v, bool)),
                     f"it must be of type {' or '.join(t.__name__ for t in types)}")
  if value is None:
    return
  text = allowed() if callable(allowed) else allowed
  if field == "dataset" and not ok(value):
    raise datasets.UnknownDatasetError(f"config.dataset={value!r} is not allowed: {text}.")
  errors.check_value(field, value, ok, text)


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """The data fields of a run's config (configs/default.py documents each)."""
  dataset: str
  data_dir: str | None
  image_size: int
  cache: bool
  shuffle_buffer_size: int
  augment: bool
  aug_branch: str
  randaugment_num_layers: int
  randaugment_magnitude: float
  eval_batch_size: int
  batch_size: int
  seed: int
  synthetic_num_examples: int
  synthetic_num_classes: int
  prefetch_to_device: int

  def __post_init__(self):
    for field in dataclasses.fields(self):
      check_field(field.name, getattr(self, field.name))

  @classmethod
  def from_config(cls, config: Any) -> "InputConfig":
    """Reads the fields from a ConfigDict (or any object with them as attributes).

    Raises:
      errors.ConfigError: a field has a wrong type or value (see `check_field`).
    """
    return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

  @property
  def spec(self) -> datasets.DatasetSpec:
    """The registry entry of `dataset`, with generated data's sizes filled in."""
    return datasets.get_spec(self)

  def published_info(self) -> datasets.DatasetInfo:
    """The DatasetInfo the registry's published sizes give, without reading data.

    What a run of generated data uses, and what shape-only work needs (memory estimates,
    building a preset's state to inspect it) where TensorFlow may be absent.
    """
    spec = self.spec
    size = self.image_size or spec.native_image_size
    return datasets.DatasetInfo(spec=spec, num_classes=spec.num_classes,
                                image_shape=(size, size, spec.channels),
                                num_train_examples=spec.num_train_examples,
                                num_eval_examples=spec.num_eval_examples)


def published_info(config: Any) -> datasets.DatasetInfo:
  """InputConfig.published_info of a ConfigDict; raises errors.ConfigError for a bad field."""
  return InputConfig.from_config(config).published_info()
