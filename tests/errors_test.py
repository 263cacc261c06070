"""errors.report: one line in one write, so that processes sharing a stderr never interleave."""

import io
import sys

from diffmic_jax.platform import errors


class _Writes(io.StringIO):
  def __init__(self):
    super().__init__()
    self.calls = []

  def write(self, text):
    self.calls.append(text)
    return super().write(text)


def test_report_writes_the_line_and_its_newline_at_once(monkeypatch):
  stderr = _Writes()
  monkeypatch.setattr(sys, "stderr", stderr)
  errors.report("error: config.x=1; expected 2")
  assert stderr.calls == ["error: config.x=1; expected 2\n"]
