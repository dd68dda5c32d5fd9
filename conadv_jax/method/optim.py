"""Optimizers and learning-rate schedules.

Three optimizers are built from optax (`config.optimizer`):

* `lars`: `optax.lars` with both masks set by `decay_mask`, so batch-norm scales/biases (of every
  BN branch) and biases get neither weight decay nor the trust ratio, as in the reference code.
* `sgd`: masked L2 weight decay, then momentum SGD (Nesterov if `config.nesterov`).
* `lamb`: Adam moments, masked weight decay and a masked trust ratio (optax's own `lamb` cannot
  exclude parameters from the trust ratio, so it is composed from optax's building blocks).

LARS trust ratio used here (optax 0.2.8 `scale_by_trust_ratio`, checked against its source).
Per parameter tensor w with gradient g, weight decay wd, trust coefficient c and epsilon e:

    u     = g + wd * w                       (decay is added to the gradient first)
    trust = c * ||w|| / (||u|| + e)          (Frobenius norms of the whole tensor)
    trust = 1   if ||w|| == 0 or ||u|| == 0  (a zero norm disables the rescaling)
    v     = momentum * v + lr * trust * u    (momentum accumulates lr-scaled steps)
    w     = w - v

TF/MLPerf LARS (the reference code's `LARSOptimizer`) instead uses
`trust = c * ||w|| / (||g|| + wd * ||w|| + e)`, with the same fallback of 1 when ||w|| or ||g||
is 0, and the same update `lr * trust * (g + wd * w)` through the momentum. By the triangle
inequality ||g + wd*w|| <= ||g|| + wd*||w||, so optax's trust ratio is never smaller than TF's; with
e = 0 optax's step has norm exactly lr * c * ||w||. The two agree when g and w are parallel or
wd = 0. This project uses optax's form. Note the fallback: a kernel whose norm is 0 (e.g. a
zero-initialised one) gets a plain `lr * g` step, with the full LARS peak LR (10 to 43).
"""
import math
from collections.abc import Callable
from typing import Any

from absl import logging
import jax
import numpy as np
import optax

from conadv_jax import errors

OPTIMIZERS = ("lars", "sgd", "lamb")
SCHEDULES = ("cosine", "polynomial")

# LAMB's second-moment decay and epsilon (no config fields; optax's `lamb` defaults).
_LAMB_B2 = 0.999
_LAMB_EPS = 1e-6


def _finite(check: Callable[[float], bool]) -> Callable[[float], bool]:
  """`check` that also refuses NaN and ±inf, which pass or fail comparisons silently."""
  return lambda v: math.isfinite(v) and check(v)


def decay_mask(params: Any) -> Any:
  """Returns a pytree of bools: True for tensors with weight decay and a trust ratio.

  Only kernels (ndim > 1: convolutions and dense layers) are True. Biases and the scale/bias of
  every batch norm (main and adversarial branches alike) are 1-D and get False: decaying them or
  rescaling their step by their small norms hurts large-batch training (reference code, MLPerf).
  Works on arrays and on `jax.ShapeDtypeStruct` leaves.

  Args:
    params: the parameter pytree (or updates with the same structure).
  """
  return jax.tree.map(lambda x: len(np.shape(x)) > 1, params)


def steps_per_epoch(batch_size: int, num_train_examples: int) -> float:
  """Global steps in one epoch, N / B, not floored: batches run on across epoch boundaries.

  The one place that turns examples into steps; schedules count in fractional epochs (the
  reference's 91 epochs at 32K are 3,558 steps).

  Raises:
    errors.ConfigError: the global batch is larger than the training set.
  """
  errors.check_value("batch_size", batch_size, lambda v: v <= num_train_examples,
                     f"it exceeds the {num_train_examples} training examples; lower it")
  return num_train_examples / batch_size


def total_train_steps(config: Any, steps_per_epoch: float) -> int:
  """Returns the number of optimizer steps of the run; schedules need it up front.

  Args:
    config: reads `num_train_steps` (used if > 0) and `num_epochs`.
    steps_per_epoch: optimizer steps per pass over the training set, N / B (fractional).

  Raises:
    errors.ConfigError: `num_train_steps` is neither -1 nor positive, `num_epochs` is not
      finite, or num_train_steps is -1 and `num_epochs * steps_per_epoch` rounds to no steps.
  """
  # Only -1 means "from num_epochs": 0 or -5 are mistakes, not a silent default.
  errors.check_value("num_train_steps", config.num_train_steps, lambda v: v == -1 or v > 0,
                     "use -1 (the length comes from num_epochs) or a positive number of steps")
  errors.check_value("num_epochs", config.num_epochs, math.isfinite, "it must be finite")
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps = int(round(config.num_epochs * steps_per_epoch))
  errors.check_value("num_epochs", config.num_epochs, lambda _: steps > 0,
                     f"it rounds to {steps} steps ({config.num_epochs} x {steps_per_epoch:g} "
                     "steps per epoch); set a num_epochs worth at least one step, or a positive "
                     f"num_train_steps (num_train_steps={config.num_train_steps})")
  return steps


