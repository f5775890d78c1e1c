"""Latent shards: per-scan latents in ArrayRecord files, and the grain reader that feeds training.

The `latents` stage runs every scan through the frozen autoencoder once and stores the result here, so that
the LDM stage reads ~30 KB latents instead of ~10 MB volumes. Layout of a shard folder:

  <shard_dir>/latents-00000.array_record ... latents-NNNNN.array_record
  <shard_dir>/metadata.json   shapes, dtypes, count, per-shard sha256 and size, scale_factor,
                              source_checkpoint, mu/logvar statistics, creation time, format version

Record format (no pickle, so a shard folder from an untrusted source cannot run code): one ArrayRecord
record per scan =
  b"LDAELAT1" | uint32 little-endian header length | JSON header | zero padding to 16 bytes | array bytes
The header names each array's dtype, shape and byte offset (16-byte aligned, so `np.frombuffer` views are
aligned) and holds the scalar fields (subject, scan_id, session_months, diagnosis, label, age).

Record fields (a dict):
  mu, logvar      float32 (X, Y, Z, C), required.
  image           float32 (X, Y, Z, 1), optional. Stored as `image_encoding`:
                    "uint16" (default): q = round(x * 65535) for x in [0, 1], read back as float32(q) / 65535
                      (step 1.5e-5, finer than float16 near 1, half the bytes of float32);
                    "float16": read back as float32(float16(x));
                    "float32": exact.
                  The round trip is exact for what is stored: `quantize_image(x, encoding)` returns exactly
                  what the reader will give back, so callers that need bit-exact agreement quantise first.
  subject, scan_id, diagnosis   str (scan_id required and unique within a folder)
  session_months, label         int (stored int32; defaults 0 and -1)
  age                           float (stored float32; nan = unknown, the default)

Reader: `make_iterator` builds a grain MapDataset pipeline
  source -> [global seeded shuffle, reshuffled every epoch] -> [repeat] -> process slice -> batch
  -> to_iter_dataset(threads) -> [mp_prefetch(workers)]
The shuffle is global and identical on every process (same seed), and each process then takes every
`process_count`-th element of the shuffled stream, so processes read disjoint records whose union is the
epoch. Its iterator's `get_state()` is a small JSON-able dict; `grain.checkpoint.CheckpointSave(it)` saves it
with orbax. `to_global` turns the process-local batch into global `jax.Array`s.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FORMAT_NAME = "ldae_jax.latent_shards"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "latents-{:05d}.array_record"
_MAGIC = b"LDAELAT1"
_ALIGN = 16
_REGENERATE = "re-run `train.py --config.stage=latents` (with the same --workdir) to rebuild the shards"

ARRAY_FIELDS = ("mu", "logvar", "image")
# name -> (numpy dtype of the value returned by the reader, default or None when required)
SCALAR_FIELDS: dict[str, tuple[Any, Any]] = {
    "subject": (np.str_, None),
    "scan_id": (np.str_, None),
    "session_months": (np.int32, 0),
    "diagnosis": (np.str_, ""),
    "label": (np.int32, -1),
    "age": (np.float32, float("nan")),
}
ALL_FIELDS = ARRAY_FIELDS + tuple(SCALAR_FIELDS)
IMAGE_ENCODINGS = ("uint16", "float16", "float32")
# Keys of metadata.json that the writer owns; a caller's `metadata` may set only the overridable ones.
_OVERRIDABLE = ("scale_factor", "source_checkpoint")
_RESERVED = ("format", "format_version", "created", "count", "records_per_shard", "fields", "shards",
             "image_encoding", "compression", "stats")


class ShardError(ValueError):
  """A shard folder is missing, incomplete, corrupted or does not match what the caller asked for."""


# ------------------------------------------------------------------------------------------- encoding
def quantize_image(image: np.ndarray, encoding: str = "uint16") -> np.ndarray:
  """What the reader returns for `image` stored with `encoding`: float32, idempotent.

  Raises ValueError for "uint16" when values fall outside [0, 1] by more than 1e-6 (the preprocessing
  maps every volume to [0, 1]; anything else is a bug upstream, not something to clip silently).
  """
  return _decode_image(_encode_image(np.asarray(image), encoding), encoding)


def _encode_image(image: np.ndarray, encoding: str) -> np.ndarray:
  if encoding not in IMAGE_ENCODINGS:
    raise ValueError(f"image_encoding={encoding!r}: must be one of {IMAGE_ENCODINGS}.")
  x = np.asarray(image, np.float32)
  if encoding == "float32":
    return x
  if encoding == "float16":
    return x.astype(np.float16)
  lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
  if lo < -1e-6 or hi > 1 + 1e-6 or not (math.isfinite(lo) and math.isfinite(hi)):
    raise ValueError(
        f"image values span [{lo}, {hi}], outside [0, 1]: image_encoding='uint16' stores unit-range "
        "volumes only; use ShardWriter(..., image_encoding='float32') for other ranges.")
  return np.rint(np.clip(x.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)


def _decode_image(stored: np.ndarray, encoding: str) -> np.ndarray:
  if encoding == "uint16":
    return stored.astype(np.float32) / np.float32(65535.0)
  return stored.astype(np.float32)


def _pad(n: int) -> int:
  return (-n) % _ALIGN


def encode_record(record: Mapping[str, Any], image_encoding: str = "uint16") -> bytes:
  """Serialises one validated record (see `_check_record`) to the on-disk bytes."""
  arrays: dict[str, np.ndarray] = {}
  for name in ARRAY_FIELDS:
    if name in record:
      a = record[name]
      arrays[name] = _encode_image(a, image_encoding) if name == "image" else np.asarray(a, np.float32)
  entries, offset = {}, 0
  for name, a in arrays.items():
    a = np.ascontiguousarray(a)
    entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
    offset += a.nbytes + _pad(a.nbytes)
  scalars = {}
  for name, (dtype, _) in SCALAR_FIELDS.items():
    v = record[name]
    if dtype is np.float32:
      v = float(np.float32(v))
      v = None if math.isnan(v) else v  # strict JSON has no NaN
    scalars[name] = v
  header = json.dumps({"arrays": entries, "scalars": scalars}, separators=(",", ":")).encode()
  prefix = _MAGIC + struct.pack("<I", len(header)) + header
  parts = [prefix, b"\0" * _pad(len(prefix))]
  for name, a in arrays.items():
    parts.append(np.ascontiguousarray(a).tobytes())
    parts.append(b"\0" * _pad(a.nbytes))
  return b"".join(parts)


def decode_record(data: bytes, fields: Sequence[str], image_encoding: str = "uint16",
                  where: str = "record") -> dict[str, np.ndarray]:
  """Inverse of `encode_record`, for the requested `fields` only (arrays are read-only views of `data`)."""
  if len(data) < 12 or data[:8] != _MAGIC:
    raise ShardError(f"{where}: not an ldae_jax latent record (bad magic); {_REGENERATE}.")
  (hlen,) = struct.unpack("<I", data[8:12])
  try:
    header = json.loads(data[12:12 + hlen])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ShardError(f"{where}: corrupted record header ({e}); {_REGENERATE}.") from e
  base = 12 + hlen + _pad(12 + hlen)
  out = {}
  for name in fields:
    if name in SCALAR_FIELDS:
      dtype = SCALAR_FIELDS[name][0]
      v = header["scalars"][name]
      out[name] = np.asarray(float("nan") if v is None else v, dtype=dtype)
      continue
    entry = header["arrays"].get(name)
    if entry is None:
      raise ShardError(f"{where}: field {name!r} was not stored (stored arrays: {sorted(header['arrays'])}).")
    start = base + entry["offset"]
    if start + entry["nbytes"] > len(data):
      raise ShardError(f"{where}: record is truncated (field {name!r}); {_REGENERATE}.")
    a = np.frombuffer(data, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])),
                      offset=start).reshape(entry["shape"])
    out[name] = _decode_image(a, image_encoding) if name == "image" else a
  return out


# ------------------------------------------------------------------------------------------- writer
def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class _Moments:
  """Streaming mean/std over all elements (float64 sums; exact enough for 1/std scale factors)."""

  def __init__(self):
    self.n, self.s, self.ss = 0, 0.0, 0.0

  def add(self, a: np.ndarray) -> None:
    a = a.astype(np.float64)
    self.n += a.size
    self.s += float(a.sum())
    self.ss += float(np.square(a).sum())

  def result(self) -> dict[str, float]:
    mean = self.s / self.n
    var = max(self.ss / self.n - mean * mean, 0.0)
    return {"mean": mean, "std": math.sqrt(var), "count": self.n}


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
    bad = sorted(set(metadata) & set(_RESERVED))
    if bad:
      raise ValueError(f"ShardWriter metadata keys {bad} are written by the writer itself; remove them.")
    try:
      json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"ShardWriter metadata must be JSON-serialisable without NaN/inf: {e}") from e
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
    self.out_dir.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    self._tmp.mkdir()
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
    entry["sha256"] = _sha256(path)
    with open(path, "rb") as f:
      os.fsync(f.fileno())

  def _finish(self) -> None:
    bad = sorted(set(self.metadata) & set(_RESERVED))
    if bad:
      raise ValueError(f"ShardWriter.metadata keys {bad} are written by the writer itself; remove them.")
    if not self._count:
      raise ValueError(f"ShardWriter({self.out_dir}): no records were written; refusing to create an empty "
                       "shard folder.")
    try:
      json.dumps(self.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"ShardWriter.metadata must be JSON-serialisable without NaN/inf: {e}") from e
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
    with open(self._tmp / METADATA_FILE, "w") as f:
      json.dump(meta, f, indent=1, allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(self._tmp)
    old = None
    if self.out_dir.exists():
      old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.out_dir, old)
    os.rename(self._tmp, self.out_dir)
    _fsync_dir(self.out_dir.parent)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- metadata
def read_metadata(shard_dir: str | os.PathLike) -> dict[str, Any]:
  """Parsed metadata.json of a complete shard folder; ShardError if the folder is not one."""
  shard_dir = pathlib.Path(shard_dir)
  path = shard_dir / METADATA_FILE
  if not path.exists():
    raise ShardError(f"{path} not found: {shard_dir} is not a complete latent shard folder; {_REGENERATE}.")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ShardError(f"{path}: not valid JSON ({e}); {_REGENERATE}.") from e
  if meta.get("format") != FORMAT_NAME:
    raise ShardError(f"{path}: format={meta.get('format')!r}, expected {FORMAT_NAME!r}.")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ShardError(f"{path}: format_version={meta.get('format_version')} but this ldae_jax reads "
                     f"version {FORMAT_VERSION}; {_REGENERATE}.")
  return meta


def _check_files(shard_dir: pathlib.Path, meta: Mapping[str, Any], checksums: bool) -> None:
  for s in meta["shards"]:
    path = shard_dir / s["file"]
    if not path.exists():
      raise ShardError(f"shard {path} is missing ({meta['count']} records expected in "
                       f"{len(meta['shards'])} shards); {_REGENERATE}.")
    size = path.stat().st_size
    if size != s["bytes"]:
      what = "truncated" if size < s["bytes"] else "larger than written"
      raise ShardError(f"shard {path} is {what}: {size} bytes on disk, {s['bytes']} in {METADATA_FILE}; "
                       f"{_REGENERATE}.")
    if checksums:
      digest = _sha256(path)
      if digest != s["sha256"]:
        raise ShardError(f"shard {path} is corrupted: sha256 {digest} != {s['sha256']} in {METADATA_FILE}; "
                         f"{_REGENERATE}.")


def verify(shard_dir: str | os.PathLike) -> dict[str, Any]:
  """Checks every shard's presence, size and sha256 against metadata.json; returns the metadata."""
  shard_dir = pathlib.Path(shard_dir)
  meta = read_metadata(shard_dir)
  _check_files(shard_dir, meta, checksums=True)
  return meta


