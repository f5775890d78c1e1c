"""The reference's stage-2 UNet in PyTorch (guided-diffusion layout; the reference spec's section 1.3), for
same-box speed comparisons only: `cpu_ops.py --nets torch_unet` times it beside the project's UNet.

Written from the spec, with the reference's state-dict keys (`input_blocks.4.0.in_layers.2.weight`, ...), so that
`ldae_jax.convert.unet.convert` loads its weights into `ldae_jax.models.UNet` and `check_against_project` can
compare the two forwards: the timed network is the one the project implements, operation for operation.
PyTorch is a benchmark-only extra, never a dependency of the package.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _norm(channels: int, groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(groups, channels, eps=1e-5)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
  """GN-SiLU-conv, scale-shift GN, SiLU, dropout, conv; (1,2,2) resampling on the last two axes."""

  def __init__(self, ch: int, emb_ch: int, out: int, groups: int, resample: str = ""):
    super().__init__()
    self.resample = resample
    self.in_layers = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv3d(ch, out, 3, padding=1))
    self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out))
    self.out_layers = nn.Sequential(_norm(out, groups), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(out, out, 3, padding=1))
    self.skip_connection = nn.Identity() if out == ch else nn.Conv3d(ch, out, 1)

  def _resample(self, x):
    if self.resample == "down":
      return F.avg_pool3d(x, (1, 2, 2), (1, 2, 2))
    if self.resample == "up":
      return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
    return x

  def forward(self, x, emb):
    if self.resample:
      h = self.in_layers[1](self.in_layers[0](x))
      h, x = self._resample(h), self._resample(x)
      h = self.in_layers[2](h)
    else:
      h = self.in_layers(x)
    scale, shift = self.emb_layers(emb)[..., None, None, None].chunk(2, dim=1)
    h = self.out_layers[0](h) * (1 + scale) + shift
    h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
    return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
  """Legacy one-head attention over every voxel: GN, qkv (1x1 conv1d), softmax(q k / sqrt(C)) v, proj_out."""

  def __init__(self, ch: int, groups: int):
    super().__init__()
    self.norm = _norm(ch, groups)
    self.qkv = nn.Conv1d(ch, 3 * ch, 1)
    self.proj_out = nn.Conv1d(ch, ch, 1)

  def forward(self, x):
    b, c, *spatial = x.shape
    qkv = self.qkv(self.norm(x).reshape(b, c, -1))
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(c))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v)
    return x + self.proj_out(a).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.ModuleList):
  """Layers of one block; ResBlocks also get the time embedding (the reference's class of that name)."""

  def forward(self, h, emb):
    for layer in self:
      h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


class UNet(nn.Module):
  """eps_theta(x, t) on NCDHW latents; the module tree (and so the state dict) is the reference's."""

  def __init__(self, in_channels: int, base: int, channel_mult, num_res_blocks: int, attention_resolutions,
               groups: int = 32):
    super().__init__()
    emb_ch = 4 * base
    self.base = base
    self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    ch = channel_mult[0] * base
    blocks, skips, ds = [TimestepEmbedSequential([nn.Conv3d(in_channels, ch, 3, padding=1)])], [ch], 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        layers = [ResBlock(ch, emb_ch, base * mult, groups)]
        ch = base * mult
        if ds in attention_resolutions:
          layers.append(AttentionBlock(ch, groups))
        blocks.append(TimestepEmbedSequential(layers))
        skips.append(ch)
      if level != len(channel_mult) - 1:
        blocks.append(TimestepEmbedSequential([ResBlock(ch, emb_ch, ch, groups, "down")]))
        skips.append(ch)
        ds *= 2
    self.input_blocks = nn.ModuleList(blocks)
    self.middle_block = TimestepEmbedSequential([ResBlock(ch, emb_ch, ch, groups), AttentionBlock(ch, groups),
                                  ResBlock(ch, emb_ch, ch, groups)])
    blocks = []
    for level, mult in list(enumerate(channel_mult))[::-1]:
      for i in range(num_res_blocks + 1):
        layers = [ResBlock(ch + skips.pop(), emb_ch, base * mult, groups)]
        ch = base * mult
        if ds in attention_resolutions:
          layers.append(AttentionBlock(ch, groups))
        if level and i == num_res_blocks:
          layers.append(ResBlock(ch, emb_ch, ch, groups, "up"))
          ds //= 2
        blocks.append(TimestepEmbedSequential(layers))
    self.output_blocks = nn.ModuleList(blocks)
    self.out = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv3d(ch, in_channels, 3, padding=1))

  def forward(self, x, t):
    emb = self.time_embed(timestep_embedding(t, self.base))
    hs, h = [], x
    for block in self.input_blocks:
      h = block(h, emb)
      hs.append(h)
    h = self.middle_block(h, emb)
    for block in self.output_blocks:
      h = block(torch.cat([h, hs.pop()], dim=1), emb)
    return self.out(h)


def from_config(config) -> UNet:
  """The torch UNet of `config.unet` for `config`'s latent channels."""
  from ldae_jax import config as cfglib  # pylint: disable=g-import-not-at-top
  u = config.unet
  return UNet(cfglib.unet_input_shape(config)[-1], int(u.base_channels), tuple(u.channel_mult),
              int(u.num_res_blocks), tuple(u.attention_resolutions), int(u.norm_groups))


def check_against_project(config, batch: int = 2, seed: int = 0) -> float:
  """Max |torch - ldae_jax| of the raw UNet output on random weights (every layer non-zero) and inputs.

  Loads the torch state dict into the project's UNet with the reference converter, so a match also says the
  timed torch network has the project's layers, shapes and FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from ldae_jax import config as cfglib, models
  from ldae_jax.convert import unet as convert_unet
  torch.manual_seed(seed)
  net = from_config(config).eval()
  with torch.no_grad():
    for p in net.parameters():  # the zero-initialised convs would hide half the network
      p.copy_(torch.randn_like(p) * 0.05)
  project = models.build_unet(config, nnx.Rngs(0))
  convert_unet.convert({k: v.numpy() for k, v in net.state_dict().items()}, project)
  shape = cfglib.latent_shape(config)
  x = np.random.default_rng(seed).standard_normal((batch,) + tuple(shape)).astype(np.float32)
  t = np.linspace(0, 999, batch).astype(np.int32)
  with torch.no_grad():
    ref = net(torch.from_numpy(np.moveaxis(x, -1, 1)), torch.from_numpy(t)).numpy()
  ours = np.asarray(project.raw(jnp.asarray(x), jnp.asarray(t)))
  return float(np.abs(np.moveaxis(ref, 1, -1) - ours).max()) / max(float(np.abs(ref).max()), 1e-12)
