"""Stage 3: representation learning (PDAE-style, as in the reference).

The ShiftUNet's UNet is loaded from the stage-2 **EMA** weights and frozen (deterministic, stop_gradient);
the semantic encoder and the shift branch are trained with the PDAE loss
  L = mean lambda_t (eps - (eps_hat + c_t G))^2, y = Enc(image), (eps_hat, G) = ShiftUNet(z_t, t, y),
with EMA copies of both. Missing or mismatching stage-2 weights are a hard error (the reference silently
trained on a random UNet; docs/fidelity.md, "Reference bugs"). EMA once per optimizer step unless
`config.train.representation.reference_ema_per_microbatch` (the reference's per-micro-batch update; docs/fidelity.md).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ldae_jax.data import latents, shards
from ldae_jax.diffusion import code_use, losses
from ldae_jax.diffusion.schedule import make_schedule
from ldae_jax.training import checkpoint
from ldae_jax.training import common
from ldae_jax.training import state as st
from ldae_jax.workdir import LDM, REPRESENTATION, Workdir

PyTree = Any
NAME = REPRESENTATION
HELDOUT_SCANS = 16  # validation scans the code-use gap is measured on at every log step
HELDOUT_TIMESTEPS = (100, 250, 475, 700)
SHIFT_TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("unet")))


def _put_params(module: nnx.Module, params: PyTree) -> None:
  """Sets `module`'s parameters from a pure dict of them (host arrays, or traced ones inside jit)."""
  current = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(current, params)
  nnx.update(module, current)


def frozen_unet_weights(unet_params: PyTree, config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike) -> checkpoint.StageWeights:
  """The stage-2 EMA UNet for the abstract (or real) parameter tree `unet_params`. Errors name path and fix."""
  return checkpoint.restore_ema_weights(
      Workdir(workdir).checkpoints(LDM), unet_params, what="stage-2 UNet weights",
      missing_fix=(f"train stage 2 first (python train.py --config ... --workdir {workdir} --config.stage=ldm) or "
                   "point --workdir at a run that has it"),
      mismatch_fix="use the config (config.unet / config.autoencoder) stage 2 was trained with, or retrain stage 2")


def load_frozen_unet(shift_unet: nnx.Module, config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> int:
  """Copies the stage-2 EMA UNet into `shift_unet.unet`; returns the stage-2 step."""
  w = frozen_unet_weights(nnx.to_pure_dict(nnx.state(shift_unet.unet, nnx.Param)), config, workdir)
  _put_params(shift_unet.unet, w.params)
  return w.step


def init_backbone(encoder: nnx.Module, path: str) -> None:
  """Loads `config.encoder.pretrained_convnext` (a torchvision ConvNeXt state dict, the paper's ImageNet
  initialisation) into the encoder's backbone; an empty path keeps the random initialisation."""
  if not path:
    return
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.encoder.pretrained_convnext={path!r} does not exist: give a torchvision "
                            "ConvNeXt state dict (.pth, or .npz of its arrays), or leave it empty to start the "
                            "encoder from random weights.")
  from ldae_jax.convert import semantic_encoder as convert_encoder  # pylint: disable=g-import-not-at-top
  report = convert_encoder.load_pretrained_convnext(path, encoder)
  print(f"[{NAME}] encoder backbone initialised from {path} ({report.consumed} tensors)", flush=True)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The stage optimizer over {'shift', 'encoder'}, the encoder's updates scaled by `cfg.encoder_lr_scale`."""
  tx = st.make_optimizer(cfg)
  factor = float(cfg.encoder_lr_scale)
  if factor <= 0:
    raise ValueError(f"config.train.representation.encoder_lr_scale={factor} must be > 0.")
  if factor == 1.0:  # the plain optimizer: its state has the structure of checkpoints written before the option
    return tx
  return optax.chain(tx, optax.masked(optax.scale(factor), {"shift": False, "encoder": True}))


