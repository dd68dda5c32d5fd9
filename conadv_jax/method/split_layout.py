"""ConAdv with tasks A and B on separate devices: task_layout="split".

On one device XLA runs ConAdv's two tasks one after the other, so a step costs what DisAdv's
does. Here the mesh is ("task", "data") = (2, N/2) and ONE jitted SPMD program (shard_map over
the mesh) runs, on each device, only its own task, chosen by lax.axis_index("task") through
lax.cond:

  task 0 (task A): the weight gradient on its "data" slice of batch t and of the adversarial
    batch made τ steps earlier (read from its FIFO slot), plus the new BN running averages;
  task 1 (task B): the attack with θ_t on its "data" slice of batch t+τ.

After the conditional, every device takes part in the same collectives:

  * gradients, metrics and BN changes: a psum over the whole mesh in which task-B devices
    contribute zeros, divided by N/2: the mean over the task-A devices, so every device applies
    the identical update and θ stays replicated;
  * the new adversarial batch: a psum over "task" in which task-A devices contribute zeros, so
    both devices of a data column write the same bytes into the FIFO slot (which stays sharded
    over "data" and replicated over "task", as parallel.state_sharding says for either layout).

shard_map runs with check_vma=False: the branch taken depends on axis_index, so JAX's
replication types would call every output "varying over task" although each one leaves a psum
that gives all its participants the same value. Replication holds by construction, and the
tests check it on every device's copy.

The result equals the shared layout's (tests/test_split_layout.py): each example keeps its
global row (its attack key), the model's BN groups are those of the shared layout on N devices
(a device of the split layout holds two shared-layout slices, 2B/N rows, and its groups never
straddle them), and with gradient accumulation micro-batch i is still the i-th chunk of each
shared-layout slice. The state pytree is the same, so checkpoints move between layouts.

Costs (docs/performance.md): a task-A device does task A on 2B/N rows, a task-B device the
attack on 2B/N rows, so the critical path is task A on twice the rows, against tasks A and B on
B/N rows in the shared layout. That pays off where a step's time barely grows with the rows per
device (small per-device batches on TPUs and GPUs), not where it grows linearly with them (a CPU).
Each batch is sent from its host to both devices of a column (task B needs it at step t-τ, task A
at step t), and the FIFO takes twice the shared layout's memory per device (2B/N rows a slot).
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from conadv_jax import errors
from conadv_jax.method import conadv, parallel
from conadv_jax.method.conadv import Batch, ForwardFn, MethodConfig, TrainState

DATA, TASK = parallel.DATA_AXIS, parallel.TASK_AXIS
TASK_A, TASK_B = 0, 1  # Index along the "task" axis.


def check_method(cfg: MethodConfig) -> None:
  """The split layout needs a task B to give the other devices: ConAdv with τ >= 1."""
  if cfg.method != "conadv" or cfg.staleness < 1:
    raise errors.ConfigError(
        "config.task_layout='split' is not allowed: it runs ConAdv's task B (the attack on "
        "batch t+τ) on devices of its own, so it needs method='conadv' with staleness >= 1 (not "
        f"method={cfg.method!r} with staleness={cfg.staleness}); use task_layout='shared'.")


def _state_specs(mesh: Mesh, state_shape: TrainState) -> TrainState:
  return jax.tree.map(lambda s: s.spec, parallel.state_sharding(mesh, state_shape))


def _zeros_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _local_rows(local_size: int) -> jax.Array:
  """The global batch rows of this device's slice: its attack keys depend on them."""
  return jax.lax.axis_index(DATA) * local_size + jnp.arange(local_size, dtype=jnp.int32)


def _shards_per_device(mesh: Mesh) -> int:
  """How many shared-layout (N-device) slices one split-layout device holds: 2."""
  return mesh.size // parallel.num_batch_shards(mesh)


def make_task_a(forward: ForwardFn, cfg: MethodConfig, shards: int):
  """task_a(state, batch, adv) -> (grads, BN changes, metrics) on this device's rows.

  The means over the device's rows (over its micro-batches with gradient accumulation, as
  conadv.make_train_step takes them). BN statistics come back as changes from the state's, so
  a branch no example passed through stays bit-exact after the mean over devices.
  """
  loss_fn = conadv.make_loss_fn(forward, cfg)
  k = cfg.grad_accum_steps

  def task_a(state: TrainState, batch: Batch, adv: Batch):
    def micro_step(xs):
      micro_batch, micro_adv = xs
      grads, (stats, metrics) = jax.grad(loss_fn, has_aux=True)(
          state.params, state.batch_stats, micro_batch, micro_adv)
      return (grads, jax.tree.map(jnp.subtract, stats, state.batch_stats), metrics), ()

    split = lambda tree: jax.tree.map(lambda x: conadv.split_micro(x, k, shards), tree)
    summed, _ = conadv.scan_micro(micro_step, (split(batch), split(adv)))
    return jax.tree.map(lambda x: x / k, summed)

  return task_a


