"""training.profile_steps: parsing, and a trace that holds exactly the chosen steps."""

import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from diffmic_jax.platform import profiling


def test_parse_steps():
  assert profiling.parse_steps("") is None
  assert profiling.parse_steps("3,7") == (3, 7)
  assert profiling.parse_steps(" 5, 5") == (5, 5)
  for bad in ("7", "3,2", "a,b", "1,2,3", "-1,2"):
    with pytest.raises(ValueError, match="training.profile_steps"):
      profiling.parse_steps(bad)


def _traced_steps(logdir):
  (path,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  events = json.load(gzip.open(path))["traceEvents"]
  return sorted({int(e["args"]["step_num"]) for e in events
                 if e.get("name") == "train" and "step_num" in e.get("args", {})})


@pytest.mark.parametrize("first, steps, end, expected", [
    (0, (2, 3), 6, [2, 3]),  # steps N..M
    (4, (2, 5), 6, [4, 5]),  # resumed after N: from the first step run
    (0, (4, 9), 6, [4, 5]),  # the stage ends before M
])
def test_trace_holds_the_chosen_steps(tmp_path, first, steps, end, expected):
  step_fn = jax.jit(lambda x: jnp.sin(x) @ x)
  profiler = profiling.StepProfiler(steps, str(tmp_path))
  x = jnp.ones((64, 64))
  for step in range(first, end):
    profiler.before(step)
    with profiler.annotate(step):
      x = step_fn(x)
    profiler.after(step, x, last_of_stage=step + 1 == end)
  assert glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  assert _traced_steps(str(tmp_path)) == expected


def test_disabled_or_off_writes_nothing(tmp_path):
  for profiler in (profiling.StepProfiler((0, 1), str(tmp_path), enabled=False),
                   profiling.StepProfiler(None, str(tmp_path))):
    for step in range(3):
      profiler.before(step)
      with profiler.annotate(step):
        pass
      profiler.after(step, None, last_of_stage=step == 2)
  assert not os.listdir(tmp_path)