def make_step(s_def, s_rngs, e_def, e_rngs, tx: optax.GradientTransformation, sched, scale: float,
              cfg: ml_collections.ConfigDict, code_norm_enabled: bool = False):
  """Pure stage-3 step; batch = {'mu': (B*accum, x, y, z, C), 'image': (B*accum, X, Y, Z, 1)}."""
  accum = int(cfg.grad_accum)
  decay = float(cfg.ema_decay)
  ema_updates = accum if cfg.reference_ema_per_microbatch else 1
  timesteps = int(sched.num_timesteps)
  code_norm = e_def is not None and code_norm_enabled

  def loss_fn(params, rest, batch, key):
    shift = st.merge_model(s_def, params["shift"], s_rngs, rest["shift"])
    enc = st.merge_model(e_def, params["encoder"], e_rngs, rest["encoder"])
    z0 = batch["mu"].astype(jnp.float32) * scale
    k_t, k_n, k_e, k_s = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, timesteps)
    noise = jax.random.normal(k_n, z0.shape, jnp.float32)
    y = enc(batch["image"], deterministic=False, rngs=nnx.Rngs(dropout=k_e))
    eps, g = shift(losses.q_sample(sched, z0, t, noise), t, y, deterministic=False, rngs=nnx.Rngs(dropout=k_s))
    return losses.pdae_loss(eps, g, noise, t, sched)

  def refresh_code_statistics(weights, rest, batch):
    # The code norm standardises training batches by their own statistics; its running statistics serve the
    # evaluation, which uses the EMA encoder, so they are the EMA encoder's (a lagging average of the online
    # encoder's statistics would be offset by far more than the codes vary between scans).
    enc = st.merge_model(e_def, weights["encoder"], e_rngs, rest["encoder"])
    enc.update_code_statistics(batch["image"])
    return {**rest, "encoder": st.module_rest(enc)}

  return st.make_train_step(loss_fn, tx, accum=accum, ema_decay=decay, ema_updates=ema_updates,
                            refresh_rest=refresh_code_statistics if code_norm else None)


def make_heldout_code_use_fn(s_def, s_rngs, e_def, e_rngs, sched, scale: float, val: dict[str, np.ndarray]):
  """`state -> {code_gap, g_gain, code_spread}` on fixed validation scans (EMA networks, fixed noise):

  code_gap: (loss with another subject's code - with the own code) / own, averaged over HELDOUT_TIMESTEPS;
  g_gain: (loss with G off - own) / off, on the loss summed over the timesteps; code_spread: std of the codes
  across scans over their RMS. A code the decoder ignores shows code_gap ~ 0 from the first log steps on.
  """
  z0 = jnp.asarray(val["mu"], jnp.float32) * scale
  images = jnp.asarray(val["image"], jnp.float32)
  perm = code_use.other_subject_pairing(val["subject"], seed=0)

  def fn(state):
    params = state.ema if state.ema is not None else state.params
    shift = st.merge_model(s_def, params["shift"], s_rngs, state.rest["shift"])
    enc = st.merge_model(e_def, params["encoder"], e_rngs, state.rest["encoder"])
    y = enc(images, deterministic=True)
    frozen, shift_fn = shift.frozen_and_shift_fns()
    out = code_use.swap_losses_by_t(frozen, shift_fn, z0, y, y[perm], jax.random.key(0), HELDOUT_TIMESTEPS, sched)
    own, other, off = (jnp.mean(out[k], axis=1) for k in ("own", "other", "off"))
    spread = jnp.mean(jnp.std(y, axis=0)) / jnp.sqrt(jnp.mean(jnp.square(y)))
    return {"code_gap": jnp.mean((other - own) / own), "g_gain": code_use.pooled_gain(off, own),
            "code_spread": spread}

  return fn


