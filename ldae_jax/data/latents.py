"""What the diffusion stages and the evaluation read from a run's latent shards beside the latents themselves:
the diffusion scale factor, the check that the shards fit the config, and the fixed held-out records.

The shards live in `Workdir(DIR).shards(split)` (ldae_jax.workdir), written by the `latents` stage.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from ldae_jax.data import shards


def scale_factor(config: ml_collections.ConfigDict, meta: dict[str, Any], where: str) -> float:
  """`config.diffusion.scale_factor` when set, else the data-derived one recorded by the `latents` stage."""
  if config.diffusion.scale_factor:
    return float(config.diffusion.scale_factor)
  s = meta.get("scale_factor")
  if not s or not np.isfinite(s) or s <= 0:
    raise ValueError(f"{where}/metadata.json has no valid scale_factor ({s!r}); rerun the `latents` stage or "
                     "set config.diffusion.scale_factor.")
  return float(s)


def check_latent_shape(config: ml_collections.ConfigDict, meta: dict[str, Any], where: str) -> tuple[int, ...]:
  """The shards' latent shape; raises when it is not the one the config's autoencoder gives."""
  from ldae_jax.config import latent_shape  # pylint: disable=g-import-not-at-top
  want = tuple(latent_shape(config))
  got = tuple(meta["fields"]["mu"]["shape"])
  if got != want:
    raise ValueError(f"{where}: latents have shape {got} but config (data.image_shape, autoencoder.channels, "
                     f"latent_channels) implies {want}; rerun the `latents` stage for this config.")
  return got


def heldout_records(shard_dir: str | os.PathLike, n: int, fields: tuple[str, ...] = ("mu",)) -> dict | None:
  """The first `n` records of `shard_dir` (a run's validation shards); None when there are none."""
  if not (pathlib.Path(shard_dir) / shards.METADATA_FILE).is_file():
    return None
  data = shards.read_all(shard_dir, fields)
  return {k: v[:n] for k, v in data.items()} if len(data[fields[0]]) else None
