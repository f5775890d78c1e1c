"""3D PatchGAN discriminator (stage 1) with MONAI-Generative `PatchDiscriminator` semantics, NDHWC.

Layers (kernel 4, explicit padding 1 on both sides, LeakyReLU 0.2):
  initial_conv: conv stride 2 with bias, no norm;
  layers[i]:    conv (no bias) -> BatchNorm (eps 1e-5) -> LeakyReLU, stride 2 except the last (stride 1),
                channels doubling from `channels`;
  final_conv:   conv stride 1 with bias, no activation (least-squares GAN logits).
The call returns every child's output, as MONAI does; the last item is the logits. For a 128x160x128 volume
with 3 middle layers the logits are 14x18x14.

BatchNorm is `nnx.BatchNorm` (running statistics are `nnx.BatchStat`, momentum 0.9 = PyTorch's 0.1). One
difference from PyTorch, harmless for the GAN: Flax's running variance is updated with the biased batch
variance, PyTorch's with the unbiased one; normalisation itself uses the biased variance in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ldae_jax.models.conv import conv_general_dilated
from ldae_jax.models.init import dtype_from_name

_PAD = ((1, 1), (1, 1), (1, 1))
_conv_init = nnx.initializers.normal(0.02)  # MONAI initialise_weights: N(0, 0.02) for every conv weight


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # MONAI: BatchNorm weight N(1, 0.02)


def _conv(in_ch: int, out_ch: int, stride: int, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, (4, 4, 4), strides=(stride,) * 3, padding=_PAD, use_bias=use_bias,
                  kernel_init=_conv_init, bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                  param_dtype=jnp.float32, conv_general_dilated=conv_general_dilated, rngs=rngs)


class ConvOnly(nnx.Module):
  """MONAI `Convolution` with a bias and no norm; `.conv` mirrors `<name>.conv.weight`."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, activation: bool, dtype, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, stride, True, dtype, rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    return nnx.leaky_relu(x, 0.2) if self.activation else x


class ConvNormAct(nnx.Module):
  """conv (no bias) -> BatchNorm -> LeakyReLU(0.2); `.conv` / `.norm` mirror `<i>.conv` / `<i>.adn.N`."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, stride, False, dtype, rngs)
    self.norm = nnx.BatchNorm(out_ch, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                              param_dtype=jnp.float32, scale_init=_bn_scale_init,
                              bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.norm(self.conv(x), use_running_average=not train)
    return nnx.leaky_relu(x, 0.2)


class PatchDiscriminator(nnx.Module):
  """PatchGAN on (B, X, Y, Z, C) volumes; returns the list of every layer's output, logits last."""

  def __init__(self, *, in_channels: int = 1, channels: int = 64, num_layers: int = 3, out_channels: int = 1,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if num_layers < 1:
      raise ValueError(f"config.discriminator.num_layers={num_layers}: need at least 1 middle layer.")
    self.in_channels = in_channels
    self.dtype = dtype
    self.initial_conv = ConvOnly(in_channels, channels, 2, activation=True, dtype=dtype, rngs=rngs)
    layers, ch = [], channels
    for i in range(num_layers):
      stride = 1 if i == num_layers - 1 else 2
      layers.append(ConvNormAct(ch, ch * 2, stride, dtype=dtype, rngs=rngs))
      ch *= 2
    self.layers = nnx.List(layers)
    self.final_conv = ConvOnly(ch, out_channels, 1, activation=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    """`train=True` normalises with batch statistics and updates the running ones; False uses the stored ones."""
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"PatchDiscriminator expects (B, X, Y, Z, {self.in_channels}) NDHWC input, got {x.shape}.")
    feats = [self.initial_conv(x.astype(self.dtype))]
    for layer in self.layers:
      feats.append(layer(feats[-1], train=train))
    feats.append(self.final_conv(feats[-1]).astype(jnp.float32))
    return feats


def build_discriminator(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PatchDiscriminator:
  """PatchDiscriminator from `config.discriminator` and `config.compute_dtype`."""
  d = config.discriminator
  return PatchDiscriminator(in_channels=d.in_channels, channels=d.channels, num_layers=d.num_layers,
                            dtype=dtype_from_name(config.compute_dtype), rngs=rngs)