def make_task_b(forward: ForwardFn, cfg: MethodConfig, shards: int):
  """task_b(state, batch, batch_index, rows) -> the adversarial version of this device's rows."""
  attack = conadv.make_attack_fn(forward, cfg)
  k = cfg.grad_accum_steps

  def task_b(state: TrainState, batch: Batch, batch_index: jax.Array, rows: jax.Array) -> Batch:
    split = lambda tree: jax.tree.map(lambda x: conadv.split_micro(x, k, shards), tree)
    _, adv = conadv.scan_micro(
        lambda xs: ((), attack(state.params, state.batch_stats, state.rng, xs[0], batch_index,
                               xs[1])), split((batch, rows)))
    return jax.tree.map(lambda x: conadv.merge_micro(x, shards), adv)

  return task_b


def make_train_step(forward: ForwardFn, tx: optax.GradientTransformation, cfg: MethodConfig,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None, *,
                    mesh: Mesh, state_shape: TrainState):
  """train_step(state, batch_t, batch_t+τ) -> (state, metrics), as conadv.make_train_step's.

  Returns a shard_map over `mesh` (a ("task", "data") mesh); jit it with
  parallel.jit_train_step. Both batches come sharded over "data" (parallel.batch_sharding).
  """
  check_method(cfg)
  shards = _shards_per_device(mesh)
  num_a = parallel.num_batch_shards(mesh)  # Task-A devices: the psum over all is N/2 of them.
  task_a = make_task_a(forward, cfg, shards)
  task_b = make_task_b(forward, cfg, shards)

  def local_step(state: TrainState, batch: Batch, ahead: Batch):
    slot = state.step % cfg.staleness
    pending = jax.tree.map(lambda f: f[slot], state.adv_fifo)  # Batch t's, made at step t-τ.
    rows = _local_rows(ahead["label"].shape[0])
    a_out = jax.eval_shape(task_a, state, batch, pending)
    b_out = jax.eval_shape(task_b, state, ahead, state.step + cfg.staleness, rows)

    def run_a():
      return task_a(state, batch, pending), _zeros_like(b_out)

    def run_b():
      return _zeros_like(a_out), task_b(state, ahead, state.step + cfg.staleness, rows)

    (grads, stats_change, metrics), new_adv = jax.lax.cond(
        jax.lax.axis_index(TASK) == TASK_A, run_a, run_b)
    # Task-B devices add zeros: the sums over the mesh are sums over the task-A devices.
    grads, stats_change, metrics = jax.tree.map(
        lambda x: jax.lax.psum(x, (TASK, DATA)) / num_a, (grads, stats_change, metrics))
    # Task-A devices add zeros: both devices of a column get task B's bytes (uint8, exact).
    new_adv = jax.tree.map(lambda x: jax.lax.psum(x, TASK), new_adv)

    batch_stats = jax.tree.map(jnp.add, state.batch_stats, stats_change)
    adv_fifo = jax.tree.map(lambda f, n: f.at[slot].set(n), state.adv_fifo, new_adv)
    return conadv.apply_update(state, tx, grads, batch_stats, adv_fifo, metrics,
                               learning_rate_fn)

  specs = _state_specs(mesh, state_shape)
  return jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA), P(DATA)),
                       out_specs=(specs, P()), check_vma=False)


def make_fill_fifo(forward: ForwardFn, cfg: MethodConfig, *, mesh: Mesh,
                   state_shape: TrainState):
  """fill_slot(state, batch, offset) -> state, as conadv.make_fill_fifo's, on the split mesh.

  The task-B devices make the attack, as in the step; it reaches the task-A devices the same
  way (a psum over "task" with zeros from task A).
  """
  check_method(cfg)
  task_b = make_task_b(forward, cfg, _shards_per_device(mesh))

  def local_fill(state: TrainState, batch: Batch, offset: jax.Array) -> TrainState:
    index = state.step + offset
    rows = _local_rows(batch["label"].shape[0])
    shape = jax.eval_shape(task_b, state, batch, index, rows)
    adv = jax.lax.cond(jax.lax.axis_index(TASK) == TASK_B,
                       lambda: task_b(state, batch, index, rows), lambda: _zeros_like(shape))
    adv = jax.tree.map(lambda x: jax.lax.psum(x, TASK), adv)
    return state.replace(adv_fifo=jax.tree.map(lambda f, a: f.at[index % cfg.staleness].set(a),
                                               state.adv_fifo, adv))

  specs = _state_specs(mesh, state_shape)
  return jax.shard_map(local_fill, mesh=mesh, in_specs=(specs, P(DATA), P()), out_specs=specs,
                       check_vma=False)
