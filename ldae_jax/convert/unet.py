"""Reference `UNet` state dict (stage-2 checkpoint) -> `ldae_jax.models.unet.UNet`.

PyTorch keys `time_embed.0.weight`, `input_blocks.4.0.in_layers.2.weight`, `middle_block.1.qkv.weight`,
`out.2.bias`, ... map mechanically onto the Flax paths `('time_embed_0', 'kernel')`,
`('input_blocks', 4, 0, 'in_layers_2', 'kernel')`, ... The layout change follows from the layer's name.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ldae_jax.convert import common

# Lightning prefixes, most preferred first: the EMA weights are the ones stage 3 and sampling use.
PREFIXES = ("ema_unet.", "unet.", "model.", "")
TOP_LEVEL = ("time_embed", "input_blocks", "middle_block", "output_blocks", "out")

# Leaf module name inside a block -> (Flax attribute, kind of the weight tensor).
_BLOCK_LAYERS = {
    "in_layers.0": ("in_layers_0", "norm"),
    "in_layers.2": ("in_layers_2", "conv"),
    "emb_layers.1": ("emb_layers_1", "linear"),
    "emb_z_layers.1": ("emb_z_layers_1", "linear"),
    "out_layers.0": ("out_layers_0", "norm"),
    "out_layers.3": ("out_layers_3", "conv"),
    "skip_connection": ("skip_connection", "conv1x1"),
    "norm": ("norm", "norm"),
    "qkv": ("qkv", "conv1x1"),
    "proj_out": ("proj_out", "conv1x1"),
}
_HEAD_LAYERS = {"0": "norm", "2": "conv"}


def leaf(attr: str, kind: str, param: str) -> tuple[tuple, str] | None:
  """(attribute, layer kind, 'weight'|'bias') -> (Flax path suffix, transform)."""
  if param == "bias":
    return (attr, "bias"), "identity"
  if param != "weight":
    return None
  if kind == "norm":
    return (attr, "scale"), "identity"
  return (attr, "kernel"), kind


def block_key_map(parts: list[str]) -> tuple[tuple, str] | None:
  """Key inside one TimestepEmbedSequential entry, e.g. ['in_layers', '2', 'weight']."""
  if len(parts) < 2:
    return None
  name, param = ".".join(parts[:-1]), parts[-1]
  if name not in _BLOCK_LAYERS:
    return None
  return leaf(*_BLOCK_LAYERS[name], param)


def sequence_key_map(parts: list[str], first_conv: bool = False) -> tuple[tuple, str] | None:
  """['<j>', ...] inside a block list; `input_blocks.0.0` is a bare conv."""
  if not parts or not parts[0].isdigit():
    return None
  j = int(parts[0])
  if first_conv and len(parts) == 2:
    mapped = leaf("", "conv", parts[1])
    return None if mapped is None else ((j,) + mapped[0][1:], mapped[1])
  mapped = block_key_map(parts[1:])
  return None if mapped is None else ((j,) + mapped[0], mapped[1])


def key_map(torch_key: str) -> tuple[tuple, str] | None:
  """PyTorch UNet key -> (Flax path, transform name), or None if the key is not a UNet parameter."""
  parts = torch_key.split(".")
  top = parts[0]
  if top == "time_embed" and len(parts) == 3 and parts[1] in ("0", "2"):
    return leaf(f"time_embed_{parts[1]}", "linear", parts[2])
  if top in ("out",) and len(parts) == 3 and parts[1] in _HEAD_LAYERS:
    return leaf(f"{top}_{parts[1]}", _HEAD_LAYERS[parts[1]], parts[2])
  if top in ("input_blocks", "output_blocks") and len(parts) >= 3 and parts[1].isdigit():
    i = int(parts[1])
    mapped = sequence_key_map(parts[2:], first_conv=(top == "input_blocks" and i == 0))
    return None if mapped is None else ((top, i) + mapped[0], mapped[1])
  if top == "middle_block":
    mapped = sequence_key_map(parts[1:])
    return None if mapped is None else ((top,) + mapped[0], mapped[1])
  return None


def detect_prefix(torch_sd: Mapping[str, np.ndarray], prefixes=PREFIXES,
                  probe: str = "time_embed.0.weight") -> str:
  """The first of `prefixes` under which `probe` exists (e.g. 'ema_unet.' in a Lightning checkpoint)."""
  for p in prefixes:
    if p + probe in torch_sd:
      return p
  some = ", ".join(list(torch_sd)[:5])
  raise common.ConversionError(
      f"No '{probe}' under any of the prefixes {list(prefixes)}; the checkpoint's first keys are: {some}. "
      "Pass --prefix explicitly or choose the right --network.")


def convert_with(torch_sd: Mapping[str, np.ndarray], model, key_map_fn, prefixes, *,
                 prefix: str | None = None, source: str = "<state dict>",
                 probe: str = "time_embed.0.weight") -> common.ConversionReport:
  """Strips the prefix, maps every key, checks completeness and writes the arrays into `model`."""
  if prefix is None:
    prefix = detect_prefix(torch_sd, prefixes, probe)
  sd = common.strip_prefix(torch_sd, prefix) if prefix else dict(torch_sd)
  if not sd:
    raise common.ConversionError(f"{source}: no keys start with prefix {prefix!r}.")
  flat, report = common.convert_state_dict(sd, common.flat_param_shapes(model), key_map_fn,
                                           source=f"{source} (prefix {prefix!r})")
  common.load_into_model(model, flat)
  return report


def convert(torch_sd: Mapping[str, np.ndarray], model, *, prefix: str | None = None,
            source: str = "<state dict>") -> common.ConversionReport:
  """Loads a reference UNet state dict (plain or Lightning, prefix auto-detected) into `model` in place."""
  return convert_with(torch_sd, model, key_map, PREFIXES, prefix=prefix, source=source)
