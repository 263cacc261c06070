"""A worker for tests/multiprocess_test.py: two processes save two checkpoints through the
run's Checkpointer and print, as JSON, the names of the barriers that went through the devices
(`multihost_utils.sync_global_devices`, a compiled all-reduce).

  python -m diffmic_jax.launch --num_processes 2 --module tests.checkpoint_barrier_worker -- DIR
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffmic_jax.platform import distributed
from diffmic_jax.platform import sharding
from diffmic_jax.run import checkpointing


def main():
  distributed.initialize(True)
  device_barriers = []
  collective_barrier = multihost_utils.sync_global_devices

  def recording_barrier(name):
    device_barriers.append(name)
    collective_barrier(name)

  multihost_utils.sync_global_devices = recording_barrier
  mesh = sharding.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"w": jax.device_put(np.arange(6, dtype=np.float32), replicated)}
  checkpointer = checkpointing.Checkpointer(sys.argv[1])
  for step in (1, 2):
    checkpointer.save("latest", step, state, {"step": step})
  checkpointer.save("best", 2, state, {"step": 2})
  checkpointer.wait()
  checkpointer.close()
  print(f"process {jax.process_index()} device barriers: {json.dumps(device_barriers)}",
        flush=True)


if __name__ == "__main__":
  main()
