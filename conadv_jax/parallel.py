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
  return shardings.replace(adv_fifo=NamedSharding(mesh, P(None, DATA_AXIS)))


def create_sharded_state(init_fn: Callable[[], TrainState], mesh: Mesh) -> TrainState:
  """Runs `init_fn` under jit so every leaf is created directly with its sharding."""
  shardings = state_sharding(mesh, jax.eval_shape(init_fn))
  return jax.jit(init_fn, out_shardings=shardings)()


def jit_train_step(train_step: Callable, mesh: Mesh, state_shape: Any) -> Callable:
  """jit(train_step) with the state donated: (state, batch, batch_ahead) -> (state, metrics)."""
  state_sh = state_sharding(mesh, state_shape)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh), batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def jit_fill_fifo(fill_fifo: Callable, mesh: Mesh, state_shape: Any) -> Callable:
  """jit(fill_fifo(state, batches)) with each of the τ batches sharded on its batch axis."""
  state_sh = state_sharding(mesh, state_shape)
  return jax.jit(fill_fifo, in_shardings=(state_sh, batch_sharding(mesh)),
                 out_shardings=state_sh, donate_argnums=(0,))
