"""Paper-size LDAE throughput on one accelerator, against the PyTorch reference anchor (issue #6).

Measures, with the project's own step functions and samplers (nothing re-implemented here):
  ldm_train      stage-2 train step (`ldm_stage.make_step`: UNet eps loss, clip, Adam, EMA), batch 64
  unet_forward   UNet forward at batch 1 and 64
  ddim_sample    DDIM-100 unconditional sampling with the UNet (`ddim.sample`, one lax.scan), batch 64
  autoencode     semantic encoder + DDIM-100 encode + DDIM-100 decode with the ShiftUNet, batch 1
  stage3_train   stage-3 train step (`representation_stage.make_step`: ConvNeXt-S over 128 slices, frozen UNet,
                 shift branch, PDAE loss, Adam, EMA), batch 4
  ldae_vs_dae    DDIM encode and sample of LDAE (ShiftUNet on latents, plus the AE encode / decode) beside the
                 image-space DAE (configs/dae_image_space.py, ShiftUNet on voxels), same batch, steps and process
                 (`evaluation.throughput`'s workloads and ratios; the paper's "20x faster" claim), batch 4,
                 DDIM-10: the ratio does not depend on the step count, and 10 keeps the DAE's calls short
Each workload is compiled ahead of time (compile seconds reported apart), run once to warm up, then timed
(median; train steps with donated state, as in training). Model FLOPs are counted as in
`../shared/reference/performance_anchor.md` (UNet forward 944 GFLOP per latent, ShiftUNet forward 1,680,
ConvNeXt-S 906 per volume; a train step = 3x its forwards) at the paper config, and XLA's cost analysis of one
network call is printed beside them as a check. MFU is against the 989 TFLOP/s bf16 dense peak of an H100/H200.

  python benchmarks/gpu_paper.py                      # paper config, bf16, on the default device
  python benchmarks/gpu_paper.py --tiny               # CPU dry run at quickstart size (seconds)
  python benchmarks/gpu_paper.py --only ldm_train,ddim_sample --out /tmp/r.json
  python benchmarks/gpu_paper.py --only ldae_vs_dae  # LDAE vs voxel DAE (--dae_config configs/dae_image_space.py:bf16)

Results go to one JSON (default `benchmarks/results/gpu_paper_<device>.json`), rewritten after each workload so
a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import runpy
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ldae_jax import config as cfglib  # noqa: E402
from ldae_jax.config import load_config  # noqa: E402
from ldae_jax.diffusion import ddim  # noqa: E402
from ldae_jax.diffusion.schedule import ddim_schedule, make_schedule  # noqa: E402
from ldae_jax.evaluation import throughput  # noqa: E402
from ldae_jax.evaluation.throughput import device_peak_tflops, peak_memory_bytes  # noqa: E402
from ldae_jax.parallel.mesh import compile_aot  # noqa: E402
from ldae_jax.training import ldm_stage, representation_stage  # noqa: E402
from ldae_jax.training import state as st  # noqa: E402

# The PyTorch reference on one H100 (performance_anchor.md) and the goals.
ANCHOR = {
    "ldm_train": {"reference_samples_per_s": 132.8, "goal_samples_per_s": 200.0},
    "ddim_sample": {"reference_samples_per_s": 5.46, "reference_note": "torch.compile; eager 3.77",
                    "goal_samples_per_s": 7.1},
    "autoencode": {"goal_seconds": 1.5},
    "stage3_train": {"reference_samples_per_s": 15.9, "goal_samples_per_s": 24.0},
    "unet_forward_b1": {"reference_seconds": 0.0281},
    "unet_forward_b64": {"reference_seconds": 0.172},
}
# Analytic model FLOPs of the paper config (performance_anchor.md), per sample.
PAPER_FLOPS = {"unet": 944e9, "shift_unet": 1680e9, "encoder": 906e9}
WORKLOADS = ("ldm_train", "ddim_sample", "autoencode", "stage3_train", "unet_forward", "ldae_vs_dae")


def _sync(tree):
  return jax.block_until_ready(tree)


def _time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _sync(fn())
    out.append(time.perf_counter() - t0)
  return out


def _flops_per_sample(compiled_flops: float | None, batch: int) -> float | None:
  return None if compiled_flops is None else compiled_flops / batch


class Bench:
  """Holds the config, the device facts and the JSON being written."""

  def __init__(self, config, args):
    self.config = config
    self.args = args
    self.paper = not args.tiny
    self.dev = jax.devices()[0]
    self.peak, self.peak_src = device_peak_tflops(self.dev, args.peak_tflops)
    self.sched = make_schedule(config.diffusion)
    self.latent = tuple(cfglib.latent_shape(config))
    self.image = tuple(config.data.image_shape) + (1,)
    self.results: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_paper.py",
        "config": args.config + (" (tiny dry-run sizes)" if args.tiny else ""),
        "compute_dtype": config.compute_dtype, "remat": bool(config.remat),
        "device": {"platform": self.dev.platform, "kind": getattr(self.dev, "device_kind", ""),
                   "count": jax.device_count()},
        "host": platform.node(), "python": platform.python_version(), "jax": jax.__version__,
        "peak_tflops": self.peak, "peak_source": self.peak_src,
        "flops_convention": "analytic model FLOPs of performance_anchor.md at the paper config (train step = 3x "
                            "forward); XLA cost analysis of one network call alongside",
        "workloads": {},
    }

  # ------------------------------------------------------------------------------------------ helpers
  def model_flops(self, name: str, xla_forward: float | None, batch: int) -> float | None:
    """Per-sample forward FLOPs: the anchor's analytic count at paper size, else XLA's."""
    if self.paper:
      return PAPER_FLOPS[name]
    return _flops_per_sample(xla_forward, batch)

  def record(self, name: str, res: dict[str, Any]) -> None:
    res = dict(res)
    flops = res.get("model_flops_per_s")
    if flops is not None:
      res["model_tflops_per_s"] = flops / 1e12
      res["mfu"] = flops / (self.peak * 1e12) if self.peak else None
    res["peak_memory_gib"] = (None if (m := peak_memory_bytes(self.dev)) is None else m / 2**30)
    if self.paper and name in ANCHOR:
      res["anchor"] = ANCHOR[name]
      ref = ANCHOR[name].get("reference_samples_per_s")
      if ref and res.get("samples_per_s"):
        res["speedup_vs_reference"] = res["samples_per_s"] / ref
      ref_s = ANCHOR[name].get("reference_seconds")
      if ref_s and res.get("seconds"):
        res["speedup_vs_reference"] = ref_s / res["seconds"]
    self.results["workloads"][name] = res
    self.write()
    keys = ("samples_per_s", "seconds", "compile_s", "model_tflops_per_s", "mfu", "speedup_vs_reference",
            "peak_memory_gib")
    shown = ", ".join(f"{k}={res[k]:.4g}" if isinstance(res.get(k), float) else f"{k}={res.get(k)}"
                      for k in keys if k in res)
    print(f"[{name}] {shown}", flush=True)

  def write(self) -> None:
    path = pathlib.Path(self.args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.results, indent=2, default=float))
    os.replace(tmp, path)

  def unet_state(self):
    from ldae_jax.models import build_unet  # pylint: disable=g-import-not-at-top
    unet = build_unet(self.config, nnx.Rngs(params=0, dropout=1))
    return st.split_model(unet)

  def xla_forward(self, fn, *args) -> float | None:
    return compile_aot(jax.jit(fn), *args, name="cost analysis").flops

  # ------------------------------------------------------------------------------------------ workloads
  def train_loop(self, name: str, step_fn, state, batch, batch_size: int, fwd_flops: float | None):
    jitted = jax.jit(step_fn, donate_argnums=(0,))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    compiled = compile_aot(jitted, *abstract, name=name)
    state, _ = compiled(state, batch)  # warm-up
    _sync(state)
    times = []
    for _ in range(self.args.train_steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      _sync(metrics)
      times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name}: loss is {loss}")
    sec = statistics.median(times)
    per_sample = fwd_flops
    return state, {
        "batch": batch_size, "seconds": sec, "seconds_all": times, "samples_per_s": batch_size / sec,
        "compile_s": compiled.seconds, "xla_step_flops": compiled.flops, "loss": loss,
        "model_flops_per_s": None if per_sample is None else 3 * per_sample * batch_size / sec,
    }

  def ldm_train(self):
    b = self.args.ldm_batch
    cfg = self.config.train.ldm.copy_and_resolve_references()
    cfg.grad_accum = 1
    graphdef, params, rng_state, rest = self.unet_state()
    tx = st.make_optimizer(cfg)
    state = st.create_state(params, rest, tx, seed=0, with_ema=True)
    step = ldm_stage.make_step(graphdef, rng_state, tx, self.sched, 1.0, cfg)
    batch = {"mu": jax.random.normal(jax.random.key(1), (b,) + self.latent, jnp.float32)}
    net_fwd = lambda p, x, t: st.merge_model(graphdef, p, rng_state, rest)(x, t)
    xla = self.xla_forward(net_fwd, params, batch["mu"], jnp.zeros((b,), jnp.int32))
    res = {"xla_forward_flops_per_sample": _flops_per_sample(xla, b)}
    state, r = self.train_loop("ldm_train", step, state, batch, b, self.model_flops("unet", xla, b))
    res.update(r)
    self.record("ldm_train", res)
    del state

  def unet_forward(self):
    graphdef, params, rng_state, rest = self.unet_state()

    def fwd(p, x, t):
      return st.merge_model(graphdef, p, rng_state, rest)(x, t)

    for b in (1, self.args.ldm_batch):
      x = jax.random.normal(jax.random.key(2), (b,) + self.latent, jnp.float32)
      t = jnp.full((b,), 500, jnp.int32)
      compiled = compile_aot(jax.jit(fwd), params, x, t, name=f"unet_forward_b{b}")
      _sync(compiled(params, x, t))
      times = _time_calls(lambda: compiled(params, x, t), self.args.repeats * 5)
      sec = statistics.median(times)
      per = self.model_flops("unet", compiled.flops, b)
      self.record(f"unet_forward_b{b}", {
          "batch": b, "seconds": sec, "samples_per_s": b / sec, "compile_s": compiled.seconds,
          "xla_forward_flops_per_sample": _flops_per_sample(compiled.flops, b),
          "model_flops_per_s": None if per is None else per * b / sec})

  def ddim_sample(self):
    b, steps = self.args.ddim_batch, self.args.ddim_steps
    graphdef, params, rng_state, rest = self.unet_state()
    dsched = ddim_schedule(self.sched, steps)
    clamp, rng = bool(self.config.diffusion.clamp_x0), float(self.config.diffusion.clamp_range)

    def sample(p, x_T):
      net = st.merge_model(graphdef, p, rng_state, rest)
      return ddim.sample(lambda x, t: net(x, t), x_T, dsched, clamp=clamp, clamp_range=rng)

    x_T = jax.random.normal(jax.random.key(3), (b,) + self.latent, jnp.float32)
    compiled = compile_aot(jax.jit(sample), params, x_T, name="ddim_sample")
    out = _sync(compiled(params, x_T))
    if not bool(jnp.all(jnp.isfinite(out))):
      raise FloatingPointError("ddim_sample produced non-finite values")
    times = _time_calls(lambda: compiled(params, x_T), self.args.repeats)
    sec = statistics.median(times)
    per = self.model_flops("unet", None, b) if self.paper else None
    self.record("ddim_sample", {
        "batch": b, "ddim_steps": steps, "seconds": sec, "seconds_all": times, "samples_per_s": b / sec,
        "compile_s": compiled.seconds,
        "model_flops_per_s": None if per is None else per * steps * b / sec})

  def autoencode(self):
    from ldae_jax.models import build_encoder, build_shift_unet  # pylint: disable=g-import-not-at-top
    steps = self.args.ddim_steps
    shift = build_shift_unet(self.config, nnx.Rngs(params=0, dropout=1))
    enc = build_encoder(self.config, nnx.Rngs(params=2, dropout=3))
    s_def, s_state = nnx.split(shift)
    e_def, e_state = nnx.split(enc)
    dsched = ddim_schedule(self.sched, steps)
    clamp, rng = bool(self.config.diffusion.clamp_x0), float(self.config.diffusion.clamp_range)

    def autoencode(s_state, e_state, image, z0):
      net = nnx.merge(s_def, s_state)
      y = nnx.merge(e_def, e_state)(image)
      fn = lambda x, t: net(x, t, y)
      x_T = ddim.encode(fn, z0, dsched, shifted=True, clamp=clamp, clamp_range=rng)
      return ddim.sample(fn, x_T, dsched, shifted=True, clamp=clamp, clamp_range=rng)

    image = jax.random.uniform(jax.random.key(4), (1,) + self.image, jnp.float32)
    z0 = jax.random.normal(jax.random.key(5), (1,) + self.latent, jnp.float32)
    compiled = compile_aot(jax.jit(autoencode), s_state, e_state, image, z0, name="autoencode")
    out = _sync(compiled(s_state, e_state, image, z0))
    if not bool(jnp.all(jnp.isfinite(out))):
      raise FloatingPointError("autoencode produced non-finite values")
    times = _time_calls(lambda: compiled(s_state, e_state, image, z0), self.args.repeats)
    sec = statistics.median(times)
    flops = (2 * steps * PAPER_FLOPS["shift_unet"] + PAPER_FLOPS["encoder"]) if self.paper else None
    self.record("autoencode", {
        "batch": 1, "ddim_steps": steps, "seconds": sec, "seconds_all": times, "samples_per_s": 1 / sec,
        "compile_s": compiled.seconds, "model_flops_per_s": None if flops is None else flops / sec,
        "note": "encoder(image) + DDIM encode + DDIM sample in one jit; AE decode not included"})

  def stage3_train(self):
    from ldae_jax.models import build_encoder, build_shift_unet  # pylint: disable=g-import-not-at-top
    b = self.args.stage3_batch
    cfg = self.config.train.representation.copy_and_resolve_references()
    cfg.grad_accum = 1
    shift = build_shift_unet(self.config, nnx.Rngs(params=0, dropout=1))
    enc = build_encoder(self.config, nnx.Rngs(params=2, dropout=3))
    s_def, sp, s_rngs, s_rest = st.split_model(shift, representation_stage.SHIFT_TRAINABLE)
    e_def, ep, e_rngs, e_rest = st.split_model(enc)
    tx = st.make_optimizer(cfg)
    state = st.create_state({"shift": sp, "encoder": ep}, {"shift": s_rest, "encoder": e_rest}, tx, seed=0,
                            with_ema=True)
    step = representation_stage.make_step(s_def, s_rngs, e_def, e_rngs, tx, self.sched, 1.0, cfg)
    batch = {"mu": jax.random.normal(jax.random.key(6), (b,) + self.latent, jnp.float32),
             "image": jax.random.uniform(jax.random.key(7), (b,) + self.image, jnp.float32)}
    # Anchor convention: 3x encoder + frozen UNet forward + 3x shift branch (ShiftUNet - UNet) per sample.
    per = None
    if self.paper:
      per = (3 * PAPER_FLOPS["encoder"] + PAPER_FLOPS["unet"]
             + 3 * (PAPER_FLOPS["shift_unet"] - PAPER_FLOPS["unet"])) / 3
    state, r = self.train_loop("stage3_train", step, state, batch, b, per)
    self.record("stage3_train", r)
    del state

  def ldae_vs_dae(self):
    """LDAE vs image-space DAE DDIM encode/sample, measured one after the other in this process."""
    b, steps = self.args.dae_batch, self.args.dae_ddim_steps
    # Not load_config: its validate() checks the UNet against the autoencoder's latent grid, but the DAE's UNet
    # runs on the voxels (evaluate.py --mode throughput reads it unvalidated too).
    path, _, variant = self.args.dae_config.partition(":")
    dae = runpy.run_path(path)["get_config"](variant)
    lat = self.latent
    emb = int(self.config.encoder.emb_dim)
    ws = (throughput.ddim_workloads(self.config, label="ldae", spatial=lat[:3], channels=lat[3], batch=b,
                                    steps=steps, emb_dim=emb)
          + throughput.autoencoder_workloads(self.config, batch=b)
          + throughput.ddim_workloads(dae, label="dae", spatial=tuple(dae.data.image_shape),
                                      channels=int(cfglib.unet_input_shape(dae)[-1]), batch=b, steps=steps, emb_dim=emb))
    measured = {}
    for w in ws:
      # XLA's FLOPs (of one network call x steps; the AE pass's own): on GPU they miss the cuDNN convolutions
      # (see RESULTS.md), so MFU here is a lower bound; the time ratios are the measurement.
      measured[w.name] = throughput.measure(w, repeats=self.args.repeats, peak_tflops=self.peak)
      r = measured[w.name]
      self.record(f"ldae_vs_dae/{w.name}", {"batch": b, "seconds": r["seconds_per_call"],
                                            "samples_per_s": r["samples_per_s"], "compile_s": r["compile_s"],
                                            "xla_flops_per_call": r["xla_flops_per_call"],
                                            "parameters": r.get("parameters"), "input_shape": r.get("input_shape")})
    ratios = throughput.ddim_ratios(measured, steps)
    self.results["workloads"]["ldae_vs_dae"] = {"dae_config": self.args.dae_config, "batch": b, "ddim_steps": steps,
                                                "ratio_dae_over_ldae": ratios}
    self.write()
    print("[ldae_vs_dae] DAE / LDAE seconds: " + ", ".join(
        f"{d} {v['ddim_only']:.1f}x ({v['with_autoencoder']:.1f}x with the AE pass)" for d, v in ratios.items()),
        flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/paper.py:bf16")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: quickstart sizes, small batches, 3 DDIM steps")
  p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list of {WORKLOADS}")
  p.add_argument("--out", default=None)
  p.add_argument("--ldm_batch", type=int, default=64)
  p.add_argument("--ddim_batch", type=int, default=64)
  p.add_argument("--ddim_steps", type=int, default=100)
  p.add_argument("--stage3_batch", type=int, default=4)
  p.add_argument("--dae_config", default="configs/dae_image_space.py:bf16")
  p.add_argument("--dae_batch", type=int, default=4)
  p.add_argument("--dae_ddim_steps", type=int, default=10)
  p.add_argument("--train_steps", type=int, default=5)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--peak_tflops", type=float, default=None)
  args = p.parse_args(argv)
  if args.tiny:
    args.config = "configs/quickstart.py"
    args.ldm_batch, args.ddim_batch, args.ddim_steps, args.stage3_batch = 4, 2, 3, 2
    args.dae_config, args.dae_batch, args.dae_ddim_steps = "configs/dae_image_space.py:small", 2, 3
    args.train_steps, args.repeats = 2, 1
  config = load_config(args.config)
  config.remat = bool(args.remat or config.remat)
  if args.out is None:
    kind = (getattr(jax.devices()[0], "device_kind", "") or jax.devices()[0].platform).replace(" ", "_")
    args.out = f"benchmarks/results/gpu_paper_{'tiny_' if args.tiny else ''}{kind}.json"
  bench = Bench(config, args)
  print(f"device {bench.results['device']}, jax {jax.__version__}, config {bench.results['config']}, "
        f"compute {config.compute_dtype}, peak {bench.peak} TFLOP/s ({bench.peak_src})", flush=True)
  failed = []
  for name in [w.strip() for w in args.only.split(",") if w.strip()]:
    if name not in WORKLOADS:
      raise SystemExit(f"--only: unknown workload {name!r}; known: {WORKLOADS}")
    t0 = time.perf_counter()
    try:
      getattr(bench, name)()
    except Exception as e:  # keep measuring the others; the JSON records the failure
      failed.append(name)
      bench.results["workloads"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      bench.write()
      print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
    print(f"[{name}] done in {time.perf_counter() - t0:.1f} s wall", flush=True)
    gc.collect()
    jax.clear_caches()
  print(f"results: {args.out}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
