"""Grain read throughput of latent shards (records/s, MB/s), with one thread, several threads and workers.

Writes `--records` paper-size latent records (mu + logvar, 16x20x16x3 float32 each, 120 KiB per record) with
`ShardWriter` to a scratch folder, then times `make_iterator` (shuffled, repeated, batched as the LDM stage
reads them) for each reader setting. For comparison it also times the reference's storage: one
`np.savez_compressed` file per scan, loaded with `np.load` in a loop.

  python benchmarks/read_throughput.py                      # 2000 records, batch 128, 3 epochs per setting
  python benchmarks/read_throughput.py --image_shape 64,80,64   # also store (and read) images

MB/s counts decoded payload bytes (the float32 arrays handed to training), MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ldae_jax.evaluation.throughput import host_cpu_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from ldae_jax.data import shards  # pylint: disable=g-import-not-at-top,wrong-import-position




def write(out_dir: pathlib.Path, n: int, latent: tuple[int, ...], image_shape, seed: int,
          compression: str = "auto") -> float:
  rng = np.random.default_rng(seed)
  image = None
  if image_shape:
    # A smooth blob in [0, 1] with zero background, as a skull-stripped volume looks to the compressor.
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in image_shape], indexing="ij")
    r2 = sum(g * g for g in grids)
    image = shards.quantize_image(np.clip(1.2 - r2, 0, 1)[..., None])
  t0 = time.perf_counter()
  with shards.ShardWriter(out_dir, records_per_shard=256, metadata={"source_checkpoint": "benchmark"},
                           compression=compression) as w:
    for i in range(n):
      rec = dict(mu=rng.standard_normal(latent, np.float32), logvar=rng.standard_normal(latent, np.float32),
                 subject=f"sub-{i:05d}", scan_id=f"sub-{i:05d}_ses-M00", label=i % 3, age=70.0)
      if image is not None:
        rec["image"] = image
      w.write(rec)
  return time.perf_counter() - t0


def time_reader(shard_dir, fields, batch, epochs, n, **kw) -> tuple[float, int, int]:
  it = shards.make_iterator(shard_dir, global_batch_size=batch, seed=0, fields=fields, process_index=0,
                            process_count=1, **kw)
  try:
    first = next(it)  # start-up (worker spawn, first reads) is not throughput
    per_batch_bytes = sum(v.nbytes for k, v in first.items() if v.dtype.kind == "f")
    steps = max(1, int(epochs * n) // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
      b = next(it)
      assert b["mu"].shape[0] == batch
    dt = time.perf_counter() - t0
  finally:
    if hasattr(it, "close"):
      it.close()
  return dt, steps * batch, steps * per_batch_bytes


def time_npz(tmp: pathlib.Path, n: int, latent) -> tuple[float, float, int]:
  """The reference's layout: one compressed .npz per scan (key `data`), read one file at a time."""
  rng = np.random.default_rng(1)
  d = tmp / "npz"
  d.mkdir()
  for i in range(n):
    np.savez_compressed(d / f"{i:05d}_compressed_latent.npz", data=rng.standard_normal(latent, np.float32))
  order = np.random.default_rng(0).permutation(n)
  t0 = time.perf_counter()
  nbytes = 0
  for i in order:
    with np.load(d / f"{i:05d}_compressed_latent.npz") as z:
      nbytes += z["data"].nbytes
  return time.perf_counter() - t0, n, nbytes


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--records", type=int, default=2000)
  p.add_argument("--latent", default="16,20,16,3", help="X,Y,Z,C of one latent (paper: 16,20,16,3)")
  p.add_argument("--image_shape", default="", help="X,Y,Z: also store and read an image per record")
  p.add_argument("--batch", type=int, default=128, help="global batch (paper LDM stage: 128)")
  p.add_argument("--epochs", type=float, default=3.0, help="epochs timed per setting")
  p.add_argument("--settings", default="t1,t2,t4,w1,w2",
                 help="comma list: tN = N reader threads, no workers; wN = N worker processes (1 thread each)")
  p.add_argument("--compression", default="auto", help="ShardWriter compression (auto, uncompressed, zstd:1)")
  p.add_argument("--tmp", default="/tmp/ldae_read_throughput")
  p.add_argument("--no_npz", action="store_true", help="skip the one-.npz-per-scan comparison")
  args = p.parse_args()

  latent = tuple(int(s) for s in args.latent.split(","))
  image_shape = tuple(int(s) for s in args.image_shape.split(",")) if args.image_shape else ()
  tmp = pathlib.Path(args.tmp)
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  shard_dir = tmp / "shards"
  fields = ("mu", "logvar") + (("image",) if image_shape else ())
  try:
    import grain
    import jax
    write_s = write(shard_dir, args.records, latent, image_shape, seed=0, compression=args.compression)
    meta = shards.verify(shard_dir)
    disk = sum(s["bytes"] for s in meta["shards"])
    print(f"device: {host_cpu_model()}, {os.cpu_count()} logical cores; python {platform.python_version()}, "
          f"jax {jax.__version__}, grain {getattr(grain, '__version__', '0.2.x')}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"config: {args.records} records, latent {latent} mu+logvar float32"
          f"{', image ' + str(image_shape) + ' stored ' + meta['image_encoding'] if image_shape else ''}, "
          f"compression {meta['compression']}, {len(meta['shards'])} shards, {disk / 1e6:.1f} MB on disk; "
          f"global batch {args.batch}, shuffle+repeat, {args.epochs:g} epochs timed per setting")
    print(f"write: {args.records / write_s:,.0f} records/s ({write_s:.2f} s incl. sha256)")
    rows = []
    for s in args.settings.split(","):
      kind, k = s[0], int(s[1:])
      kw = dict(num_threads=k, num_workers=0) if kind == "t" else dict(num_threads=1, num_workers=k)
      dt, recs, nbytes = time_reader(shard_dir, fields, args.batch, args.epochs, args.records, **kw)
      row = dict(setting=s, **kw, records_per_s=recs / dt, mb_per_s=nbytes / dt / 1e6, seconds=dt, records=recs)
      rows.append(row)
      print(f"grain {s:>3} (threads={kw['num_threads']}, workers={kw['num_workers']}): "
            f"{row['records_per_s']:>9,.0f} records/s  {row['mb_per_s']:>8,.1f} MB/s  ({recs} records, {dt:.2f} s)")
    if not args.no_npz and not image_shape:
      dt, recs, nbytes = time_npz(tmp, args.records, latent)
      print(f"npz per scan (reference layout, mu only, 1 thread): {recs / dt:>9,.0f} records/s  "
            f"{nbytes / dt / 1e6:>8,.1f} MB/s")
    print("json:", json.dumps(rows))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
