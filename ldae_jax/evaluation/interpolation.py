"""Longitudinal interpolation (the paper's missing follow-up experiment): predict an intermediate scan from its neighbours.

For every subject with >= 3 sessions, every pair (i, j) with j >= i + 2 and every k strictly between them:
alpha = (t_k - t_i) / (t_j - t_i); y = LERP(y_i, y_j; alpha); x_T = SLERP(x_T,i, x_T,j; alpha) (each x_T
DDIM-encoded with its own code); DDIM-sample and AE-decode. Scored against the AE reconstruction of scan k (the
reference's target) and against the image, beside two model-free baselines scored the same way: copying the
nearest session, and the voxel-wise LERP of the two neighbouring images. Grouped by prediction gap min(t_k - t_i, t_j - t_k) in months
(the quantity behind the paper's 6/12/18/24-month figures, most plausibly), by the
total gap t_j - t_i and by the relative position alpha rounded to 0.1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldae_jax.diffusion import ddim as ddim_lib, interpolate, schedule as schedule_lib
from ldae_jax.evaluation import metrics
from ldae_jax.evaluation.reconstruction import LDAEModels, map_batched
from flax import nnx


def triplets(subjects: np.ndarray, months: np.ndarray) -> list[dict[str, Any]]:
  """All (i, k, j) scan-index triplets of the same subject with t_i < t_k < t_j (sessions sorted by months)."""
  by_subj: dict[str, list[int]] = defaultdict(list)
  for idx, s in enumerate(subjects):
    by_subj[str(s)].append(idx)
  out = []
  for s, idxs in sorted(by_subj.items()):
    idxs = sorted(idxs, key=lambda i: int(months[i]))
    t = [int(months[i]) for i in idxs]
    if len(set(t)) != len(t):
      raise ValueError(f"subject {s} has two scans at session month {t}; sessions must be distinct.")
    for a in range(len(idxs)):
      for b in range(a + 2, len(idxs)):
        for c in range(a + 1, b):
          ti, tk, tj = t[a], t[c], t[b]
          out.append({"subject": s, "i": idxs[a], "k": idxs[c], "j": idxs[b], "alpha": (tk - ti) / (tj - ti),
                      "time_gap": tj - ti, "prediction_gap": min(tk - ti, tj - tk)})
  return out


def make_interp_fn(m: LDAEModels, config: ml_collections.ConfigDict, steps: int):
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  clamp, crange = m.clamp, m.clamp_range
  kernel = int(config.eval.ssim_kernel)

  @jax.jit
  def run(states, b):
    ae = nnx.merge(m.ae_def, states["ae"])
    shift = nnx.merge(m.shift_def, states["shift"])
    enc = nnx.merge(m.enc_def, states["enc"])
    y_i, y_j = enc(b["image_i"], deterministic=True), enc(b["image_j"], deterministic=True)
    enc_x = lambda z, y: ddim_lib.encode(lambda x, t: shift(x, t, y), z * m.scale, sched, shifted=True,
                                         clamp=clamp, clamp_range=crange)
    x_i, x_j = enc_x(b["mu_i"], y_i), enc_x(b["mu_j"], y_j)
    y = interpolate.lerp(y_i, y_j, b["alpha"])
    x_T = interpolate.slerp(x_i, x_j, b["alpha"])
    z = ddim_lib.sample(lambda x, t: shift(x, t, y), x_T, sched, shifted=True, clamp=clamp, clamp_range=crange)
    pred = ae.decode(z / m.scale)
    target = ae.decode(b["mu_k"])  # AE reconstruction of the stored latent (reference target)
    # Baselines that use no model: a blob-like prediction must not score better than these.
    a = b["alpha"].reshape((-1,) + (1,) * (b["image_i"].ndim - 1))
    candidates = {"": pred, "nearest_": jnp.where(a <= 0.5, b["image_i"], b["image_j"]),
                  "average_": (1.0 - a) * b["image_i"] + a * b["image_j"]}
    out = {"pred": pred}
    for name, v in candidates.items():
      out[f"{name}ssim_vs_ae"] = metrics.ssim(v, target, kernel_size=kernel)
      out[f"{name}mse_vs_ae"] = metrics.mse(v, target)
      out[f"{name}ssim_vs_image"] = metrics.ssim(v, b["image_k"], kernel_size=kernel)
      out[f"{name}mse_vs_image"] = metrics.mse(v, b["image_k"])
    return out

  return run


def _group(rows: list[dict], key: str, values: dict[str, np.ndarray]) -> dict[str, dict]:
  groups: dict[Any, list[int]] = defaultdict(list)
  for n, r in enumerate(rows):
    groups[r[key]].append(n)
  return {str(g): {**{m: float(np.mean(v[idx])) for m, v in values.items()}, "n": len(idx)}
          for g, idx in sorted(groups.items())}


def evaluate_interpolation(m: LDAEModels, config: ml_collections.ConfigDict, data: dict[str, np.ndarray], *,
                           steps: int, max_triplets: int = 64, keep: int = 3) -> dict[str, Any]:
  """Runs every triplet (up to max_triplets) and groups the metrics; {'n': 0, ...} when no subject qualifies."""
  rows = triplets(data["subject"], data["session_months"])[:max_triplets]
  if not rows:
    return {"n": 0, "note": "no subject with >= 3 sessions in this split"}
  idx = {s: np.array([r[s] for r in rows]) for s in ("i", "j", "k")}
  arrays = {"alpha": np.array([r["alpha"] for r in rows], np.float32)}
  for s in ("i", "j", "k"):
    arrays[f"image_{s}"] = data["image"][idx[s]]
    arrays[f"mu_{s}"] = data["mu"][idx[s]]
  states = {"ae": m.ae_state, "shift": m.shift_state, "enc": m.enc_state}
  res = map_batched(make_interp_fn(m, config, steps), arrays, int(config.eval.batch_size), states,
                    desc=f"interp DDIM-{steps}")
  vals = {k: v for k, v in res.items() if k != "pred"}
  for r in rows:
    r["relative_position"] = round(r["alpha"], 1)
  return {
      "n": len(rows), "ddim_steps": steps,
      "overall": {k: float(np.mean(v)) for k, v in vals.items()},
      "by_prediction_gap_months": _group(rows, "prediction_gap", vals),
      "by_time_gap_months": _group(rows, "time_gap", vals),
      "by_relative_position": _group(rows, "relative_position", vals),
      "examples": {"rows": rows[:keep], "start": arrays["image_i"][:keep], "end": arrays["image_j"][:keep],
                   "target": arrays["image_k"][:keep], "pred": res["pred"][:keep]},
  }
