"""Batch norm with per-branch statistics and ghost (grouped) statistics.

Two things large-batch adversarial training needs that `flax.linen.BatchNorm` does not give:

* Ghost BN: statistics over groups of `group_size` examples, by reshaping the batch axis. Under
  `jit` with a batch sharded over devices, a plain BatchNorm normalises over the *global* batch
  (an all-reduce per layer) and its result changes with the data layout; a fixed group size makes
  the result independent of how many devices share the batch, and keeps the reduction local when
  the group size divides the per-device batch.
* Branches (AdvProp's auxiliary BN): clean examples use the "main" BN, adversarial ones the "adv"
  BN, and the AutoAugment view of the three-branch recipe the "aug" BN, each with its own scale,
  bias and running averages: the three input distributions differ, and one set of statistics
  for their mixture would fit none of them (AdvProp). Evaluation uses "main" only.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MAIN = "main"
ADV = "adv"
AUG = "aug"  # The AutoAugment view of the three-branch recipe.


class _BatchNormSettings(nn.Module):
  """The settings every batch norm here takes.

  Attributes:
    group_size: examples per statistics group; None normalises over the whole batch this call
      sees (under `jit`, the global batch).
    momentum: decay of the running averages.
    epsilon: added to the variance.
    dtype: output dtype; statistics are always computed in float32.
    scale_init: initialiser of the scale (zeros for the last BN of a residual block).
  """
  group_size: int | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones


class GhostBatchNorm(_BatchNormSettings):
  """BatchNorm whose training statistics come from groups of `group_size` examples."""

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if use_running_average:
      mean, var = running_mean.value, running_var.value
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      batch = x.shape[0]
      group = self.group_size or batch
      if batch % group:
        raise ValueError(f"BatchNorm: batch of {batch} examples is not divisible into groups of "
                         f"bn_group_size={group}; pick a bn_group_size that divides it.")
      grouped = x.astype(jnp.float32).reshape((batch // group, group) + x.shape[1:])
      reduce_axes = tuple(range(1, grouped.ndim - 1))
      mean = grouped.mean(reduce_axes, keepdims=True)
      var = jnp.square(grouped - mean).mean(reduce_axes, keepdims=True)
      y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        flat = (-1, features)
        running_mean.value = (self.momentum * running_mean.value +
                              (1 - self.momentum) * mean.reshape(flat).mean(0))
        running_var.value = (self.momentum * running_var.value +
                             (1 - self.momentum) * var.reshape(flat).mean(0))
    return (y * scale + bias).astype(self.dtype)


class BranchBatchNorm(_BatchNormSettings):
  """One GhostBatchNorm per branch in `branches`; the first one (main) also serves "adv" if absent.

  Without "adv" in `branches` the adversarial examples share the clean BN ("shared", or a
  method that makes none); with it they get their own ("separate"). Any other branch must be
  listed: an "aug" view normalised by the main BN because the model was built without its set
  would train silently on the wrong statistics, so it raises instead.
  """
  branches: Sequence[str] = (MAIN, ADV)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, branch: str = MAIN) -> jax.Array:
    norms = {
        b: GhostBatchNorm(self.group_size, self.momentum, self.epsilon, self.dtype,
                          self.scale_init, name=f"bn_{b}") for b in self.branches
    }
    if self.is_initializing():  # Create every branch's variables, whichever branch is asked for.
      for norm in norms.values():
        norm(x, use_running_average=not train)
    if branch in norms:
      chosen = norms[branch]
    elif branch == ADV:
      chosen = norms[self.branches[0]]
    else:
      raise ValueError(f"BatchNorm branch {branch!r} is not one of this model's {tuple(norms)}; "
                       "build the model with the branches the method uses (models.bn_branches).")
    return chosen(x, use_running_average=not train)
