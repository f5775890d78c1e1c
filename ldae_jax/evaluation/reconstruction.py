"""Trained-model loading, semantic codes and DDIM reconstructions (the paper's encode-decode protocol).

Every per-batch computation is one `jax.jit` function of (model state, batch) compiled once per batch shape: the
last batch is padded to the fixed `config.eval.batch_size` (padded rows are dropped from the results), and each
DDIM loop is one `lax.scan` from `ldae_jax.diffusion.ddim`.

Reconstructions are scored against the image (reference protocol) *and* against the autoencoder's own
reconstruction decode(z0 / scale): the latter isolates the diffusion part. SSIM(AE reconstruction, image) is
what decoding the true latent gives (a decode may land on either side of it), and the train split's mean image
is scored beside them as the floor of a decode that carries nothing of the scan.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax import progress
from ldae_jax.data import latents, shards
from ldae_jax.diffusion import ddim as ddim_lib, schedule as schedule_lib
from ldae_jax.evaluation import metrics
from ldae_jax.parallel import mesh as pmesh
from ldae_jax.workdir import AUTOENCODER, REPRESENTATION, Workdir

SCALAR_FIELDS = ("subject", "scan_id", "diagnosis", "age", "session_months")


@dataclasses.dataclass
class LDAEModels:
  """The EMA networks of a trained run, split for jitting (graphdef + state), and the latent scale."""
  ae_def: Any
  ae_state: Any
  shift_def: Any
  shift_state: Any
  enc_def: Any
  enc_state: Any
  scale: float
  steps: dict[str, int]
  clamp: bool = True
  clamp_range: float = 1.0

  def ddim_kwargs(self) -> dict[str, Any]:
    """The x0-clamp arguments of every DDIM call on these models (`config.diffusion`, resolved on load)."""
    return {"clamp": self.clamp, "clamp_range": self.clamp_range}


def resolve_clamp_range(config: ml_collections.ConfigDict, workdir: str | os.PathLike, scale: float) -> float:
  """`config.diffusion.clamp_range`, or with 0 the largest |scaled latent| of the train split: the clamp then
  bounds x0 where the data lie instead of cutting the scaled latents (std 1) at the reference's +-1."""
  if float(config.diffusion.clamp_range) > 0:
    return float(config.diffusion.clamp_range)
  mu = shards.read_all(Workdir(workdir).shards("train"), ("mu",))["mu"]
  return float(np.abs(mu).max() * scale)


