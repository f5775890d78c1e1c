"""Writing shard folders, all or nothing (temp folder, then rename): `ShardWriter` (records -> ArrayRecord shards +
metadata.json) and `merge` (the folders that separate processes wrote -> one)."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldae_jax.data import atomic
from ldae_jax.data.shards.reader import read_metadata
from ldae_jax.data.shards.record import (ALL_FIELDS, ARRAY_FIELDS, FORMAT_NAME, FORMAT_VERSION, IMAGE_ENCODINGS,
                                         METADATA_FILE, REGENERATE, RESERVED, SCALAR_FIELDS, SHARD_PATTERN,
                                         ShardError, encode_record, file_sha256)


class _Moments:
  """Streaming mean/std over all elements (float64 sums; exact enough for 1/std scale factors)."""

  def __init__(self, n: int = 0, s: float = 0.0, ss: float = 0.0):
    self.n, self.s, self.ss = n, s, ss

  @classmethod
  def of(cls, stats: Mapping[str, float]) -> "_Moments":
    """The sums behind a `result()` dict, to merge the statistics of separately written folders."""
    n = int(stats["count"])
    return cls(n, stats["mean"] * n, (stats["std"] ** 2 + stats["mean"] ** 2) * n)

  def __add__(self, other: "_Moments") -> "_Moments":
    return _Moments(self.n + other.n, self.s + other.s, self.ss + other.ss)

  def add(self, a: np.ndarray) -> None:
    a = a.astype(np.float64)
    self.n += a.size
    self.s += float(a.sum())
    self.ss += float(np.square(a).sum())

  def result(self) -> dict[str, float]:
    mean = self.s / self.n
    var = max(self.ss / self.n - mean * mean, 0.0)
    return {"mean": mean, "std": math.sqrt(var), "count": self.n}


def _check_caller_metadata(metadata: Mapping[str, Any], who: str) -> None:
  """A caller's metadata.json entries: none of the writer's own keys, and strict JSON."""
  bad = sorted(set(metadata) & set(RESERVED))
  if bad:
    raise ValueError(f"{who}: metadata keys {bad} are written by the writer itself; remove them.")
  try:
    json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{who}: metadata must be JSON-serialisable without NaN/inf: {e}") from e


class ShardWriter:
  """Writes records into ArrayRecord shards plus `metadata.json`, all or nothing.

  Everything goes to a hidden temporary folder beside `out_dir`; only a clean exit of the `with` block
  moves it into place (an existing `out_dir` is replaced after the new one is complete). An exception inside
  the block deletes the temporary folder and leaves any previous `out_dir` untouched.

  Args:
    out_dir: destination folder (e.g. `<workdir>/latents/shards`).
    records_per_shard: records per `.array_record` file.
    metadata: extra JSON-serialisable entries for metadata.json (e.g. `scale_factor`, `source_checkpoint`,
      the config). Keys the writer owns (count, shards, fields, ...) are rejected. It stays editable as
      `writer.metadata` until the block exits, so a scale factor computed from `writer.stats()` can be set.
    image_encoding: how `image` is stored ("uint16", "float16", "float32"); see the module docstring.
    compression: ArrayRecord compression option ("uncompressed", "zstd:1", "snappy", ...). "auto":
      uncompressed for latents only (random floats do not compress; reads are 2x faster), zstd:1 when images
      are stored (background voxels compress well).
  """

  def __init__(self, out_dir: str | os.PathLike, *, records_per_shard: int = 256,
               metadata: Mapping[str, Any] | None = None, image_encoding: str = "uint16",
               compression: str = "auto"):
    if records_per_shard < 1:
      raise ValueError(f"records_per_shard={records_per_shard}: must be >= 1.")
    if image_encoding not in IMAGE_ENCODINGS:
      raise ValueError(f"image_encoding={image_encoding!r}: must be one of {IMAGE_ENCODINGS}.")
    metadata = dict(metadata or {})
    _check_caller_metadata(metadata, "ShardWriter")
    self.out_dir = pathlib.Path(out_dir)
    self.records_per_shard = int(records_per_shard)
    self.image_encoding = image_encoding
    self.compression = compression
    self.metadata: dict[str, Any] = {"scale_factor": None, "source_checkpoint": "", **metadata}
    self._tmp: pathlib.Path | None = None
    self._writer = None
    self._shards: list[dict[str, Any]] = []
    self._in_shard = 0
    self._count = 0
    self._fields: dict[str, Any] | None = None
    self._scan_ids: set[str] = set()
    self._moments = {"mu": _Moments(), "logvar": _Moments()}

  # -- context manager
  def __enter__(self) -> "ShardWriter":
    self._tmp = _temp_dir(self.out_dir)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      self._close_shard()
      if exc_type is None:
        self._finish()
    finally:
      if self._tmp is not None and self._tmp.exists():
        shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None

  # -- public
  @property
  def count(self) -> int:
    return self._count

  def stats(self) -> dict[str, dict[str, float]]:
    """Mean/std over every element of `mu` and `logvar` written so far (e.g. scale_factor = 1 / mu std)."""
    if not self._count:
      raise ValueError("ShardWriter.stats(): no records written yet.")
    return {k: m.result() for k, m in self._moments.items()}

  def write(self, record: Mapping[str, Any]) -> None:
    """Validates and appends one record (see the module docstring for the fields)."""
    if self._tmp is None:
      raise RuntimeError("ShardWriter.write() outside its `with` block.")
    rec = self._check_record(record)
    try:
      data = encode_record(rec, self.image_encoding)  # validates the image range for uint16
    except ValueError as e:
      raise ValueError(f"ShardWriter.write (record {self._count}, scan_id={rec['scan_id']!r}): {e}") from e
    if self._writer is None:
      self._open_shard(has_image="image" in rec)
    self._writer.write(data)
    self._scan_ids.add(rec["scan_id"])
    self._moments["mu"].add(rec["mu"])
    self._moments["logvar"].add(rec["logvar"])
    self._count += 1
    self._in_shard += 1
    if self._in_shard == self.records_per_shard:
      self._close_shard()

  # -- internals
  def _check_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
    where = f"ShardWriter.write (record {self._count}, scan_id={record.get('scan_id')!r})"
    unknown = sorted(set(record) - set(ALL_FIELDS))
    if unknown:
      raise ValueError(f"{where}: unknown fields {unknown}; known fields are {list(ALL_FIELDS)}.")
    rec: dict[str, Any] = {}
    for name in ("mu", "logvar"):
      if name not in record:
        raise ValueError(f"{where}: missing required field {name!r}.")
    for name in ARRAY_FIELDS:
      if name not in record:
        continue
      a = np.asarray(record[name])
      if a.dtype.kind != "f":
        raise ValueError(f"{where}: field {name!r} has dtype {a.dtype}; a float array is expected.")
      if a.ndim != 4:
        raise ValueError(f"{where}: field {name!r} has shape {a.shape}; expected (X, Y, Z, C) without a "
                         "batch axis (write one record per scan).")
      rec[name] = a.astype(np.float32, copy=False)
    if rec["mu"].shape != rec["logvar"].shape:
      raise ValueError(f"{where}: mu {rec['mu'].shape} and logvar {rec['logvar'].shape} shapes differ.")
    if "image" in rec and rec["image"].shape[-1] != 1:
      raise ValueError(f"{where}: image shape {rec['image'].shape}: expected (X, Y, Z, 1).")
    for name, (dtype, default) in SCALAR_FIELDS.items():
      v = record.get(name, default)
      if v is None:
        raise ValueError(f"{where}: missing required field {name!r}.")
      if dtype is np.str_:
        if not isinstance(v, str):
          raise ValueError(f"{where}: field {name!r}={v!r} must be a str.")
      elif dtype is np.int32:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -2**31 <= int(v) < 2**31:
          raise ValueError(f"{where}: field {name!r}={v!r} must be an int32-range integer.")
        v = int(v)
      else:
        try:
          v = float(v)
        except (TypeError, ValueError) as e:
          raise ValueError(f"{where}: field {name!r}={v!r} must be a float (nan for unknown).") from e
      rec[name] = v
    if rec["scan_id"] in self._scan_ids:
      raise ValueError(f"{where}: duplicate scan_id {rec['scan_id']!r}; scan ids must be unique.")
    fields = {name: {"shape": list(rec[name].shape), "dtype": "float32"} for name in ARRAY_FIELDS
              if name in rec}
    if self._fields is None:
      self._fields = fields
    elif fields != self._fields:
      raise ValueError(f"{where}: array fields {fields} differ from the first record's {self._fields}; "
                       "all records of a shard folder share shapes and the set of stored arrays.")
    return rec

  def _open_shard(self, has_image: bool) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    if self.compression == "auto":
      self.compression = "zstd:1" if has_image else "uncompressed"
    path = self._tmp / SHARD_PATTERN.format(len(self._shards))
    # group_size:1 makes every record its own chunk: what random access (grain shuffling) needs.
    self._writer = ArrayRecordWriter(str(path), f"group_size:1,{self.compression}")
    self._shards.append({"file": path.name, "records": 0})
    self._in_shard = 0

  def _close_shard(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    entry = self._shards[-1]
    path = self._tmp / entry["file"]
    entry["records"] = self._in_shard
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = file_sha256(path)
    with open(path, "rb") as f:
      os.fsync(f.fileno())

  def _finish(self) -> None:
    _check_caller_metadata(self.metadata, "ShardWriter (writer.metadata at the end of the block)")
    if not self._count:
      raise ValueError(f"ShardWriter({self.out_dir}): no records were written; refusing to create an empty "
                       "shard folder.")
    fields = dict(self._fields)
    if "image" in fields:
      fields["image"]["stored_dtype"] = self.image_encoding
    for name, (dtype, _) in SCALAR_FIELDS.items():
      fields[name] = {"shape": [], "dtype": np.dtype(dtype).name if dtype is not np.str_ else "str"}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": self._count,
        "records_per_shard": self.records_per_shard,
        "fields": fields,
        "image_encoding": self.image_encoding if "image" in fields else None,
        "compression": self.compression,
        "stats": self.stats(),
        "shards": self._shards,
        **self.metadata,
    }
    _install(self._tmp, meta, self.out_dir)


def _temp_dir(out_dir: pathlib.Path) -> pathlib.Path:
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  return tmp


def _install(tmp: pathlib.Path, meta: Mapping[str, Any], out_dir: pathlib.Path) -> None:
  """Writes metadata.json into the complete folder `tmp`, then renames it to `out_dir` (replacing an old one
  only once the new one is in place)."""
  with open(tmp / METADATA_FILE, "w") as f:
    json.dump(meta, f, indent=1, allow_nan=False)
    f.flush()
    os.fsync(f.fileno())
  atomic.fsync_dir(tmp)
  old = None
  if out_dir.exists():
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
  os.rename(tmp, out_dir)
  atomic.fsync_dir(out_dir.parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _merged_stats(metas: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  return {k: sum((_Moments.of(m["stats"][k]) for m in metas), _Moments()).result() for k in metas[0]["stats"]}


def merged_stats(parts: Sequence[str | os.PathLike]) -> dict[str, dict[str, float]]:
  """The mu/logvar statistics (mean, std, count over every element) that `merge(parts, ...)` will record."""
  return _merged_stats([read_metadata(p) for p in parts])


def merge(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
          metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Joins shard folders written by separate processes into one folder `out_dir`, records in `parts` order.

  The parts must hold disjoint scans (the caller's slicing guarantees it: scan ids are not re-read here) with
  the same fields, encoding and caller metadata; their shard files are moved, not copied, and the parts are
  removed once `out_dir` is complete. `metadata` sets caller entries (e.g. a scale factor that needs the merged
  statistics). Returns the merged metadata.
  """
  parts = [pathlib.Path(p) for p in parts]
  out_dir = pathlib.Path(out_dir)
  if not parts:
    raise ValueError(f"shards.merge({out_dir}): no parts to merge.")
  metas = [read_metadata(p) for p in parts]
  same = ("fields", "image_encoding", "records_per_shard")
  caller = lambda m: {k: v for k, v in m.items() if k not in RESERVED}  # noqa: E731
  for p, m in zip(parts[1:], metas[1:]):
    diff = [k for k in same if m[k] != metas[0][k]] + (["metadata"] if caller(m) != caller(metas[0]) else [])
    if diff:
      raise ShardError(f"shards.merge: {p} differs from {parts[0]} in {diff}; the parts were not written by one "
                       f"run. {REGENERATE}.")
  extra = dict(metadata or {})
  _check_caller_metadata(extra, "shards.merge")
  tmp = _temp_dir(out_dir)
  try:
    entries = []
    for p, m in zip(parts, metas):
      for entry in m["shards"]:
        name = SHARD_PATTERN.format(len(entries))
        os.rename(p / entry["file"], tmp / name)
        entries.append(dict(entry, file=name))
    meta = dict(metas[0])
    meta.update(extra)
    meta.update(count=sum(m["count"] for m in metas), shards=entries,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                compression=metas[0]["compression"] if len({m["compression"] for m in metas}) == 1 else "mixed",
                stats=_merged_stats(metas))
    _install(tmp, meta, out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  for p in parts:
    shutil.rmtree(p, ignore_errors=True)
  return meta
