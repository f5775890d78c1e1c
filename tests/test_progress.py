"""ldae_jax.progress: bars on a terminal only (a log file must not get carriage-return frames)."""

import io
import sys

from ldae_jax import progress


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_bar_is_silent_off_a_terminal(monkeypatch):
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  assert list(progress.bar(range(5), desc="x")) == list(range(5))
  assert err.getvalue() == ""


def test_bar_draws_on_a_terminal_unless_disabled(monkeypatch):
  err = _Tty()
  monkeypatch.setattr(sys, "stderr", err)
  b = progress.bar(range(3), desc="work", file=err)
  assert list(b) == [0, 1, 2] and "work" in err.getvalue()
  quiet = _Tty()
  monkeypatch.setattr(sys, "stderr", quiet)
  assert list(progress.bar(range(3), desc="work", disable=True, file=quiet)) == [0, 1, 2]
  assert quiet.getvalue() == ""
