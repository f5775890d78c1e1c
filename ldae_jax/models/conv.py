"""Convolution that is fast on every backend: the `conv_general_dilated` every `nnx.Conv` here uses.

Stride-1 depthwise 2D convolutions (the ConvNeXt block's 7x7 in the semantic encoder) are, on CPU, a sum of
shifted products over the kernel taps that touch real pixels, with a backward of the same form
(`depthwise_taps`): XLA's CPU grouped convolution took 71 ms for the forward at 256 x 8 x 10 x 16 where the
tap sum takes 1 ms, and the quickstart encoder's maps shrink to 2x2 and 1x1, where most 7x7 taps read only
padding. Encoder forward + backward at stage 3's batch (8 volumes, 256 slices): 340 -> 128 ms.

For 3D convolutions:

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
Those narrow layers (the autoencoder's full-resolution convolutions, 1-16 channels) compute r = 2 or 4
neighbouring output depths in one 2D convolution (`depth_blocked_conv`, r by `depth_block`): r times the
output channels for (r - 1) extra input taps and a block kernel with zeros, which XLA's CPU kernels run
faster than the narrow plain fold (1->8 at 32x40x32: 50 -> 14 ms forward+backward, 8->8: 97 -> 65 ms).
"""

from __future__ import annotations

import functools
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


def _blocked_kernel(rhs, r: int):
  """(kd, kh, kw, C, O) -> (kh, kw, (kd + r - 1) * C, r * O): output depth j of a block reads taps j..j+kd-1."""
  kd = rhs.shape[0]
  k = jnp.stack([jnp.pad(rhs, ((j, r - 1 - j), (0, 0), (0, 0), (0, 0), (0, 0))) for j in range(r)], axis=-2)
  k = jnp.transpose(k, (1, 2, 0, 3, 4, 5))  # (kh, kw, kd + r - 1, C, r, O)
  return k.reshape(k.shape[:2] + (-1, r * rhs.shape[-1]))


def depth_block(cin: int, cout: int, spatial: Sequence[int]) -> int:
  """Output depths per 2D convolution for a depth-stride-1, ungrouped layer on CPU.

  Chosen from `benchmarks/cpu_ops.py --alternatives` at the quickstart autoencoder's shapes (batch 4, one
  pinned core, forward / forward+backward ms, r = 1 / 2 / 4): 1->8 at 32x40x32 23.3/50.3, 9.1/24.1, 2.6/13.8;
  8->8 there 19.3/96.7, 16.6/64.9, 16.4/71.8; 16->16 there 85.1/278, 46.9/260, 60.8/304; 8->16 at 16x20x16
  2.5/11.3, 1.8/9.3, 2.4/13.6; but 16->16 at 16x20x16 3.3/16.2, 3.6/27.6, 5.7/20.5 and 16->3 at 8x10x8
  0.29/1.18, 0.45/1.66, 0.38/1.73: blocks pay where a side of the contraction is narrow or the volume large.
  """
  if cin * cout <= 16:
    return 4
  if cin <= 8 or (cout <= 16 and spatial[0] * spatial[1] * spatial[2] >= 32768):
    return 2
  return 1


def depth_blocked_conv(x, rhs, pads: Sequence[tuple[int, int]], r: int, hw_strides=(1, 1), precision=None,
                       **kwargs):
  """A depth-stride-1, ungrouped 3D convolution as one 2D convolution that computes r output depths at once.

  The kd + r - 1 input depths that r neighbouring output depths read are laid side by side as channels and the
  kernel is the block matrix of `_blocked_kernel` (its (r - 1) * r / (kd + r - 1) share of zeros is wasted
  work), so a layer with few output channels gets an r times wider contraction output.
  """
  b, d, h, w, c = x.shape
  kd = rhs.shape[0]
  d_out = d + pads[0][0] + pads[0][1] - kd + 1
  nb = -(-d_out // r)
  x = lax.pad(x, lax.convert_element_type(0, x.dtype),
              ((0, 0, 0), (pads[0][0], pads[0][1] + nb * r - d_out, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)))
  taps = [lax.slice_in_dim(x, i, i + r * (nb - 1) + 1, stride=r, axis=1) for i in range(kd + r - 1)]
  x = jnp.stack(taps, axis=-2).reshape(b * nb, h, w, (kd + r - 1) * c)
  out = lax.conv_general_dilated(x, _blocked_kernel(rhs, r), tuple(hw_strides), pads[1:],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision, **kwargs)
  ho, wo, o = out.shape[1], out.shape[2], rhs.shape[-1]
  out = jnp.moveaxis(out.reshape(b, nb, ho, wo, r, o), 4, 2).reshape(b, nb * r, ho, wo, o)
  return out[:, :d_out]


def _depthwise_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count) -> list[tuple[int, int]] | None:
  """The (H, W) paddings when this is a stride-1 NHWC depthwise 2D convolution on CPU that `depthwise_taps`
  computes (padding within [0, k - 1] on every side), else None."""
  if jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.shape[2] != 1:
    return None
  if not (feature_group_count == lhs.shape[-1] == rhs.shape[-1]) or any(s != 1 for s in window_strides):
    return None
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return None
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or ("NHWC", "HWIO", "NHWC")) != want:
    return None
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], window_strides)
  if any(not 0 <= p <= k - 1 for (lo, hi), k in zip(pads, rhs.shape[:2]) for p in (lo, hi)):
    return None
  return pads


