"""3D AutoencoderKL (stage 1) with MONAI-Generative semantics, NDHWC.

The reference is MONAI-Generative's `AutoencoderKL` (spatial_dims 3, no attention). Its quirks are kept on
purpose, because the released LDAE checkpoints were trained with them:
  * Downsample = zero-pad (0, 1) at the *end* of each spatial axis, then a stride-2 VALID conv (not SAME).
  * Upsample = nearest x2 on all three axes, then a 3x3x3 conv.
  * The encoder and decoder tails go GroupNorm -> conv with no activation in between.
  * log sigma^2 is clamped to [-30, 20] before sigma = exp(log sigma^2 / 2).
Attribute names mirror the PyTorch module paths (`encoder.blocks[i].conv1.conv`, `quant_conv_mu.conv`, ...)
so that `ldae_jax.convert.autoencoder.key_map` is mechanical.

Parameters are float32; activations run in `config.compute_dtype`; GroupNorm statistics are float32 (Flax
computes normalisation statistics in at least float32); mu, sigma and the reconstruction are returned in
float32 because the latents and the losses are.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ldae_jax.models.conv import conv_general_dilated
from ldae_jax.models.init import dtype_from_name, torch_bias_init, torch_kernel_init

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class Conv(nnx.Module):
  """MONAI `Convolution(conv_only=True)`: a wrapper whose only child is `.conv` (mirrors `<name>.conv.weight`)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, strides: int = 1, padding="SAME",
               dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = in_ch * kernel**3
    self.conv = nnx.Conv(in_ch, out_ch, (kernel,) * 3, strides=(strides,) * 3, padding=padding,
                         kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                         dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=conv_general_dilated,
                         rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def _group_norm(ch: int, groups: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  if ch % groups:
    raise ValueError(f"config.autoencoder.norm_groups={groups} does not divide the channel count {ch} "
                     "(config.autoencoder.channels); pick a divisor.")
  # use_fast_variance=False: E[(x-mu)^2], as PyTorch, instead of E[x^2]-mu^2 (cancellation on large means).
  return nnx.GroupNorm(ch, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class ResBlock(nnx.Module):
  """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus the input (1x1x1 `nin_shortcut` when channels change)."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, eps: float, dtype, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_ch, groups, eps, dtype, rngs)
    self.conv1 = Conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.norm2 = _group_norm(out_ch, groups, eps, dtype, rngs)
    self.conv2 = Conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.nin_shortcut = Conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
    return skip + h


class Downsample(nnx.Module):
  """Zero-pad one voxel at the end of each spatial axis, then conv3 stride 2 VALID (MONAI's asymmetric pad)."""

  def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
    self.conv = Conv(ch, ch, 3, strides=2, padding=((0, 1), (0, 1), (0, 1)), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 on the three spatial axes of an NDHWC array."""
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class Upsample(nnx.Module):
  """Nearest x2 then conv3 (MONAI with use_convtranspose=False)."""

  def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
    self.conv = Conv(ch, ch, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(upsample_nearest(x))


def _run_blocks(blocks: nnx.List, x: jax.Array, remat: bool) -> jax.Array:
  for block in blocks:
    if remat and isinstance(block, ResBlock):
      x = nnx.remat(lambda m, h: m(h))(block, x)
    else:
      x = block(x)
  return x


class Encoder(nnx.Module):
  """conv3 -> per level: ResBlocks (+ Downsample except the last) -> GN -> conv3 to latent channels."""

  def __init__(self, in_ch: int, channels: Sequence[int], latent_ch: int, num_res_blocks: int, *,
               groups: int, eps: float, dtype, remat: bool, rngs: nnx.Rngs):
    self.remat = remat
    blocks = [Conv(in_ch, channels[0], 3, dtype=dtype, rngs=rngs)]
    ch = channels[0]
    for i, out_ch in enumerate(channels):
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(ch, out_ch, groups=groups, eps=eps, dtype=dtype, rngs=rngs))
        ch = out_ch
      if i != len(channels) - 1:
        blocks.append(Downsample(ch, dtype=dtype, rngs=rngs))
    blocks.append(_group_norm(ch, groups, eps, dtype, rngs))
    blocks.append(Conv(ch, latent_ch, 3, dtype=dtype, rngs=rngs))  # no activation before it (MONAI)
    self.blocks = nnx.List(blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _run_blocks(self.blocks, x, self.remat)


class Decoder(nnx.Module):
  """conv3 from latent -> per level (reversed channels): ResBlocks (+ Upsample except the last) -> GN -> conv3."""

  def __init__(self, channels: Sequence[int], latent_ch: int, out_ch: int, num_res_blocks: int, *,
               groups: int, eps: float, dtype, remat: bool, rngs: nnx.Rngs):
    self.remat = remat
    rev = list(reversed(channels))
    blocks = [Conv(latent_ch, rev[0], 3, dtype=dtype, rngs=rngs)]
    ch = rev[0]
    for i, level_ch in enumerate(rev):
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(ch, level_ch, groups=groups, eps=eps, dtype=dtype, rngs=rngs))
        ch = level_ch
      if i != len(rev) - 1:
        blocks.append(Upsample(ch, dtype=dtype, rngs=rngs))
    blocks.append(_group_norm(ch, groups, eps, dtype, rngs))
    blocks.append(Conv(ch, out_ch, 3, dtype=dtype, rngs=rngs))  # linear output, no activation
    self.blocks = nnx.List(blocks)

  def __call__(self, z: jax.Array) -> jax.Array:
    return _run_blocks(self.blocks, z, self.remat)


class AutoencoderKL(nnx.Module):
  """KL-regularised 3D autoencoder: (B, X, Y, Z, 1) <-> (B, X/f, Y/f, Z/f, latent), f = 2**(levels-1)."""

  def __init__(self, *, in_channels: int = 1, channels: Sequence[int] = (64, 128, 128, 128),
               latent_channels: int = 3, num_res_blocks: int = 2, norm_groups: int = 32,
               norm_eps: float = 1e-6, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    if not channels:
      raise ValueError("config.autoencoder.channels is empty: give one channel count per level.")
    self.in_channels = in_channels
    self.downsample_factor = 2 ** (len(channels) - 1)
    kw = dict(groups=norm_groups, eps=norm_eps, dtype=dtype, remat=remat, rngs=rngs)
    self.encoder = Encoder(in_channels, channels, latent_channels, num_res_blocks, **kw)
    self.decoder = Decoder(channels, latent_channels, in_channels, num_res_blocks, **kw)
    # The three 1x1x1 convs run in float32: they are tiny and their outputs are the stored latents.
    self.quant_conv_mu = Conv(latent_channels, latent_channels, 1, dtype=jnp.float32, rngs=rngs)
    self.quant_conv_log_sigma = Conv(latent_channels, latent_channels, 1, dtype=jnp.float32, rngs=rngs)
    self.post_quant_conv = Conv(latent_channels, latent_channels, 1, dtype=jnp.float32, rngs=rngs)
    self.dtype = dtype

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"AutoencoderKL expects (B, X, Y, Z, {self.in_channels}) NDHWC volumes, got {x.shape}.")
    bad = [s for s in x.shape[1:4] if s % self.downsample_factor]
    if bad:
      raise ValueError(f"AutoencoderKL input spatial shape {x.shape[1:4]} is not divisible by the "
                       f"downsampling factor {self.downsample_factor} (config.data.image_shape).")

  def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu, log sigma^2) in float32, the log-variance clamped to [-30, 20] as in the reference."""
    self._check_input(x)
    h = self.encoder(x.astype(self.dtype)).astype(jnp.float32)
    mu = self.quant_conv_mu(h)
    logvar = jnp.clip(self.quant_conv_log_sigma(h), LOGVAR_MIN, LOGVAR_MAX)
    return mu, logvar

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mu, sigma), sigma = exp(clamped log sigma^2 / 2)."""
    mu, logvar = self.encode_moments(x)
    return mu, jnp.exp(logvar / 2)

  @staticmethod
  def sample(mu: jax.Array, sigma: jax.Array, key: jax.Array) -> jax.Array:
    """Reparameterised draw z = mu + sigma * eps, eps ~ N(0, I)."""
    return mu + sigma * jax.random.normal(key, mu.shape, mu.dtype)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent (B, x, y, z, C) -> reconstruction (B, X, Y, Z, 1) in float32 (linear output, no clamp)."""
    h = self.post_quant_conv(z.astype(jnp.float32))
    return self.decoder(h.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reconstruction of a sampled z, mu, sigma), as MONAI's `forward`."""
    mu, sigma = self.encode(x)
    return self.decode(self.sample(mu, sigma, key)), mu, sigma


def build_autoencoder(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> AutoencoderKL:
  """AutoencoderKL from `config.autoencoder`, `config.compute_dtype` and `config.remat`."""
  a = config.autoencoder
  return AutoencoderKL(in_channels=a.in_channels, channels=tuple(a.channels), latent_channels=a.latent_channels,
                       num_res_blocks=a.num_res_blocks, norm_groups=a.norm_groups, norm_eps=a.norm_eps,
                       dtype=dtype_from_name(config.compute_dtype), remat=bool(config.remat), rngs=rngs)