# ------------------------------------------------------------------------------------------- reader
class LatentDataset:
  """Random-access view of a shard folder (a grain data source): `ds[i]` is record i as a dict of numpy.

  Opening checks every shard's presence and size (cheap); `verify()` adds the checksums. Arrays are
  read-only views of the record bytes; copy before writing into them.
  """

  def __init__(self, shard_dir: str | os.PathLike, fields: Sequence[str] = ("mu", "logvar"),
               verify_checksums: bool = False):
    import grain  # pylint: disable=g-import-not-at-top
    self.shard_dir = pathlib.Path(shard_dir)
    self.metadata = read_metadata(self.shard_dir)
    self.fields = tuple(fields)
    stored = set(self.metadata["fields"])
    bad = [f for f in self.fields if f not in stored]
    if bad or not self.fields:
      raise ShardError(f"fields {list(self.fields)}: {bad or 'none requested'} not stored in {self.shard_dir} "
                       f"(stored: {sorted(stored)}). Images are stored only with "
                       "config.train.latents_store_images=True.")
    _check_files(self.shard_dir, self.metadata, checksums=verify_checksums)
    self._encoding = self.metadata.get("image_encoding") or "float32"
    paths = [str(self.shard_dir / s["file"]) for s in self.metadata["shards"]]
    try:
      self._source = grain.sources.ArrayRecordDataSource(paths)
      n = len(self._source)
    except Exception as e:  # the C++ reader's messages do not say what to do
      raise ShardError(f"cannot open the shards of {self.shard_dir}: {e}; {_REGENERATE}.") from e
    if n != self.metadata["count"]:
      raise ShardError(f"{self.shard_dir}: shards hold {n} records, {METADATA_FILE} says "
                       f"{self.metadata['count']}; {_REGENERATE}.")

  def __len__(self) -> int:
    return self.metadata["count"]

  def _decode(self, data: bytes, index: int) -> dict[str, np.ndarray]:
    return decode_record(data, self.fields, self._encoding, where=f"{self.shard_dir} record {index}")

  def _read(self, keys: Sequence[int]) -> list[bytes]:
    try:
      if len(keys) == 1:  # grain's batching asks one index at a time; the batched read adds thread overhead
        return [self._source[keys[0]]]
      return list(self._source.__getitems__(keys))
    except Exception as e:
      raise ShardError(f"reading records {list(keys)[:4]}... of {self.shard_dir} failed: {e}; "
                       f"{_REGENERATE}.") from e

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)}) in {self.shard_dir}.")
    return self._decode(self._read([index])[0], index)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    indices = [int(i) for i in indices]
    return [self._decode(d, i) for d, i in zip(self._read(indices), indices)]

  def __repr__(self) -> str:
    return f"LatentDataset({str(self.shard_dir)!r}, n={len(self)}, fields={self.fields})"


