"""JAX's multi-process runtime (`jax.distributed`): the only module that starts it.

One process runs per host (or per GPU); together they see every device of the job, and the
('data',) mesh of `sharding.make_mesh` spans them all. Where the processes come from:

- `diffmic_jax.launch` (this machine, or one host with several GPUs) sets COORDINATOR_ENV,
  NUM_PROCESSES_ENV and PROCESS_ID_ENV for every process it starts;
- on a cluster (SLURM's `srun`, Open MPI, Kubernetes, Cloud TPU) none of them is set and
  `jax.distributed.initialize()` reads the job's own environment.

On CPU the processes exchange data through gloo collectives, which must be chosen before JAX
creates its CPU backend; GPUs use NCCL whatever this setting says.

Process 0 writes the run's records; `from_primary` hands its decisions (the workdir lock, the
validations already done) to the others, `primary_first` lets it prepare a dataset before they
read it, and `exit_at_once_on_error` ends a failing process without waiting for its peers.
`StopSignals` turns SIGTERM and SIGINT into a stop at a step boundary that every process agrees
on (preemption).
"""

import contextlib
import json
import os
import signal
import sys
import traceback

import jax
import numpy as np
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as orbax_multihost

from diffmic_jax.platform import errors

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


def planned_process_count():
  """The number of processes diffmic_jax.launch starts (DIFFMIC_NUM_PROCESSES), or None (a
  cluster's own environment, read by JAX)."""
  return _env_int(NUM_PROCESSES_ENV)


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
  use_coordination_barriers()


def use_coordination_barriers() -> None:
  """Makes Orbax's checkpoint barriers wait on the coordination service (a key-value store
  reached over gRPC, with a timeout) instead of running a psum over every device.

  The default barrier is a compiled collective: on CPU a gloo all-reduce, on GPU an NCCL one,
  issued between the training step's own collectives. A barrier that sends nothing through the
  devices can never be paired with another computation's collective, whatever each process's
  timing. The timing does differ on CPU: only process 0 writes the persistent compilation cache
  and every other process's cache key carries its own CPU topology fingerprint, so with a warm
  cache process 0 loads each program while the others compile it (on the tiny config, 1.6 s
  against 33 s for the joint step).
  """
  # An absl flag of Orbax's, read at every barrier: set before the first checkpoint is saved.
  # Orbax reads it as False while absl's flags are unparsed (a program that never calls
  # app.run); marking them parsed keeps every other flag at its default.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  flags.FLAGS[orbax_multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name].value = True


def is_primary() -> bool:
  """True in the process that writes the run's records (config, metrics, reports, plots)."""
  return jax.process_index() == 0


def from_primary(value):
  """Process 0's `value` in every process (a collective: every process must call it).

  Args:
    value: anything JSON can encode; only process 0's is used.

  Returns:
    process 0's value, decoded from JSON in the other processes; `value` itself in a
    one-process run.
  """
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
  buffer = np.zeros(size, np.int32) if data is None else data.astype(np.int32)
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(buffer.astype(np.uint8).tobytes().decode())


@contextlib.contextmanager
def primary_first(name: str):
  """Process 0 runs the block first (preparing a dataset, say); the others run it once process
  0 has finished it. A block that fails in process 0 leaves the others waiting: the launcher
  (or the cluster) stops them when process 0 exits."""
  if jax.process_count() == 1:
    yield
    return
  if not is_primary():
    multihost_utils.sync_global_devices(f"diffmic primary_first {name}")
  yield
  if is_primary():
    multihost_utils.sync_global_devices(f"diffmic primary_first {name}")


def _exit_status(error: BaseException):
  """The exit status for an exception, or None for an exit that is not a failure."""
  if isinstance(error, SystemExit):
    code = error.code
    if code is None or code == 0:
      return None
    return code if isinstance(code, int) else 1
  if isinstance(error, KeyboardInterrupt):
    return 130
  return 1


@contextlib.contextmanager
def exit_at_once_on_error():
  """In a multi-process run, a process that fails exits at once, with its error printed.

  A normal exit would first wait in JAX's shutdown barrier for the other processes, which
  themselves wait in a collective for this one: nobody would exit until a timeout, and
  `diffmic_jax.launch` could not stop the run. Files are closed and checkpoints finished by
  then (the training loop closes them on the way out). One-process runs exit as usual.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-exception-caught
    status = _exit_status(e)
    if status is None or not jax.distributed.is_initialized():
      raise
    if isinstance(e, KeyboardInterrupt):  # one line per process, not a traceback each
      errors.report("interrupted (SIGINT)")
    elif not isinstance(e, SystemExit):  # SystemExit: the message is already printed
      traceback.print_exc()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access


class StopSignals:
  """SIGTERM and SIGINT during training: a request to save and stop at a step boundary.

  Schedulers (SLURM, Kubernetes, spot VMs) announce a preemption with SIGTERM and send SIGKILL a
  grace period later. Inside the `with` block either signal only records the request, and
  `reached(step)` is True at the one step where every process must save and stop:

  - one process: the first step boundary after the signal;
  - several: the step that JAX's preemption service (`multihost_utils.
    reached_preemption_sync_point`) agrees on, whichever process was signalled. JAX catches
    SIGTERM itself; SIGINT is passed on to it as SIGTERM.

  Later signals are ignored, so a second SIGTERM cannot interrupt the save. The previous
  handlers are restored on exit. Must be entered in the main thread.
  """

  def __init__(self):
    self.signum = None  # the first signal received (SIGTERM when JAX's service caught it)
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    # With several processes JAX's preemption service owns SIGTERM (set up by initialize).
    handled = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      return  # already stopping; a second signal must not interrupt the save
    self.signum = signum
    os.write(2, f"\n{signal.Signals(signum).name} received: saving a checkpoint at the next "
                "step boundary, then stopping\n".encode())
    if self._multi:  # JAX's preemption service hears SIGTERM and tells every process
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether the run must save and stop once `step` steps are done (a collective in a
    multi-process run: every process calls it at every step, with the same step numbers)."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
