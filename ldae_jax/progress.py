"""Progress bars for long work: a tqdm bar on a terminal, nothing elsewhere.

A bar written to a log file becomes one carriage-return frame per refresh (megabytes on one line), so bars are
off when stderr is not a terminal and on every process but 0; long loops print their own plain summary lines.
"""

from __future__ import annotations

import sys
from typing import Any


def bar(iterable: Any = None, *, total: int | None = None, desc: str = "", disable: bool = False, **kwargs):
  """`tqdm(iterable, ...)` shown only on process 0 of a run whose stderr is a terminal (and not `disable`)."""
  from tqdm import tqdm
  import jax
  show = not disable and sys.stderr.isatty() and jax.process_index() == 0
  return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, disable=not show, **kwargs)
