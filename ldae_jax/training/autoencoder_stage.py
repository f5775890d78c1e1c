"""Stage 1: AutoencoderKL with a least-squares patch discriminator (the reference's first stage).

Generator: L_G = L1 + kl_weight * KL + adv_weight * mean (D(x_hat) - 1)^2 (the reference adds a perceptual
term, see below).
Discriminator: L_D = adv_weight * 0.5 * [mean D(x_hat)^2 + mean (D(x) - 1)^2], x_hat detached; fake and real
in separate calls (separate BatchNorm batch statistics), as the reference does.

The two networks have separate Adam optimizers (lr, lr_disc) and are clipped separately. The reference's
generator backward also deposits the gradient of adv_weight * (D(x_hat)-1)^2 into D's gradients
(docs/fidelity.md, "Reference bugs"); that leak is off here and reproduced only with
`config.train.autoencoder.reference_disc_grad_leak`.
Both gradients of a micro-batch come from the same, not yet updated, networks: with accumulation the
reference also steps both only after the last micro-batch, and without it its D step sees the x_hat computed
before the G step, so this matches its update order.

The reference's perceptual (fake-3D LPIPS) term needs LPIPS/SqueezeNet weights this port does not ship, so it
is not implemented (no config field pretends otherwise) and the stage says so in its log.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ldae_jax.training import checkpoint
from ldae_jax.training import common
from ldae_jax.training import state as st
from ldae_jax.training import volumes
from ldae_jax.workdir import AUTOENCODER, Workdir

NAME = AUTOENCODER


def kl_loss(mu: jax.Array, sigma: jax.Array) -> jax.Array:
  """0.5 * sum over latent elements of (mu^2 + sigma^2 - log sigma^2 - 1), averaged over the batch."""
  mu = mu.astype(jnp.float32)
  sigma = sigma.astype(jnp.float32)
  per = 0.5 * (jnp.square(mu) + jnp.square(sigma) - jnp.log(jnp.square(sigma)) - 1.0)
  return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), axis=1))


def make_step(g_def, g_rngs, d_def, d_rngs, tx: dict[str, optax.GradientTransformation],
              cfg: ml_collections.ConfigDict):
  """Pure AE step `(state, {'image': (B*accum, X, Y, Z, 1)}) -> (state, metrics)`.

  state.params = {'g': autoencoder, 'd': discriminator}; state.rest = same split of the non-trainable state
  (the discriminator's BatchNorm statistics).
  """
  accum = int(cfg.grad_accum)
  kl_w, adv_w = float(cfg.kl_weight), float(cfg.adv_weight)
  leak = bool(cfg.reference_disc_grad_leak)
  decay = float(cfg.ema_decay)

  def g_loss(gp, dp, rest, x, key):
    ae = st.merge_model(g_def, gp, g_rngs, rest["g"])
    disc = st.merge_model(d_def, dp, d_rngs, rest["d"])
    x_hat, mu, sigma = ae(x, key)
    rec = jnp.mean(jnp.abs(x_hat - x))
    kl = kl_loss(mu, sigma)
    adv = jnp.mean(jnp.square(disc(x_hat, train=True)[-1] - 1.0))
    loss = rec + kl_w * kl + adv_w * adv
    new_rest = {"g": st.module_rest(ae), "d": st.module_rest(disc)}
    return loss, (x_hat, new_rest, {"loss": loss, "l1": rec, "kl": kl, "g_adv": adv})

  def d_loss(dp, rest_d, x_hat, x):
    disc = st.merge_model(d_def, dp, d_rngs, rest_d)
    fake = disc(x_hat, train=True)[-1]
    real = disc(x, train=True)[-1]
    loss = adv_w * 0.5 * (jnp.mean(jnp.square(fake)) + jnp.mean(jnp.square(real - 1.0)))
    return loss, (st.module_rest(disc), {"d_loss": loss, "d_fake": jnp.mean(fake), "d_real": jnp.mean(real)})

  def recon_only_grad_fn(params, rest, batch, key):
    # adv_weight 0: the discriminator is neither run nor trained (a short run spends its compute on the
    # reconstruction); its parameters, statistics and optimizer state stay as they are.
    def loss_fn(gp):
      ae = st.merge_model(g_def, gp, g_rngs, rest["g"])
      x_hat, mu, sigma = ae(batch["image"].astype(jnp.float32), key)
      rec = jnp.mean(jnp.abs(x_hat - batch["image"]))
      kl = kl_loss(mu, sigma)
      loss = rec + kl_w * kl
      return loss, ({"g": st.module_rest(ae), "d": rest["d"]}, {"loss": loss, "l1": rec, "kl": kl})
    (_, (new_rest, gm)), g_grads = jax.value_and_grad(loss_fn, has_aux=True)(params["g"])
    return {"g": g_grads, "d": jax.tree.map(jnp.zeros_like, params["d"])}, new_rest, gm

  def grad_fn(params, rest, batch, key):
    if adv_w == 0.0 and not leak:
      return recon_only_grad_fn(params, rest, batch, key)
    x = batch["image"].astype(jnp.float32)
    argnums = (0, 1) if leak else 0
    (_, (x_hat, rest, gm)), g_grads = jax.value_and_grad(g_loss, argnums=argnums, has_aux=True)(
        params["g"], params["d"], rest, x, key)
    if leak:
      g_grads, leaked = g_grads
    (_, (rest_d, dm)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(
        params["d"], rest["d"], jax.lax.stop_gradient(x_hat), x)
    if leak:
      d_grads = jax.tree.map(jnp.add, d_grads, leaked)
    return {"g": g_grads, "d": d_grads}, {"g": rest["g"], "d": rest_d}, {**gm, **dm}

  def step(state: st.TrainState, batch):
    grads, rest, metrics = st.accumulate_grads(grad_fn, state.params, state.rest, batch, st.step_key(state), accum)
    params, opt_state = {}, {}
    for k in ("g", "d"):
      if k == "d" and adv_w == 0.0 and not leak:  # untrained: Adam must not see (and count) zero gradients
        params[k], opt_state[k] = state.params[k], state.opt_state[k]
        continue
      updates, opt_state[k] = tx[k].update(grads[k], state.opt_state[k], state.params[k])
      params[k] = optax.apply_updates(state.params[k], updates)
    ema = None if state.ema is None else st.ema_step(state.ema, state.params, params, decay)
    metrics = {**metrics, "g_grad_norm": optax.tree.norm(grads["g"]), "d_grad_norm": optax.tree.norm(grads["d"])}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rest=rest), metrics

  return step


def build_networks(config: ml_collections.ConfigDict):
  from ldae_jax.models import build_autoencoder, build_discriminator  # pylint: disable=g-import-not-at-top
  ae = build_autoencoder(config, nnx.Rngs(params=config.seed))
  disc = build_discriminator(config, nnx.Rngs(params=config.seed + 1))
  return ae, disc


def build(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> common.StageSpec:
  cfg = config.train.autoencoder
  print("[autoencoder] perceptual (LPIPS) term: not implemented; "
        f"discriminator gradient leak of the reference: {'ON' if cfg.reference_disc_grad_leak else 'off'}",
        flush=True)
  g_def, gp, g_rngs, _ = st.abstract_model(lambda: build_networks(config)[0])
  d_def, dp, d_rngs, _ = st.abstract_model(lambda: build_networks(config)[1])
  tx = {"g": st.make_optimizer(cfg), "d": st.make_optimizer(cfg, lr=cfg.lr_disc)}

  def init_state():
    ae, disc = build_networks(config)
    _, g_params, _, g_rest = st.split_model(ae)
    _, d_params, _, d_rest = st.split_model(disc)
    return st.create_state({"g": g_params, "d": d_params}, {"g": g_rest, "d": d_rest}, tx, seed=config.seed + 2,
                           with_ema=cfg.ema_decay > 0)

  train = volumes.splits(config, workdir)["train"]
  gbs = int(cfg.batch_size) * int(cfg.grad_accum)

  def make_iterator():
    return volumes.make_iterator(train, config, global_batch_size=gbs, seed=int(config.seed))

  shape = (gbs,) + tuple(config.data.image_shape) + (1,)
  return common.StageSpec(
      name=NAME, init_state=init_state, step_fn=make_step(g_def, g_rngs, d_def, d_rngs, tx, cfg), make_iterator=make_iterator,
      batch_shapes={"image": jax.ShapeDtypeStruct(shape, jnp.float32)}, samples_per_step=gbs,
      extra_summary={"train_scans": len(train), "autoencoder_parameters": st.count_params(gp),
                     "discriminator_parameters": st.count_params(dp),
                     "reference_disc_grad_leak": bool(cfg.reference_disc_grad_leak), "perceptual": False})


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, mesh=None,
        stop_at: int | None = None) -> dict[str, Any] | None:
  return common.train_stage(build(config, workdir), config, workdir, mesh=mesh, stop_at=stop_at)


def trained_autoencoder(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
  """(AutoencoderKL with the newest stage-1 weights (EMA when kept), checkpoint step).

  Reads only the autoencoder's EMA and state, not the discriminator or the optimizer. Raises FileNotFoundError
  naming the path and the fix when stage 1 has not been run in `workdir`.
  """
  from ldae_jax.models import build_autoencoder  # pylint: disable=g-import-not-at-top
  g_def, gp, g_rngs, g_rest = st.abstract_model(lambda: build_autoencoder(config, nnx.Rngs(params=config.seed)))
  w = checkpoint.restore_ema_weights(
      Workdir(workdir).checkpoints(NAME), {"g": gp}, {"g": g_rest}, what="autoencoder weights",
      missing_fix=f"run the autoencoder stage first (--config.stage=autoencoder --workdir {workdir})",
      mismatch_fix="use the config (config.autoencoder) it was trained with")
  return st.merge_model(g_def, w.params["g"], g_rngs, w.rest["g"]), w.step