def create_learning_rate_schedule(config: Any, steps_per_epoch: float,
                                  total_steps: int) -> optax.Schedule:
  """Returns linear warmup from 0 to the peak, then decay to `end_learning_rate`.

  Warmup lasts round(warmup_epochs * steps_per_epoch) steps (0 is allowed: decay from step 0).
  The decay (`lr_schedule`: "polynomial" with power `lr_decay_power`, or "cosine") spans the
  remaining steps, so the LR equals `end_learning_rate` at `total_steps` and stays there. A warmup
  longer than the run is clamped to the run (with a warning).

  Args:
    config: reads learning_rate, warmup_epochs, lr_schedule, lr_decay_power, end_learning_rate.
    steps_per_epoch: optimizer steps per epoch, to turn warmup epochs into steps.
    total_steps: length of the run, e.g. from `total_train_steps`.

  Raises:
    errors.ConfigError: a field is out of range (the message names it).
  """
  # A peak of 0 is a schedule too (frozen parameters); config validation refuses it for a run.
  errors.check_value("learning_rate", config.learning_rate, _finite(lambda v: v >= 0),
                     "it must be a finite >= 0")
  errors.check_value("warmup_epochs", config.warmup_epochs, _finite(lambda v: v >= 0),
                     "it must be a finite >= 0")
  errors.check_value("lr_schedule", config.lr_schedule, lambda v: v in SCHEDULES,
                     f"choose one of {', '.join(SCHEDULES)}")
  errors.check_value("lr_decay_power", config.lr_decay_power, _finite(lambda v: v > 0),
                     "it must be finite and > 0")
  errors.check_value("end_learning_rate", config.end_learning_rate,
                     _finite(lambda v: 0 <= v <= config.learning_rate),
                     "it must be >= 0 and not exceed the peak "
                     f"learning_rate={config.learning_rate}")
  peak = float(config.learning_rate)
  end = float(config.end_learning_rate)
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if warmup_steps > total_steps:
    # A quick check (--config.num_train_steps=3) of a long recipe must still run.
    # Step t uses schedule(t), so the last step (total_steps - 1) gets (total - 1) / total of it.
    logging.warning("Warmup (%d steps) is longer than the run (%d steps): clamped to the run, so "
                    "the learning rate rises over the whole run and would reach its peak %g only "
                    "after the last step (which uses %g).", warmup_steps, total_steps, peak,
                    peak * (total_steps - 1) / total_steps)
    warmup_steps = total_steps
  # At least one decay step keeps optax's schedules well defined for very short runs.
  decay_steps = max(total_steps - warmup_steps, 1)

  if config.lr_schedule == "polynomial":
    decay = optax.polynomial_schedule(init_value=peak, end_value=end,
                                      power=config.lr_decay_power, transition_steps=decay_steps)
  elif config.lr_schedule == "cosine":
    # cosine_decay_schedule goes from init_value to alpha * init_value.
    alpha = end / peak if peak != 0.0 else 0.0
    decay = optax.cosine_decay_schedule(init_value=peak, decay_steps=decay_steps, alpha=alpha)
  else:  # Unreachable: lr_schedule was checked above.
    raise AssertionError(config.lr_schedule)

  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup_steps)
  return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def _lamb(learning_rate: optax.Schedule, b1: float, weight_decay: float,
          mask: Any) -> optax.GradientTransformation:
  """LAMB whose weight decay AND trust ratio skip what `mask` marks False."""
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=_LAMB_B2, eps=_LAMB_EPS),
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(), mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def create_optimizer(config: Any, steps_per_epoch: float,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule); the schedule is also handy for logging.

  Weight decay is coupled L2 (wd * w added to the gradient) and applies to kernels only
  (`decay_mask`). For "lamb", `config.momentum` is Adam's b1.

  Args:
    config: reads `optimizer` and the fields of `create_learning_rate_schedule`, plus
      weight_decay, momentum, nesterov (sgd), lars_trust_coefficient and lars_eps (lars).
    steps_per_epoch: optimizer steps per epoch.
    total_steps: length of the run.

  Raises:
    errors.ConfigError: a field is out of range (the message names it), also one the named
      optimizer ignores.
  """
  errors.check_value("optimizer", config.optimizer, lambda v: v in OPTIMIZERS,
                     f"choose one of {', '.join(OPTIMIZERS)}")
  errors.check_value("weight_decay", config.weight_decay, _finite(lambda v: v >= 0),
                     "it must be a finite >= 0")
  errors.check_value("momentum", config.momentum, lambda v: 0 <= v < 1, "it must be in [0, 1)")
  errors.check_value("lars_trust_coefficient", config.lars_trust_coefficient,
                     _finite(lambda v: v > 0), "it must be finite and > 0")
  errors.check_value("lars_eps", config.lars_eps, _finite(lambda v: v >= 0),
                     "it must be a finite >= 0")
  schedule = create_learning_rate_schedule(config, steps_per_epoch, total_steps)
  name = config.optimizer
  if name == "lars":
    tx = optax.lars(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        weight_decay_mask=decay_mask,
        trust_coefficient=config.lars_trust_coefficient,
        eps=config.lars_eps,
        trust_ratio_mask=decay_mask,
        momentum=config.momentum,
        nesterov=False,
    )
  elif name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate=schedule, momentum=config.momentum or None,
                  nesterov=bool(config.nesterov)),
    )
  elif name == "lamb":
    tx = _lamb(schedule, b1=config.momentum, weight_decay=config.weight_decay, mask=decay_mask)
  else:  # Unreachable: optimizer was checked above.
    raise AssertionError(name)
  return tx, schedule
