"""One builder for a run's model, state and jitted steps.

The run's loop, scripts/benchmark_step.py, the tests and docs/api.md all build through `build`,
so the model, the optimizer, the method and the shardings fit together the same way everywhere.
It reads the config and a description of the data (`DataShape`); it reads no data.
"""
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import optax

from conadv_jax.method import attacks, conadv, evaluation, models, optim, parallel, split_layout


if TYPE_CHECKING:
  import ml_collections


class DataShape(Protocol):
  """What the method needs to know of the data; data.datasets.DatasetInfo is one."""
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  pixel_mean: tuple[float, ...]  # Per channel, 0-255 scale; the model subtracts it.
  pixel_std: tuple[float, ...]


def method_config(config: "ml_collections.ConfigDict", num_classes: int) -> conadv.MethodConfig:
  """What the train step computes, from the config's method and attack fields."""
  return conadv.MethodConfig(
      method=config.method, num_classes=num_classes, staleness=config.staleness,
      attack=attacks.AttackConfig.from_config(config.attack), clean_weight=config.clean_weight,
      adv_weight=config.adv_weight, label_smoothing=config.label_smoothing,
      aug_view=config.aug_branch != "none", loss_weighting=config.loss_weighting,
      grad_accum_steps=config.grad_accum_steps)


@dataclasses.dataclass
class Experiment:
  """The pieces of a run; the jitted functions are built (and compiled) on first use."""
  config: "ml_collections.ConfigDict"
  info: DataShape
  mesh: jax.sharding.Mesh
  model: Any
  forward: conadv.ForwardFn
  method: conadv.MethodConfig
  tx: optax.GradientTransformation
  learning_rate_fn: optax.Schedule
  steps_per_epoch: float  # N / B: epochs are fractional, the schedules count in them.
  total_steps: int
  init_fn: Callable[[], conadv.TrainState]
  state_shape: conadv.TrainState  # ShapeDtypeStructs.

  @property
  def eval_every_steps(self) -> int:
    """config.eval_every_steps, or once per epoch (rounded to a whole step) when it is -1."""
    if self.config.eval_every_steps > 0:
      return self.config.eval_every_steps
    return max(round(self.steps_per_epoch), 1)

  @property
  def task_layout(self) -> str:
    """The mesh's task layout, "shared" or "split" (build() makes it config.task_layout's)."""
    return parallel.layout_of(self.mesh)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return (self.config.batch_size, *self.info.image_shape)

  def init_state(self) -> conadv.TrainState:
    """A step-0 state, every leaf created directly with its sharding."""
    return parallel.create_sharded_state(self.init_fn, self.mesh)

  def abstract_state(self) -> conadv.TrainState:
    """The state's shapes with their shardings, as a restore target."""
    shardings = parallel.state_sharding(self.mesh, self.state_shape)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.state_shape, shardings)

  @functools.cached_property
  def train_step(self) -> Callable:
    """(state, batch_t, batch_t+τ) -> (state, metrics), jitted with the state donated."""
    if self.task_layout == "split":
      step = split_layout.make_train_step(self.forward, self.tx, self.method,
                                          self.learning_rate_fn, mesh=self.mesh,
                                          state_shape=self.state_shape)
    else:
      step = conadv.make_train_step(self.forward, self.tx, self.method, self.learning_rate_fn,
                                    num_shards=self.mesh.size)
    return parallel.jit_train_step(step, self.mesh, self.state_shape)

  @functools.cached_property
  def fill_fifo(self) -> Callable:
    """(state, τ batches, on_slot=None) -> state whose FIFO holds their attacks with θ."""
    if self.task_layout == "split":
      fill_slot = split_layout.make_fill_fifo(self.forward, self.method, mesh=self.mesh,
                                              state_shape=self.state_shape)
    else:
      fill_slot = conadv.make_fill_fifo(self.forward, self.method, num_shards=self.mesh.size)
    return parallel.jit_fill_fifo(fill_slot, self.mesh, self.state_shape)

  @functools.cached_property
  def eval_step(self) -> Callable:
    step = evaluation.make_eval_step(self.forward, self.method, self.config.eval_adversarial)
    if self.task_layout == "split":
      # Eval batches arrive sharded over "data" only (held by both tasks' devices); spread each
      # over all N devices (a local slice, no transfer) so the eval is not computed twice.
      spread = jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec((parallel.DATA_AXIS, parallel.TASK_AXIS)))
      inner = step

      def step(state, batch, batch_index):
        return inner(state, jax.lax.with_sharding_constraint(batch, spread), batch_index)
    return jax.jit(step)

  def batch_bytes_per_device(self) -> int:
    """Memory of one input batch on each device: uint8 images (and their AutoAugment view)
    and int32 labels, sharded like the FIFO."""
    views = 2 if self.method.aug_view else 1
    rows = self.batch_shape[0]
    return ((math.prod(self.batch_shape) * views + 4 * rows) //
            parallel.num_batch_shards(self.mesh))

  def fifo_bytes_per_device(self) -> int:
    """Memory of the adversarial FIFO on each device (it is sharded like the batches).

    In the split layout both devices of a "data" column hold the column's rows: twice the
    shared layout's share.
    """
    leaves = jax.tree.leaves(self.state_shape.adv_fifo)
    return (sum(leaf.size * leaf.dtype.itemsize for leaf in leaves) //
            parallel.num_batch_shards(self.mesh))


def build(config: "ml_collections.ConfigDict", info: DataShape,
          mesh: jax.sharding.Mesh | None = None) -> Experiment:
  """Everything a run of `config` on data `info` needs, on `mesh` (default: all devices).

  The mesh's layout must be config.task_layout's (parallel.make_mesh(devices, layout)).
  """
  if mesh is None:
    mesh = parallel.make_mesh(layout=config.task_layout)
  elif parallel.layout_of(mesh) != config.task_layout:
    raise ValueError(f"config.task_layout={config.task_layout!r} but the mesh given has axes "
                     f"{mesh.axis_names} (layout {parallel.layout_of(mesh)!r}); make it with "
                     f"parallel.make_mesh(devices, {config.task_layout!r}).")
  steps_per_epoch = optim.steps_per_epoch(config.batch_size, info.num_train_examples)
  total_steps = optim.total_train_steps(config, steps_per_epoch)
  tx, learning_rate_fn = optim.create_optimizer(config, steps_per_epoch, total_steps)
  model = models.create_model_from_config(config, info, mesh.size)
  method = method_config(config, info.num_classes)
  if config.task_layout == "split":
    split_layout.check_method(method)

  def init_fn() -> conadv.TrainState:
    init_rng, attack_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = model.init(init_rng, jnp.zeros((1, *info.image_shape)), train=False)
    return conadv.TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx,
        staleness=method.staleness, batch_shape=(config.batch_size, *info.image_shape),
        rng=attack_rng)

  return Experiment(
      config=config, info=info, mesh=mesh, model=model, forward=conadv.linen_forward(model),
      method=method, tx=tx, learning_rate_fn=learning_rate_fn, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, init_fn=init_fn, state_shape=jax.eval_shape(init_fn))
