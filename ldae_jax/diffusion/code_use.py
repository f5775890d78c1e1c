"""Does the shift branch use the semantic code? The PDAE loss of one batch with the scan's own code, another
subject's code and the mean code, and with the shift branch off, at fixed timesteps and fixed noise.

A decoder that ignores its code scores the same with every code; the relative gap (other - own) / own is the
code's worth to the decoder in loss units. The frozen UNet runs once per timestep and only the shift branch is
re-run per code, so a held-out batch costs about as much as a few training steps (stage 3 logs it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldae_jax.diffusion import losses
from ldae_jax.diffusion.schedule import GaussianSchedule

CODES = ("own", "other", "mean")
# Timesteps the diagnostics report by default: the low-noise end, the middle where the posterior mean still
# depends on the subject, and the high-noise end where it barely does.
DEFAULT_TIMESTEPS = (25, 100, 250, 475, 700, 900)

FrozenFn = Callable[[jax.Array, jax.Array], tuple[Any, jax.Array]]  # (x_t, t) -> (context, eps_hat)
ShiftFn = Callable[[Any, jax.Array], jax.Array]  # (context, y) -> G


def other_subject_pairing(subjects: Sequence[Any], seed: int = 0) -> np.ndarray:
  """perm such that subjects[perm[i]] != subjects[i] for every i (a random pairing with another subject).

  Raises ValueError when fewer than two subjects are present (no other subject to swap with).
  """
  subjects = np.asarray(subjects)
  n = len(subjects)
  if len(np.unique(subjects)) < 2:
    raise ValueError("code-swap diagnostics need scans of at least two subjects.")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  for i in range(n):
    if subjects[perm[i]] == subjects[i]:
      candidates = np.flatnonzero((subjects != subjects[i]) & (subjects[perm] != subjects[i]))
      if len(candidates) == 0:  # no swap partner keeps both sides valid: take any scan of another subject
        perm[i] = rng.choice(np.flatnonzero(subjects != subjects[i]))
        continue
      j = rng.choice(candidates)
      perm[i], perm[j] = perm[j], perm[i]
  return perm


def swap_losses(frozen_fn: FrozenFn, shift_fn: ShiftFn, z0: jax.Array, y: jax.Array, y_other: jax.Array,
                y_mean: jax.Array, noise: jax.Array, t: jax.Array, sched: GaussianSchedule) -> dict[str, jax.Array]:
  """Per-scan PDAE losses at one timestep per scan (t int (B,)); every output is (B,) float32.

  Keys: `off` (eps_hat alone, the shift branch off), `own`, `other`, `mean` (the code given to G),
  `eps_mse` (the frozen UNet's unweighted eps error), `g_rms` (RMS of c_t G with the own code) and
  `g_swap_rms` (RMS of c_t (G_own - G_other)).
  """
  x_t = losses.q_sample(sched, z0, t, noise)
  ctx, eps = frozen_fn(x_t, t)
  eps = eps.astype(jnp.float32)
  weight = losses.extract(sched.pdae_weight, t, z0.ndim)
  coef = losses.extract(sched.shift_coef, t, z0.ndim)
  per_scan = lambda a: jnp.mean(a.reshape(a.shape[0], -1), axis=1)
  out = {"off": per_scan(weight * jnp.square(noise - eps)), "eps_mse": per_scan(jnp.square(noise - eps))}
  shifts = {}
  for name, code in zip(CODES, (y, y_other, jnp.broadcast_to(y_mean, y.shape))):
    shifts[name] = coef * shift_fn(ctx, code).astype(jnp.float32)
    out[name] = per_scan(weight * jnp.square(noise - (eps + shifts[name])))
  out["g_rms"] = jnp.sqrt(per_scan(jnp.square(shifts["own"])))
  out["g_swap_rms"] = jnp.sqrt(per_scan(jnp.square(shifts["own"] - shifts["other"])))
  return out


def swap_losses_by_t(frozen_fn: FrozenFn, shift_fn: ShiftFn, z0: jax.Array, y: jax.Array, y_other: jax.Array,
                     noise_key: jax.Array, timesteps: Sequence[int], sched: GaussianSchedule,
                     y_mean: jax.Array | None = None) -> dict[str, jax.Array]:
  """`swap_losses` at every timestep of `timesteps` (the same t for the whole batch): outputs (T, B).

  The noise of timestep k is drawn from fold_in(noise_key, k), so two calls with the same key score the same
  noisy latents whatever the codes (the comparison between codes is paired). `y_mean` (1, D) defaults to the
  batch mean.
  """
  y_mean = jnp.mean(y, axis=0, keepdims=True) if y_mean is None else jnp.reshape(y_mean, (1, -1))
  ts = jnp.asarray(np.asarray(timesteps, np.int32))

  def one(k_t):
    k, t_scalar = k_t
    noise = jax.random.normal(jax.random.fold_in(noise_key, k), z0.shape, jnp.float32)
    t = jnp.full((z0.shape[0],), t_scalar, jnp.int32)
    return swap_losses(frozen_fn, shift_fn, z0, y, y_other, y_mean, noise, t, sched)

  return jax.lax.map(one, (jnp.arange(len(timesteps)), ts))


def relative_gap(other: np.ndarray, own: np.ndarray) -> float:
  """(mean other - mean own) / mean own: how much worse the loss gets with another subject's code."""
  own_m = float(np.mean(own))
  return (float(np.mean(other)) - own_m) / own_m


def pooled_gain(off, own):
  """(sum off - sum own) / sum off over timesteps: what G gains on the summed loss. A mean of per-timestep ratios
  would be ruled by the timesteps where both losses are ~1e-5 (on the seed-0 quickstart: -207 % at t = 900
  against +0.5 ... +38 % at t = 25 ... 700, a mean of -18.7 %; summed: +13.0 %); the sum weighs each timestep
  by the loss there is to gain. `off`, `own`: (T,) numpy or jax arrays of the mean loss per timestep."""
  return (off.sum() - own.sum()) / off.sum()


def summarise(by_t: dict[str, np.ndarray], timesteps: Sequence[int], *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
  """Per-timestep means and gaps, and the gap averaged over timesteps with a 95 % bootstrap interval over scans.

  `by_t[key]` is (T, N). `gap_other` / `gap_mean` are (other or mean - own) / own; `g_gain` is (off - own) / off
  (what G gains over eps_hat alone, with or without the code), per timestep and, in the summary, on the loss
  summed over the timesteps (`pooled_gain`); `swap_change` is RMS c_t(G_own - G_other) over RMS c_t G_own.
  """
  by_t = {k: np.asarray(v, np.float64) for k, v in by_t.items()}
  rows = []
  for i, t in enumerate(timesteps):
    row = {"t": int(t), **{k: float(np.mean(by_t[k][i])) for k in ("off", "eps_mse") + CODES}}
    row["gap_other"] = relative_gap(by_t["other"][i], by_t["own"][i])
    row["gap_mean"] = relative_gap(by_t["mean"][i], by_t["own"][i])
    row["g_gain"] = (row["off"] - row["own"]) / row["off"]
    row["swap_change"] = float(np.sqrt(np.mean(by_t["g_swap_rms"][i] ** 2)) /
                               max(np.sqrt(np.mean(by_t["g_rms"][i] ** 2)), 1e-12))
    rows.append(row)

  def mean_gap(idx):
    return float(np.mean([relative_gap(by_t["other"][i][idx], by_t["own"][i][idx]) for i in range(len(timesteps))]))

  n = by_t["own"].shape[1]
  rng = np.random.default_rng(seed)
  boots = [mean_gap(rng.integers(0, n, n)) for _ in range(n_boot)]
  return {
      "by_t": rows,
      "gap_other": mean_gap(np.arange(n)),
      "gap_other_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
      "gap_mean": float(np.mean([r["gap_mean"] for r in rows])),
      "g_gain": float(pooled_gain(np.array([r["off"] for r in rows]), np.array([r["own"] for r in rows]))),
      "swap_change": float(np.mean([r["swap_change"] for r in rows])),
      "n_scans": int(n),
  }
