"""Whole LDAE pipeline on a small synthetic cohort, sized to finish in about 15 minutes on a 2-core CPU.

Volumes are the synthetic brains resampled to 6 mm (32x40x32), the autoencoder downsamples x4
(latent 8x10x8x3), the UNet and the ConvNeXt encoder are narrow. The figures it gives are a smoke test of
the whole method, not the paper's numbers.
"""

from ldae_jax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.name = "quickstart"
  c.data.image_shape = (32, 40, 32)
  c.data.spacing_mm = 6.0
  c.data.val_fraction = 0.1
  c.data.test_fraction = 0.25
  c.data.synthetic.subjects = 48
  c.data.synthetic.seed = 0

  c.autoencoder.channels = (16, 32, 32)
  c.autoencoder.num_res_blocks = 1
  c.autoencoder.norm_groups = 8

  c.discriminator.num_layers = 2
  c.discriminator.channels = 8

  c.unet.base_channels = 32
  c.unet.channel_mult = (1, 2)
  c.unet.num_res_blocks = 1
  c.unet.attention_resolutions = (2,)
  c.unet.norm_groups = 8

  c.encoder.dims = (16, 32, 64, 128)
  c.encoder.depths = (1, 1, 1, 1)
  c.encoder.stochastic_depth = 0.1
  c.encoder.emb_dim = 128
  c.encoder.seq_len = 32

  c.train.autoencoder.batch_size = 8
  c.train.autoencoder.grad_accum = 1
  c.train.autoencoder.lr = 1e-3
  c.train.autoencoder.lr_disc = 1e-3
  c.train.autoencoder.steps = 300
  c.train.ldm.batch_size = 32
  c.train.ldm.lr = 1e-3
  c.train.ldm.steps = 400
  c.train.representation.batch_size = 8
  c.train.representation.grad_accum = 1
  c.train.representation.lr = 3e-4
  c.train.representation.steps = 300
  for s in (c.train.autoencoder, c.train.ldm, c.train.representation):
    s.log_every = 25
    s.checkpoint_every = 100
    s.keep_checkpoints = 2
  c.eval.ddim_steps = (10, 20)
  c.eval.max_scans = 64
  if variant:
    raise ValueError(f"configs/quickstart.py: unknown variant {variant!r}")
  return c
