"""3D convolution that is fast on every backend: the `conv_general_dilated` every 3D `nnx.Conv` here uses.

On GPU/TPU a 3D convolution goes to the vendor library unchanged. XLA's CPU backend, though, runs 3D
convolutions through a generic loop nest that reaches only 1-50 GFLOP/s at the narrow widths of small models,
and its backward of a strided 3D convolution is slower still, while its 2D convolutions reach ~200 GFLOP/s on
one core. On CPU a kD x kH x kW convolution is therefore one 2D convolution: the kD depth taps of each output
depth are laid side by side as channels (depth folded into the batch), and the kernel's (kD, C) axes are merged
to match - the same sum of products, reordered, so results agree to float32 rounding. One 2D convolution of
kD*C channels matches the kD separate 2D convolutions summed (the previous form) at the UNet's widths, within
the box's noise, and beats it up to 2x on narrow or small layers (one wider contraction, a cheaper backward);
im2col + one matmul was 5-8x slower (the 27-tap concatenation costs more than the matmul saves). It compiles in ~0.15-0.3 s per convolution against ~0.02 s for the plain 3D one, but even
tiny test networks compile no slower overall (tests/test_unet.py: 65 s vs 67 s), so it is used at every size.
Measured at the quickstart's shapes on one pinned core of the 2-core development box (AMD EPYC),
`benchmarks/cpu_ops.py`, forward / forward+backward GFLOP/s, this form vs XLA's conv3d vs torch 2.13 conv3d:
UNet 16x8x5x4, 64->64: 193 / 163 vs 49 / 50 vs 215 / 177; UNet 16x8x10x8, 32->32: 126 / 105 vs 26 / 25 vs
167 / 152; AE 4x32x40x32, 8->8: 18 / 32 vs 7 / 6 vs 71 / 63 (narrow wide-volume layers remain 2-4x behind).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _explicit_padding(padding: Any, in_spatial: Sequence[int], kernel: Sequence[int],
                      strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(in_spatial, kernel, strides, padding))
  return [tuple(p) for p in padding]


def _use_depth_taps(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers) -> bool:
  if jax.default_backend() != "cpu" or lhs.ndim != 5 or rhs.shape[0] == 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC)
  got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or _NDHWC)
  return got == want


def _fold_depth(x, kd: int, sd: int, d_out: int, groups: int):
  """(B, D', H, W, C) depth-padded -> (B * d_out, H, W, kd * C): the kd depth taps side by side as channels.

  With groups, each group's channels stay one contiguous block (its kd taps inside), as a grouped 2D
  convolution expects.
  """
  b, _, h, w, c = x.shape
  taps = [lax.slice_in_dim(x, i, i + sd * (d_out - 1) + 1, stride=sd, axis=1) for i in range(kd)]
  x = jnp.stack(taps, axis=-2)  # (B, d_out, H, W, kd, C)
  if groups > 1:
    x = x.reshape(b, d_out, h, w, kd, groups, c // groups).swapaxes(-3, -2)
  return x.reshape(b * d_out, h, w, kd * c)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None, **kwargs):
  """Drop-in for `jax.lax.conv_general_dilated` (as `nnx.Conv(conv_general_dilated=...)` calls it)."""
  if not _use_depth_taps(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  b, d, h, w, c = lhs.shape
  kd, kh, kw, cin_g, cout = rhs.shape
  sd, sh, sw = window_strides
  pads = _explicit_padding(padding, (d, h, w), rhs.shape[:3], window_strides)
  x = lax.pad(lhs, lax.convert_element_type(0, lhs.dtype),
              ((0, 0, 0), (pads[0][0], pads[0][1], 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)))
  d_out = (d + pads[0][0] + pads[0][1] - kd) // sd + 1
  x = _fold_depth(x, kd, sd, d_out, feature_group_count)
  k = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin_g, cout)  # per group: (kd, C/G) as x
  out = lax.conv_general_dilated(x, k, (sh, sw), pads[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=feature_group_count, precision=precision, **kwargs)
  return out.reshape((b, d_out) + out.shape[1:])
