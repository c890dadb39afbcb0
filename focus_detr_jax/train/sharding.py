"""Device mesh and shardings for data-parallel training (one `data` axis over all devices).

Parameters and optimiser state are replicated; batches are split along their leading axis.
Each host feeds its own slice of the global batch; `global_batch` assembles the per-host numpy
arrays into global `jax.Array`s without copying other hosts' data.
"""

from typing import Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, group_size: int):
  """The global batch must split evenly over devices, hosts and batch groups."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices")
  if (global_batch // n) % group_size:
    raise ValueError(f"per-device batch {global_batch // n} is not a multiple of "
                     f"model.batch_group_size={group_size} (groups must not span devices)")
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by {jax.process_count()} hosts")


def global_batch(local: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Per-host batch (leading axis = this host's share) -> global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def jit_data_parallel(fn, mesh: Mesh, donate_state: bool = False):
  """`fn(state, batch)` jitted with a replicated state and a data-sharded batch.

  Calls (and so tracing) run with `mesh` as the context mesh (`jax.set_mesh`), which lets the
  per-image parts that must not communicate (the Hungarian solver) run under `shard_map`.
  """
  jitted = jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=replicated(mesh), donate_argnums=(0,) if donate_state else ())

  def call(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  def lower(state, batch):   # ahead-of-time: shapes (ShapeDtypeStruct) are enough
    with jax.set_mesh(mesh):
      return jitted.lower(state, batch)

  call.lower = lower
  return call
