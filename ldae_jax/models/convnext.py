"""ConvNeXt backbone with torchvision semantics (the semantic encoder's per-slice 2D network), NHWC.

torchvision's `ConvNeXt` with the classifier's last Linear replaced by the identity (as the reference does):
  features[0]        stem ("patchify"): conv 4x4 stride 4 (VALID) -> LayerNorm2d (eps 1e-6); `patch_size`
                     changes 4 for slices at a coarser spacing than the paper's 1.5 mm (see below)
  features[1, 3, ..] stages: CNBlocks
  features[2, 4, ..] downsampling: LayerNorm2d -> conv 2x2 stride 2 (VALID; floor, 5 -> 2)
  classifier_0       global average pool -> LayerNorm2d; output (N, dims[-1])
CNBlock = depthwise 7x7 (pad 3) -> LayerNorm -> Linear(d, 4d) -> exact (erf) GELU -> Linear(4d, d) ->
x layer_scale -> stochastic depth ('row': one Bernoulli per image, survivors scaled by 1/(1-p)) -> + input.
The drop probability grows linearly from 0 at the first block to `stochastic_depth` at the last, over all
blocks of all stages, as in torchvision. The stem takes `in_channels` (1: grayscale MRI slices).

`patch_size` (default 4, torchvision's and the reference's) is the stem's kernel and stride. The paper's
128x160 slices give 32x40 -> 16x20 -> 8x10 -> 4x5 feature maps; a volume resampled k times coarser needs a
patch k times smaller to keep those maps (and the anatomy each position sees): 6 mm slices (32x40) need patch
1, or they shrink to 1x1 by the last stage. The quickstart keeps 4 all the same: at 6 mm patch 1 trained 4.5x
slower and did not improve its probes (docs/fidelity.md).

The Flax names mirror torchvision's keys: `features.1.0.block.3.weight` is `features[1][0].block_3.kernel`,
`features.0.0.weight` is `features[0][0].kernel`, `classifier.0.weight` is `classifier_0.scale`; see
`ldae_jax.convert.semantic_encoder.convnext_key_map`. Initialisation follows torchvision (truncated normal
std 0.02 for conv/linear weights, zero biases, layer scale 1e-6; Flax truncates at 2 std where torch
truncates at +-2 absolute, which for std 0.02 is immaterial) except for the stem's bias, which starts from
PyTorch's default U(+-1/sqrt(fan_in)). With torchvision's zero bias, every patch of background (exact zeros,
~80 % of a skull-stripped slice) leaves the stem as an all-zero vector, the LayerNorm after it divides by
sqrt(eps) = 1e-3, and so does every later LayerNorm those positions pass: the encoder's gradient at
initialisation measured 4e13 (quickstart encoder, 4 scans), nearly all on the stem bias, where a random
bias gives 3e3. Under global-norm clipping such a step moves only that bias and starves everything else.
The reference never meets this: its backbone starts from ImageNet weights, whose stem bias is non-zero.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldae_jax.models.conv import conv_general_dilated
from ldae_jax.models.init import torch_bias_init

_w_init = nnx.initializers.truncated_normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()


def _layer_norm(ch: int, dtype, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
  # Statistics in float32 (Flax promotes), two-pass variance as PyTorch.
  return nnx.LayerNorm(ch, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                       rngs=rngs)


def _conv2d(in_ch: int, out_ch: int, k: int, *, stride: int = 1, padding="VALID", groups: int = 1, dtype,
            rngs: nnx.Rngs, bias_init=_zeros) -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, (k, k), strides=(stride, stride), padding=padding, feature_group_count=groups,
                  kernel_init=_w_init, bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32,
                  conv_general_dilated=conv_general_dilated, rngs=rngs)


def stochastic_depth(x: jax.Array, p: float, key: jax.Array | None) -> jax.Array:
  """torchvision StochasticDepth 'row' mode: drop each sample's residual with prob p, scale survivors."""
  if key is None or p == 0.0:
    return x
  survival = 1.0 - p
  keep = jax.random.bernoulli(key, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
  scale = 1.0 / survival if survival > 0.0 else 0.0
  return x * (keep.astype(x.dtype) * jnp.asarray(scale, x.dtype))


def drop_probabilities(depths: Sequence[int], stochastic_depth_prob: float) -> list[float]:
  """Per-block drop probability, linear from 0 to `stochastic_depth_prob` over all blocks (torchvision)."""
  total = sum(depths)
  if total <= 1:
    return [0.0] * total
  return [stochastic_depth_prob * i / (total - 1.0) for i in range(total)]


class CNBlock(nnx.Module):
  """ConvNeXt block; `block_0/2/3/5` mirror torchvision's `block.0/2/3/5` (1, 4, 6 hold no parameters)."""

  def __init__(self, dim: int, drop_prob: float, *, layer_scale: float = 1e-6, dtype, rngs: nnx.Rngs):
    self.block_0 = _conv2d(dim, dim, 7, padding=((3, 3), (3, 3)), groups=dim, dtype=dtype, rngs=rngs)
    self.block_2 = _layer_norm(dim, dtype, rngs)
    self.block_3 = nnx.Linear(dim, 4 * dim, kernel_init=_w_init, bias_init=_zeros, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.block_5 = nnx.Linear(4 * dim, dim, kernel_init=_w_init, bias_init=_zeros, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
    self.drop_prob = drop_prob

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key=None` is the deterministic (eval) path; with a key, stochastic depth is active."""
    h = self.block_0(x)
    h = self.block_2(h)
    h = jax.nn.gelu(self.block_3(h), approximate=False)  # torch nn.GELU() is the exact erf form
    h = self.block_5(h)
    h = h * self.layer_scale[...].astype(h.dtype)
    return x + stochastic_depth(h, self.drop_prob, key)


def _call_block(block: CNBlock, x: jax.Array, key: jax.Array | None) -> jax.Array:
  return block(x, key)


_call_block_remat = nnx.remat(_call_block)


class ConvNeXt(nnx.Module):
  """(N, H, W, in_channels) images -> (N, dims[-1]) features (pooled, LayerNorm2d; no final Linear)."""

  def __init__(self, *, in_channels: int = 1, dims: Sequence[int] = (96, 192, 384, 768),
               depths: Sequence[int] = (3, 3, 27, 3), stochastic_depth_prob: float = 0.0,
               layer_scale: float = 1e-6, patch_size: int = 4, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    if len(dims) != len(depths) or not dims:
      raise ValueError(f"config.encoder.dims {tuple(dims)} and config.encoder.depths {tuple(depths)} must be "
                       "non-empty and of equal length (one entry per ConvNeXt stage).")
    self.dtype = dtype
    self.remat = remat
    self.in_channels = in_channels
    if patch_size < 1:
      raise ValueError(f"config.encoder.patch_size={patch_size} must be a positive integer (torchvision: 4).")
    self.patch_size = patch_size
    probs = iter(drop_probabilities(depths, stochastic_depth_prob))
    # Stem bias: PyTorch's default U(+-1/sqrt(fan_in)), not torchvision's zeros (see the module docstring).
    stem = _conv2d(in_channels, dims[0], patch_size, stride=patch_size, dtype=dtype, rngs=rngs,
                   bias_init=torch_bias_init(in_channels * patch_size * patch_size))
    features: list = [nnx.List([stem, _layer_norm(dims[0], dtype, rngs)])]
    kinds = ["stem"]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      features.append(nnx.List([CNBlock(dim, next(probs), layer_scale=layer_scale, dtype=dtype, rngs=rngs)
                                for _ in range(depth)]))
      kinds.append("stage")
      if i + 1 < len(dims):
        features.append(nnx.List([_layer_norm(dim, dtype, rngs),
                                  _conv2d(dim, dims[i + 1], 2, stride=2, dtype=dtype, rngs=rngs)]))
        kinds.append("down")
    self.features = nnx.List(features)
    self.kinds = tuple(kinds)
    self.classifier_0 = _layer_norm(dims[-1], dtype, rngs)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """`key=None`: eval (no stochastic depth). Returns float32 (N, dims[-1])."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ConvNeXt expects (N, H, W, {self.in_channels}) images, got {x.shape}.")
    x = x.astype(self.dtype)
    n_block = 0
    for kind, feat in zip(self.kinds, self.features):
      if kind != "stage":  # stem: conv -> LN; downsampling: LN -> conv
        x = feat[1](feat[0](x))
        continue
      for block in feat:
        k = None if key is None else jax.random.fold_in(key, n_block)
        x = _call_block_remat(block, x, k) if self.remat else block(x, k)
        n_block += 1
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # global average pool, accumulated in float32
    return self.classifier_0(x).astype(jnp.float32)
