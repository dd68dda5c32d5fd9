"""Checks a config before anything is compiled, so a typo costs seconds, not pod time.

Every field of configs/default.py has a rule in `FIELD_RULES` (a test keeps the two in step);
allowed names come from the modules that own them. Each error names the field, the bad value and
what is allowed.
"""
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from conadv_jax import errors
from conadv_jax.data import datasets
from conadv_jax.method import attacks, conadv, models, optim, parallel
from conadv_jax.run import config_history


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise errors.ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)


def _one_of(names) -> tuple[Callable[[Any], bool], str]:
  """`names` is read at each check: an entry added to a registry at run time is allowed."""
  return (lambda v: v in names), f"choose one of {', '.join(map(str, names))}"


def _at_least(low, kind: str = "") -> tuple[Callable[[Any], bool], str]:
  return (lambda v: math.isfinite(v) and v >= low), f"it must be a finite {kind}>= {low}"


def _above(low) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: math.isfinite(v) and v > low), f"it must be finite and > {low}"


_ANY = ((lambda v: True), "")
_FINITE = ((lambda v: math.isfinite(v)), "it must be finite")

# field: (accepted types, (check, what is allowed)). None is accepted only where listed.
FIELD_RULES: dict[str, tuple[tuple[type, ...], tuple[Callable[[Any], bool], str]]] = {
    "dataset": (_STR, _one_of(datasets.DATASETS)),
    "data_dir": (_STR + (type(None),),
                 ((lambda v: v is None or bool(v.strip())), "use a folder path, or leave unset")),
    "image_size": (_INT, ((lambda v: 0 <= v <= 4096),
                          "use 0 (the dataset's native size) or a side in pixels up to 4096")),
    "cache": (_BOOL, _ANY),
    "shuffle_buffer_size": (_INT, _at_least(1)),
    "augment": (_BOOL, _ANY),
    "aug_branch": (_STR, _one_of(datasets.AUG_BRANCHES)),
    "randaugment_num_layers": (_INT, _at_least(0)),
    "randaugment_magnitude": (_FLOAT, (
        (lambda v: 0 <= v <= datasets.RANDAUGMENT_MAX_MAGNITUDE),
        f"it must be in [0, {datasets.RANDAUGMENT_MAX_MAGNITUDE:g}]")),
    "eval_batch_size": (_INT, _at_least(1)),
    "synthetic_num_examples": (_INT, _at_least(1)),
    "synthetic_num_classes": (_INT, _at_least(2)),
    "model": (_STR, _one_of(models.MODEL_NAMES)),
    "small_resnet_depth": (_INT, _one_of(models.SMALL_RESNET_DEPTHS)),
    "small_resnet_width": (_INT, _at_least(1)),
    # A tuple; a list as read back from a checkpoint's JSON config.
    "mlp_widths": ((tuple, list), (models.valid_mlp_widths,
                                   "use a non-empty tuple of positive ints, e.g. (256, 256)")),
    "dtype": (_STR, _one_of(models.DTYPES)),
    "bn_group_size": (_INT + (type(None),),
                      ((lambda v: v is None or v >= 0), "it must be >= 0 (0: per device)")),
    "adv_bn": (_STR, _one_of(models.ADV_BN_MODES)),
    "model_init": (_STR, _one_of(models.MODEL_INITS)),
    "method": (_STR, _one_of(conadv.METHODS)),
    "staleness": (_INT, _at_least(0)),
    "clean_weight": (_FLOAT, _at_least(0)),
    "adv_weight": (_FLOAT, _at_least(0)),
    "label_smoothing": (_FLOAT, ((lambda v: 0 <= v < 1), "it must be in [0, 1)")),
    "attack.epsilon": (_FLOAT, _at_least(0, "number of pixels ")),
    "attack.step_size": (_FLOAT, _above(0)),
    "attack.num_steps": (_INT, _at_least(1)),
    "attack.random_start_prob": (_FLOAT, ((lambda v: 0.0 <= v <= 1.0),
                                          "it is a probability, in [0, 1]")),
    "attack.targeted": (_BOOL, _ANY),
    "attack.random_start": (_STR, _one_of(attacks.RANDOM_STARTS)),
    "loss_weighting": (_STR, _one_of(conadv.LOSS_WEIGHTINGS)),
    "task_layout": (_STR, _one_of(parallel.TASK_LAYOUTS)),
    "grad_accum_steps": (_INT, _at_least(1)),
    "batch_size": (_INT, _at_least(1)),
    "num_epochs": (_FLOAT, _FINITE),
    "num_train_steps": (_INT, ((lambda v: v == -1 or v > 0),
                               "use -1 (the length comes from num_epochs) or a positive number "
                               "of steps")),
    "optimizer": (_STR, _one_of(optim.OPTIMIZERS)),
    "learning_rate": (_FLOAT, _above(0)),
    "warmup_epochs": (_FLOAT, _at_least(0)),
    "lr_schedule": (_STR, _one_of(optim.SCHEDULES)),
    "lr_decay_power": (_FLOAT, _above(0)),
    "end_learning_rate": (_FLOAT, _at_least(0)),
    "weight_decay": (_FLOAT, _at_least(0)),
    "momentum": (_FLOAT, ((lambda v: 0 <= v < 1), "it must be in [0, 1)")),
    "nesterov": (_BOOL, _ANY),
    "lars_trust_coefficient": (_FLOAT, _above(0)),
    "lars_eps": (_FLOAT, _at_least(0)),
    "seed": (_INT, _at_least(0)),
    "log_every_steps": (_INT, _at_least(1)),
    "eval_every_steps": (_INT, ((lambda v: v == -1 or v > 0), "use -1 (once per epoch) or > 0")),
    "checkpoint_every_steps": (_INT, _at_least(1)),
    "keep_checkpoints": (_INT, ((lambda v: v >= 1),
                                "at least 1 checkpoint must be kept, or a preempted run could not "
                                "resume")),
    "eval_adversarial": (_BOOL, _ANY),
    "eval_pgd_steps": (_INT, _at_least(0)),
    "eval_pgd_epsilon": (_FLOAT, _at_least(0, "number of pixels ")),
    "sharpness_num_examples": (_INT, _at_least(0)),
    "sharpness_iterations": (_INT, _at_least(1)),
    "prefetch_to_device": (_INT, _at_least(0)),
    "fifo_memory_limit_gib": (_FLOAT, _at_least(0)),
    "profile_steps": (_INT, _at_least(0)),
}


