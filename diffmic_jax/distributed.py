"""JAX's multi-process runtime (`jax.distributed`): the only module that starts it.

One process runs per host (or per GPU); together they see every device of the job, and the
('data',) mesh of `sharding.make_mesh` spans them all. Where the processes come from:

- `diffmic_jax.launch` (this machine, or one host with several GPUs) sets COORDINATOR_ENV,
  NUM_PROCESSES_ENV and PROCESS_ID_ENV for every process it starts;
- on a cluster (SLURM's `srun`, Open MPI, Kubernetes, Cloud TPU) none of them is set and
  `jax.distributed.initialize()` reads the job's own environment.

On CPU the processes exchange data through gloo collectives, which must be chosen before JAX
creates its CPU backend; GPUs use NCCL whatever this setting says.
"""

import os

import jax

COORDINATOR_ENV = "DIFFMIC_COORDINATOR_ADDRESS"  # host:port of process 0's coordinator
NUM_PROCESSES_ENV = "DIFFMIC_NUM_PROCESSES"
PROCESS_ID_ENV = "DIFFMIC_PROCESS_ID"


def _env_int(name: str):
  value = os.environ.get(name)
  if value is None:
    return None
  if not value.isdigit():
    raise ValueError(f"environment variable {name}={value!r}; expected a non-negative integer")
  return int(value)


def initialize(enabled: bool) -> None:
  """Joins the job's processes (once; later calls do nothing). Call before any JAX computation.

  Args:
    enabled: config.training.distributed; False leaves JAX single-process.

  Raises:
    ValueError: a malformed DIFFMIC_* variable, or only some of them set.
  """
  if not enabled or jax.distributed.is_initialized():
    return
  env = {COORDINATOR_ENV: os.environ.get(COORDINATOR_ENV),
         NUM_PROCESSES_ENV: _env_int(NUM_PROCESSES_ENV), PROCESS_ID_ENV: _env_int(PROCESS_ID_ENV)}
  given = [name for name, value in env.items() if value is not None]
  if given and len(given) < len(env):
    raise ValueError(f"set all of {', '.join(env)} or none of them (cluster auto-detection); "
                     f"only {', '.join(given)} is set")
  settings = {"coordinator_address": env[COORDINATOR_ENV],
              "num_processes": env[NUM_PROCESSES_ENV], "process_id": env[PROCESS_ID_ENV]}
  # CPU processes need gloo to run collectives across processes (the default has none).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)


def is_primary() -> bool:
  """True in the process that writes the run's records (config, metrics, reports, plots)."""
  return jax.process_index() == 0
