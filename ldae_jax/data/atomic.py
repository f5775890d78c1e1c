"""Atomic file writes: a reader (or a crash) never sees a half-written manifest, volume or table."""

from __future__ import annotations

import os
import pathlib
import tempfile


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path`, flushes it to disk, then renames it into place (same
  filesystem), so that the path holds either the old content or all of the new."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def fsync_dir(path: str | os.PathLike) -> None:
  """Flushes a folder's entries (a rename into it) to disk, so that a crash cannot undo a completed rename."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
