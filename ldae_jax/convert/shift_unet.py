"""Reference `ShiftUNet` state dict (stage-3 `decoder`) -> `ldae_jax.models.shift_unet.ShiftUNet`.

The frozen UNet's keys (`time_embed.*`, `input_blocks.*`, `middle_block.*`, `output_blocks.*`, `out.*`) go
under `('unet', ...)` with the UNet's key map; the shift branch (`label_emb`, `shift_middle_block.j`,
`shift_output_blocks.i.j`, `shift_out.{0,2}`) maps onto the same block attributes (plus `emb_z_layers_1`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ldae_jax.convert import common
from ldae_jax.convert import unet as unet_conv

PREFIXES = ("ema_decoder.", "decoder.", "model.", "")


def key_map(torch_key: str) -> tuple[tuple, str] | None:
  """PyTorch ShiftUNet key -> (Flax path, transform name), or None if it is not a ShiftUNet parameter."""
  parts = torch_key.split(".")
  top = parts[0]
  if top in unet_conv.TOP_LEVEL:
    mapped = unet_conv.key_map(torch_key)
    return None if mapped is None else (("unet",) + mapped[0], mapped[1])
  if top == "label_emb" and len(parts) == 2:
    return unet_conv.leaf("label_emb", "linear", parts[1])
  if top == "shift_out" and len(parts) == 3 and parts[1] in ("0", "2"):
    return unet_conv.leaf(f"shift_out_{parts[1]}", {"0": "norm", "2": "conv"}[parts[1]], parts[2])
  if top == "shift_middle_block":
    mapped = unet_conv.sequence_key_map(parts[1:])
    return None if mapped is None else ((top,) + mapped[0], mapped[1])
  if top == "shift_output_blocks" and len(parts) >= 3 and parts[1].isdigit():
    mapped = unet_conv.sequence_key_map(parts[2:])
    return None if mapped is None else ((top, int(parts[1])) + mapped[0], mapped[1])
  return None


def convert(torch_sd: Mapping[str, np.ndarray], model, *, prefix: str | None = None,
            source: str = "<state dict>") -> common.ConversionReport:
  """Loads a reference ShiftUNet state dict (plain or Lightning, prefix auto-detected) into `model`.

  Only a complete ShiftUNet is accepted (the stage-3 `decoder`); to start stage 3 from a stage-2 UNet,
  convert that into `model.unet` with `ldae_jax.convert.unet.convert(sd, model.unet)`.
  """
  return unet_conv.convert_with(torch_sd, model, key_map, PREFIXES, prefix=prefix, source=source,
                                probe="label_emb.weight")
