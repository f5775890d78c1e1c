"""MONAI-Generative `AutoencoderKL` state dict -> `ldae_jax.models.autoencoder.AutoencoderKL`.

The Flax attribute names mirror the PyTorch module paths, so the map is a rename of the leaf:
`<...>.conv.weight` is a Conv3d kernel (transposed to (kD, kH, kW, I, O)), any other `.weight` is a GroupNorm
scale (`encoder.blocks.<i>.weight` for the tail norm, `norm1`/`norm2` inside ResBlocks), and biases keep their
name. Numeric path parts become list indices (`blocks.4` -> `('blocks', 4)`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ldae_jax.convert import common

# A plain `AutoencoderKL.state_dict()` (what the reference's scripts load) has no prefix; the Lightning
# stage-1 checkpoint (`LitAutoencoderKL`) stores the network under `model.`.
PREFIXES = ("model.",)


def split_key(key: str) -> list:
  """'encoder.blocks.4.conv1.conv.weight' -> ['encoder', 'blocks', 4, 'conv1', 'conv', 'weight']."""
  return [int(p) if p.isdigit() else p for p in key.split(".")]


def select_prefix(torch_sd: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> dict[str, np.ndarray]:
  """Strips the first of `prefixes` that some key carries (a Lightning checkpoint); else returns the dict as is."""
  for prefix in prefixes:
    if prefix and any(k.startswith(prefix) for k in torch_sd):
      return common.strip_prefix(torch_sd, prefix)
  return dict(torch_sd)


def key_map(torch_key: str) -> tuple[tuple, str] | None:
  parts = split_key(torch_key)
  if parts[0] not in ("encoder", "decoder", "quant_conv_mu", "quant_conv_log_sigma", "post_quant_conv"):
    return None
  *head, leaf = parts
  if leaf == "bias":
    return tuple(head) + ("bias",), "identity"
  if leaf == "weight":
    if head and head[-1] == "conv":
      return tuple(head) + ("kernel",), "conv"
    return tuple(head) + ("scale",), "identity"
  return None


def map_state_dict(torch_sd: Mapping[str, np.ndarray], model, *, source: str = "<autoencoder state dict>"
                   ) -> tuple[dict, common.ConversionReport]:
  """(Flax path -> array, report) without touching `model` (which may be abstract, from nnx.eval_shape)."""
  sd = select_prefix(torch_sd, PREFIXES)
  return common.convert_state_dict(sd, common.flat_param_shapes(model), key_map, source=source)


def convert(torch_sd: Mapping[str, np.ndarray], model, *, source: str = "<autoencoder state dict>"
            ) -> common.ConversionReport:
  """Fills `model` (an AutoencoderKL) in place from a reference state dict; raises ConversionError if incomplete."""
  flat, report = map_state_dict(torch_sd, model, source=source)
  common.load_into_model(model, flat)
  return report
