"""Code-use diagnostics of a trained run: does DDIM decoding depend on the semantic code, and how much?

On test scans (EMA networks, fixed timesteps and noise):
- the PDAE loss by timestep with the shift branch off, with the scan's own code, with another subject's code
  and with the mean code; the relative gap (other - own) / own averaged over timesteps with a bootstrap
  interval over scans; how much c_t G moves when the code is swapped; the frozen UNet's eps error by t;
- a DDIM decode from the scan's own encoded x_T with its own code and with another subject's: how far apart
  the two decodes land, beside how far apart the two subjects' latents are;
- semantic-only decodes (x_T ~ N(0, I), DDIM): MSE to the scan's latent with the own code, with another
  subject's, and the MSE of the cohort-mean latent. An ideal unconditional sample lands at twice the
  cohort-mean MSE (E|x - x'|^2 = 2 Var); farther means the sampler leaves the data manifold.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax.diffusion import code_use as cu, ddim as ddim_lib, schedule as schedule_lib
from ldae_jax.evaluation.reconstruction import LDAEModels, map_batched, semantic_codes


def make_swap_fn(m: LDAEModels, config: ml_collections.ConfigDict, timesteps) -> Any:
  sched = schedule_lib.make_schedule(config.diffusion)

  @jax.jit
  def run(shift_state, batch):
    shift = nnx.merge(m.shift_def, shift_state)
    frozen, shift_fn = shift.frozen_and_shift_fns()
    key = jax.random.wrap_key_data(batch["key"][0])
    out = cu.swap_losses_by_t(frozen, shift_fn, batch["mu"] * m.scale, batch["y"], batch["y_other"], key,
                              timesteps, sched, y_mean=batch["y_mean"][0])
    return {k: jnp.swapaxes(v, 0, 1) for k, v in out.items()}  # (B, T): map_batched concatenates rows

  return run


def make_decode_fn(m: LDAEModels, config: ml_collections.ConfigDict, steps: int) -> Any:
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  kw = dict(shifted=True, **m.ddim_kwargs())

  @jax.jit
  def run(shift_state, batch):
    shift = nnx.merge(m.shift_def, shift_state)
    with_code = lambda y: (lambda x, t: shift(x, t, y))
    sample = lambda y, x: ddim_lib.sample(with_code(y), x, sched, **kw)
    per = lambda a: jnp.mean(jnp.square(a).reshape(a.shape[0], -1), axis=1)
    z0, z_other = batch["mu"] * m.scale, batch["mu_other"] * m.scale
    x_T = ddim_lib.encode(with_code(batch["y"]), z0, sched, **kw)
    rec_own, rec_other = sample(batch["y"], x_T), sample(batch["y_other"], x_T)
    noise = jax.random.normal(jax.random.wrap_key_data(batch["key"][0]), z0.shape, jnp.float32)
    sem_own, sem_other = sample(batch["y"], noise), sample(batch["y_other"], noise)
    return {"swap_decode_rms": jnp.sqrt(per(rec_own - rec_other)), "subject_rms": jnp.sqrt(per(z0 - z_other)),
            "encoded_mse": per(rec_own - z0), "semantic_own_mse": per(sem_own - z0),
            "semantic_other_mse": per(sem_other - z0),
            "cohort_mean_mse": per(batch["mean_latent"] * m.scale - z0)}

  return run


def evaluate_code_use(m: LDAEModels, config: ml_collections.ConfigDict, data: dict[str, np.ndarray],
                      mean_latent: np.ndarray, *, steps: int = 10, timesteps=cu.DEFAULT_TIMESTEPS,
                      seed: int = 0) -> dict[str, Any]:
  """The diagnostics above on `data` (test split: mu, image, subject); `mean_latent` is the train-split mean mu."""
  n = len(data["mu"])
  bs = int(config.eval.batch_size)
  y = semantic_codes(m.enc_def, m.enc_state, data["image"], bs, desc="codes")
  perm = cu.other_subject_pairing(data["subject"], seed=seed)
  key = np.asarray(jax.random.key_data(jax.random.key(seed)))
  keys = np.broadcast_to(key, (n,) + key.shape)
  arrays = {"mu": data["mu"], "y": y, "y_other": y[perm], "key": keys,
            "y_mean": np.broadcast_to(y.mean(0), y.shape)}
  by_scan = map_batched(make_swap_fn(m, config, tuple(timesteps)), arrays, bs, m.shift_state, desc="code swap")
  loss = cu.summarise({k: v.T for k, v in by_scan.items()}, timesteps, seed=seed)
  sample_keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed + 1), n)))
  dec = map_batched(make_decode_fn(m, config, steps),
                    {"mu": data["mu"], "mu_other": data["mu"][perm], "y": y, "y_other": y[perm],
                     "key": sample_keys, "mean_latent": np.broadcast_to(mean_latent, data["mu"].shape)},
                    bs, m.shift_state, desc=f"code-swap DDIM-{steps}")
  d = {k: float(np.mean(v)) for k, v in dec.items()}
  decode = {
      "ddim_steps": int(steps),
      **d,
      "swap_decode_over_subject": d["swap_decode_rms"] / max(d["subject_rms"], 1e-12),
      "semantic_own_vs_other": d["semantic_own_mse"] / max(d["semantic_other_mse"], 1e-12),
      "semantic_own_vs_cohort_mean": d["semantic_own_mse"] / max(d["cohort_mean_mse"], 1e-12),
  }
  return {"loss": loss, "decode": decode, "n_scans": int(n)}


def markdown(res: dict[str, Any]) -> str:
  """The report section: loss by t band, the gap with its interval, decode distances."""
  lo, de = res["loss"], res["decode"]
  lines = [
      f"Code use ({res['n_scans']} test scans; EMA networks; fixed noise per timestep):",
      "",
      "| t | eps MSE (stage 2) | loss, G off | own code | other subject's code | mean code | gap other | "
      "G change on swap |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in lo["by_t"]:
    lines.append(f"| {r['t']} | {r['eps_mse']:.4g} | {r['off']:.4g} | {r['own']:.4g} | {r['other']:.4g} | "
                 f"{r['mean']:.4g} | {100 * r['gap_other']:+.2f} % | {100 * r['swap_change']:.1f} % |")
  ci = lo["gap_other_ci95"]
  lines += [
      "",
      f"- loss gap (other subject's code - own) / own, mean over t: **{100 * lo['gap_other']:+.2f} %** "
      f"[95 % interval {100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]; with the mean code {100 * lo['gap_mean']:+.2f} %; "
      f"what G gains over eps_hat alone (own code, loss summed over t): {100 * lo['g_gain']:.1f} %.",
      f"- DDIM-{de['ddim_steps']} decode of the scan's own x_T with another subject's code moves the latent by "
      f"RMS {de['swap_decode_rms']:.4g}; the two subjects' latents differ by {de['subject_rms']:.4g} "
      f"(ratio {de['swap_decode_over_subject']:.3f}).",
      f"- semantic-only decodes (x_T ~ N(0, I)), MSE to the scan's latent: own code {de['semantic_own_mse']:.4g}, "
      f"another subject's {de['semantic_other_mse']:.4g} (own/other {de['semantic_own_vs_other']:.3f}); the "
      f"cohort-mean latent {de['cohort_mean_mse']:.4g} (own / cohort-mean {de['semantic_own_vs_cohort_mean']:.2f}; "
      "an ideal unconditional sample lands at 2).",
  ]
  return "\n".join(lines) + "\n"
