"""Whole LDAE pipeline on a small synthetic cohort, sized for a 2-core CPU (~28-36 min training, ~5-6 min evaluation).

576 synthetic subjects (~2,000 scans) resampled to 6 mm (32x40x32), with the age/disease atrophy exaggerated 3x
so that it spans whole voxels; the autoencoder downsamples x4 (latent 8x10x8x3); the UNet and the ConvNeXt
encoder are narrow. The cohort is large so that the probes fit on ~260 AD/CN subjects and score ~96 (with 288
subjects the test split happened to be age-confounded). Step counts follow what each stage was measured to
need (docs/fidelity.md, "Making the decoder use the code"): the autoencoder trains without its adversarial term
(a short run spends the compute on the reconstruction) for 1,000 steps with a cosine lr decay (600 constant-lr
steps reached SSIM 0.71); stage 2 runs 1,000 steps with a cosine lr decay, since its held-out eps error
was still falling 9 % over the last quarter of 500, and predicts v instead of the reference's eps (an eps-UNet
this short-trained sends DDIM from noise 12x farther from the scans than the cohort mean; docs/fidelity.md,
"The v-parameterisation"), with the x0 clamp at the data's range; stage 3 uses the template code norm (the
reference's LayerNorm'd code collapses to a constant that the decoder ignores) with the encoder's dropout off,
for 1,000 steps, since its held-out code-swap gap was still rising (+12 % at 450, +28 % at 800, +30 % at 1,000).
Variants: `reference_code`, the reference's code and encoder dropout; `eps`, the reference's eps-prediction and
[-1, 1] clamp in stage 2; everything else the same. The figures are a smoke test of the whole method, not the
paper's numbers (measured results: README, "What the quickstart shows").
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
  # Dropout and stochastic depth would be standardised into the code as if they were differences between scans.
  c.encoder.stochastic_depth = 0.0
  c.encoder.attn_dropout = 0.0
  c.encoder.code_norm = "template"
  c.encoder.emb_dim = 128
  c.encoder.seq_len = 32

  c.train.autoencoder.batch_size = 4
  c.train.autoencoder.grad_accum = 1
  c.train.autoencoder.lr = 1e-3
  c.train.autoencoder.lr_disc = 1e-3
  c.train.autoencoder.steps = 1000
  c.train.autoencoder.adv_weight = 0.0
  c.train.autoencoder.lr_schedule = "cosine"
  c.train.ldm.batch_size = 16
  c.train.ldm.lr = 5e-4
  c.train.ldm.steps = 1000
  c.train.ldm.lr_schedule = "cosine"
  # The v-parameterisation (the reference predicts eps): an eps-UNet this short-trained has x0 errors of 0.9 (MSE) at
  # t=700 and 20 at t=900, so DDIM from noise lands 12x farther from a scan than the cohort mean does; v bounds them.
  c.diffusion.prediction = "v"
  # With v the sampler's x0 stays where the latents are; the reference's [-1, 1] clamp would cut 19 % of them.
  c.diffusion.clamp_range = 0.0
  c.train.representation.batch_size = 8
  c.train.representation.grad_accum = 1
  c.train.representation.lr = 1e-3
  c.train.representation.steps = 1000
  # About a thousand steps: an EMA of 0.999 would still be ~37 % initial weights; 0.97 averages ~30 steps.
  c.train.ldm.ema_decay = 0.97
  c.train.representation.ema_decay = 0.97
  c.encoder.code_norm_momentum = c.train.representation.ema_decay  # statistics of the EMA encoder's window
  for s in (c.train.autoencoder, c.train.ldm, c.train.representation):
    s.log_every = 50  # also the held-out evaluations of stages 2 and 3
    s.checkpoint_every = 250
    s.keep_checkpoints = 2
  c.eval.ddim_steps = (10,)
  c.eval.max_scans = 48
  if variant == "reference_code":
    c.encoder.code_norm = "none"
    c.encoder.stochastic_depth = 0.1
    c.encoder.attn_dropout = 0.1
  elif variant == "eps":
    c.diffusion.prediction = "eps"
    c.diffusion.clamp_range = 1.0
  elif variant:
    raise ValueError(f"configs/quickstart.py: unknown variant {variant!r} (known: reference_code, eps)")
  return c
