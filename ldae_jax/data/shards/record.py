"""The on-disk format of a latent shard folder: field schema, record bytes, image encodings, file checksums.

One ArrayRecord record per scan =
  b"LDAELAT1" | uint32 little-endian header length | JSON header | zero padding to 16 bytes | array bytes
(no pickle, so a shard folder from an untrusted source cannot run code); the package docstring lists the fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMAT_NAME = "ldae_jax.latent_shards"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "latents-{:05d}.array_record"
MAGIC = b"LDAELAT1"
_ALIGN = 16
REGENERATE = "re-run `train.py --config.stage=latents` (with the same --workdir) to rebuild the shards"

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
# Keys of metadata.json that the writer owns: a caller's `metadata` may not set them.
RESERVED = ("format", "format_version", "created", "count", "records_per_shard", "fields", "shards",
            "image_encoding", "compression", "stats")


class ShardError(ValueError):
  """A shard folder is missing, incomplete, corrupted or does not match what the caller asked for."""


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
  prefix = MAGIC + struct.pack("<I", len(header)) + header
  parts = [prefix, b"\0" * _pad(len(prefix))]
  for name, a in arrays.items():
    parts.append(np.ascontiguousarray(a).tobytes())
    parts.append(b"\0" * _pad(a.nbytes))
  return b"".join(parts)


def decode_record(data: bytes, fields: Sequence[str], image_encoding: str = "uint16",
                  where: str = "record") -> dict[str, np.ndarray]:
  """Inverse of `encode_record`, for the requested `fields` only (arrays are read-only views of `data`)."""
  if len(data) < 12 or data[:8] != MAGIC:
    raise ShardError(f"{where}: not an ldae_jax latent record (bad magic); {REGENERATE}.")
  (hlen,) = struct.unpack("<I", data[8:12])
  try:
    header = json.loads(data[12:12 + hlen])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ShardError(f"{where}: corrupted record header ({e}); {REGENERATE}.") from e
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
      raise ShardError(f"{where}: record is truncated (field {name!r}); {REGENERATE}.")
    a = np.frombuffer(data, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])),
                      offset=start).reshape(entry["shape"])
    out[name] = _decode_image(a, image_encoding) if name == "image" else a
  return out



def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()