def build(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> common.StageSpec:
  from ldae_jax.models import build_encoder, build_shift_unet  # pylint: disable=g-import-not-at-top
  cfg = config.train.representation
  wd = Workdir(workdir)
  sdir = wd.shards("train")
  meta = shards.read_metadata(sdir)
  if "image" not in meta["fields"]:
    raise ValueError(f"{sdir} holds no images (config.train.latents_store_images was off); stage 3 needs the "
                     "image beside each latent: rerun the `latents` stage with it on.")
  shape = latents.check_latent_shape(config, meta, str(sdir))
  scale = latents.scale_factor(config, meta, str(sdir))
  build_shift = lambda: build_shift_unet(config, nnx.Rngs(params=config.seed + 10, dropout=config.seed + 11))
  build_enc = lambda: build_encoder(config, nnx.Rngs(params=config.seed + 12, dropout=config.seed + 13))
  s_def, _, s_rngs, _ = st.abstract_model(build_shift, SHIFT_TRAINABLE)
  e_def, _, e_rngs, _ = st.abstract_model(build_enc)
  # What comes from files is read here, on the host; init_state builds everything else on the mesh.
  frozen = frozen_unet_weights(nnx.to_pure_dict(nnx.state(nnx.eval_shape(build_shift).unet, nnx.Param)),
                               config, workdir)
  template = (np.asarray(shards.field_mean(sdir, "image"), np.float32)
              if config.encoder.code_norm == "template" else None)
  pretrained = None
  if config.encoder.pretrained_convnext:  # the converter fills a module: take the encoder's parameters from one
    host_encoder = build_enc()
    init_backbone(host_encoder, config.encoder.pretrained_convnext)
    pretrained = nnx.to_pure_dict(nnx.state(host_encoder, nnx.Param))
  tx = make_optimizer(cfg)

  def init_state(unet_params, template_image, encoder_params):
    shift_unet = build_shift()
    _put_params(shift_unet.unet, unet_params)
    encoder = build_enc()
    if encoder_params is not None:
      _put_params(encoder, encoder_params)
    if template_image is not None:
      encoder.set_template(template_image)
    _, sp, _, s_rest = st.split_model(shift_unet, SHIFT_TRAINABLE)
    _, ep, _, e_rest = st.split_model(encoder)
    return st.create_state({"shift": sp, "encoder": ep}, {"shift": s_rest, "encoder": e_rest}, tx,
                           seed=config.seed + 14, with_ema=cfg.ema_decay > 0)

  sched = make_schedule(config.diffusion)
  gbs = int(cfg.batch_size) * int(cfg.grad_accum)

  def make_iterator():
    return shards.make_iterator(sdir, global_batch_size=gbs, seed=int(config.seed), shuffle=True, repeat=True,
                                drop_remainder=True, fields=("mu", "image"), num_workers=int(config.data.num_workers))

  image_shape = (gbs,) + tuple(config.data.image_shape) + (1,)
  val = latents.heldout_records(wd.shards("val"), HELDOUT_SCANS, fields=("mu", "image", "subject"))
  if val is not None and len(np.unique(val["subject"])) < 2:
    val = None
  heldout = None if val is None else make_heldout_code_use_fn(s_def, s_rngs, e_def, e_rngs, sched, scale, val)
  return common.StageSpec(
      name=NAME, init_state=init_state, init_args=(frozen.params, template, pretrained),
      step_fn=make_step(s_def, s_rngs, e_def, e_rngs, tx, sched, scale, cfg,
                        code_norm_enabled=config.encoder.code_norm == "template"),
      make_iterator=make_iterator,
      batch_shapes={"mu": jax.ShapeDtypeStruct((gbs,) + shape, jnp.float32),
                    "image": jax.ShapeDtypeStruct(image_shape, jnp.float32)},
      samples_per_step=gbs,
      extra_summary={"scale_factor": scale, "ldm_step": frozen.step, "train_records": int(meta["count"]),
                     "ema_per_microbatch": bool(cfg.reference_ema_per_microbatch)},
      heldout_fn=heldout)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, mesh=None,
        stop_at: int | None = None) -> dict[str, Any] | None:
  return common.train_stage(build(config, workdir), config, workdir, mesh=mesh, stop_at=stop_at)