def _check_fields(flat: dict[str, Any]) -> None:
  unknown = sorted(set(flat) - set(FIELD_RULES))
  if unknown:
    raise errors.ConfigError(f"config.{unknown[0]} is not a known field (known: "
                      f"{', '.join(sorted(FIELD_RULES))}); check its spelling.")
  for field, (types, (check, allowed)) in FIELD_RULES.items():
    if field not in flat:
      raise errors.ConfigError(f"config.{field} is missing; start the config file from "
                        "configs/default.py's get_config().")
    value = flat[field]
    # bool is an int to Python; a flag for a number must not pass as one.
    type_ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    _require(type_ok, field, value,
             f"it must be of type {' or '.join(t.__name__ for t in types)}")
    if value is not None:
      _require(check(value), field, value, allowed)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises errors.ConfigError for the first invalid field; needs no data and compiles nothing."""
  _check_fields(config_history.flatten(config))
  _require(config.method == "conadv" or config.staleness == 0, "staleness", config.staleness,
           f"staleness > 0 needs method='conadv' (method is {config.method!r}); "
           "set --config.staleness=0 or --config.method=conadv")
  _require(config.method != "conadv" or config.staleness >= 1, "staleness", config.staleness,
           "conadv needs staleness >= 1 (staleness 0 is method='disadv')")
  split = config.task_layout == "split"
  _require(not split or config.method == "conadv", "task_layout", config.task_layout,
           "split runs ConAdv's task B (the attack on batch t+τ) on devices of its own, so it "
           f"needs method='conadv' with staleness >= 1 (method is {config.method!r}); use "
           "task_layout='shared'")
  _require(not split or num_devices % 2 == 0, "task_layout", config.task_layout,
           "split puts tasks A and B on two equal halves of the devices, so it needs an even "
           f"number of devices ({num_devices} here); use task_layout='shared'")

  _require(config.batch_size % num_devices == 0, "batch_size", config.batch_size,
           f"it must be a positive multiple of the {num_devices} devices")
  _require(config.eval_batch_size % num_devices == 0, "eval_batch_size", config.eval_batch_size,
           f"it must be a positive multiple of the {num_devices} devices")
  accum = config.grad_accum_steps
  _require(config.batch_size % (num_devices * accum) == 0, "grad_accum_steps", accum,
           f"batch_size={config.batch_size} must split into {accum} equal micro-batches on each "
           f"of the {num_devices} devices; pick a grad_accum_steps that divides "
           f"{config.batch_size // num_devices}")
  per_device = config.batch_size // num_devices // accum
  where = (f"the per-device batch of {per_device} (batch_size {config.batch_size} over "
           f"{num_devices} devices)" if accum == 1 else
           f"the per-device micro-batch of {per_device} (batch_size {config.batch_size} over "
           f"{num_devices} devices and {accum} micro-batches)")
  group = config.bn_group_size or 0
  _require(group <= per_device, "bn_group_size", config.bn_group_size,
           f"it must not exceed {where}")
  _require(group == 0 or config.batch_size % group == 0, "bn_group_size", config.bn_group_size,
           f"it must divide batch_size={config.batch_size}")
  _require(group == 0 or per_device % group == 0, "bn_group_size", config.bn_group_size,
           f"it must divide {where} so groups stay on one device")
  _require(config.end_learning_rate <= config.learning_rate, "end_learning_rate",
           config.end_learning_rate,
           f"it must not exceed the peak learning_rate={config.learning_rate}")
  _require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", config.num_epochs,
           "set a positive num_epochs, or a positive num_train_steps "
           f"(num_train_steps={config.num_train_steps})")
  # Published split sizes: catches a run that rounds to zero steps before any data is read.
  _check_run_length(config, datasets.get_spec(config).num_train_examples)


def _check_run_length(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
  """The run's step count, computed as the run computes it, must be positive; and what is read
  from the train split after training must be in it (else it fails after all the training)."""
  _require(config.batch_size <= num_train_examples, "batch_size", config.batch_size,
           f"it exceeds the {num_train_examples} training examples of {config.dataset}")
  steps_per_epoch = optim.steps_per_epoch(config.batch_size, num_train_examples)
  try:
    optim.total_train_steps(config, steps_per_epoch)
  except ValueError:
    _require(False, "num_epochs", config.num_epochs,
             f"it rounds to 0 steps ({config.num_epochs} x {steps_per_epoch} steps per epoch); "
             "train for at least one step")
  # evaluation.final_sharpness reads this many train examples in _finish, after the last step.
  generated = datasets.get_spec(config).source == "synthetic"
  _require(config.sharpness_num_examples <= num_train_examples, "sharpness_num_examples",
           config.sharpness_num_examples,
           f"the train split of {config.dataset} has only {num_train_examples} examples; use at "
           f"most {num_train_examples}"
           + (" (or raise config.synthetic_num_examples)" if generated else "")
           + ", or 0 to skip the sharpness measurement")


def validate_against_data(config: ml_collections.ConfigDict, info) -> None:
  """Checks that need the prepared data's size (it may differ from the published one)."""
  _check_run_length(config, info.num_train_examples)


