"""Reading a shard folder: its metadata and checksums, random access (`LatentDataset`, a grain data source),
whole-split reads for evaluation, and the grain training stream (`make_iterator`)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ldae_jax.data import grain_pipeline
from ldae_jax.data.shards.record import (FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, REGENERATE, ShardError,
                                         decode_record, file_sha256)

def read_metadata(shard_dir: str | os.PathLike) -> dict[str, Any]:
  """Parsed metadata.json of a complete shard folder; ShardError if the folder is not one."""
  shard_dir = pathlib.Path(shard_dir)
  path = shard_dir / METADATA_FILE
  if not path.exists():
    raise ShardError(f"{path} not found: {shard_dir} is not a complete latent shard folder; {REGENERATE}.")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ShardError(f"{path}: not valid JSON ({e}); {REGENERATE}.") from e
  if meta.get("format") != FORMAT_NAME:
    raise ShardError(f"{path}: format={meta.get('format')!r}, expected {FORMAT_NAME!r}.")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ShardError(f"{path}: format_version={meta.get('format_version')} but this ldae_jax reads "
                     f"version {FORMAT_VERSION}; {REGENERATE}.")
  return meta


def _check_files(shard_dir: pathlib.Path, meta: Mapping[str, Any], checksums: bool) -> None:
  for s in meta["shards"]:
    path = shard_dir / s["file"]
    if not path.exists():
      raise ShardError(f"shard {path} is missing ({meta['count']} records expected in "
                       f"{len(meta['shards'])} shards); {REGENERATE}.")
    size = path.stat().st_size
    if size != s["bytes"]:
      what = "truncated" if size < s["bytes"] else "larger than written"
      raise ShardError(f"shard {path} is {what}: {size} bytes on disk, {s['bytes']} in {METADATA_FILE}; "
                       f"{REGENERATE}.")
    if checksums:
      digest = file_sha256(path)
      if digest != s["sha256"]:
        raise ShardError(f"shard {path} is corrupted: sha256 {digest} != {s['sha256']} in {METADATA_FILE}; "
                         f"{REGENERATE}.")


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
      raise ShardError(f"cannot open the shards of {self.shard_dir}: {e}; {REGENERATE}.") from e
    if n != self.metadata["count"]:
      raise ShardError(f"{self.shard_dir}: shards hold {n} records, {METADATA_FILE} says "
                       f"{self.metadata['count']}; {REGENERATE}.")

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
                       f"{REGENERATE}.") from e

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


def make_dataset(shard_dir: str | os.PathLike, *, global_batch_size: int, seed: int, shuffle: bool = True,
                 repeat: bool = True, drop_remainder: bool = True, fields: Sequence[str] = ("mu", "logvar"),
                 num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = 2, prefetch_batches: int = 4, worker_buffer_size: int = 2):
  """The grain `IterDataset` behind `make_iterator` (same arguments); use it to inspect or extend."""
  source = LatentDataset(shard_dir, fields)
  if drop_remainder and len(source) < global_batch_size:
    raise ShardError(f"{shard_dir} holds {len(source)} records, fewer than global_batch_size={global_batch_size}: "
                     "with drop_remainder=True no batch would ever be produced. Lower the batch size.")
  return grain_pipeline.batched(
      source, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
      drop_remainder=drop_remainder, num_workers=num_workers, process_index=process_index,
      process_count=process_count, num_threads=num_threads, prefetch_batches=prefetch_batches,
      worker_buffer_size=worker_buffer_size)


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
  grain_pipeline.ensure_absl_flags_parsed()
  return iter(make_dataset(
      shard_dir, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
      drop_remainder=drop_remainder, fields=fields, num_workers=num_workers, process_index=process_index,
      process_count=process_count, num_threads=num_threads, prefetch_batches=prefetch_batches,
      worker_buffer_size=worker_buffer_size))


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
