"""SPMD layout: one `data` mesh axis; state replicated, batches and the adversarial FIFO sharded.

The same jitted program runs on 1 CPU, 8 fake CPU devices or a pod: only the mesh changes.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conadv_jax.conadv import TrainState

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over devices."""
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
