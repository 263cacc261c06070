"""The error class for mistakes a user can fix (a bad config value, file, checkpoint or workdir).

`main` prints such errors as one line (`error: ...`, `report`) and exits with status 1; any other
exception is a bug and keeps its traceback. Subclassing ValueError keeps `except ValueError`
callers working.
"""

import sys


class UserError(ValueError):
  """Bad user input; the message names the file, row or config field and what was expected."""


class Preempted(Exception):
  """A training run stopped on SIGTERM or SIGINT at a step boundary, its checkpoint saved.

  `main` prints the message as one line and exits with `exit_status` (128 + the signal number,
  the status of a process ended by that signal), which schedulers treat as a preempted job to
  requeue; rerunning the same command resumes from the checkpoint.
  """

  def __init__(self, signum: int, step: int, checkpoints: str):
    import signal  # pylint: disable=g-import-not-at-top
    self.exit_status = 128 + signum
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint "
                     f"saved in {checkpoints}; rerun the same command to resume")


def report(line: str) -> None:
  """Writes `line` and its newline to stderr in one write, flushed.

  `print` writes the text and the newline separately, and with an unbuffered stderr
  (PYTHONUNBUFFERED) the processes of a launched run, which share the launcher's stderr, then
  interleave their lines ("...(3)error: ...(3)" and an empty line). One write of a short line
  to a pipe is atomic.
  """
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
