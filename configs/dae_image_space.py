"""Image-space diffusion autoencoder (DAE) baseline: the LDAE UNet family run directly on voxels.

Used by the throughput benchmark (`benchmarks/throughput.py`) to measure LDAE's latent-space DDIM against the
same kind of network on the full volume, in the same run. The reference ships no DAE (the paper's reported DAE code size
suggests it ran at a reduced resolution); this one runs at the LDAE image size.
At 128x160x128 the UNet cannot use the latent UNet's width or attention at full resolution, so it follows the
usual pixel-space recipe: narrower base (64), more levels (Y and Z halved four times, X kept, as in LDAE's UNet)
and attention only at the coarsest level (128x10x8 = 10,240 tokens).

Variants: "" paper size (GPU); "small" the quickstart volume 32x40x32 (CPU); "bf16" / "small_bf16" compute dtype.
"""

from ldae_jax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.name = "dae_image_space"
  known = ("", "bf16", "small", "small_bf16")
  if variant not in known:
    raise ValueError(f"configs/dae_image_space.py: unknown variant {variant!r} (known: {known[1:]})")
  c.unet.input_space = "image"
  if variant.startswith("small"):
    c.name = "dae_image_space_small"
    c.data.image_shape = (32, 40, 32)
    c.data.spacing_mm = 6.0
    c.encoder.seq_len = 32
    c.unet.base_channels = 32
    c.unet.channel_mult = (1, 2, 2, 2)  # Y, Z: 40x32 -> 5x4
    c.unet.num_res_blocks = 1
    c.unet.attention_resolutions = (8,)
    c.unet.norm_groups = 8
    c.encoder.emb_dim = 128
  else:
    c.unet.base_channels = 64
    c.unet.channel_mult = (1, 1, 2, 2, 4)  # Y, Z: 160x128 -> 10x8
    c.unet.num_res_blocks = 2
    c.unet.attention_resolutions = (16,)
  if variant.endswith("bf16"):
    c.compute_dtype = "bfloat16"
  return c
