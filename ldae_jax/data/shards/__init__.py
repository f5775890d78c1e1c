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

Files: `record` (the format above), `writer` (`ShardWriter`; `merge` of the folders that separate processes
wrote), `reader` (metadata, checksums, `LatentDataset`, `read_all`, `field_mean`, and `make_iterator`, the
training stream built by `ldae_jax.data.grain_pipeline`).
"""

from ldae_jax.data.shards.reader import (LatentDataset, field_mean, make_dataset, make_iterator, read_all,
                                         read_metadata, verify)
from ldae_jax.data.shards.record import (ALL_FIELDS, ARRAY_FIELDS, FORMAT_NAME, FORMAT_VERSION, IMAGE_ENCODINGS,
                                         METADATA_FILE, SCALAR_FIELDS, SHARD_PATTERN, ShardError, decode_record,
                                         encode_record, quantize_image)
from ldae_jax.data.shards.writer import ShardWriter, merge, merged_stats

__all__ = ["ALL_FIELDS", "ARRAY_FIELDS", "FORMAT_NAME", "FORMAT_VERSION", "IMAGE_ENCODINGS", "METADATA_FILE",
           "SCALAR_FIELDS", "SHARD_PATTERN", "LatentDataset", "ShardError", "ShardWriter", "decode_record",
           "encode_record", "field_mean", "make_dataset", "make_iterator", "merge",
           "merged_stats", "quantize_image", "read_all",
           "read_metadata", "verify"]