def check_same_on_all_processes(config: ml_collections.ConfigDict) -> None:
  """Refuses processes started with different configs: their "replicated" state would diverge.

  Compares a hash per field across processes before anything runs, so the message can name the
  fields that differ.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  flat = config_history.flatten(config)

  def digest(text: str) -> int:  # 31 bits: survives JAX's default int32.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1

  names = sorted(flat)
  summary = np.asarray([len(names), digest(" ".join(names))], np.int32)
  summaries = np.asarray(multihost_utils.process_allgather(summary))
  if not np.all(summaries == summaries[0]):
    raise errors.ConfigError("The processes of this run have configs with different fields; start "
                      "every process with the same --config file and overrides.")
  per_field = np.asarray([digest(json.dumps(flat[n], sort_keys=True)) for n in names], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(per_field))
  differing = [n for i, n in enumerate(names) if not np.all(gathered[:, i] == gathered[0, i])]
  if differing:
    me = jax.process_index()
    raise errors.ConfigError(
        f"The processes of this run were started with different configs (fields "
        f"{', '.join('config.' + n for n in differing)}; this is process {me}, with "
        f"{', '.join(f'{n}={flat[n]!r}' for n in differing)}). Every process must get the same "
        "--config file and overrides, or their replicated parameters would diverge.")
