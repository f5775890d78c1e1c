"""The whole LDAE pipeline at GPU scale on a synthetic cohort, sized for one H200 in at most 9 minutes.

Built on configs/quickstart.py's choices (the template code norm, the encoder's dropout and stochastic depth
off, the autoencoder without its adversarial term; docs/fidelity.md, "Making the decoder use the code"), at
twice the quickstart's resolution: 3 mm voxels, 64x80x64 (the autoencoder's x4 downsampling gives the paper's
own 16x20x16x3 latent), 768 subjects (~2,700 scans), wider networks, more steps and bf16 compute.
`scripts/gpu_run.sh` runs it end to end (cohort, every stage, `evaluate.py --mode report`) in one device call.

Time on one H200: an ESTIMATE, not a measurement. XLA forward GFLOP per sample of these networks (cost
analysis on the CPU, float32): UNet 55 (30.5 M parameters), ShiftUNet 98, encoder 5.5, autoencoder encode 55 +
decode 156; a train step = 3x its forwards. At paper size on an H100 the UNet step ran at 50 % MFU and the
stage-3 step at 16 % (benchmarks/RESULTS.md); these nets are ~14x smaller, so 10 % of the 989 TFLOP/s bf16
peak (the H200's compute is the H100's) is assumed for every step:
  cohort, 16 processes               ~15 s   (quickstart: 576 subjects at 6 mm in 10 s, 2 cores; 8x voxels)
  autoencoder 1,000 x 8 volumes      ~50 s  + compile ~30 s
  latents (~2,700 scans + images)    ~25 s   (NIfTI reads and zstd shards on the CPU)
  ldm 1,000 x 64 latents            ~105 s  + compile ~60 s (the paper-size step compiled in 140 s)
  representation 1,500 x 16          ~50 s  + compile ~60 s (paper size: 89 s)
  evaluation --mode report          ~100 s   (mostly compiles: DDIM-10/20 on 64 scans; probes on the CPU)
  start-up, checkpoints, held-out    ~30 s
  total                             ~8.8 min. Only the step lines scale with the step counts: a first run that
overshoots is brought in by lowering `train.ldm.steps`, one that finishes early by raising it.
Variant `tiny`: 16 subjects at 6 mm (32x40x32), narrow nets, a handful of steps, float32: the same script on
a CPU in a few minutes (a dry run of the plumbing, not of the method).
"""

from ldae_jax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.name = "gpu"
  c.compute_dtype = "bfloat16"
  c.data.image_shape = (64, 80, 64)
  c.data.spacing_mm = 3.0
  c.data.val_fraction = 0.1
  c.data.test_fraction = 0.25
  c.data.synthetic.subjects = 768
  # 3 mm voxels: the real-size atrophy spans a voxel only at its largest; exaggerate it 1.5x (the quickstart's
  # 6 mm grid needs 3x).
  c.data.synthetic.atrophy_scale = 1.5
  c.data.synthetic.seed = 0
  c.data.synthetic.workers = 0  # every core of the machine (the output does not depend on it)
  # ~1,900 train scans of 1.3 MB are over the 1 GiB preload limit, so the autoencoder stage decodes NIfTI files
  # while it trains; 8 grain worker processes keep a 50 ms step fed from the 16 cores.
  c.data.num_workers = 8

  c.autoencoder.channels = (32, 64, 64)
  c.autoencoder.num_res_blocks = 1
  c.autoencoder.norm_groups = 16

  c.unet.base_channels = 64
  c.unet.channel_mult = (1, 2, 3)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (2, 4)
  c.unet.norm_groups = 16

  c.encoder.dims = (32, 64, 128, 256)
  c.encoder.depths = (1, 1, 3, 1)
  # Dropout and stochastic depth would be standardised into the code as if they were differences between scans.
  c.encoder.stochastic_depth = 0.0
  c.encoder.attn_dropout = 0.0
  c.encoder.code_norm = "template"
  c.encoder.emb_dim = 256
  c.encoder.seq_len = 64

  c.train.autoencoder.batch_size = 8
  c.train.autoencoder.grad_accum = 1
  c.train.autoencoder.lr = 1e-3
  c.train.autoencoder.steps = 1000
  c.train.autoencoder.adv_weight = 0.0
  c.train.ldm.batch_size = 64
  c.train.ldm.lr = 5e-4
  c.train.ldm.steps = 1000
  c.train.representation.batch_size = 16
  c.train.representation.grad_accum = 1
  c.train.representation.lr = 1e-3
  c.train.representation.steps = 1500
  # 1,000-1,500 steps: an EMA of 0.999 would still be ~25-37 % initial weights; 0.99 averages ~100 steps.
  c.train.ldm.ema_decay = 0.99
  c.train.representation.ema_decay = 0.99
  c.encoder.code_norm_momentum = c.train.representation.ema_decay  # statistics of the EMA encoder's window
  for s in (c.train.autoencoder, c.train.ldm, c.train.representation):
    s.log_every = 100  # also the held-out evaluations of stages 2 and 3
    s.checkpoint_every = 1000  # a device run is not resumed: checkpoints only for the next stage's weights
    s.keep_checkpoints = 1
  c.eval.ddim_steps = (10, 20)
  c.eval.max_scans = 64
  c.eval.batch_size = 16

  if variant == "tiny":
    c.name = "gpu_tiny"
    c.compute_dtype = "float32"  # the CPU has no fast bf16
    c.data.image_shape = (32, 40, 32)
    c.data.spacing_mm = 6.0
    c.data.synthetic.subjects = 16
    c.data.synthetic.atrophy_scale = 3.0
    c.data.synthetic.workers = 2
    c.data.num_workers = 2  # the GPU run's reader (grain worker processes), exercised at CPU scale
    c.autoencoder.channels = (8, 16, 16)
    c.autoencoder.norm_groups = 8
    c.unet.base_channels = 16
    c.unet.channel_mult = (1, 2)
    c.unet.num_res_blocks = 1
    c.unet.attention_resolutions = (2,)
    c.unet.norm_groups = 8
    c.encoder.dims = (8, 16, 32, 64)
    c.encoder.depths = (1, 1, 1, 1)
    c.encoder.emb_dim = 64
    c.encoder.seq_len = 32
    for s, steps, batch in ((c.train.autoencoder, 6, 2), (c.train.ldm, 6, 4), (c.train.representation, 6, 2)):
      s.steps = steps
      s.batch_size = batch
      s.log_every = 3
      s.checkpoint_every = steps
    c.eval.ddim_steps = (2,)
    c.eval.max_scans = 8
    c.eval.batch_size = 4
    c.eval.num_variations = 2
  elif variant:
    raise ValueError(f"configs/gpu.py: unknown variant {variant!r} (known: tiny)")
  return c
