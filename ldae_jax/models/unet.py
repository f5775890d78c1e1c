"""The latent-diffusion UNet eps_theta (reference `src/ldae/nets/unet.py`, guided-diffusion layout), NDHWC.

Module tree mirrors the PyTorch state dict: `time_embed_0`, `time_embed_2`, `input_blocks[i][j]`,
`middle_block[j]`, `output_blocks[i][j]`, `out_0`, `out_2`. Down/upsampling act on Y and Z only.
The forward is split into `embed_time` / `encode` / `middle` / `decode` / `head` so that the ShiftUNet can
run the frozen encoder once and feed its skips to both decoders.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ldae_jax.models.init import dtype_from_name
from ldae_jax.models.layers import (AttentionBlock, GroupNorm, ResBlock, apply_sequence, conv3d, dense,
                                    timestep_embedding)

Array = jax.Array
F32 = jnp.float32


def build_decoder_blocks(block_cls, ch: int, skip_chans: list[int], *, base: int,
                         channel_mult: Sequence[int], num_res_blocks: int,
                         attention_resolutions: Sequence[int], num_heads: int, emb_channels: int,
                         dropout: float, norm_groups: int, dtype, rngs: nnx.Rngs) -> tuple[nnx.List, int]:
  """The `output_blocks` list (shared by the UNet and the ShiftUNet's shift branch with `ResBlockShift`).

  `skip_chans` is consumed from the end (a copy is made). Returns (blocks, channels of the last block).
  """
  skip_chans = list(skip_chans)
  ds = 2 ** (len(channel_mult) - 1)
  blocks = []
  for level, mult in list(enumerate(channel_mult))[::-1]:
    for i in range(num_res_blocks + 1):
      ich = skip_chans.pop()
      layers = [block_cls(ch + ich, emb_channels, base * mult, dropout=dropout, norm_groups=norm_groups,
                          dtype=dtype, rngs=rngs)]
      ch = base * mult
      if ds in attention_resolutions:
        layers.append(AttentionBlock(ch, num_heads, norm_groups=norm_groups, dtype=dtype, rngs=rngs))
      if level and i == num_res_blocks:
        layers.append(block_cls(ch, emb_channels, ch, dropout=dropout, resample="up",
                                norm_groups=norm_groups, dtype=dtype, rngs=rngs))
        ds //= 2
      blocks.append(nnx.List(layers))
  return nnx.List(blocks), ch


def build_middle_block(block_cls, ch: int, *, num_heads: int, emb_channels: int, dropout: float,
                       norm_groups: int, dtype, rngs: nnx.Rngs) -> nnx.List:
  """ResBlock, AttentionBlock, ResBlock at the lowest resolution."""
  kw = dict(dropout=dropout, norm_groups=norm_groups, dtype=dtype, rngs=rngs)
  return nnx.List([block_cls(ch, emb_channels, ch, **kw),
                   AttentionBlock(ch, num_heads, norm_groups=norm_groups, dtype=dtype, rngs=rngs),
                   block_cls(ch, emb_channels, ch, **kw)])


def build_head(ch: int, out_channels: int, *, norm_groups: int, dtype, rngs: nnx.Rngs):
  """`out`: GN -> SiLU -> conv3 (zero-init). Returns (out_0, out_2)."""
  return GroupNorm(ch, norm_groups), conv3d(ch, out_channels, 3, dtype=dtype, rngs=rngs, zero=True)


def apply_head(norm: GroupNorm, conv: nnx.Conv, h: Array, dtype) -> Array:
  return conv(jax.nn.silu(norm(h, out_dtype=F32)).astype(dtype)).astype(F32)


class UNet(nnx.Module):
  """eps_theta(x_t, t): guided-diffusion UNet with scale-shift norm, (1,2,2) resampling, legacy attention."""

  def __init__(self, in_channels: int, base_channels: int, channel_mult: Sequence[int],
               num_res_blocks: int, attention_resolutions: Sequence[int], *, num_heads: int = 1,
               dropout: float = 0.0, norm_groups: int = 32, out_channels: int | None = None,
               dtype=F32, remat: bool = False, v_coefs: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
               rngs: nnx.Rngs):
    self.in_channels = in_channels
    # v-parameterisation (`config.diffusion.prediction="v"`): the head predicts v = sqrt(abar) eps - sqrt(1-abar) x0
    # and `to_eps` returns eps = sqrt(1-abar) x_t + sqrt(abar) v, so every caller still receives eps. Static
    # per-timestep tables (sqrt(1-abar_t), sqrt(abar_t)) as tuples: part of the graph definition, not of the state.
    self.v_coefs = None if v_coefs is None else (tuple(map(float, v_coefs[0])), tuple(map(float, v_coefs[1])))
    self.base_channels = base_channels
    self.channel_mult = tuple(channel_mult)
    self.dtype = dtype
    self.remat = remat
    emb_ch = 4 * base_channels
    out_channels = out_channels or in_channels
    # The time MLP acts on (B, 4*base): float32 (negligible cost, exact embedding).
    self.time_embed_0 = dense(base_channels, emb_ch, dtype=F32, rngs=rngs)
    self.time_embed_2 = dense(emb_ch, emb_ch, dtype=F32, rngs=rngs)

    common = dict(dropout=dropout, norm_groups=norm_groups, dtype=dtype, rngs=rngs)
    ch = int(channel_mult[0] * base_channels)
    blocks = [nnx.List([conv3d(in_channels, ch, 3, dtype=dtype, rngs=rngs)])]
    skip_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        layers = [ResBlock(ch, emb_ch, base_channels * mult, **common)]
        ch = base_channels * mult
        if ds in attention_resolutions:
          layers.append(AttentionBlock(ch, num_heads, norm_groups=norm_groups, dtype=dtype, rngs=rngs))
        blocks.append(nnx.List(layers))
        skip_chans.append(ch)
      if level != len(channel_mult) - 1:
        blocks.append(nnx.List([ResBlock(ch, emb_ch, ch, resample="down", **common)]))
        skip_chans.append(ch)
        ds *= 2
    self.input_blocks = nnx.List(blocks)
    self.skip_channels = tuple(skip_chans)
    self.middle_block = build_middle_block(ResBlock, ch, num_heads=num_heads, emb_channels=emb_ch,
                                           **common)
    self.output_blocks, ch = build_decoder_blocks(
        ResBlock, ch, skip_chans, base=base_channels, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
        num_heads=num_heads, emb_channels=emb_ch, **common)
    self.out_0, self.out_2 = build_head(ch, out_channels, norm_groups=norm_groups, dtype=dtype, rngs=rngs)

  # ----------------------------------------------------------------------- pieces (reused by ShiftUNet)
  def embed_time(self, t: Array) -> Array:
    """t int (B,) -> time embedding (B, 4*base) float32."""
    e = timestep_embedding(t, self.base_channels)
    return self.time_embed_2(jax.nn.silu(self.time_embed_0(e)))

  def encode(self, x: Array, emb: Array, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> list[Array]:
    """Runs `input_blocks`; returns every block's output (the skips; the last one feeds the middle)."""
    kw = dict(deterministic=deterministic, rngs=rngs, remat=self.remat)
    h = x.astype(self.dtype)
    hs = []
    for layers in self.input_blocks:
      h = apply_sequence(layers, h, emb, **kw)
      hs.append(h)
    return hs

  def middle(self, h: Array, emb: Array, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> Array:
    return apply_sequence(self.middle_block, h, emb, deterministic=deterministic, rngs=rngs,
                          remat=self.remat)

  def decode(self, h: Array, hs: Sequence[Array], emb: Array, *, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> Array:
    """Runs `output_blocks`, concatenating [h, skip] (h first) with the skips popped from the end."""
    kw = dict(deterministic=deterministic, rngs=rngs, remat=self.remat)
    for i, layers in enumerate(self.output_blocks):
      h = jnp.concatenate([h, hs[len(hs) - 1 - i]], axis=-1)
      h = apply_sequence(layers, h, emb, **kw)
    return h

  def head(self, h: Array) -> Array:
    """`out`: GN -> SiLU -> conv3, float32 result (eps, or v under the v-parameterisation)."""
    return apply_head(self.out_0, self.out_2, h, self.dtype)

  def to_eps(self, raw: Array, x: Array, t: Array) -> Array:
    """The head's output as predicted noise: itself (reference), or from v at timesteps t (float32)."""
    if self.v_coefs is None:
      return raw
    shape = (t.shape[0],) + (1,) * (raw.ndim - 1)
    c_x, c_v = (jnp.take(jnp.asarray(c, jnp.float32), t.astype(jnp.int32)).reshape(shape) for c in self.v_coefs)
    return c_x * x.astype(F32) + c_v * raw

  def raw(self, x: Array, t: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    """The network's own output (eps, or v under the v-parameterisation), float32."""
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects x of shape (B, X, Y, Z, {self.in_channels}) (NDHWC); got {x.shape}.")
    emb = self.embed_time(t)
    hs = self.encode(x, emb, deterministic=deterministic, rngs=rngs)
    h = self.middle(hs[-1], emb, deterministic=deterministic, rngs=rngs)
    return self.head(self.decode(h, hs, emb, deterministic=deterministic, rngs=rngs))

  def __call__(self, x: Array, t: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> Array:
    """x (B, X, Y, Z, C), t int (B,) -> predicted noise (B, X, Y, Z, C) float32."""
    return self.to_eps(self.raw(x, t, deterministic=deterministic, rngs=rngs), x, t)


def unet_kwargs(config: ml_collections.ConfigDict) -> dict:
  """UNet constructor arguments from `config.unet`, `config.compute_dtype`, `config.remat`; the channels are
  those of what it denoises (`ldae_jax.config.unet_input_shape`)."""
  from ldae_jax.config import unet_input_shape  # pylint: disable=g-import-not-at-top
  u = config.unet
  return dict(in_channels=unet_input_shape(config)[-1], base_channels=u.base_channels, channel_mult=tuple(u.channel_mult),
              num_res_blocks=u.num_res_blocks, attention_resolutions=tuple(u.attention_resolutions),
              num_heads=u.num_heads, dropout=u.dropout, norm_groups=u.norm_groups,
              dtype=dtype_from_name(config.compute_dtype), remat=bool(config.remat), v_coefs=v_coefs(config))


def v_coefs(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(sqrt(1 - abar_t), sqrt(abar_t)) for `config.diffusion.prediction == "v"`, else None (eps, the reference)."""
  prediction = config.diffusion.get("prediction", "eps")
  if prediction == "eps":
    return None
  if prediction != "v":
    raise ValueError(f"config.diffusion.prediction={prediction!r}: 'eps' (reference) or 'v'.")
  from ldae_jax.diffusion import schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  t64 = schedule_lib.tables_f64(config.diffusion)  # numpy: also callable while nnx.eval_shape traces
  return tuple(t64["sqrt_one_minus_alphas_cumprod"].tolist()), tuple(t64["sqrt_alphas_cumprod"].tolist())


def build_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> UNet:
  """The stage-2 UNet for `config` (use `nnx.eval_shape(lambda: build_unet(c, nnx.Rngs(0)))` to size it)."""
  return UNet(**unet_kwargs(config), rngs=rngs)
