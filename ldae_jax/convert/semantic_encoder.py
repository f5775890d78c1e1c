"""Reference `AttentionSemanticEncoder` / torchvision ConvNeXt state dicts -> `SemanticEncoder`.

The reference registers its ConvNeXt twice, as `backbone.backbone.*` and `slice_distributed.module.backbone.*`
(the same tensors); both names map to the same Flax parameter and the second is counted as a duplicate after
checking it equals the first. `positional_encoding.pe` is a fixed buffer: it is checked against our table and
not loaded. The Lightning stage-3 checkpoint holds the encoder twice, as `ema_encoder.` (the one used for
inference and probes) and `encoder.`; `convert` prefers the EMA copy unless `prefix` is given.

`import_torchvision_convnext` initialises the backbone from a torchvision ConvNeXt ImageNet state dict
(`features.*`, `classifier.0.*`; the 1000-way `classifier.2` is dropped) with the RGB stem summed over its
input channels, as the reference's grayscale conversion does.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ldae_jax.convert import common
from ldae_jax.convert.autoencoder import select_prefix
from ldae_jax.models.semantic_encoder import positional_table

PREFIXES = ("ema_encoder.", "encoder.")
_BACKBONE = "backbone.backbone."
_DUPLICATE = "slice_distributed.module.backbone."
_PE_KEY = "positional_encoding.pe"


def convnext_key_map(key: str) -> tuple[tuple, str] | None:
  """torchvision ConvNeXt key (`features.3.1.block.5.weight`) -> path inside `ConvNeXt`."""
  m = re.fullmatch(r"features\.(\d+)\.(\d+)\.layer_scale", key)
  if m:
    return ("features", int(m[1]), int(m[2]), "layer_scale"), "flatten"
  m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.([0235])\.(weight|bias)", key)
  if m:
    i, j, k, leaf = int(m[1]), int(m[2]), m[3], m[4]
    if leaf == "bias":
      return ("features", i, j, f"block_{k}", "bias"), "identity"
    name, kind = {"0": ("kernel", "conv"), "2": ("scale", "identity"), "3": ("kernel", "linear"),
                  "5": ("kernel", "linear")}[k]
    return ("features", i, j, f"block_{k}", name), kind
  m = re.fullmatch(r"features\.(\d+)\.([01])\.(weight|bias)", key)
  if m:  # stem (conv, LN2d) at index 0; downsampling layers (LN2d, conv) at the even indices
    i, j, leaf = int(m[1]), int(m[2]), m[3]
    is_conv = (j == 0) if i == 0 else (j == 1)
    if leaf == "bias":
      return ("features", i, j, "bias"), "identity"
    return ("features", i, j, "kernel" if is_conv else "scale"), "conv" if is_conv else "identity"
  m = re.fullmatch(r"classifier\.0\.(weight|bias)", key)
  if m:
    return ("classifier_0", "scale" if m[1] == "weight" else "bias"), "identity"
  return None


def key_map(torch_key: str) -> tuple[tuple, str] | None:
  for prefix in (_BACKBONE, _DUPLICATE):
    if torch_key.startswith(prefix):
      mapped = convnext_key_map(torch_key[len(prefix):])
      return None if mapped is None else (("backbone",) + mapped[0], mapped[1])
  m = re.fullmatch(r"(query_projection|key_projection|value_projection|soft_attention\.linear|"
                   r"cross_attention\.out_proj)\.(weight|bias)", torch_key)
  if m:
    path = tuple(m[1].split("."))
    return (path + ("kernel",), "linear") if m[2] == "weight" else (path + ("bias",), "identity")
  if torch_key == "cross_attention.in_proj_weight":
    return ("cross_attention", "in_proj_kernel"), "linear"
  if torch_key == "cross_attention.in_proj_bias":
    return ("cross_attention", "in_proj_bias"), "identity"
  m = re.fullmatch(r"layer_norm_after_attention\.(weight|bias)", torch_key)
  if m:
    return ("layer_norm_after_attention", "scale" if m[1] == "weight" else "bias"), "identity"
  return None


def pe_tolerance(table: np.ndarray) -> np.ndarray:
  """Per-entry tolerance for comparing a sin/cos table made by another float32 library with `table`.

  torch's and numpy's float32 `exp` round about 40 % of the frequencies w_i to a neighbouring float (up to
  2 ulp apart once both libraries' 1-ulp errors add up); position k multiplies that into an angle error of
  k * ulp(w_i), plus one rounding of the float32 product k * w_i in each library. At the paper's 128 x 768
  the genuine reference buffer differs from ours by 1.5e-5, so a flat atol of 1e-5 refuses it. The bound
  below is twice that worst case (4.6e-5 at most at 128 positions), still far below any real mistake (a
  wrong width, order or entry).
  """
  length, dim = table.shape
  if length < 2:
    return np.full(table.shape, 1e-6, np.float32)
  freq = np.arctan2(table[1, 0::2], table[1, 1::2]).astype(np.float32)  # w_i from row 1 = (sin w_i, cos w_i)
  pos = np.arange(length, dtype=np.float32)[:, None]
  angle = (pos * freq).astype(np.float32)
  per_freq = 2 * (2 * pos * np.spacing(freq) + np.spacing(np.abs(angle))) + 1e-6
  return np.repeat(per_freq, 2, axis=1)[:, :dim].astype(np.float32)  # same bound for sin (2i) and cos (2i+1)


def _check_pe(pe: np.ndarray, model, source: str) -> None:
  pe = np.asarray(pe, np.float32).reshape(-1, pe.shape[-1])
  ours = positional_table(pe.shape[0], pe.shape[1])
  if pe.shape[1] != model.emb_dim or not np.all(np.abs(pe - ours) <= pe_tolerance(ours)):
    raise common.ConversionError(
        f"{source}: {_PE_KEY} {pe.shape} is not the interleaved sin/cos table of width "
        f"config.encoder.emb_dim={model.emb_dim} (max difference "
        f"{np.abs(pe - ours).max() if pe.shape == ours.shape else 'n/a'}, beyond float32 rounding); the "
        "checkpoint is not an AttentionSemanticEncoder of this configuration.")
  if pe.shape[0] != model.seq_len:
    raise common.ConversionError(f"{source}: {_PE_KEY} has {pe.shape[0]} positions but config.encoder.seq_len="
                                 f"{model.seq_len}; set seq_len to the checkpoint's.")


def map_state_dict(torch_sd: Mapping[str, np.ndarray], model, *, prefix: str | None = None,
                   source: str = "<encoder state dict>") -> tuple[dict, common.ConversionReport]:
  """(Flax path -> array, report) without touching `model` (which may be abstract, from nnx.eval_shape)."""
  if prefix is None:  # auto: the EMA copy of a Lightning checkpoint, else the plain encoder state dict
    sd = select_prefix(torch_sd, PREFIXES)
  else:  # explicit; "" means the keys are already bare
    sd = common.strip_prefix(torch_sd, prefix) if prefix else dict(torch_sd)
  duplicates = {}
  for key in sd:
    if key.startswith(_DUPLICATE):
      original = _BACKBONE + key[len(_DUPLICATE):]
      if original in sd:
        if not np.array_equal(np.asarray(sd[key]), np.asarray(sd[original])):
          raise common.ConversionError(f"{source}: {key} differs from {original}; the reference registers "
                                       "one backbone under both names, so they must be equal.")
        duplicates[key] = original
  if _PE_KEY in sd:
    _check_pe(sd[_PE_KEY], model, source)
  return common.convert_state_dict(sd, common.flat_param_shapes(model), key_map, duplicates=duplicates,
                                   ignore=lambda k: k == _PE_KEY, source=source)


def convert(torch_sd: Mapping[str, np.ndarray], model, *, prefix: str | None = None,
            source: str = "<encoder state dict>") -> common.ConversionReport:
  """Fills `model` (a SemanticEncoder) in place; raises ConversionError if anything does not fit."""
  flat, report = map_state_dict(torch_sd, model, prefix=prefix, source=source)
  common.load_into_model(model, flat)
  return report


def import_torchvision_convnext(state_dict: Mapping[str, np.ndarray], encoder_model, *,
                                source: str = "<torchvision ConvNeXt state dict>") -> common.ConversionReport:
  """Loads torchvision ConvNeXt weights (e.g. ConvNeXt_Small_Weights.IMAGENET1K_V1) into the encoder's backbone.

  The stem (O, 3, 4, 4) is summed over its input channels to (O, 1, 4, 4) (the reference's grayscale
  conversion, not a mean); `classifier.2` (the ImageNet Linear) is dropped. Every backbone parameter must be
  filled, so a ConvNeXt of another size fails with the list of mismatches.
  """
  backbone = encoder_model.backbone if hasattr(encoder_model, "backbone") else encoder_model
  if getattr(backbone, "patch_size", 4) != 4:
    raise common.ConversionError(f"{source}: torchvision ConvNeXt weights have a 4x4 stem, the backbone "
                                 f"config.encoder.patch_size={backbone.patch_size}; set it to 4 to load them.")
  sd = {}
  for key, value in state_dict.items():
    if key.startswith("classifier.2."):
      continue
    value = np.asarray(value)
    if key == "features.0.0.weight" and value.ndim == 4 and value.shape[1] != backbone.in_channels:
      if backbone.in_channels != 1:
        raise common.ConversionError(f"{source}: stem has {value.shape[1]} input channels, the backbone "
                                     f"{backbone.in_channels}; only RGB -> grayscale (1) is converted.")
      value = value.sum(axis=1, keepdims=True)
    sd[key] = value
  flat, report = common.convert_state_dict(sd, common.flat_param_shapes(backbone), convnext_key_map,
                                           source=source)
  common.load_into_model(backbone, flat)
  return report


def load_pretrained_convnext(path: str, encoder_model) -> common.ConversionReport:
  """`config.encoder.pretrained_convnext` (a .pth or .npz torchvision state dict) -> the encoder's backbone."""
  return import_torchvision_convnext(common.load_torch_file(path), encoder_model, source=path)
