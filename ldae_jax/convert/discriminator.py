"""MONAI-Generative `PatchDiscriminator` state dict -> `ldae_jax.models.discriminator.PatchDiscriminator`.

PyTorch children `initial_conv`, `0`..`n-1`, `final_conv` become `initial_conv`, `layers[i]`, `final_conv`;
`<i>.adn.N` (the BatchNorm inside MONAI's ADN block) becomes `layers[i].norm`, whose running statistics are
`nnx.BatchStat` `mean` / `var`. `num_batches_tracked` has no Flax counterpart and is ignored.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ldae_jax.convert import common
from ldae_jax.convert.autoencoder import select_prefix

# Lightning stage-1 checkpoint: the discriminator sits beside `model.` under `discriminator.`.
PREFIXES = ("discriminator.",)

_BN_LEAF = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def key_map(torch_key: str) -> tuple[tuple, str] | None:
  m = re.fullmatch(r"(initial_conv|final_conv)\.conv\.(weight|bias)", torch_key)
  if m:
    return (m[1], "conv", "kernel" if m[2] == "weight" else "bias"), "conv" if m[2] == "weight" else "identity"
  m = re.fullmatch(r"(\d+)\.conv\.weight", torch_key)
  if m:
    return ("layers", int(m[1]), "conv", "kernel"), "conv"
  m = re.fullmatch(r"(\d+)\.adn\.N\.(weight|bias|running_mean|running_var)", torch_key)
  if m:
    return ("layers", int(m[1]), "norm", _BN_LEAF[m[2]]), "identity"
  return None


def _ignore(key: str) -> bool:
  return key.endswith("num_batches_tracked")


def map_state_dict(torch_sd: Mapping[str, np.ndarray], model, *, source: str = "<discriminator state dict>"
                   ) -> tuple[dict, common.ConversionReport]:
  """(Flax path -> array, report) without touching `model` (which may be abstract, from nnx.eval_shape)."""
  sd = select_prefix(torch_sd, PREFIXES)
  return common.convert_state_dict(sd, common.flat_param_shapes(model), key_map, ignore=_ignore, source=source)


def convert(torch_sd: Mapping[str, np.ndarray], model, *, source: str = "<discriminator state dict>"
            ) -> common.ConversionReport:
  """Fills `model` (parameters and BatchNorm statistics) in place; raises ConversionError if incomplete."""
  flat, report = map_state_dict(torch_sd, model, source=source)
  common.load_into_model(model, flat)
  return report