def load_ldae(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> LDAEModels:
  """EMA AE, ShiftUNet (with its frozen stage-2 UNet) and encoder from `workdir` checkpoints."""
  from ldae_jax.models import build_encoder, build_shift_unet
  from ldae_jax.training import autoencoder_stage, representation_stage as rs, state as st
  from ldae_jax.training.checkpoint import restore_ema_weights
  wd = Workdir(workdir)
  ae, ae_step = autoencoder_stage.trained_autoencoder(config, workdir)
  s_def, sp, s_rngs, s_rest = st.abstract_model(lambda: build_shift_unet(config, nnx.Rngs(0)), rs.SHIFT_TRAINABLE)
  e_def, ep, e_rngs, e_rest = st.abstract_model(lambda: build_encoder(config, nnx.Rngs(0)))
  # The shift branch's `rest` holds the frozen stage-2 UNet and the encoder's the code-norm statistics.
  w = restore_ema_weights(
      wd.checkpoints(REPRESENTATION), {"shift": sp, "encoder": ep}, {"shift": s_rest, "encoder": e_rest},
      what="representation weights",
      missing_fix=f"run the representation stage first (--config.stage=representation --workdir {workdir})",
      mismatch_fix="use the config (config.unet / config.encoder) it was trained with")
  shift = st.merge_model(s_def, w.params["shift"], s_rngs, w.rest["shift"])
  enc = st.merge_model(e_def, w.params["encoder"], e_rngs, w.rest["encoder"])
  sdir = wd.shards("train")
  scale = latents.scale_factor(config, shards.read_metadata(sdir), str(sdir))
  return LDAEModels(*nnx.split(ae), *nnx.split(shift), *nnx.split(enc), scale,
                    {AUTOENCODER: ae_step, REPRESENTATION: w.step}, clamp=bool(config.diffusion.clamp_x0),
                    clamp_range=resolve_clamp_range(config, workdir, scale))


def random_encoder(config: ml_collections.ConfigDict, seed: int = 12345):
  """(graphdef, state) of an untrained, randomly initialised encoder: the probes' 'what training added' control.

  Built without the code norm: a template offset and a per-dimension scale change no linear probe (they
  standardise every dimension), and an untrained encoder has no running statistics to standardise by.
  """
  from ldae_jax.models import build_encoder
  plain = config.copy_and_resolve_references()
  plain.encoder.code_norm = "none"
  return nnx.split(build_encoder(plain, nnx.Rngs(seed)))


def mean_train_image(workdir: str | os.PathLike) -> np.ndarray:
  """Voxel-wise mean of the train split's stored images (X, Y, Z, 1) float32."""
  return shards.field_mean(Workdir(workdir).shards("train"), "image")


def read_split(workdir: str | os.PathLike, split: str, max_scans: int | None = None,
               fields: tuple[str, ...] = ("mu", "image")) -> dict[str, np.ndarray]:
  """Latents, images and scan facts of one split from the latent shards (first `max_scans` in write order)."""
  d = Workdir(workdir).shards(split)
  data = shards.read_all(d, fields + SCALAR_FIELDS)
  if max_scans:
    data = {k: v[:max_scans] for k, v in data.items()}
  return data


def batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(indices padded to batch_size by repeating the last index, number of real rows)."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    real = len(idx)
    yield np.concatenate([idx, np.full(batch_size - real, idx[-1])]), real


def map_batched(fn: Callable[..., dict], arrays: dict[str, np.ndarray], batch_size: int, *args,
                desc: str = "") -> dict[str, np.ndarray]:
  """Runs jitted `fn(*args, batch_dict)` over fixed-size batches (last padded) and concatenates real rows.

  Each batch is split over this process's devices when they divide `batch_size` (`args`, the model states,
  replicated), so a CPU host split into one device per core (parallel/cpu_devices) evaluates on every core.
  """
  n = len(next(iter(arrays.values())))
  mesh = pmesh.local_mesh_splitting(batch_size)
  rows = pmesh.batch_sharding(mesh)
  args = jax.device_put(args, pmesh.replicated(mesh))
  outs: dict[str, list] = {}
  for idx, real in progress.bar(list(batches(n, batch_size)), desc=desc, unit="batch", leave=False):
    res = jax.device_get(fn(*args, jax.device_put({k: v[idx] for k, v in arrays.items()}, rows)))
    for k, v in res.items():
      outs.setdefault(k, []).append(np.asarray(v)[:real])
  return {k: np.concatenate(v) for k, v in outs.items()}


def make_code_fn(enc_def) -> Callable:
  @jax.jit
  def codes(enc_state, batch):
    return {"codes": nnx.merge(enc_def, enc_state)(batch["image"], deterministic=True)}
  return codes


def semantic_codes(enc_def, enc_state, images: np.ndarray, batch_size: int, desc: str = "codes") -> np.ndarray:
  return map_batched(make_code_fn(enc_def), {"image": images}, batch_size, enc_state, desc=desc)["codes"]


def make_recon_fn(m: LDAEModels, config: ml_collections.ConfigDict, steps: int) -> Callable:
  """jit fn(states, batch{image, mu, key}) -> per-scan metrics of encoded-x_T and semantic-only reconstructions,
  the AE bound, and the volumes."""
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  ckw = m.ddim_kwargs()
  kernel = int(config.eval.ssim_kernel)
  ms_w = metrics.ms_ssim_weights(tuple(config.data.image_shape), kernel)

  @jax.jit
  def run(states, batch):
    ae = nnx.merge(m.ae_def, states["ae"])
    shift = nnx.merge(m.shift_def, states["shift"])
    enc = nnx.merge(m.enc_def, states["enc"])
    image = batch["image"]
    y = enc(image, deterministic=True)
    model_fn = lambda x, t: shift(x, t, y)
    z0 = batch["mu"] * m.scale
    x_T = ddim_lib.encode(model_fn, z0, sched, shifted=True, **ckw)
    rec = ae.decode(ddim_lib.sample(model_fn, x_T, sched, shifted=True, **ckw) / m.scale)
    noise = jax.random.normal(batch["key"][0], z0.shape, jnp.float32)
    sem = ae.decode(ddim_lib.sample(model_fn, noise, sched, shifted=True, **ckw) / m.scale)
    ae_rec = ae.decode(z0 / m.scale)
    out = {"x_T": x_T, "recon": rec, "semantic": sem, "ae_recon": ae_rec}
    vm = lambda a, b: metrics.volume_metrics(a, b, kernel_size=kernel, ms_weights=ms_w)
    # The cohort-mean image scores what knowing nothing about the scan scores: the floor every decode must beat.
    for name, (a, b) in {"encoded_vs_image": (rec, image), "semantic_vs_image": (sem, image),
                         "ae_vs_image": (ae_rec, image), "encoded_vs_ae": (rec, ae_rec),
                         "semantic_vs_ae": (sem, ae_rec), "cohort_mean_vs_image": (batch["mean_image"], image),
                         }.items():
      for k, v in vm(a, b).items():
        out[f"{name}/{k}"] = v
    return out

  return run


def summarise(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """mean / std / n of every per-scan metric array (keys with a '/')."""
  return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": int(len(v))}
          for k, v in values.items() if "/" in k}


def evaluate_reconstruction(m: LDAEModels, config: ml_collections.ConfigDict, data: dict[str, np.ndarray],
                            *, mean_image: np.ndarray, seed: int = 0, keep_volumes: int = 4) -> dict[str, Any]:
  """Metrics for each T in config.eval.ddim_steps; returns {'by_steps': {T: summary}, 'volumes': {...}}.

  `mean_image` (X, Y, Z, 1): the train split's voxel-wise mean image, scored as the no-information baseline.
  """
  states = {"ae": m.ae_state, "shift": m.shift_state, "enc": m.enc_state}
  n = len(data["mu"])
  keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n)))
  out: dict[str, Any] = {"by_steps": {}, "volumes": {}}
  bs = int(config.eval.batch_size)
  for steps in config.eval.ddim_steps:
    fn = make_recon_fn(m, config, int(steps))
    wrapped = jax.jit(lambda s, b, fn=fn: fn(s, dict(b, key=jax.random.wrap_key_data(b["key"]))))
    arrays = {"image": data["image"], "mu": data["mu"], "key": keys,
              "mean_image": np.broadcast_to(np.asarray(mean_image, np.float32), data["image"].shape)}
    res = map_batched(wrapped, arrays, bs, states,
                      desc=f"recon DDIM-{steps}")
    out["by_steps"][int(steps)] = summarise(res)
    out["volumes"][int(steps)] = {k: res[k][:keep_volumes] for k in ("recon", "semantic", "ae_recon", "x_T")}
  out["volumes"]["image"] = data["image"][:keep_volumes]
  return out