def _live_taps(size: int, pad_lo: int, out: int, k: int) -> list[int]:
  """Kernel offsets whose window over the padded axis touches at least one real (unpadded) element."""
  return [a for a in range(k) if a <= pad_lo + size - 1 and a + out - 1 >= pad_lo]


def _tap_sum(x, w, pads):
  """sum over live taps (a, b) of pad(x)[:, a:a+Ho, b:b+Wo, :] * w[a, b, 0, :]; float32 accumulation."""
  _, h, wd, _ = x.shape
  kh, kw = w.shape[:2]
  ho, wo = h + sum(pads[0]) - kh + 1, wd + sum(pads[1]) - kw + 1
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  out = None
  for a in _live_taps(h, pads[0][0], ho, kh):
    for b in _live_taps(wd, pads[1][0], wo, kw):
      term = xp[:, a:a + ho, b:b + wo, :].astype(jnp.float32) * w[a, b, 0].astype(jnp.float32)
      out = term if out is None else out + term
  return out.astype(jnp.result_type(x.dtype, w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x, w, pads):
  return _tap_sum(x, w, pads)


def _depthwise_fwd(x, w, pads):
  return _tap_sum(x, w, pads), (x, w)


def _depthwise_bwd(pads, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  # dx: the same tap sum of g with the flipped kernel and the complementary padding (stride 1).
  dx = _tap_sum(g, w[::-1, ::-1], ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
                                    (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))).astype(x.dtype)
  # dw[a, b, 0, c] = sum over batch and positions of pad(x)[:, a:a+Ho, b:b+Wo, c] * g; taps over padding only: 0.
  _, h, wd, c = x.shape
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0))).astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  live_a, live_b = _live_taps(h, pads[0][0], ho, kh), _live_taps(wd, pads[1][0], wo, kw)
  dw = jnp.zeros((kh, kw, 1, c), jnp.float32)
  for a in live_a:
    for b in live_b:
      dw = dw.at[a, b, 0].set(jnp.sum(xp[:, a:a + ho, b:b + wo, :] * g32, axis=(0, 1, 2)))
  return dx, dw.astype(w.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_taps(x, w, pads: Sequence[tuple[int, int]]):
  """Stride-1 NHWC depthwise 2D convolution as a sum of shifted products over the kernel taps that touch real
  pixels (a 7x7 kernel on a 1x1 map is one product), with a hand-written backward of the same form.

  x: (N, H, W, C); w: (kh, kw, 1, C) (HWIO with one input channel per group); pads: ((top, bottom), (left,
  right)), each within [0, k - 1]. Equals `lax.conv_general_dilated(..., feature_group_count=C)` to float32
  rounding, values and gradients (tests/test_conv.py).
  """
  return _depthwise(x, w, tuple(tuple(int(v) for v in p) for p in pads))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None, **kwargs):
  """Drop-in for `jax.lax.conv_general_dilated` (as `nnx.Conv(conv_general_dilated=...)` calls it)."""
  dw_pads = _depthwise_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count)
  if dw_pads is not None:
    return depthwise_taps(lhs, rhs, dw_pads)
  if not _use_depth_taps(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  b, d, h, w, c = lhs.shape
  kd, kh, kw, cin_g, cout = rhs.shape
  sd, sh, sw = window_strides
  pads = _explicit_padding(padding, (d, h, w), rhs.shape[:3], window_strides)
  r = depth_block(c, cout, (d, h, w)) if sd == 1 and feature_group_count == 1 else 1
  if r > 1:
    return depth_blocked_conv(lhs, rhs, pads, r, (sh, sw), precision=precision, **kwargs)
  x = lax.pad(lhs, lax.convert_element_type(0, lhs.dtype),
              ((0, 0, 0), (pads[0][0], pads[0][1], 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)))
  d_out = (d + pads[0][0] + pads[0][1] - kd) // sd + 1
  x = _fold_depth(x, kd, sd, d_out, feature_group_count)
  k = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin_g, cout)  # per group: (kd, C/G) as x
  out = lax.conv_general_dilated(x, k, (sh, sw), pads[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=feature_group_count, precision=precision, **kwargs)
  return out.reshape((b, d_out) + out.shape[1:])
