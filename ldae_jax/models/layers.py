"""Building blocks of the LDAE UNet family (guided-diffusion / PDAE style), NDHWC.

Attribute names mirror the PyTorch module paths (`in_layers.0` -> `in_layers_0`, ...) so that the weight
conversion in `ldae_jax.convert.unet` is a mechanical renaming. Parameters are float32; activations run in
the module's `dtype` (the config's compute dtype). Normalisation statistics, the softmax, the time
embedding and the scale/shift modulation are computed in float32 whatever that dtype is: they are cheap
elementwise/reduction work that XLA fuses, and bf16 there costs accuracy for no speed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldae_jax.models.conv import conv_general_dilated
from ldae_jax.models.init import torch_bias_init, torch_kernel_init, zeros_init

Array = jax.Array
F32 = jnp.float32


# ----------------------------------------------------------------------------------------- pure functions
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, eps: float,
               out_dtype: Any = None) -> Array:
  """GroupNorm over contiguous channel groups (as torch.nn.GroupNorm), statistics in float32.

  Variance uses E[x^2]-E[x]^2 (clipped at 0) like Flax's default, so both statistics come out of one pass over
  the activations. The sums run per channel first (a reduction over voxels with the channels contiguous,
  which vectorises; reducing (B, N, G, C/G) over N and C/G directly made XLA's CPU backend crawl at
  C/G = 4) and are then added up per group on the tiny (B, C) arrays; the normalisation and the affine are
  folded into one per-channel multiply-add, y = x * a + b, which fuses with the activation that follows.

  Args:
    x: (B, ..., C) in any float dtype.
    scale, bias: (C,) affine parameters.
    num_groups: G; must divide C.
    eps: added to the variance.
    out_dtype: dtype of the result; default x.dtype.
  """
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(f"GroupNorm: {c} channels are not divisible by {num_groups} groups.")
  per = c // num_groups
  xf = x.astype(F32).reshape(b, -1, c)
  n = xf.shape[1] * per
  mean = jnp.sum(xf, axis=1).reshape(b, num_groups, per).sum(-1) / n  # (B, G)
  var = jnp.maximum(jnp.sum(jnp.square(xf), axis=1).reshape(b, num_groups, per).sum(-1) / n
                    - jnp.square(mean), 0.0)
  a = jnp.repeat(jax.lax.rsqrt(var + eps), per, axis=1) * scale.astype(F32)  # (B, C)
  shift = bias.astype(F32) - jnp.repeat(mean, per, axis=1) * a
  y = xf * a[:, None] + shift[:, None]
  return y.reshape(x.shape).astype(out_dtype or x.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [cos(t f), sin(t f)] (cos first), f_i = exp(-ln(max_period) i / (dim/2)).

  Computed in float32 with the reference's operation order (the reference hard-codes float32 here, even
  in its float64 runs), so integer timesteps give the reference's values to the last ulp or so.
  Returns (B, dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=F32) / jnp.float32(half))
  args = jnp.asarray(t).astype(F32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def avg_pool_122(x: Array) -> Array:
  """AvgPool3d kernel = stride = (1, 2, 2) on (X, Y, Z): X is never pooled (reference convention)."""
  b, d, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"UNet downsampling needs even Y and Z; got spatial shape {(d, h, w)}.")
  return jnp.mean(x.reshape(b, d, h // 2, 2, w // 2, 2, c), axis=(3, 5), dtype=F32).astype(x.dtype)


def upsample_122(x: Array) -> Array:
  """Nearest-neighbour upsampling x(1, 2, 2), as broadcast + reshape (no gather)."""
  b, d, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, d, h, 2, w, 2, c))
  return x.reshape(b, d, 2 * h, 2 * w, c)


# ----------------------------------------------------------------------------------------- layers
def conv3d(cin: int, cout: int, kernel: int, *, dtype, rngs: nnx.Rngs, zero: bool = False) -> nnx.Conv:
  """3D conv with 'same' padding and PyTorch-default (or zero) init; params float32, compute `dtype`."""
  fan_in = cin * kernel**3
  pad = kernel // 2
  return nnx.Conv(cin, cout, (kernel,) * 3, padding=((pad, pad),) * 3, dtype=dtype, param_dtype=F32,
                  kernel_init=zeros_init if zero else torch_kernel_init,
                  bias_init=zeros_init if zero else torch_bias_init(fan_in),
                  conv_general_dilated=conv_general_dilated, rngs=rngs)


def dense(cin: int, cout: int, *, dtype, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
  """Linear over the last axis (also used for the reference's 1x1(x1) convs) with PyTorch-default init."""
  return nnx.Linear(cin, cout, dtype=dtype, param_dtype=F32,
                    kernel_init=zeros_init if zero else torch_kernel_init,
                    bias_init=zeros_init if zero else torch_bias_init(cin), rngs=rngs)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm(num_groups, C, eps) with float32 statistics (`group_norm`)."""

  def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups "
                       "(config.unet.norm_groups).")
    self.num_groups = num_groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((num_channels,), F32))
    self.bias = nnx.Param(jnp.zeros((num_channels,), F32))

  def __call__(self, x: Array, out_dtype: Any = None) -> Array:
    return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps, out_dtype)


class ResBlock(nnx.Module):
  """Guided-diffusion ResBlock with scale-shift norm, optional (1,2,2) down/up resampling.

  in_layers: GN -> SiLU -> [resample] -> conv3; emb_layers: SiLU -> Linear(emb, 2*out) = (scale, shift);
  out_layers: GN(h)*(1+scale)+shift -> SiLU -> Dropout -> conv3 (zero-init); skip: identity, or a 1x1x1
  conv (a Dense over channels) when the channel count changes, applied to the same resampled input.
  """

  def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
               dropout: float = 0.0, resample: str | None = None, norm_groups: int = 32,
               eps: float = 1e-5, dtype=F32, rngs: nnx.Rngs):
    if resample not in (None, "down", "up"):
      raise ValueError(f"ResBlock resample={resample!r}: None, 'down' or 'up'.")
    out_channels = out_channels or channels
    self.resample = resample
    self.dtype = dtype
    self.in_layers_0 = GroupNorm(channels, norm_groups, eps)
    self.in_layers_2 = conv3d(channels, out_channels, 3, dtype=dtype, rngs=rngs)
    # The embedding path is (B, emb) sized: float32 costs nothing and keeps scale/shift exact.
    self.emb_layers_1 = dense(emb_channels, 2 * out_channels, dtype=F32, rngs=rngs)
    self.out_layers_0 = GroupNorm(out_channels, norm_groups, eps)
    self.out_layers_2 = nnx.Dropout(dropout, rngs=rngs)
    self.out_layers_3 = conv3d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs, zero=True)
    self.skip_connection = (dense(channels, out_channels, dtype=dtype, rngs=rngs)
                            if out_channels != channels else None)

  def _resample(self, x: Array) -> Array:
    if self.resample == "down":
      return avg_pool_122(x)
    if self.resample == "up":
      return upsample_122(x)
    return x

  def _modulate(self, h: Array, emb: Array, z_emb: Array | None) -> Array:
    """GN(h)*(1+scale)+shift in float32; `ResBlockShift` adds the second modulation."""
    scale, shift = jnp.split(self.emb_layers_1(jax.nn.silu(emb.astype(F32))), 2, axis=-1)
    h = self.out_layers_0(h, out_dtype=F32)
    return h * (1.0 + scale[:, None, None, None, :]) + shift[:, None, None, None, :]

  def __call__(self, x: Array, emb: Array, z_emb: Array | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    x = x.astype(self.dtype)
    h = jax.nn.silu(self.in_layers_0(x, out_dtype=F32)).astype(self.dtype)
    h = self._resample(h)
    x = self._resample(x)
    h = self.in_layers_2(h)
    h = jax.nn.silu(self._modulate(h, emb, z_emb)).astype(self.dtype)
    h = self.out_layers_2(h, deterministic=deterministic, rngs=rngs)
    h = self.out_layers_3(h)
    skip = x if self.skip_connection is None else self.skip_connection(x)
    return skip + h


class ResBlockShift(ResBlock):
  """ResBlock of the ShiftUNet's gradient estimator: the norm is modulated twice.

  h = (1 + z_scale) * (GN(h) * (1 + scale) + shift) + z_shift, with (scale, shift) from the time embedding
  (`emb_layers`) and (z_scale, z_shift) = chunk(emb_z_layers(shift_emb), 2) from the semantic embedding
  (`shift_unet_tiny.json` notes; checked against its outputs).
  """

  def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(channels, emb_channels, out_channels, rngs=rngs, **kwargs)
    self.emb_z_layers_1 = dense(emb_channels, 2 * (out_channels or channels), dtype=F32, rngs=rngs)

  def _modulate(self, h: Array, emb: Array, z_emb: Array | None) -> Array:
    if z_emb is None:
      raise ValueError("ResBlockShift needs the semantic embedding z_emb (label_emb(y)).")
    h = super()._modulate(h, emb, None)
    z_scale, z_shift = jnp.split(self.emb_z_layers_1(jax.nn.silu(z_emb.astype(F32))), 2, axis=-1)
    return (1.0 + z_scale[:, None, None, None, :]) * h + z_shift[:, None, None, None, :]


class AttentionBlock(nnx.Module):
  """Legacy guided-diffusion self-attention over all voxels (QKVAttentionLegacy order).

  GN -> qkv (Dense C->3C; per head the channels are [q; k; v]) -> softmax(q k^T / sqrt(ch)) v ->
  proj_out (Dense C->C, zero-init) -> residual. The attention core is `jax.nn.dot_product_attention`,
  which keeps logits and softmax in float32 under bf16 (and can use a fused kernel on GPU).
  """

  def __init__(self, channels: int, num_heads: int = 1, *, norm_groups: int = 32, eps: float = 1e-5,
               dtype=F32, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f"AttentionBlock: {channels} channels not divisible by num_heads={num_heads} "
                       "(config.unet.num_heads).")
    self.num_heads = num_heads
    self.dtype = dtype
    self.norm = GroupNorm(channels, norm_groups, eps)
    self.qkv = dense(channels, 3 * channels, dtype=dtype, rngs=rngs)
    self.proj_out = dense(channels, channels, dtype=dtype, rngs=rngs, zero=True)

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    b, c = x.shape[0], x.shape[-1]
    heads = self.num_heads
    qkv = self.qkv(self.norm(x).reshape(b, -1, c))  # (B, T, 3C)
    qkv = qkv.reshape(b, qkv.shape[1], heads, 3, c // heads)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (B, T, H, ch) each
    a = jax.nn.dot_product_attention(q, k, v)
    h = self.proj_out(a.reshape(b, -1, c))
    return x + h.reshape(x.shape)


def apply_layer(layer: nnx.Module, h: Array, emb: Array, z_emb: Array | None = None, *,
                deterministic: bool = True, rngs: nnx.Rngs | None = None, remat: bool = False) -> Array:
  """Calls one entry of a TimestepEmbedSequential: ResBlocks get (emb, z_emb), others only h.

  With `remat`, ResBlocks and attention blocks run under `nnx.remat`, so their activations are recomputed
  in the backward pass instead of stored (the big 3D feature maps dominate memory at paper size).
  """
  if isinstance(layer, ResBlock):
    def fn(m, h, emb, z_emb, rngs):
      return m(h, emb, z_emb, deterministic=deterministic, rngs=rngs)
    args = (layer, h, emb, z_emb, rngs)
  elif isinstance(layer, AttentionBlock):
    def fn(m, h):
      return m(h)
    args = (layer, h)
  else:
    return layer(h)
  if remat:
    fn = nnx.remat(fn)
  return fn(*args)


def apply_sequence(layers: Sequence[nnx.Module], h: Array, emb: Array, z_emb: Array | None = None,
                   **kwargs) -> Array:
  for layer in layers:
    h = apply_layer(layer, h, emb, z_emb, **kwargs)
  return h



def materialize_rng_state(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Gives concrete values to the RNG streams of a model built with `nnx.eval_shape`.

  Building a network abstractly and then loading converted/checkpointed weights avoids drawing (and, on
  CPU, compiling) hundreds of random initialisers - half a minute for the tiny UNet, gigabytes at paper
  size. Only the dropout streams (`RngKey`/`RngCount`) are then still abstract; they get
  `fold_in(key(seed), i)` and count 0 here. Any other variable still abstract (a parameter nobody filled)
  is an error. Works in place and returns `model`.
  """
  state = nnx.state(model)
  base = jax.random.key(seed)
  missing = []
  for i, (path, var) in enumerate(nnx.to_flat_state(state)):
    value = var.get_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
      continue
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.fold_in(base, i))
    elif isinstance(var, nnx.RngCount):
      var.set_value(jnp.zeros(value.shape, value.dtype))
    else:
      missing.append("/".join(map(str, path)))
  if missing:
    raise ValueError(f"{len(missing)} variables are still abstract (never loaded): {missing[:10]}; load "
                     "the weights (convert / load_converted) before materializing.")
  nnx.update(model, state)
  return model
