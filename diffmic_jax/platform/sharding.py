"""Data parallelism with `jax.jit` and `NamedSharding` on a 1-D ('data',) mesh.

The batch is sharded over every device of every host; variables are replicated. The same
code runs on one CPU, one GPU, several GPUs and several hosts (after
`jax.distributed.initialize`).
"""

import collections

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
  """A ('data',) mesh over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> int:
  """Returns this process's share of a global batch; the batch must split evenly."""
  if batch_size % mesh.size:
    raise ValueError(f"config.{field}={batch_size} must be divisible by the number of devices "
                     f"({mesh.size})")
  return batch_size // jax.process_count()


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the ('data',) axis."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree of arrays replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def prefetch(iterator, mesh: Mesh, size: int = 2, with_state: bool = False):
  """Yields device batches while keeping `size` more already transferred.

  Transfers are asynchronous, so the next batches are copied while the current step runs.
  With `with_state`, yields (batch, iterator state right after that batch) so that a
  checkpoint records the position of the last batch consumed, not of the last prefetched.
  """
  queue = collections.deque()
  for batch in iterator:
    state = iterator.get_state() if with_state else None
    device_batch = put_batch(batch, mesh)
    queue.append((device_batch, state) if with_state else device_batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
