"""Throughput measurements: train steps, DDIM encode/sample for LDAE and an image-space DAE, in one run.

The paper claims LDAE infers "20x faster" than a voxel-space diffusion autoencoder but ships no measurement.
This module measures both side by side on the same device and in the same process, so
the ratio is not confounded by different machines or software:
* every workload is `jax.jit(f).lower(*args).compile()`d ahead of time (compile time reported separately), then
  run `warmup` times and timed `repeats` times with `block_until_ready` (median reported);
* model FLOPs come from XLA's cost analysis of *one network call* (a scanned DDIM loop's body would be counted
  once by the cost model, not S times), multiplied by the calls per workload;
* MFU = achieved model FLOP/s / the device's peak (table below or `peak_tflops`); None on CPU, where no honest
  peak is known;
* peak device memory from `device.memory_stats()["peak_bytes_in_use"]` (None on CPU, which reports no stats).
Parameters are random (throughput does not depend on their values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax import config as cfglib
from ldae_jax.diffusion import ddim as ddim_lib, schedule as schedule_lib
from ldae_jax.parallel import mesh as pmesh

# Dense bf16 peak per chip (spec sheets). H200 has the H100's compute die; only memory differs.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def host_cpu_model() -> str:
  """The host CPU's model name (/proc/cpuinfo, else platform.processor()), for benchmark records."""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def device_peak_tflops(device: jax.Device, override: float | None = None) -> tuple[float | None, str]:
  """(peak TFLOP/s or None, where it came from)."""
  if override:
    return float(override), "flag --peak_tflops"
  kind = getattr(device, "device_kind", "") or ""
  for name, peak in PEAK_TFLOPS.items():
    if name in kind:
      return peak, f"table ({name} bf16 dense)"
  return None, f"unknown for device kind {kind!r} (no MFU); pass --peak_tflops"


def peak_memory_bytes(device: jax.Device) -> int | None:
  """Peak bytes in use so far, or None where the backend keeps no statistics (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


@dataclasses.dataclass
class Workload:
  """One timed function: fn(*args) with `samples` examples per call and `model_flops` per call.

  model_flops: a number, None (unknown), or "xla" (the compiled workload's own cost analysis; right for
  loop-free functions such as one AE pass).
  """
  name: str
  fn: Callable[..., Any]
  args: tuple
  samples: int
  model_flops: float | str | None = None
  info: dict = dataclasses.field(default_factory=dict)


def forward_flops(fn: Callable[..., Any], *args) -> float | None:
  """XLA cost-analysis FLOPs of one call of `fn` (compiled, not run)."""
  return pmesh.compile_aot(jax.jit(fn), *args, name="cost analysis").flops


def measure(w: Workload, *, repeats: int = 3, warmup: int = 1,
            peak_tflops: float | None = None) -> dict[str, Any]:
  """Compiles `w.fn` ahead of time and times it; returns the JSON-able measurement."""
  jitted = jax.jit(w.fn)
  aot = pmesh.compile_aot(jitted, *w.args, name=w.name)
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(aot(*w.args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(aot(*w.args))
    times.append(time.perf_counter() - t0)
  del out
  sec = statistics.median(times)
  flops = aot.flops if w.model_flops == "xla" else w.model_flops
  achieved = None if flops is None else flops / sec
  return {
      "name": w.name, "samples_per_call": w.samples, "compile_s": aot.seconds, "seconds_per_call": sec,
      "seconds_all": times, "samples_per_s": w.samples / sec,
      "model_flops_per_call": flops, "xla_flops_per_call": aot.flops,
      "model_tflops_per_s": None if achieved is None else achieved / 1e12,
      "mfu": None if achieved is None or not peak_tflops else achieved / (peak_tflops * 1e12),
      **w.info,
  }


# ------------------------------------------------------------------------------------------- workloads
def _split(model: nnx.Module):
  graphdef, state = nnx.split(model)
  return graphdef, state


def _diffusion_net(config: ml_collections.ConfigDict, emb_dim: int, rngs: nnx.Rngs):
  """The semantic-conditioned ShiftUNet both autoencoders sample with. Returns (graphdef, state,
  call(net, x, t, y) -> (eps, G), shifted, kind)."""
  from ldae_jax import models
  c = ml_collections.ConfigDict(config.to_dict())
  c.encoder.emb_dim = emb_dim
  net = models.build_shift_unet(c, rngs)
  return (*_split(net), lambda n, x, t, y: n(x, t, y), True, "ShiftUNet")


def ddim_workloads(config: ml_collections.ConfigDict, *, label: str, spatial: Sequence[int], channels: int,
                   batch: int, steps: int, emb_dim: int, seed: int = 0) -> list[Workload]:
  """DDIM-`steps` encode and sample of `batch` volumes of (spatial, channels) with the config's UNet family."""
  rngs = nnx.Rngs(seed)
  graphdef, state, call, shifted, kind = _diffusion_net(config, emb_dim, rngs)
  sched = schedule_lib.ddim_schedule(schedule_lib.make_schedule(config.diffusion), steps)
  key = jax.random.key(seed)
  x = jax.random.normal(key, (batch, *spatial, channels), jnp.float32)
  y = jax.random.normal(jax.random.fold_in(key, 1), (batch, emb_dim), jnp.float32)
  t = jnp.full((batch,), 500, jnp.int32)
  clamp, rng_ = bool(config.diffusion.clamp_x0), float(config.diffusion.clamp_range)

  def one_call(state, x, t, y):
    return call(nnx.merge(graphdef, state), x, t, y)

  def run(direction):
    def f(state, x, y):
      net = nnx.merge(graphdef, state)
      model_fn = lambda xx, tt: call(net, xx, tt, y)
      fn = ddim_lib.sample if direction == "sample" else ddim_lib.encode
      return fn(model_fn, x, sched, shifted=shifted, clamp=clamp, clamp_range=rng_)
    return f

  per_call = forward_flops(one_call, state, x, t, y)
  info = {"network": kind, "input_shape": [batch, *spatial, channels], "ddim_steps": steps,
          "parameters": int(sum(np.size(v) for v in jax.tree.leaves(state))), "label": label,
          "compute_dtype": config.compute_dtype}
  return [Workload(f"{label}_ddim{steps}_{d}", run(d), (state, x, y), batch,
                   None if per_call is None else per_call * steps, dict(info, direction=d, flops_per_network_call=per_call))
          for d in ("encode", "sample")]


