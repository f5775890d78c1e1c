"""The one configuration schema every stage reads.

`default_config()` returns the paper-size settings (the reference's `aekl.yaml`, `ldae_pretrain.yaml`,
`ldae_repr_learn.yaml`). Config files under `configs/` start from it and override fields; they never add
fields, so a typo in a config file or on the command line (`--config.unet.base_chanels=8`) fails loudly
instead of being ignored. Tuples (not lists) so that ml_collections accepts command-line overrides.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

STAGES = ("autoencoder", "latents", "ldm", "representation", "all")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "paper"
  c.stage = "all"
  c.seed = 42

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  # CSV manifest (columns: subject, path, diagnosis, age, [session]). Empty: generate the
  # synthetic cohort described by `data.synthetic` into `<workdir>/cohort` and use its manifest.
  c.data.manifest = ""
  c.data.image_shape = (128, 160, 128)  # (X, Y, Z), RAS, the reference's crop
  c.data.spacing_mm = 1.5
  c.data.percentile_clip = 0.0  # 0 = plain min-max (reference); e.g. 99.5 clips the top 0.5 % first
  c.data.classes = ("AD", "CN", "MCI")
  c.data.val_fraction = 0.005
  c.data.test_fraction = 0.1
  c.data.split_seed = 42
  c.data.num_workers = 0  # grain worker processes (0 = read in the main process)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.subjects = 200
  c.data.synthetic.seed = 0
  # Multiplies the synthetic age/disease atrophy: 1 = real-cohort volumes (visible at 1.5 mm); coarse grids
  # such as the quickstart's 6 mm voxels need it larger for the effects to span whole voxels.
  c.data.synthetic.atrophy_scale = 1.0
  # Multiplies the head pose/size and bias-field variation that registration to MNI and N4 remove in a real
  # cohort: 1 = unregistered scans, ~0.25 = the residuals of the paper's preprocessing.
  c.data.synthetic.nuisance_scale = 1.0
  # Processes generating the cohort (0: one per CPU core). The files are the same for any number.
  c.data.synthetic.workers = 1

  # ---------------------------------------------------------------- networks
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.in_channels = 1
  c.autoencoder.channels = (64, 128, 128, 128)  # one entry per level; len-1 downsamplings
  c.autoencoder.latent_channels = 3
  c.autoencoder.num_res_blocks = 2
  c.autoencoder.norm_groups = 32
  c.autoencoder.norm_eps = 1e-6

  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.num_layers = 3
  c.discriminator.channels = 64
  c.discriminator.in_channels = 1

  c.unet = ml_collections.ConfigDict()
  # What the UNet denoises: "latent" (LDAE: the autoencoder's latent) or "image" (an image-space DAE baseline).
  c.unet.input_space = "latent"
  c.unet.base_channels = 256
  c.unet.channel_mult = (1, 2, 3)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (2, 4)
  c.unet.num_heads = 1
  c.unet.dropout = 0.1
  c.unet.norm_groups = 32

  c.encoder = ml_collections.ConfigDict()
  # ConvNeXt block settings: (channels, depth) per stage (ConvNeXt-Small).
  c.encoder.dims = (96, 192, 384, 768)
  c.encoder.depths = (3, 3, 27, 3)
  c.encoder.stochastic_depth = 0.4
  c.encoder.emb_dim = 768
  c.encoder.num_heads = 8
  c.encoder.seq_len = 128  # number of axial slices = image_shape[2]
  c.encoder.attn_dropout = 0.1
  # ConvNeXt stem kernel = stride (torchvision: 4; ImageNet weights need 4). The paper's feature-map sizes
  # come from 4 at 1.5 mm and from 1 at 6 mm (see ldae_jax/models/convnext.py).
  c.encoder.patch_size = 4
  # "none": the reference's code (LayerNorm after the attention pooling). "template": the code minus the code
  # of the train split's mean image, each dimension standardised across the batch (running statistics when
  # deterministic), so that the shift branch sees what varies between scans and no code can shrink to a
  # constant (docs/fidelity.md, "Making the decoder use the code").
  c.encoder.code_norm = "none"
  # Running statistics of "template" (bias-corrected exponential averages, used when deterministic): match the
  # stage-3 EMA decay, so that they describe the EMA encoder the evaluation uses.
  c.encoder.code_norm_momentum = 0.999
  c.encoder.pretrained_convnext = ""  # optional torchvision ConvNeXt state dict (.pth / converted .npz)

  # Compute: parameters stay float32; activations in `compute_dtype`.
  c.compute_dtype = "float32"  # "bfloat16" on accelerators
  c.remat = False  # rematerialise each ResBlock / ConvNeXt block in the backward pass
  # Trace this many steps of each trained stage with jax.profiler (after its first step, so neither the compile
  # nor the warm-up is in it) into DIR/<stage>/profile/process_<i>/; TensorBoard's profile plugin or Perfetto
  # reads it. 0 = off.
  c.profile_steps = 0
  # A folder for JAX's persistent compilation cache: a rerun, a resume or the evaluation after training loads
  # the compiled steps instead of compiling them again. Empty = off.
  c.compilation_cache_dir = ""

  # ---------------------------------------------------------------- diffusion
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.timesteps = 1000
  c.diffusion.beta_schedule = "linear"  # or "cosine"
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.clamp_x0 = True  # reference behaviour (PDAE legacy); see docs
  c.diffusion.clamp_range = 1.0  # 0: the largest |scaled latent| of the train split (docs/fidelity.md)
  c.diffusion.pdae_gamma = 0.1
  # What the stage-2 UNet's head predicts: "eps" (the reference) or "v" = sqrt(abar) eps - sqrt(1-abar) x0, trained
  # with the v-MSE; either way the UNet returns eps, so stage 3 and DDIM are unchanged (docs/fidelity.md).
  c.diffusion.prediction = "eps"
  c.diffusion.scale_factor = 0.0  # 0 = computed from the data at the `latents` stage (1/std)

  # ---------------------------------------------------------------- parallelism
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.param_sharding = "replicate"  # or "fsdp"
  c.mesh.fsdp_min_size = 2**16  # parameters with fewer elements stay replicated
  # CPU only: JAX devices per process, so that the mesh runs on every core (XLA runs one CPU device's
  # convolutions on ~one core). 0 = one per core, lowered until it divides every batch; see parallel/cpu_devices.
  c.mesh.cpu_devices = 0

  # Multi-host initialisation (empty/-1: auto-detect on SLURM / TPU / env, or single process).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = -1
  c.distributed.process_id = -1
  c.distributed.initialize = "auto"  # "auto" | "always" | "never"
  # How long a process waits for the others where one process's files are read by all (the synthetic cohort,
  # the latent shards): past it, a process that died or hangs stops the run with an error instead of a hang.
  c.distributed.barrier_timeout_s = 1800.0

  # ---------------------------------------------------------------- training, one block per stage
  def stage(batch, lr, steps, accum=1, ema=0.999, clip=1.0):
    s = ml_collections.ConfigDict()
    s.batch_size = batch  # global batch per optimizer micro-step
    s.grad_accum = accum
    s.lr = lr
    s.lr_schedule = "constant"  # the reference's; "cosine" decays lr to 0 over `steps` (short runs)
    s.b1 = 0.9
    s.b2 = 0.999
    s.eps = 1e-8
    s.clip_norm = clip
    s.steps = steps
    s.ema_decay = ema
    s.log_every = 50
    s.checkpoint_every = 1000
    s.keep_checkpoints = 3
    return s

  c.train = ml_collections.ConfigDict()
  c.train.autoencoder = stage(batch=1, lr=5e-5, steps=100_000, accum=4, ema=0.0)
  c.train.autoencoder.lr_disc = 1e-4
  c.train.autoencoder.kl_weight = 1e-7
  c.train.autoencoder.adv_weight = 0.025
  c.train.autoencoder.reference_disc_grad_leak = False  # reproduce the reference's G->D gradient leak
  c.train.ldm = stage(batch=128, lr=2.5e-5, steps=200_000)
  c.train.representation = stage(batch=8, lr=2.5e-5, steps=100_000, accum=4)
  # Reference: EMA updated every micro-batch (0.999 per micro-batch ~ 0.996 per optimizer step with accum 4).
  c.train.representation.reference_ema_per_microbatch = False
  # Multiplies the semantic encoder's step size (1 = the reference: one lr for every group). The reference's
  # backbone starts from ImageNet weights; a randomly initialised one trained at a high lr can collapse to
  # a near-constant code (docs/fidelity.md, "The semantic encoder in short runs from random weights").
  c.train.representation.encoder_lr_scale = 1.0
  c.train.latents_batch_size = 4
  c.train.latents_records_per_shard = 256
  c.train.latents_store_images = True  # stage 3 needs the image beside its latent

  # ---------------------------------------------------------------- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.ddim_steps = (10, 20, 50, 100)
  c.eval.batch_size = 4
  c.eval.max_scans = 200
  c.eval.ssim_kernel = 3
  c.eval.manip_alphas = (-2.5, -1.0, 1.0, 2.5)
  c.eval.num_variations = 4
  # Numeric manifest columns (e.g. regional volumes) whose ridge read-out from the codes the report shows
  # beside the probes; a synthetic cohort always reports its own generative factors.
  c.eval.known_factors = ()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks cross-field constraints that a type check cannot see; raises ValueError naming the field."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}: must be one of {STAGES}.")
  n_down = len(config.autoencoder.channels) - 1
  for ax, size in zip("XYZ", config.data.image_shape):
    if size % (2**n_down):
      raise ValueError(
          f"config.data.image_shape {tuple(config.data.image_shape)}: axis {ax}={size} is not divisible by "
          f"2**{n_down} (the autoencoder's {n_down} downsamplings).")
  if config.diffusion.prediction not in ("eps", "v"):
    raise ValueError(f"config.diffusion.prediction={config.diffusion.prediction!r}: 'eps' (reference) or 'v'.")
  if config.unet.input_space not in ("latent", "image"):
    raise ValueError(f"config.unet.input_space={config.unet.input_space!r}: 'latent' or 'image'.")
  unet_input = unet_input_shape(config)
  n_unet_down = len(config.unet.channel_mult) - 1
  for ax, size in zip("YZ", unet_input[1:3]):
    if size % (2**n_unet_down):
      where = (f"image {tuple(config.data.image_shape)} / 2**{n_down}" if config.unet.input_space == "latent"
               else "config.unet.input_space='image'")
      raise ValueError(
          f"UNet input axis {ax}={size} ({where}) is not divisible by 2**{n_unet_down}, the UNet's (1,2,2) "
          "downsamplings.")
  if config.encoder.seq_len != config.data.image_shape[2]:
    raise ValueError(
        f"config.encoder.seq_len={config.encoder.seq_len} must equal the number of axial slices "
        f"config.data.image_shape[2]={config.data.image_shape[2]}.")
  if config.mesh.param_sharding not in ("replicate", "fsdp"):
    raise ValueError(f"config.mesh.param_sharding={config.mesh.param_sharding!r}: 'replicate' or 'fsdp'.")
  if config.compute_dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.compute_dtype={config.compute_dtype!r}: float32, bfloat16 or float16.")
  _validate_ranges(config)


def _check(config: ml_collections.ConfigDict, field: str, ok, allowed: str) -> None:
  """Raises ValueError naming `config.<field>`, its value and the values allowed unless `ok(value)`."""
  value = config
  for part in field.split("."):
    value = value[part]
  if not ok(value):
    raise ValueError(f"config.{field}={value!r}: must be {allowed}; set --config.{field}=<value> accordingly.")


def _validate_ranges(config: ml_collections.ConfigDict) -> None:
  """Counts, rates and sizes: caught here, before a run spends minutes building and compiling networks."""
  positive = lambda v: v > 0
  at_least_one = lambda v: v >= 1
  non_negative = lambda v: v >= 0
  unit = lambda v: 0 <= v < 1
  for name in ("autoencoder", "ldm", "representation"):
    t = f"train.{name}"
    # 0 steps is no way to skip a stage: it would write summary.json ("complete") without a checkpoint,
    # and the next stage would stop for want of weights. Choose the stages to run with config.stage.
    _check(config, f"{t}.steps", at_least_one, ">= 1 (to run some stages only, set config.stage instead)")
    for field in ("batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
      _check(config, f"{t}.{field}", at_least_one, "an integer >= 1")
    _check(config, f"{t}.lr", positive, "> 0")
    _check(config, f"{t}.eps", positive, "> 0")
    for field in ("b1", "b2"):
      _check(config, f"{t}.{field}", unit, "in [0, 1) (Adam's moment decay)")
    _check(config, f"{t}.ema_decay", unit, "in [0, 1) (0 = keep no EMA copy)")
    _check(config, f"{t}.clip_norm", non_negative, ">= 0 (0 = no gradient clipping)")
  _check(config, "train.autoencoder.lr_disc", positive, "> 0")
  for field in ("kl_weight", "adv_weight"):
    _check(config, f"train.autoencoder.{field}", non_negative, ">= 0")
  _check(config, "train.representation.encoder_lr_scale", positive, "> 0 (1 = the reference's one learning rate)")
  _check(config, "profile_steps", non_negative, "an integer >= 0 (0 = no profiler trace)")
  _check(config, "mesh.cpu_devices", non_negative, "an integer >= 0 (0 = one CPU device per core)")
  _check(config, "train.latents_batch_size", at_least_one, "an integer >= 1")
  _check(config, "train.latents_records_per_shard", at_least_one, "an integer >= 1")
  for field in ("val_fraction", "test_fraction"):
    _check(config, f"data.{field}", unit, "in [0, 1)")
  if config.data.val_fraction + config.data.test_fraction >= 1:
    raise ValueError(f"config.data.val_fraction={config.data.val_fraction} + config.data.test_fraction="
                     f"{config.data.test_fraction} leave no subjects to train on; their sum must be < 1.")
  _check(config, "data.image_shape", lambda v: len(v) == 3 and all(s >= 1 for s in v), "three sizes >= 1 (X, Y, Z)")
  _check(config, "data.spacing_mm", positive, "> 0")
  _check(config, "data.percentile_clip", lambda v: 0 <= v < 100, "in [0, 100) (0 = plain min-max)")
  _check(config, "data.num_workers", non_negative, "an integer >= 0 (0 = read in the main process)")
  _check(config, "data.synthetic.subjects", at_least_one, "an integer >= 1")
  _check(config, "data.synthetic.workers", non_negative, "an integer >= 0 (0 = one process per CPU core)")
  for field in ("atrophy_scale", "nuisance_scale"):
    _check(config, f"data.synthetic.{field}", non_negative, ">= 0")
  _check(config, "diffusion.timesteps", at_least_one, "an integer >= 1")
  _check(config, "distributed.barrier_timeout_s", lambda v: v > 0, "> 0 seconds")
  _check(config, "diffusion.scale_factor", non_negative, ">= 0 (0 = computed at the latents stage)")
  _check(config, "diffusion.clamp_range", non_negative, ">= 0 (0 = the largest |scaled latent| of the train split)")
  _check(config, "encoder.code_norm", lambda v: v in ("none", "template"), "'none' (the reference) or 'template'")
  for name in ("autoencoder", "ldm", "representation"):
    _check(config, f"train.{name}.lr_schedule", lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'")
  _check(config, "encoder.code_norm_momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  _check(config, "eval.ddim_steps", lambda v: len(v) >= 1 and all(1 <= s <= config.diffusion.timesteps for s in v),
         f"one or more step counts in [1, config.diffusion.timesteps={config.diffusion.timesteps}]")
  for field in ("batch_size", "max_scans", "num_variations", "ssim_kernel"):
    _check(config, f"eval.{field}", at_least_one, "an integer >= 1")


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(X, Y, Z, C) of the autoencoder's latent for `config.data.image_shape`."""
  f = 2 ** (len(config.autoencoder.channels) - 1)
  x, y, z = (s // f for s in config.data.image_shape)
  return (x, y, z, config.autoencoder.latent_channels)


def unet_input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(X, Y, Z, C) of what the UNet denoises: the latent, or for `unet.input_space="image"` the image itself.

  The channel count follows from what is denoised (`autoencoder.latent_channels`, or the image's
  `autoencoder.in_channels`), so it is not a UNet option of its own that could disagree with the data."""
  if config.unet.input_space == "image":
    return (*config.data.image_shape, config.autoencoder.in_channels)
  return latent_shape(config)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/paper.py' or 'configs/paper.py:bf16' -> the file's `get_config(variant)`, validated.

  For scripts and tests outside absl; `train.py`/`evaluate.py` use `config_flags.DEFINE_config_file`, which
  reads the same files and adds `--config.a.b=value` overrides.
  """
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist (give a path such as configs/paper.py).")
  mod_spec = importlib.util.spec_from_file_location(f"_ldae_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path} defines no get_config(variant='').")
  config = module.get_config(variant) if variant else module.get_config()
  validate(config)
  return config
