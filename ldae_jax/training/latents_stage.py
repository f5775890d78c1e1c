"""Stage 1b: encode every scan of the manifest into latent shards (the reference caches latents too).

One shard folder per split, `DIR/latents/shards/{train,val,test}`, each record holding the posterior mean
and log-variance (not one stochastic sample; docs/fidelity.md, "Reference bugs"), and, when
`config.train.latents_store_images`, the preprocessed image that stage 3's encoder needs beside its latent.
The diffusion scale factor is 1 / std of all train-split mu elements (the reference's 0.8730 belongs to its
own autoencoder) and is written into every split's metadata together with the autoencoder checkpoint it came
from.

In a multi-process run process 0 alone encodes and writes (every process would encode the same scans);
the others wait at a barrier, then read the scale factor from the shards it wrote.
"""

from __future__ import annotations

import os
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
  if jax.process_index() == 0:
    scale = _encode_and_write(encode, state, split_records, config, workdir, source)
  distributed.barrier(f"latents written to {wd.shard_root}")
  if jax.process_index() != 0:
    scale = shards.read_metadata(wd.shards("train"))["scale_factor"]
  summary = {"stage": NAME, "steps": 0, "final_loss": None, "scale_factor": scale, "scans": counts,
             "source_checkpoint": source, "wall_seconds": time.perf_counter() - t0, "compile_seconds": 0.0,
             "samples_per_s": sum(counts.values()) / max(time.perf_counter() - t0, 1e-9)}
  loop.finish_stage(wd.stage_dir(NAME), summary)
  return summary


def _encode_and_write(encode, state, split_records, config, workdir, source: str) -> float:
  """Writes every split's shards; returns the scale factor (1 / std of the train split's mu)."""
  bs = max(1, int(config.train.latents_batch_size))
  scale = None
  for split in SPLITS:  # train first: its mu statistics give the scale factor written into every split
    records = split_records[split]
    if not records:
      continue
    meta = {"scale_factor": scale, "source_checkpoint": source, "split": split,
            "image_shape": list(config.data.image_shape), "spacing_mm": float(config.data.spacing_mm)}
    with shards.ShardWriter(Workdir(workdir).shards(split),
                            records_per_shard=int(config.train.latents_records_per_shard),
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
      if split == "train":
        std = writer.stats()["mu"]["std"]
        if not np.isfinite(std) or std <= 0:
          raise FloatingPointError(f"train-split latent std is {std}; the autoencoder checkpoint {source} is "
                                   "degenerate. Retrain stage 1.")
        scale = 1.0 / std
        writer.metadata["scale_factor"] = scale
    print(f"[latents] {split}: {len(records)} scans -> {Workdir(workdir).shards(split)}", flush=True)
  return scale
