"""Attribute manipulation along the AD-vs-CN probe direction, and stochastic variations (the paper's counterfactual edits).

With the probe's standardisation (mean m, std s) and unit direction w (towards AD, the positive class):
y' = ((y - m)/s + alpha sqrt(d) w) s + m (`diffusion.interpolate.manipulate`); x_T is DDIM-encoded with the
original y, decoding uses y'. AD scans are moved towards CN (-w), CN scans towards AD (+w), for each |alpha| in
config.eval.manip_alphas. As a check that the edit is semantic, the edited volume is re-encoded and scored
by the same probe: p(AD) should fall for AD->CN and rise for CN->AD as |alpha| grows.
Variations: the same y with several x_T ~ N(0, I).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax.diffusion import ddim as ddim_lib, interpolate, schedule as schedule_lib
from ldae_jax.evaluation import probes
from ldae_jax.evaluation.reconstruction import LDAEModels


def edit_magnitude(volumes: np.ndarray) -> np.ndarray:
  """(N, A, ...) decodes for alphas[0] = 0, alphas[1:] -> (A,) mean |decode(alpha) - decode(0)| over scans and
  voxels: separates 'the edit moved the image but not the probe' from 'the decoder ignores the code'."""
  v = np.asarray(volumes, np.float64)
  return np.abs(v - v[:, :1]).reshape(v.shape[0], v.shape[1], -1).mean(axis=(0, 2))


def make_manip_fn(m: LDAEModels, config: ml_collections.ConfigDict, steps: int, alphas: tuple[float, ...]):
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  clamp, crange = m.clamp, m.clamp_range

  @jax.jit
  def run(states, image, mu, direction, mean, std):
    ae = nnx.merge(m.ae_def, states["ae"])
    shift = nnx.merge(m.shift_def, states["shift"])
    enc = nnx.merge(m.enc_def, states["enc"])
    y = enc(image, deterministic=True)
    x_T = ddim_lib.encode(lambda x, t: shift(x, t, y), mu * m.scale, sched, shifted=True, clamp=clamp,
                          clamp_range=crange)
    outs, codes = [], []
    for a in alphas:
      y2 = interpolate.manipulate(y, direction, a, mean, std)
      z = ddim_lib.sample(lambda x, t: shift(x, t, y2), x_T, sched, shifted=True, clamp=clamp, clamp_range=crange)
      v = ae.decode(z / m.scale)
      outs.append(v)
      codes.append(enc(v, deterministic=True))
    return jnp.stack(outs, 1), jnp.stack(codes, 1)

  return run


def make_variation_fn(m: LDAEModels, config: ml_collections.ConfigDict, steps: int, n: int):
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  clamp, crange = m.clamp, m.clamp_range

  @jax.jit
  def run(states, image, mu, key):
    ae = nnx.merge(m.ae_def, states["ae"])
    shift = nnx.merge(m.shift_def, states["shift"])
    y = nnx.merge(m.enc_def, states["enc"])(image[:1], deterministic=True)
    y = jnp.repeat(y, n, axis=0)
    x_T = jax.random.normal(key, (n, *mu.shape[1:]), jnp.float32)
    z = ddim_lib.sample(lambda x, t: shift(x, t, y), x_T, sched, shifted=True, clamp=clamp, clamp_range=crange)
    return ae.decode(z / m.scale)

  return run


def evaluate_manipulation(m: LDAEModels, config: ml_collections.ConfigDict, data: dict[str, np.ndarray],
                          probe: probes.LinearProbe, *, steps: int, per_class: int = 2, seed: int = 0) -> dict:
  """Edits `per_class` AD and CN scans for each |alpha|; returns volumes and p(AD) of the re-encoded edits."""
  states = {"ae": m.ae_state, "shift": m.shift_state, "enc": m.enc_state}
  alphas = tuple(sorted({abs(float(a)) for a in config.eval.manip_alphas}))
  w = probes.manipulation_direction(probe)
  fn = make_manip_fn(m, config, steps, (0.0,) + alphas)
  out: dict[str, Any] = {"alphas": [0.0, *alphas], "ddim_steps": steps, "direction": "unit probe weight, AD +"}
  for src, sign, name in (("AD", -1.0, "AD_to_CN"), ("CN", 1.0, "CN_to_AD")):
    idx = np.flatnonzero(data["diagnosis"] == src)[:per_class]
    if len(idx) == 0:
      out[name] = {"n": 0}
      continue
    vols, codes = fn(states, jnp.asarray(data["image"][idx]), jnp.asarray(data["mu"][idx]),
                     jnp.asarray(sign * w, jnp.float32), jnp.asarray(probe.mean, jnp.float32),
                     jnp.asarray(probe.std, jnp.float32))
    codes = np.asarray(codes, np.float64)
    p_ad = 1 / (1 + np.exp(-probe.decision(codes.reshape(-1, codes.shape[-1])).reshape(codes.shape[:2])))
    vols = np.asarray(vols)
    out[name] = {"n": int(len(idx)), "scan_ids": [str(s) for s in data["scan_id"][idx]],
                 "p_ad_reencoded_by_alpha": p_ad.mean(0).tolist(),
                 # How much the edit changed the decoded image at all (0 for alpha 0 by construction).
                 "mean_abs_change_by_alpha": edit_magnitude(vols).tolist(), "volumes": vols,
                 "originals": data["image"][idx]}
  n = int(config.eval.num_variations)
  var = make_variation_fn(m, config, steps, n)(states, jnp.asarray(data["image"][:1]), jnp.asarray(data["mu"][:1]),
                                               jax.random.key(seed))
  out["variations"] = {"n": n, "scan_id": str(data["scan_id"][0]), "volumes": np.asarray(var),
                       "original": data["image"][0]}
  return out
