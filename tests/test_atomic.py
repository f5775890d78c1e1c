"""atomic.write_bytes: the path holds the old content or all of the new, never a part; no temp file is left."""

import pytest

from ldae_jax.data import atomic


def test_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
  p = tmp_path / "sub" / "f.json"
  atomic.write_bytes(p, b"old")
  atomic.write_bytes(p, b"new content")
  assert p.read_bytes() == b"new content" and sorted(x.name for x in p.parent.iterdir()) == ["f.json"]
  atomic.fsync_dir(p.parent)  # a folder can be flushed after a rename into it


def test_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
  p = tmp_path / "f.bin"
  atomic.write_bytes(p, b"old")

  def broken_replace(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(atomic.os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk full"):
    atomic.write_bytes(p, b"new")
  assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]
