"""`jax.profiler` traces of chosen training steps (training.profile_steps='N,M').

The trace of global steps N..M (inclusive, numbered as in metrics.jsonl) goes to DIR/profile/:
`plugins/profile/<time>/*.xplane.pb` for TensorBoard's profile plugin, and
`*.trace.json.gz` for https://ui.perfetto.dev. Each step is annotated (StepTraceAnnotation), so
the viewers show step boundaries. Only process 0 traces (processes of one host would overwrite
each other's files). A range that crosses a stage boundary gives one trace per stage, since each
stage compiles its own step.
"""

import contextlib

import jax

from diffmic_jax.platform import errors

SUBDIR = "profile"


def parse_steps(spec: str):
  """'N,M' -> (N, M) with 0 <= N <= M; '' -> None (no profiling).

  Raises:
    errors.UserError: naming config.training.profile_steps and the expected form.
  """
  if not spec:
    return None
  parts = str(spec).split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise errors.UserError(f"config.training.profile_steps={spec!r}; expected 'N,M' (first and "
                           "last global step to trace, 0 <= N <= M) or '' (off)")
  first, last = (int(p) for p in parts)
  if first > last:
    raise errors.UserError(f"config.training.profile_steps={spec!r}: the first step {first} is "
                           f"after the last {last}")
  return first, last


class StepProfiler:
  """Starts a trace before step N (or the first step run, if later) and stops it after step M."""

  def __init__(self, steps, logdir: str, enabled: bool = True):
    """`steps`: `parse_steps`'s (N, M) or None; `enabled`: False in processes other than 0."""
    self._steps = steps if enabled else None
    self._logdir = logdir
    self._active = False

  def annotate(self, step: int):
    """Context manager around one step: TraceAnnotation named 'train' with its step number."""
    if self._steps is None:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def before(self, step: int) -> None:
    if self._steps is not None and not self._active and self._steps[0] <= step <= self._steps[1]:
      jax.profiler.start_trace(self._logdir, create_perfetto_trace=True)
      self._active = True

  def after(self, step: int, outputs, last_of_stage: bool) -> None:
    """Stops the trace after step M (or at the stage's end) once `outputs` are computed."""
    if self._active and (step >= self._steps[1] or last_of_stage):
      jax.block_until_ready(outputs)  # the trace must contain the step's device work
      jax.profiler.stop_trace()
      self._active = False