def autoencoder_workloads(config: ml_collections.ConfigDict, *, batch: int, seed: int = 0) -> list[Workload]:
  """AE encode (image -> latent mean) and decode (latent -> image): LDAE's fixed cost around the latent DDIM."""
  from ldae_jax import models
  graphdef, state = _split(models.build_autoencoder(config, nnx.Rngs(seed)))
  img = jax.random.uniform(jax.random.key(seed), (batch, *config.data.image_shape, 1), jnp.float32)
  lat = jax.random.normal(jax.random.key(seed + 1), (batch, *cfglib.latent_shape(config)), jnp.float32)
  enc = lambda s, x: nnx.merge(graphdef, s).encode(x)[0]
  dec = lambda s, z: nnx.merge(graphdef, s).decode(z)
  info = {"network": "AutoencoderKL", "image_shape": [batch, *config.data.image_shape, 1],
          "latent_shape": [batch, *cfglib.latent_shape(config)]}
  return [Workload("ae_encode", enc, (state, img), batch, "xla", info),
          Workload("ae_decode", dec, (state, lat), batch, "xla", info)]


def ldm_train_workload(config: ml_collections.ConfigDict, *, batch: int, seed: int = 0) -> Workload:
  """One stage-2 optimizer step of the training code itself (`ldm_stage.make_step`) on `batch` latents."""
  from ldae_jax import models
  from ldae_jax.training import ldm_stage, state as st
  cfg = config.train.ldm.copy_and_resolve_references()
  cfg.grad_accum = 1
  graphdef, params, rng_state, rest = st.split_model(models.build_unet(config, nnx.Rngs(seed, dropout=seed + 1)))
  tx = st.make_optimizer(cfg)
  state = st.create_state(params, rest, tx, seed=seed + 2, with_ema=cfg.ema_decay > 0)
  step = ldm_stage.make_step(graphdef, rng_state, tx, schedule_lib.make_schedule(config.diffusion), 1.0, cfg)
  batch_ = {"mu": jax.random.normal(jax.random.key(seed), (batch, *cfglib.latent_shape(config)), jnp.float32)}
  # Model FLOPs of a training step ~ 3x the forward (forward + backward wrt activations and weights).
  fwd = forward_flops(lambda p, z, t: st.merge_model(graphdef, p, rng_state, rest)(z, t), params, batch_["mu"],
                      jnp.zeros((batch,), jnp.int32))
  return Workload("ldm_train_step", step, (state, batch_), batch, None if fwd is None else 3 * fwd,
                  {"network": "UNet", "input_shape": [batch, *cfglib.latent_shape(config)],
                   "flops_note": "3 x XLA forward FLOPs"})


