"""Atomic file writes: a reader (or a crash) never sees a half-written manifest, volume or table."""

from __future__ import annotations

import os
import pathlib
import tempfile


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path`, then renames it into place (same filesystem)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path
