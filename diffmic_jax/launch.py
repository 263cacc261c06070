"""Starts N local processes of one multi-process run and stops them all when one fails.

  python -m diffmic_jax.launch --num_processes 2 -- --config configs/demo.py --workdir runs/demo

Everything after `--` goes to `python -m diffmic_jax.main` (or `--module`) unchanged, plus
`--config.training.distributed=True` for diffmic_jax.main. Process 0 runs the coordinator on a
free local port; every process learns it, the process count and its own index from the
environment variables that `distributed.initialize` reads. On this CPU each process drives one
CPU device and the processes talk through gloo; on a host with several GPUs,
`--gpus_per_process K` gives process i the GPUs iK..iK+K-1 (CUDA_VISIBLE_DEVICES).

The launcher forwards SIGINT and SIGTERM to every process: a training run saves a checkpoint at
a step boundary all processes agree on and exits with 128 + the signal number
(`distributed.StopSignals`); once the first process has ended, those still running are killed
`--grace_seconds` later. A scheduler's SIGKILL of the launcher kills every process with it.
When a process exits with an error (or is killed), the others are stopped too (SIGTERM, then
SIGKILL after the grace period), the launcher names the process that failed and exits non-zero:
a peer would otherwise wait forever in a collective for the process that died (a failing
process of diffmic_jax.main exits at once: `distributed.exit_at_once_on_error`). Checkpoints are
written atomically, so stopping a process never leaves a checkpoint that would be restored.
Exit status: the failing process's status (128 + signal number when a signal ended it), or
128 + signal number when the launcher was signalled.
"""

import argparse
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from diffmic_jax.platform import distributed
from diffmic_jax.platform import errors

_POLL_SECONDS = 0.2


def free_port() -> int:
  """A TCP port that is free on this host now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, num_processes: int, coordinator: str,
                gpus_per_process: int) -> dict:
  """The environment of process `index`: the coordinator, the process count and its index."""
  env = {**base, distributed.COORDINATOR_ENV: coordinator,
         distributed.NUM_PROCESSES_ENV: str(num_processes),
         distributed.PROCESS_ID_ENV: str(index)}
  if gpus_per_process > 0:
    first = index * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(gpus_per_process))
  return env


def _die_with_parent():
  """Runs in each child before exec: the kernel kills it if the launcher dies (Linux)."""
  try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass  # not glibc: children then outlive a launcher killed with SIGKILL


def _describe(returncode: int) -> str:
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with status {returncode}"


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


class Launcher:
  """The child processes of one run (each in its own session, so signals reach it only from us)."""

  def __init__(self, commands: list[list[str]], envs: list[dict], grace_seconds: float):
    self.grace_seconds = grace_seconds
    self.signalled = None  # the signal the launcher received
    self.kill_at = None  # when survivors get SIGKILL (set once a stop begins)
    self.exited = {}  # process index -> return code, in the order they ended
    self.procs = [subprocess.Popen(cmd, env=env, start_new_session=True,
                                   preexec_fn=_die_with_parent)
                  for cmd, env in zip(commands, envs)]

  def send(self, signum: int) -> None:
    """Sends `signum` to every running process's group (its data-loader workers included)."""
    for i, proc in enumerate(self.procs):
      if i not in self.exited:
        try:
          os.killpg(proc.pid, signum)
        except ProcessLookupError:
          pass  # it ended and its exit is not yet collected

  def _stop(self, signum: int) -> None:
    self.send(signum)
    if self.kill_at is None:
      self.kill_at = time.monotonic() + self.grace_seconds

  def forward(self, signum, frame) -> None:
    """Signal handler: passes SIGINT/SIGTERM on; the processes save and stop (no SIGKILL
    until one of them has ended)."""
    del frame
    self.signalled = signum
    self.send(signum)

  def wait(self) -> int:
    """Waits until every process has ended; returns the launcher's exit status.

    The first process to end with an error is named, and the others are stopped: SIGTERM,
    then SIGKILL after the grace period. After a forwarded signal, the processes still running
    when the first one ends are killed after the grace period.
    """
    exits = queue.Queue()
    for i, proc in enumerate(self.procs):
      threading.Thread(target=lambda i=i, p=proc: exits.put((i, p.wait())), daemon=True).start()
    first_failure = None
    while len(self.exited) < len(self.procs):
      if self.kill_at is not None and time.monotonic() > self.kill_at:
        self.send(signal.SIGKILL)
      try:
        i, code = exits.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        continue
      self.exited[i] = code
      if self.signalled is not None and self.kill_at is None:  # the first to stop on a signal
        self.kill_at = time.monotonic() + self.grace_seconds
      if code != 0 and first_failure is None and self.signalled is None:
        first_failure = i
        errors.report(f"error: process {i} (pid {self.procs[i].pid}) {_describe(code)}; "
                      f"stopping the other {len(self.procs) - 1}")
        self._stop(signal.SIGTERM)
    if self.signalled is not None:
      errors.report(f"error: launcher received {signal.Signals(self.signalled).name}; stopped "
                    f"all {len(self.procs)} processes")
      return 128 + self.signalled
    return 0 if first_failure is None else _exit_status(self.exited[first_failure])


def _parse(argv: list[str]):
  if "--" in argv:
    split = argv.index("--")
    own, forwarded = argv[:split], argv[split + 1:]
  else:
    own, forwarded = argv, []
  parser = argparse.ArgumentParser(
      prog="python -m diffmic_jax.launch",
      description="Start N local processes of one multi-process run; arguments after -- go "
                  "to every process.")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--module", default="diffmic_jax.main",
                      help="Python module each process runs (python -m MODULE ARGS).")
  parser.add_argument("--gpus_per_process", type=int, default=0,
                      help="0: every process sees every GPU (CUDA_VISIBLE_DEVICES untouched).")
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = a free one.")
  parser.add_argument("--grace_seconds", type=float, default=5.0,
                      help="how long stopped processes get before SIGKILL.")
  args = parser.parse_args(own)
  for name, value, low in (("num_processes", args.num_processes, 1),
                           ("gpus_per_process", args.gpus_per_process, 0)):
    if value < low:  # a bad value, like every user error of the package: one line, status 1
      errors.report(f"error: --{name}={value}; expected >= {low}")
      sys.exit(1)
  return args, forwarded


def main(argv: list[str]) -> int:
  args, forwarded = _parse(argv)
  if args.module == "diffmic_jax.main":
    forwarded = [*forwarded, "--config.training.distributed=True"]
  coordinator = f"127.0.0.1:{args.port or free_port()}"
  command = [sys.executable, "-m", args.module, *forwarded]
  envs = [process_env(dict(os.environ), i, args.num_processes, coordinator,
                      args.gpus_per_process) for i in range(args.num_processes)]
  launcher = Launcher([command] * args.num_processes, envs, args.grace_seconds)
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, launcher.forward)
  return launcher.wait()


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
