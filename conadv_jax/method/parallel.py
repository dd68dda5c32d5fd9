"""SPMD layout: the mesh, the shardings, and jit with the state donated.

Two task layouts (config.task_layout):

* "shared": a 1-D mesh ("data",). Every device runs tasks A and B of ConAdv (and the only task
  of vanilla and DisAdv) on its slice of the batch. State replicated, batches and the
  adversarial FIFO sharded over "data".
* "split": a 2-D mesh ("task", "data") of shape (2, N/2). Devices of task 0 run task A, devices
  of task 1 run task B, at the same time (conadv_jax/method/split_layout.py). The same shardings apply
  unchanged: a PartitionSpec that does not name "task" is replicated over it, so each batch and
  the FIFO are sharded over "data" and held by both devices of a "data" column.

Device pairing in "split": data column j is (devices[2j], devices[2j+1]), both on one host
(make_mesh refuses a pair that spans hosts). Each host then holds whole columns, covering one
contiguous block of every batch's rows, the block its input pipeline reads: each host's pipeline
feeds only its own devices (batch t to its task-0 devices, the same rows of batch t+τ to its
task-1 devices), and the adversarial batch crosses from task 1 to task 0 inside a host. The same
jitted program runs on 1 CPU, 4 fake CPU devices or a pod: only the mesh changes.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conadv_jax import errors
from conadv_jax.method.conadv import TrainState

DATA_AXIS = "data"
TASK_AXIS = "task"
TASK_LAYOUTS = ("shared", "split")


class LayoutError(errors.ConfigError):
  """The devices cannot be arranged in the asked-for task layout."""


def check_layout(layout: str, num_devices: int) -> None:
  """Raises errors.ConfigError (LayoutError for the device count) unless `layout` can run.

  Needs only the device count, so config validation calls it before any mesh is made.
  """
  errors.check_value("task_layout", layout, lambda v: v in TASK_LAYOUTS,
                     f"choose one of {', '.join(TASK_LAYOUTS)}")
  if layout == "split" and num_devices % 2:
    raise LayoutError(f"config.task_layout='split' is not allowed: it puts tasks A and B on two "
                      "equal halves of the devices, so it needs an even number of devices "
                      f"({num_devices} here); use task_layout='shared'.")


def make_mesh(devices: Sequence[jax.Device] | None = None, layout: str = "shared") -> Mesh:
  """A mesh over all (or the given) devices: ("data",) for "shared", ("task", "data") for "split".

  For "split", devices 2j and 2j+1 (in the given order; jax.devices() lists each process's
  devices together) become data column j; see the module docstring for why a pair must not span
  hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  check_layout(layout, len(devices))
  if layout == "shared":
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  split_pairs = [(a.process_index, b.process_index) for a, b in zip(devices[0::2], devices[1::2])
                 if a.process_index != b.process_index]
  if split_pairs:
    counts = {}
    for d in devices:
      counts[d.process_index] = counts.get(d.process_index, 0) + 1
    raise LayoutError(
        "task_layout='split' pairs a task-A and a task-B device on the same host, so every "
        f"process needs an even number of devices (devices per process: {counts}). Run one "
        "process per host with all its devices, or use task_layout='shared'.")
  return Mesh(np.asarray(devices).reshape(-1, 2).T, (TASK_AXIS, DATA_AXIS))


def layout_of(mesh: Mesh) -> str:
  """The task layout of `mesh`: "split" if it has a "task" axis, else "shared"."""
  return "split" if TASK_AXIS in mesh.axis_names else "shared"


def num_batch_shards(mesh: Mesh) -> int:
  """How many distinct slices a batch is cut into: the size of the "data" axis."""
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data" (and, in "split", held by both tasks' devices)."""
  return NamedSharding(mesh, P(DATA_AXIS))


def state_sharding(mesh: Mesh, state: TrainState) -> TrainState:
  """Shardings for a TrainState (or its shape): all replicated but the FIFO's batch axis."""
  shardings = jax.tree.map(lambda _: replicated(mesh), state)
  if state.adv_fifo is None:
    return shardings
  return shardings.replace(adv_fifo=jax.tree.map(lambda _: NamedSharding(mesh, P(None, DATA_AXIS)),
                                                 state.adv_fifo))


def create_sharded_state(init_fn: Callable[[], TrainState], mesh: Mesh) -> TrainState:
  """Runs `init_fn` under jit so every leaf is created directly with its sharding."""
  shardings = state_sharding(mesh, jax.eval_shape(init_fn))
  return jax.jit(init_fn, out_shardings=shardings)()


def jit_train_step(train_step: Callable, mesh: Mesh, state_shape: Any) -> Callable:
  """jit(train_step) with the state donated: (state, batch, batch_ahead) -> (state, metrics)."""
  state_sh = state_sharding(mesh, state_shape)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh), batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def jit_fill_fifo(fill_slot: Callable, mesh: Mesh, state_shape: Any) -> Callable:
  """fill(state, batches, on_slot=None) -> state: `fill_slot` jitted once, run per batch.

  One compiled program fills any number of slots, so compile time and peak memory do not grow
  with τ; `on_slot(i, state)` is called after slot i is dispatched (progress logging).
  """
  state_sh = state_sharding(mesh, state_shape)
  fill_slot = jax.jit(fill_slot, in_shardings=(state_sh, batch_sharding(mesh), replicated(mesh)),
                      out_shardings=state_sh, donate_argnums=(0,))

  def fill(state: TrainState, batches: Sequence[Any],
           on_slot: Callable[[int, TrainState], None] | None = None) -> TrainState:
    for offset, batch in enumerate(batches):
      state = fill_slot(state, batch, np.int32(offset))
      if on_slot is not None:
        on_slot(offset, state)
    return state

  fill.compiled_slot = fill_slot  # For tests: one compilation serves every slot.
  return fill