def stage_summaries(workdir: str | None) -> dict[str, Any]:
  """Train throughput each stage measured while training (summary.json), when a workdir is given."""
  import json
  from ldae_jax import workdir as layout
  out = {}
  if not workdir:
    return out
  for stage in layout.TRAINED_STAGES:
    p = layout.Workdir(workdir).summary(stage)
    if p.exists():
      s = json.loads(p.read_text())
      out[stage] = {k: v for k, v in s.items() if any(w in k for w in ("sample", "second", "step", "compile"))}
  return out


def ddim_ratios(results: dict[str, dict], steps: int) -> dict[str, dict]:
  """DAE / LDAE seconds for the same batch, DDIM alone and with LDAE's autoencoder pass added (encode: AE
  encode before the DDIM encode; sample: AE decode after it), from `measure` results keyed by workload name."""
  ratios = {}
  for d in ("encode", "sample"):
    l, a = results[f"ldae_ddim{steps}_{d}"], results[f"dae_ddim{steps}_{d}"]
    ae = results["ae_encode" if d == "encode" else "ae_decode"]
    ratios[d] = {"ddim_only": a["seconds_per_call"] / l["seconds_per_call"],
                 "with_autoencoder": a["seconds_per_call"] / (l["seconds_per_call"] + ae["seconds_per_call"]),
                 "meaning": "DAE seconds / LDAE seconds for the same batch (> 1: LDAE faster)"}
  return ratios


def compare(config: ml_collections.ConfigDict, dae_config: ml_collections.ConfigDict, *, batch: int, steps: int,
            repeats: int = 3, peak_tflops: float | None = None, train_batch: int | None = None,
            workdir: str | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
  """LDAE vs image-space DAE DDIM encode/sample throughput (and the LDM train step) in one process."""
  dev = jax.devices()[0]
  peak, peak_src = device_peak_tflops(dev, peak_tflops)
  emb = int(config.encoder.emb_dim)
  lat = cfglib.latent_shape(config)
  groups = {
      "ldae": ddim_workloads(config, label="ldae", spatial=lat[:3], channels=lat[3], batch=batch, steps=steps,
                             emb_dim=emb),
      "autoencoder": autoencoder_workloads(config, batch=batch),
      "dae": ddim_workloads(dae_config, label="dae", spatial=cfglib.unet_input_shape(dae_config)[:3],
                            channels=cfglib.unet_input_shape(dae_config)[3], batch=batch, steps=steps, emb_dim=emb),
      "train": [ldm_train_workload(config, batch=train_batch or batch)],
  }
  results: dict[str, dict] = {}
  for name, ws in groups.items():
    for w in ws:
      progress(f"measuring {w.name} ...")
      r = measure(w, repeats=repeats, peak_tflops=peak)
      results[w.name] = r
      progress(f"  {w.name}: {r['samples_per_s']:.3g} samples/s, compile {r['compile_s']:.1f} s, "
               f"MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 3)}")
  ratios = ddim_ratios(results, steps)
  return {
      "device": {"platform": dev.platform, "kind": getattr(dev, "device_kind", ""), "count": jax.device_count()},
      "jax_version": jax.__version__,
      "peak_tflops": peak, "peak_source": peak_src,
      "peak_memory_bytes": peak_memory_bytes(dev),
      "peak_memory_note": None if peak_memory_bytes(dev) is not None else "backend reports no memory statistics",
      "ldae_config": config.name, "dae_config": dae_config.name, "batch": batch, "ddim_steps": steps,
      "results": results, "ratio_dae_over_ldae": ratios, "train_from_summaries": stage_summaries(workdir),
  }
