"""A worker for tests/multiprocess_test.py: process 1 raises while process 0 waits for it in a
collective, as a training process waits for a peer that crashed.

  python -m diffmic_jax.launch --num_processes 2 --module tests.multiprocess_worker
"""

import jax
from jax.experimental import multihost_utils

from diffmic_jax.platform import distributed


def main():
  distributed.initialize(True)
  with distributed.exit_at_once_on_error():  # as diffmic_jax.main runs every process
    if jax.process_index() == 1:
      raise RuntimeError("process 1 fails on purpose")
    multihost_utils.sync_global_devices("waits for process 1, which never comes")


if __name__ == "__main__":
  main()
