"""Stage 2: eps-prediction pretraining of the latent UNet on the latent shards (the reference's
`ldae_pretrain.yaml`).

z0 = scale * mu (the posterior mean, not one stored posterior sample as the reference does, see docs/fidelity.md,
"Reference bugs": a baked-in sigma*eps sample puts a floor under the loss), t ~ U{0..T-1}, z_t = q_sample(z0, t, eps),
L = mean (eps - UNet(z_t, t))^2 with dropout active (with `config.diffusion.prediction="v"`, the v-MSE of the UNet's
head instead). Adam with the reference's settings after global-norm
clipping; gradient accumulation by `lax.scan`; EMA once per optimizer step.
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
from ldae_jax.training import common
from ldae_jax.training import loop
from ldae_jax.training import state as st
from ldae_jax.workdir import LDM, Workdir

NAME = LDM
HELDOUT_SCANS = 32  # validation latents the held-out eps error is measured on at every log step


def make_step(graphdef, rng_state, tx: optax.GradientTransformation, sched, scale: float,
              cfg: ml_collections.ConfigDict):
  """The pure ldm train step `(state, batch) -> (state, metrics)`; batch = {'mu': (B*accum, X, Y, Z, C)}."""
  accum = int(cfg.grad_accum)
  decay = float(cfg.ema_decay)
  timesteps = int(sched.num_timesteps)

  def loss_fn(params, rest, batch, key):
    model = st.merge_model(graphdef, params, rng_state, rest)
    z0 = batch["mu"].astype(jnp.float32) * scale
    k_t, k_n, k_d = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, timesteps)
    noise = jax.random.normal(k_n, z0.shape, jnp.float32)
    out = model.raw(losses.q_sample(sched, z0, t, noise), t, deterministic=False, rngs=nnx.Rngs(dropout=k_d))
    # eps-MSE (reference), or v-MSE: the eps-MSE weighted by 1/abar_t, so that the high-t steps, where the
    # sampler's x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) magnifies every eps error, are learnt as well.
    v_prediction = model.v_coefs is not None  # config.diffusion.prediction, fixed in the graph definition
    return losses.eps_loss(out, losses.v_target(sched, z0, t, noise) if v_prediction else noise)

  return st.make_train_step(loss_fn, tx, accum=accum, ema_decay=decay)


def make_heldout_eps_fn(graphdef, rng_state, sched, scale: float, mu: np.ndarray,
                        timesteps=code_use.DEFAULT_TIMESTEPS):
  """`state -> {eps_t<t>: MSE, eps: mean}`: the EMA UNet's eps error on fixed validation latents and noise at
  fixed timesteps (the stage's held-out plateau; stage 3 builds on these weights)."""
  z0 = jnp.asarray(mu, jnp.float32) * scale
  ts = jnp.asarray(np.asarray(timesteps, np.int32))

  def fn(state):
    params = state.ema if state.ema is not None else state.params
    model = st.merge_model(graphdef, params, rng_state, state.rest)

    def one(k_t):
      k, t = k_t
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), k), z0.shape, jnp.float32)
      tt = jnp.full((z0.shape[0],), t, jnp.int32)
      return losses.eps_loss(model(losses.q_sample(sched, z0, tt, noise), tt, deterministic=True), noise)

    errs = jax.lax.map(one, (jnp.arange(len(timesteps)), ts))
    return {"eps": jnp.mean(errs), **{f"eps_t{t}": errs[i] for i, t in enumerate(timesteps)}}

  return fn


def plateau_note(metrics: list[dict[str, float]], key: str = "heldout_eps", window: float = 0.25,
                 tolerance: float = 0.02) -> str:
  """Whether `key` still fell by more than `tolerance` (relative) over the last `window` of the logged steps."""
  vals = [(m["step"], m[key]) for m in metrics if key in m]
  label = key.replace("heldout_", "held-out ")
  if len(vals) < 3:
    return f"{label}: too few log points to judge a plateau"
  last_step = vals[-1][0]
  ref = [v for s, v in vals if s <= last_step * (1 - window)]
  if not ref:
    return f"{label}: too few log points to judge a plateau"
  drop = (ref[-1] - vals[-1][1]) / ref[-1]
  verdict = ("still falling: NOT at a plateau yet, more steps would help (config.train.ldm.steps)"
             if drop > tolerance else "at a plateau")
  return (f"{label} {ref[-1]:.4g} -> {vals[-1][1]:.4g} over the last {int(window * 100)} % of the steps "
          f"({100 * drop:+.1f} %): {verdict}")


def build(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> common.StageSpec:
  from ldae_jax.models import build_unet  # pylint: disable=g-import-not-at-top
  cfg = config.train.ldm
  wd = Workdir(workdir)
  sdir = wd.shards("train")
  meta = shards.read_metadata(sdir)
  shape = latents.check_latent_shape(config, meta, str(sdir))
  scale = latents.scale_factor(config, meta, str(sdir))
  build_net = lambda: build_unet(config, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  graphdef, _, rng_state, _ = st.abstract_model(build_net)
  tx = st.make_optimizer(cfg)

  def init_state():
    _, params, _, rest = st.split_model(build_net())
    return st.create_state(params, rest, tx, seed=config.seed + 2, with_ema=cfg.ema_decay > 0)

  sched = make_schedule(config.diffusion)
  gbs = int(cfg.batch_size) * int(cfg.grad_accum)

  def make_iterator():
    return shards.make_iterator(sdir, global_batch_size=gbs, seed=int(config.seed), shuffle=True, repeat=True,
                                drop_remainder=True, fields=("mu",), num_workers=int(config.data.num_workers))

  val = latents.heldout_records(wd.shards("val"), HELDOUT_SCANS)
  return common.StageSpec(
      name=NAME, init_state=init_state, step_fn=make_step(graphdef, rng_state, tx, sched, scale, cfg),
      make_iterator=make_iterator, batch_shapes={"mu": jax.ShapeDtypeStruct((gbs,) + shape, jnp.float32)},
      samples_per_step=gbs, extra_summary={"scale_factor": scale, "train_records": int(meta["count"])},
      heldout_fn=None if val is None else make_heldout_eps_fn(graphdef, rng_state, sched, scale, val["mu"]))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, mesh=None,
        stop_at: int | None = None) -> dict[str, Any] | None:
  summary = common.train_stage(build(config, workdir), config, workdir, mesh=mesh, stop_at=stop_at)
  if summary is not None and jax.process_index() == 0:
    print(f"[{NAME}] {plateau_note(loop.read_metrics(Workdir(workdir).stage_dir(NAME)))}", flush=True)
  return summary