def ensure_absl_flags_parsed() -> None:
  """grain reads its absl flags in worker threads; outside an absl app they are unparsed and would raise."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(shard_dir: str | os.PathLike, *, global_batch_size: int, seed: int, shuffle: bool = True,
                 repeat: bool = True, drop_remainder: bool = True, fields: Sequence[str] = ("mu", "logvar"),
                 num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = 2, prefetch_batches: int = 4, worker_buffer_size: int = 2):
  """The grain `IterDataset` behind `make_iterator` (same arguments); use it to inspect or extend."""
  import grain  # pylint: disable=g-import-not-at-top
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count} (each process reads global/process_count records).")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: grain shuffling needs 0 <= seed < 2**32.")
  if num_workers < 0 or num_threads < 0:
    raise ValueError(f"num_workers={num_workers}, num_threads={num_threads}: must be >= 0.")
  local_batch = global_batch_size // process_count
  source = LatentDataset(shard_dir, fields)
  n = len(source)
  if drop_remainder and n < global_batch_size:
    raise ShardError(f"{shard_dir} holds {n} records, fewer than global_batch_size={global_batch_size}: with "
                     "drop_remainder=True no batch would ever be produced. Lower the batch size.")
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()  # same permutation on every process; a new one each epoch
  if repeat:
    ds = ds.repeat()
  elif drop_remainder:
    # Cut the epoch to whole global batches before slicing, so that every process yields the same number
    # of batches (an extra batch on one host would hang the others in the next collective).
    ds = ds[:(n // global_batch_size) * global_batch_size]
  ds = ds[process_index::process_count]
  ds = ds.batch(local_batch, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=max(prefetch_batches, num_threads)))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=worker_buffer_size))
  return it_ds


def make_iterator(shard_dir: str | os.PathLike, *, global_batch_size: int, seed: int, shuffle: bool = True,
                  repeat: bool = True, drop_remainder: bool = True, fields: Sequence[str] = ("mu", "logvar"),
                  num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2, prefetch_batches: int = 4, worker_buffer_size: int = 2):
  """A grain `DatasetIterator` over process-local batches: dict field -> (global/process_count, ...).

  Args:
    shard_dir: folder written by `ShardWriter`.
    global_batch_size: batch across all processes; must be a multiple of `process_count`.
    seed: shuffle seed (0 <= seed < 2**32); each epoch gets a different permutation derived from it.
    shuffle, repeat, drop_remainder: as in grain. Without `repeat` and with `drop_remainder` the epoch is
      cut to whole global batches so every process yields the same number of batches. With `repeat` the
      stream runs on across epochs (each a full new permutation), so when the record count is not a multiple
      of the batch, the batch that straddles an epoch boundary can hold one record twice.
    fields: record fields to decode (see the module docstring); strings come back as numpy str arrays.
    num_workers: grain worker processes (0: read in this process with `num_threads` threads).
    process_index, process_count: this process's slice; default `jax.process_index()/process_count()`.
    num_threads, prefetch_batches, worker_buffer_size: grain ReadOptions / MultiprocessingOptions.

  The iterator's `get_state()` / `set_state()` resume exactly (JSON-able dict); save it with orbax via
  `grain.checkpoint.CheckpointSave(iterator)`. Close iterators that use workers with `.close()`.
  """
  ensure_absl_flags_parsed()
  return iter(make_dataset(
      shard_dir, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
      drop_remainder=drop_remainder, fields=fields, num_workers=num_workers, process_index=process_index,
      process_count=process_count, num_threads=num_threads, prefetch_batches=prefetch_batches,
      worker_buffer_size=worker_buffer_size))


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
  """Process-local batch -> global `jax.Array`s sharded by `sharding` along the batch axis.

  Each process passes its own slice (leading dim = global/process_count); the global leading dim is the
  sum over processes. String fields (subject, scan_id, diagnosis) cannot live on devices: they are returned
  unchanged as process-local numpy arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":
      out[k] = v
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def read_all(shard_dir: str | os.PathLike, fields: Iterable[str] | None = None,
             verify_checksums: bool = True) -> dict[str, np.ndarray]:
  """Every record, in write order, stacked per field (for evaluation and small data sets).

  `fields=None` reads every stored field. Checksums are verified first unless `verify_checksums=False`.
  """
  meta = read_metadata(shard_dir)
  fields = tuple(meta["fields"]) if fields is None else tuple(fields)
  ds = LatentDataset(shard_dir, fields, verify_checksums=verify_checksums)
  out: dict[str, list[np.ndarray]] = {f: [] for f in fields}
  step = 64
  for start in range(0, len(ds), step):
    for rec in ds.__getitems__(range(start, min(start + step, len(ds)))):
      for f in fields:
        out[f].append(rec[f])
  return {f: np.stack(v) for f, v in out.items()}


def field_mean(shard_dir: str | os.PathLike, field: str, chunk: int = 64) -> np.ndarray:
  """Element-wise mean of one field over every record (float64 accumulation, float32 result), read in chunks
  so that a paper-size split of images never has to fit in memory at once."""
  ds = LatentDataset(shard_dir, (field,), verify_checksums=False)
  if len(ds) == 0:
    raise ValueError(f"{shard_dir}: no records to average.")
  total = None
  for start in range(0, len(ds), chunk):
    for rec in ds.__getitems__(range(start, min(start + chunk, len(ds)))):
      v = np.asarray(rec[field], np.float64)
      total = v if total is None else total + v
  return (total / len(ds)).astype(np.float32)
