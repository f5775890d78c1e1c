"""ShiftUNet: frozen stage-2 UNet (eps branch) + trainable gradient estimator G_psi (shift branch), NDHWC.

Reference `src/ldae/nets/shift_unet.py`. The frozen UNet lives at `.unet` (Flax paths `('unet', ...)`), so
the stage-3 trainable filter `nnx.All(nnx.Param, nnx.Not(nnx.PathContains('unet')))` selects exactly the
shift branch: `label_emb`, `shift_middle_block`, `shift_output_blocks`, `shift_out`. The shift branch starts
from the frozen encoder's bottleneck and concatenates the same frozen skips as the eps branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ldae_jax.models.layers import ResBlockShift, apply_sequence, dense
from ldae_jax.models.unet import (UNet, apply_head, build_decoder_blocks, build_head, build_middle_block,
                                  unet_kwargs)

Array = jax.Array
F32 = jnp.float32

TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("unet")))


class ShiftUNet(nnx.Module):
  """(x_t, t, y_sem) -> (eps, G). The eps branch is the frozen UNet, run deterministically under stop_gradient."""

  def __init__(self, in_channels: int, base_channels: int, channel_mult, num_res_blocks: int,
               attention_resolutions, *, latent_dim: int, num_heads: int = 1, dropout: float = 0.0,
               norm_groups: int = 32, dtype=F32, remat: bool = False, v_coefs=None, rngs: nnx.Rngs):
    self.unet = UNet(in_channels, base_channels, channel_mult, num_res_blocks, attention_resolutions,
                     num_heads=num_heads, dropout=dropout, norm_groups=norm_groups, dtype=dtype,
                     remat=remat, v_coefs=v_coefs, rngs=rngs)
    self.dtype = dtype
    self.remat = remat
    self.latent_dim = latent_dim
    emb_ch = 4 * base_channels
    common = dict(dropout=dropout, norm_groups=norm_groups, dtype=dtype, rngs=rngs)
    ch = base_channels * channel_mult[-1]
    # y_sem -> shift_emb: Linear(latent_dim, 4*base), no activation before it (float32: (B, emb) sized).
    self.label_emb = dense(latent_dim, emb_ch, dtype=F32, rngs=rngs)
    self.shift_middle_block = build_middle_block(ResBlockShift, ch, num_heads=num_heads,
                                                 emb_channels=emb_ch, **common)
    self.shift_output_blocks, ch = build_decoder_blocks(
        ResBlockShift, ch, list(self.unet.skip_channels), base=base_channels, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, num_heads=num_heads,
        emb_channels=emb_ch, **common)
    self.shift_out_0, self.shift_out_2 = build_head(ch, in_channels, norm_groups=norm_groups, dtype=dtype,
                                                    rngs=rngs)

  def frozen(self, x: Array, t: Array) -> tuple[Array, list[Array], Array]:
    """The frozen UNet: (time embedding, encoder skips, eps), all under stop_gradient, dropout off.

    stop_gradient on every output means no cotangent ever reaches the UNet's parameters, so its backward
    pass is never computed even when a caller differentiates with respect to the whole model.
    """
    u = self.unet
    emb = u.embed_time(t)
    hs = u.encode(x, emb, deterministic=True)
    h = u.middle(hs[-1], emb, deterministic=True)
    eps = u.to_eps(u.head(u.decode(h, hs, emb, deterministic=True)), x, t)
    return jax.lax.stop_gradient((emb, hs, eps))

  def shift(self, hs: list[Array], emb: Array, y: Array, *, deterministic: bool = True,
            rngs: nnx.Rngs | None = None) -> Array:
    """G from the frozen encoder's skips `hs` (the last one is the bottleneck), t-embedding and y_sem."""
    z = self.label_emb(y.astype(F32))
    kw = dict(deterministic=deterministic, rngs=rngs, remat=self.remat)
    h = apply_sequence(self.shift_middle_block, hs[-1], emb, z, **kw)
    for i, layers in enumerate(self.shift_output_blocks):
      h = jnp.concatenate([h, hs[len(hs) - 1 - i]], axis=-1)
      h = apply_sequence(layers, h, emb, z, **kw)
    return apply_head(self.shift_out_0, self.shift_out_2, h, self.dtype)

  def frozen_and_shift_fns(self):
    """`(frozen_fn, shift_fn)` in the form `diffusion.code_use` takes: `frozen_fn(x_t, t) -> ((emb, skips), eps)`
    runs the frozen UNet once; `shift_fn(context, y) -> G` re-runs only the shift branch for another code."""
    def frozen_fn(x, t):
      emb, hs, eps = self.frozen(x, t)
      return (emb, hs), eps
    return frozen_fn, lambda ctx, y: self.shift(ctx[1], ctx[0], y)

  def __call__(self, x: Array, t: Array, y: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[Array, Array]:
    """x (B,X,Y,Z,C), t int (B,), y (B, latent_dim) -> (eps, G), both (B,X,Y,Z,C) float32."""
    if y.ndim != 2 or y.shape[-1] != self.latent_dim:
      raise ValueError(f"ShiftUNet expects y of shape (B, {self.latent_dim}) (config.encoder.emb_dim); "
                       f"got {y.shape}.")
    emb, hs, eps = self.frozen(x, t)
    return eps, self.shift(hs, emb, y, deterministic=deterministic, rngs=rngs)


def build_shift_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ShiftUNet:
  """The stage-3 ShiftUNet for `config` (latent_dim = config.encoder.emb_dim)."""
  return ShiftUNet(**unet_kwargs(config), latent_dim=config.encoder.emb_dim, rngs=rngs)
