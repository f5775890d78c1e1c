"""Whole LDAE pipeline on a small synthetic cohort, sized for a 2-core CPU (training ~13 min, evaluation ~10 min).

576 synthetic subjects (~2,000 scans) resampled to 6 mm (32x40x32), with the age/disease atrophy exaggerated 3x
so that it spans whole voxels; the autoencoder downsamples x4 (latent 8x10x8x3); the UNet and the ConvNeXt
encoder are narrow, and each stage runs a few hundred steps (the step counts, not the cohort size, set the
training time). The cohort is large so that the probes fit on ~260 AD/CN subjects and score ~96: with 288
subjects the 48 AD/CN test subjects happened to hold AD patients younger than the controls, and every code
(raw voxels included) scored 0.82 there against 0.91 in cross-validation. The figures are a smoke test of the
whole method, not the paper's numbers (measured results: README, "What the quickstart shows").
"""

from ldae_jax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.name = "quickstart"
  c.data.image_shape = (32, 40, 32)
  c.data.spacing_mm = 6.0
  c.data.val_fraction = 0.1
  c.data.test_fraction = 0.25
  c.data.synthetic.subjects = 576
  # 6 mm voxels: the real-size (1.5 mm) atrophy would be a fraction of a voxel; exaggerate it 3x.
  c.data.synthetic.atrophy_scale = 3.0
  c.data.synthetic.seed = 0

  c.autoencoder.channels = (8, 16, 16)
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

  c.train.autoencoder.batch_size = 4
  c.train.autoencoder.grad_accum = 1
  c.train.autoencoder.lr = 1e-3
  c.train.autoencoder.lr_disc = 1e-3
  c.train.autoencoder.steps = 250
  c.train.ldm.batch_size = 16
  c.train.ldm.lr = 5e-4
  c.train.ldm.steps = 250
  c.train.representation.batch_size = 8
  c.train.representation.grad_accum = 1
  c.train.representation.lr = 1e-3
  c.train.representation.steps = 350
  # A few hundred steps: an EMA of 0.999 would still be ~75 % initial weights; 0.97 averages ~30 steps.
  c.train.ldm.ema_decay = 0.97
  c.train.representation.ema_decay = 0.97
  for s in (c.train.autoencoder, c.train.ldm, c.train.representation):
    s.log_every = 25
    s.checkpoint_every = 100
    s.keep_checkpoints = 2
  c.eval.ddim_steps = (10, 20)
  c.eval.max_scans = 64
  if variant:
    raise ValueError(f"configs/quickstart.py: unknown variant {variant!r}")
  return c
