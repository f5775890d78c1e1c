"""Stage 1b: encode every scan of the manifest into latent shards (the reference caches latents too).

One shard folder per split, `DIR/latents/shards/{train,val,test}`, each record holding the posterior mean
and log-variance (not one stochastic sample; docs/fidelity.md, "Reference bugs"), and, when
`config.train.latents_store_images`, the preprocessed image that stage 3's encoder needs beside its latent.
The diffusion scale factor is 1 / std of all train-split mu elements (the reference's 0.8730 belongs to its
own autoencoder) and is written into every split's metadata together with the autoencoder checkpoint it came
from.

Each process encodes its own contiguous block of every split into a part folder (`Workdir.shard_part`); after
a barrier process 0 merges the parts, in process order, into the split's folder (so the records come out in
the order one process would write them), with the scale factor from the merged train statistics; after a
second barrier every process reads it. A process that dies makes the others stop at a barrier within
`config.distributed.barrier_timeout_s`.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax.data import shards
from ldae_jax.parallel import distributed
from ldae_jax.training import autoencoder_stage
from ldae_jax.training import loop
from ldae_jax.training import volumes
from ldae_jax.workdir import LATENTS, SPLITS, Workdir

NAME = LATENTS


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, **unused: Any) -> dict[str, Any]:
  t0 = time.perf_counter()
  wd = Workdir(workdir)
  ae, ae_step = autoencoder_stage.trained_autoencoder(config, workdir)
  graphdef, state = nnx.split(ae)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_moments(x))
  split_records = volumes.splits(config, workdir)
  if not split_records["train"]:
    raise ValueError("the train split is empty; nothing to compute the scale factor from (check the manifest).")
  source = str(wd.checkpoints(autoencoder_stage.NAME) / str(ae_step))
  counts = {split: len(split_records[split]) for split in SPLITS}
  pi, pc = jax.process_index(), jax.process_count()
  timeout = float(config.distributed.barrier_timeout_s)
  for split in SPLITS:
    _encode_part(encode, state, process_block(split_records[split], pi, pc), config, wd.shard_part(split, pi),
                 split, source)
  distributed.barrier(f"latent shard parts in {wd.shard_root}", timeout)
  if pi == 0:
    _merge_parts(wd, {split: len(split_records[split]) for split in SPLITS}, pc, source)
  distributed.barrier(f"latent shards merged in {wd.shard_root}", timeout)
  scale = shards.read_metadata(wd.shards("train"))["scale_factor"]
  summary = {"stage": NAME, "steps": 0, "final_loss": None, "scale_factor": scale, "scans": counts,
             "source_checkpoint": source, "processes": pc, "wall_seconds": time.perf_counter() - t0,
             "compile_seconds": 0.0, "samples_per_s": sum(counts.values()) / max(time.perf_counter() - t0, 1e-9)}
  loop.finish_stage(wd.stage_dir(NAME), summary)
  return summary


def process_block(records: list, process_index: int, process_count: int) -> list:
  """Process `process_index`'s contiguous share of `records` (sizes differ by at most one; blocks in process
  order concatenate to `records`)."""
  n = len(records)
  return records[n * process_index // process_count:n * (process_index + 1) // process_count]


def _encode_part(encode, state, records, config, out_dir, split: str, source: str) -> None:
  """Encodes `records` into the shard folder `out_dir` (for an empty block, only a stale part is removed)."""
  if not records:
    shutil.rmtree(out_dir, ignore_errors=True)
    return
  bs = max(1, int(config.train.latents_batch_size))
  meta = {"scale_factor": None, "source_checkpoint": source, "split": split,
          "image_shape": list(config.data.image_shape), "spacing_mm": float(config.data.spacing_mm)}
  with shards.ShardWriter(out_dir, records_per_shard=int(config.train.latents_records_per_shard),
                          metadata=meta) as writer:
    for i in range(0, len(records), bs):
      chunk = records[i:i + bs]
      images = np.stack([volumes.load(r, config) for r in chunk])
      pad = bs - len(chunk)  # one compiled shape for every batch
      batch = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
      mu, logvar = jax.device_get(encode(state, jnp.asarray(batch)))
      for j, r in enumerate(chunk):
        rec = dict(mu=mu[j], logvar=logvar[j], subject=r.subject, scan_id=r.scan_id,
                   session_months=int(r.session_months), diagnosis=r.diagnosis, label=int(r.label),
                   age=float(r.age))
        if config.train.latents_store_images:
          rec["image"] = images[j]
        writer.write(rec)


def _merge_parts(wd: Workdir, counts: dict[str, int], process_count: int, source: str) -> None:
  """Process 0: every split's parts -> its shard folder, the scale factor (1 / std of the train split's mu)
  in every split's metadata. Parts of more processes than this run has (an earlier, larger run) are dropped."""
  parts = {split: [wd.shard_part(split, i) for i in range(process_count) if wd.shard_part(split, i).is_dir()]
           for split in SPLITS}
  for split in SPLITS:
    got = sum(shards.read_metadata(p)["count"] for p in parts[split])
    if got != counts[split]:
      raise RuntimeError(f"the {split} parts in {wd.shard_root} hold {got} records, the split has "
                         f"{counts[split]}: a process did not write its part; rerun the latents stage.")
  std = shards.merged_stats(parts["train"])["mu"]["std"]
  if not np.isfinite(std) or std <= 0:
    raise FloatingPointError(f"train-split latent std is {std}; the autoencoder checkpoint {source} is "
                             "degenerate. Retrain stage 1.")
  for split in SPLITS:
    if parts[split]:
      shards.merge(parts[split], wd.shards(split), metadata={"scale_factor": 1.0 / std})
      print(f"[latents] {split}: {counts[split]} scans from {len(parts[split])} process(es) -> "
            f"{wd.shards(split)}", flush=True)
    for stale in wd.shard_parts(split):  # of an earlier run with more processes
      shutil.rmtree(stale, ignore_errors=True)
