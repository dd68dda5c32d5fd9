"""Checks a config before anything is compiled, so a typo costs seconds, not pod time.

Each field is checked once, by the code that reads it: InputConfig, MethodConfig, AttackConfig,
models.create_model, optim and parallel.check_layout raise errors.ConfigError naming the field.
`validate` builds them cheaply (no data read, nothing compiled) and adds only what no one reader
can check: rules across readers, on the device count or on a whole run, and a range for each
field only the loop reads (LOOP_FIELD_RULES). Unknown fields and wrong types are left to the
locked, type-safe ConfigDict. So a new field needs configs/default.py and its reader, plus a
LOOP_FIELD_RULES entry if only the loop reads it and it has a range.
"""
import ml_collections

from conadv_jax import errors
from conadv_jax.data import datasets, input_config
from conadv_jax.method import experiment, models, optim, parallel, split_layout


# Fields that only run/ reads (the loop, evaluate.py), with no dataclass of their own.
LOOP_FIELD_RULES = {
    "log_every_steps": errors.at_least(1),
    "eval_every_steps": ((lambda v: v == -1 or v > 0), "use -1 (once per epoch) or > 0"),
    "checkpoint_every_steps": errors.at_least(1),
    "keep_checkpoints": ((lambda v: v >= 1), "at least 1 checkpoint must be kept, or a "
                         "preempted run could not resume"),
    "eval_pgd_steps": errors.at_least(0),
    "eval_pgd_epsilon": errors.at_least(0),
    "sharpness_num_examples": errors.at_least(0),
    "sharpness_iterations": errors.at_least(1),
    "fifo_memory_limit_gib": errors.at_least(0),
    "profile_steps": errors.at_least(0),
}


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises errors.ConfigError for the first invalid field; reads no data, compiles nothing."""
  for field, (ok, allowed) in LOOP_FIELD_RULES.items():
    errors.check_value(field, config[field], ok, allowed)
  spec = input_config.InputConfig.from_config(config).spec
  method = experiment.method_config(config, spec.num_classes)
  parallel.check_layout(config.task_layout, num_devices)
  if config.task_layout == "split":
    split_layout.check_method(method)
  models.create_model_from_config(config, spec, num_devices)
  _check_batches(config, num_devices)
  optim.create_optimizer(config, *_check_run_length(config, spec.num_train_examples))
  # The schedule takes a peak of 0 (frozen parameters, as tests use); a run with it learns nothing.
  errors.check_value("learning_rate", config.learning_rate, lambda v: v > 0, "it must be > 0")


def _check_batches(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Batches, micro-batches and BN groups must split evenly over the devices."""
  batch, accum = config.batch_size, config.grad_accum_steps
  for field in ("batch_size", "eval_batch_size"):
    errors.check_value(field, config[field], lambda v: v % num_devices == 0,
                       f"it must be a positive multiple of the {num_devices} devices")
  errors.check_value("grad_accum_steps", accum, lambda v: batch % (num_devices * v) == 0,
                     f"batch_size={batch} must split into {accum} equal micro-batches on each of "
                     f"the {num_devices} devices; pick a grad_accum_steps that divides "
                     f"{batch // num_devices}")
  per_device = batch // num_devices // accum
  micro = f" and {accum} micro-batches" if accum > 1 else ""
  errors.check_value("bn_group_size", config.bn_group_size,
                     lambda v: not v or per_device % v == 0,
                     f"it must divide the per-device {'micro-' if micro else ''}batch of "
                     f"{per_device} (batch_size {batch} over {num_devices} devices{micro}), so "
                     "groups stay on one device")


def _check_run_length(config: ml_collections.ConfigDict,
                      num_train_examples: int) -> tuple[float, int]:
  """The run's length as the run computes it (optim owns those rules; from the published split
  size, before any data is read), and the train examples the final sharpness measure reads;
  returns (steps per epoch, steps)."""
  per_epoch = optim.steps_per_epoch(config.batch_size, num_train_examples)
  total_steps = optim.total_train_steps(config, per_epoch)
  errors.check_value(
      "sharpness_num_examples", config.sharpness_num_examples, lambda v: v <= num_train_examples,
      f"the train split of {config.dataset} has only {num_train_examples} examples; use at most "
      f"{num_train_examples}" + (" (or raise config.synthetic_num_examples)"
                                 if datasets.get_spec(config).source == "synthetic" else "") +
      ", or 0 to skip the sharpness measurement")
  return per_epoch, total_steps


def validate_against_data(config: ml_collections.ConfigDict, info) -> None:
  """Checks that need the prepared data's size (it may differ from the published one)."""
  _check_run_length(config, info.num_train_examples)
