"""CPU hot ops and networks at the quickstart's exact shapes, against XLA's conv3d and (if installed) PyTorch.

Part `ops`: every distinct 3D convolution and GroupNorm(+SiLU) the quickstart's AE, discriminator, UNet,
ShiftUNet and semantic encoder run (shapes recorded by tracing the networks built from the config, batch =
the stage's training batch), each timed forward and forward+backward as
  * `project`: `ldae_jax.models.conv.conv_general_dilated` / `layers.group_norm` + SiLU (what the models run),
  * `xla3d`: `lax.conv_general_dilated` in 3D (XLA's CPU conv3d; the vendor path on accelerators),
  * `torch`: `torch.nn.functional.conv3d` / `group_norm` + `silu` (channels-last-3d and contiguous NCDHW, the
    faster one reported), when torch is importable - optional, never a dependency of the package.
  * with `--alternatives`, the forms tried and rejected: `tap_sum` (kD 2D convolutions summed, the previous CPU
    form), `im2col` (all taps concatenated, one matmul) and `depth_block{1,2,4}` (r output depths per 2D
    convolution, `conv.depth_blocked_conv`; 1 is the plain depth fold; the code picks r by `conv.depth_block`).
GFLOP/s count 2 * MACs of the convolution (x3 for forward+backward); GroupNorm reports GB/s of its input. The
semantic encoder is traced too but records nothing: it runs 2D convolutions over slices and LayerNorm.
Part `nets`: the project's own UNet forward and train steps (LDM, AE+discriminator, stage 3), a PyTorch
re-implementation of the UNet ResBlock at the same shapes, and the whole reference UNet in PyTorch
(`torch_unet.py`, checked against the project's UNet on shared weights): its forwards and LDM train steps.
Same-box comparison of the UNet (torch on 2 threads, JAX on 2 CPU devices, as train.py runs):

    python3 benchmarks/cpu_ops.py --part nets --nets unet_forward,ldm_train,torch_unet --threads 2 --cpu_devices 2

    taskset -c 1 python3 benchmarks/cpu_ops.py --part all --threads 1

Writes benchmarks/results/cpu_ops_<label>_<UTC>.json. `--threads` sets torch's thread count; jax's is set by
the CPU affinity (run both under the same `taskset`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import pathlib
import statistics
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402

from ldae_jax import config as cfglib  # noqa: E402
from ldae_jax import models  # noqa: E402
from ldae_jax.evaluation.throughput import host_cpu_model  # noqa: E402
from ldae_jax.models import conv as convlib, layers  # noqa: E402

DN = ("NDHWC", "DHWIO", "NDHWC")
NET_WORKLOADS = ("unet_forward", "ldm_train", "autoencoder_train", "encoder_train", "stage3_train", "torch_resblock",
                 "torch_unet")




def time_fn(fn, *args, repeats: int, min_seconds: float = 0.3) -> tuple[float, float]:
  """(median seconds per call, compile seconds) of jit(fn)(*args)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 200):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s


# ------------------------------------------------------------------------------------------ shape recording
@contextlib.contextmanager
def recording():
  """Records the 3D convolutions and GroupNorms the models call (traced with eval_shape, nothing computed)."""
  convs, norms = [], []

  def record_conv(lhs, rhs, window_strides, padding, **kw):
    if lhs.ndim == 5:
      pads = convlib._explicit_padding(padding, lhs.shape[1:4], rhs.shape[:3], window_strides)
      convs.append((tuple(lhs.shape), tuple(rhs.shape), tuple(window_strides), tuple(map(tuple, pads)),
                    int(kw.get("feature_group_count", 1))))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)

  def record_norm(x, scale, bias, num_groups, eps, out_dtype=None):
    norms.append((tuple(x.shape), num_groups))
    return real_norm(x, scale, bias, num_groups, eps, out_dtype)

  real_norm, real_lax, real_taps = layers.group_norm, convlib.lax, convlib._use_depth_taps
  real_flax_gn = nnx.GroupNorm.__call__

  def flax_gn(self, x, *a, **k):
    norms.append((tuple(x.shape), self.num_groups))
    return real_flax_gn(self, x, *a, **k)

  proxy = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax) if not k.startswith("__")})
  proxy.conv_general_dilated = record_conv
  convlib.lax, convlib._use_depth_taps, layers.group_norm = proxy, (lambda *a: False), record_norm
  nnx.GroupNorm.__call__ = flax_gn
  try:
    yield convs, norms
  finally:
    convlib.lax, convlib._use_depth_taps, layers.group_norm = real_lax, real_taps, real_norm
    nnx.GroupNorm.__call__ = real_flax_gn


def quickstart_shapes(config) -> dict[str, tuple[list, list]]:
  """{network: (conv records, norm records)} of one forward at the stage's training batch."""
  lat = cfglib.latent_shape(config)
  img = tuple(config.data.image_shape) + (1,)
  b_ae, b_ldm, b_rep = (int(config.train.autoencoder.batch_size), int(config.train.ldm.batch_size),
                        int(config.train.representation.batch_size))
  out = {}
  rngs = lambda: nnx.Rngs(0, dropout=1)
  cases = {
      "autoencoder": (lambda: models.build_autoencoder(config, rngs()),
                      lambda m: m(jnp.zeros((b_ae,) + img), jax.random.key(0))),
      "discriminator": (lambda: models.build_discriminator(config, rngs()),
                        lambda m: m(jnp.zeros((b_ae,) + img), train=True)),
      "unet": (lambda: models.build_unet(config, rngs()),
               lambda m: m(jnp.zeros((b_ldm,) + lat), jnp.zeros((b_ldm,), jnp.int32))),
      "shift_unet": (lambda: models.build_shift_unet(config, rngs()),
                     lambda m: m(jnp.zeros((b_rep,) + lat), jnp.zeros((b_rep,), jnp.int32),
                                 jnp.zeros((b_rep, int(config.encoder.emb_dim))))),
      "encoder": (lambda: models.build_encoder(config, rngs()), lambda m: m(jnp.zeros((b_rep,) + img))),
  }
  for name, (build, call) in cases.items():
    model = build()
    with recording() as (convs, norms):
      nnx.eval_shape(call, model)
    out[name] = (convs, norms)
  return out


# ------------------------------------------------------------------------------------------ op timing
def conv_flops(rec) -> float:
  lhs, rhs, strides, pads, groups = rec
  out = [(n + p[0] + p[1] - k) // s + 1 for n, p, k, s in zip(lhs[1:4], pads, rhs[:3], strides)]
  return 2.0 * lhs[0] * np.prod(out) * np.prod(rhs[:3]) * rhs[3] * rhs[4]


def tap_sum_conv(x, w, strides, pads, groups):
  """The previous CPU form: the sum over the kD depth taps of 2D convolutions of depth-strided slices."""
  b, d, h, wd, c = x.shape
  kd, sd = w.shape[0], strides[0]
  x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  d_out = (d + pads[0][0] + pads[0][1] - kd) // sd + 1
  out = 0
  for i in range(kd):
    xi = lax.slice_in_dim(x, i, i + sd * (d_out - 1) + 1, stride=sd, axis=1).reshape(b * d_out, h, wd, c)
    out = out + lax.conv_general_dilated(xi, w[i], strides[1:], pads[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=groups)
  return out.reshape((b, d_out) + out.shape[1:])


def im2col_conv(x, w, strides, pads):
  """All kD*kH*kW taps concatenated along channels, then one matmul (stride 1, no groups)."""
  b, d, h, wd, _ = x.shape
  kd, kh, kw = w.shape[:3]
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  do, ho, wo = (n + p[0] + p[1] - k + 1 for n, p, k in zip((d, h, wd), pads, (kd, kh, kw)))
  cols = jnp.concatenate([xp[:, i:i + do, j:j + ho, l:l + wo] for i in range(kd) for j in range(kh)
                          for l in range(kw)], axis=-1)
  return lax.dot_general(cols, w.reshape(-1, w.shape[-1]), (((4,), (0,)), ((), ())))


def jax_conv_variants(rec, alternatives: bool):
  _, _, strides, pads, groups = rec
  kw = dict(dimension_numbers=DN, feature_group_count=groups)
  out = {
      "project": lambda x, w: convlib.conv_general_dilated(x, w, strides, pads, **kw),
      "xla3d": lambda x, w: lax.conv_general_dilated(x, w, strides, pads, **kw),
  }
  if alternatives and rec[1][0] > 1:
    out["tap_sum"] = lambda x, w: tap_sum_conv(x, w, strides, pads, groups)
    if all(s == 1 for s in strides) and groups == 1:
      out["im2col"] = lambda x, w: im2col_conv(x, w, strides, pads)
    if strides[0] == 1 and groups == 1:
      for r in (1, 2, 4):
        out[f"depth_block{r}"] = functools.partial(
            lambda x, w, r: convlib.depth_blocked_conv(x, w, pads, r, strides[1:]), r=r)
  return out


def time_jax_conv(rec, repeats: int, alternatives: bool) -> dict:
  lhs, rhs = rec[0], rec[1]
  x = jax.random.normal(jax.random.key(0), lhs, jnp.float32)
  w = jax.random.normal(jax.random.key(1), rhs, jnp.float32) * 0.1
  flops = conv_flops(rec)
  res = {}
  for name, f in jax_conv_variants(rec, alternatives).items():
    tf, cf = time_fn(f, x, w, repeats=repeats)
    g = jax.grad(lambda x, w: jnp.sum(jnp.square(f(x, w))), argnums=(0, 1))
    tb, cb = time_fn(g, x, w, repeats=repeats)
    res[name] = {"fwd_ms": tf * 1e3, "fwdbwd_ms": tb * 1e3, "fwd_gflops": flops / tf / 1e9,
                 "fwdbwd_gflops": 3 * flops / tb / 1e9, "compile_fwd_s": cf, "compile_fwdbwd_s": cb}
  return res


def torch_time(fn, repeats: int, min_seconds: float = 0.3) -> float:
  fn()
  times, start = [], time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 200):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_torch_conv(torch, rec, repeats: int) -> dict:
  lhs, rhs, strides, pads, groups = rec
  F = torch.nn.functional
  flops = conv_flops(rec)
  x0 = torch.randn(lhs[0], lhs[4], *lhs[1:4])
  w = (torch.randn(rhs[4], rhs[3], *rhs[:3]) * 0.1).requires_grad_()
  best = None
  for fmt in (torch.contiguous_format, torch.channels_last_3d):
    x = x0.contiguous(memory_format=fmt).requires_grad_()
    wf = w.detach().contiguous(memory_format=fmt).requires_grad_()

    def fwd():
      with torch.no_grad():
        return F.conv3d(F.pad(x, [p for q in pads[::-1] for p in q]), wf, stride=strides, groups=groups)

    def fb():
      y = F.conv3d(F.pad(x, [p for q in pads[::-1] for p in q]), wf, stride=strides, groups=groups)
      torch.autograd.grad(y.square().sum(), (x, wf))

    tf, tb = torch_time(fwd, repeats), torch_time(fb, repeats)
    r = {"format": str(fmt).split(".")[-1], "fwd_ms": tf * 1e3, "fwdbwd_ms": tb * 1e3,
         "fwd_gflops": flops / tf / 1e9, "fwdbwd_gflops": 3 * flops / tb / 1e9}
    if best is None or r["fwdbwd_ms"] < best["fwdbwd_ms"]:
      best = r
  return best


def time_jax_norm(rec, repeats: int) -> dict:
  shape, groups = rec
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  s, b = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
  f = lambda x, s, b: jax.nn.silu(layers.group_norm(x, s, b, groups, 1e-5))
  tf, cf = time_fn(f, x, s, b, repeats=repeats)
  g = jax.grad(lambda x, s, b: jnp.sum(jnp.square(f(x, s, b))), argnums=(0, 1, 2))
  tb, cb = time_fn(g, x, s, b, repeats=repeats)
  gb = 4 * np.prod(shape) / 1e9
  return {"project": {"fwd_ms": tf * 1e3, "fwdbwd_ms": tb * 1e3, "fwd_gbps": gb / tf, "compile_fwd_s": cf,
                      "compile_fwdbwd_s": cb}}


def time_torch_norm(torch, rec, repeats: int) -> dict:
  shape, groups = rec
  F = torch.nn.functional
  x = torch.randn(shape[0], shape[-1], *shape[1:-1]).requires_grad_()
  s, b = torch.ones(shape[-1], requires_grad=True), torch.zeros(shape[-1], requires_grad=True)

  def fwd():
    with torch.no_grad():
      return F.silu(F.group_norm(x, groups, s, b, 1e-5))

  def fb():
    torch.autograd.grad(F.silu(F.group_norm(x, groups, s, b, 1e-5)).square().sum(), (x, s, b))

  tf, tb = torch_time(fwd, repeats), torch_time(fb, repeats)
  return {"fwd_ms": tf * 1e3, "fwdbwd_ms": tb * 1e3, "fwd_gbps": 4 * np.prod(shape) / 1e9 / tf}


def run_ops(config, torch, repeats: int, networks: set[str] | None = None, alternatives: bool = False) -> dict:
  shapes = {k: v for k, v in quickstart_shapes(config).items() if not networks or k in networks}
  seen_c, seen_n, out = {}, {}, {"convs": [], "norms": []}
  for net, (convs, norms) in shapes.items():
    for rec in convs:
      seen_c.setdefault(rec, []).append(net)
    for rec in norms:
      seen_n.setdefault(rec, []).append(net)
  for rec, nets in seen_c.items():
    r = {"lhs": rec[0], "rhs": rec[1], "strides": rec[2], "padding": rec[3], "groups": rec[4],
         "networks": sorted(set(nets)), "calls_per_forward": len(nets), "gflop": conv_flops(rec) / 1e9,
         **time_jax_conv(rec, repeats, alternatives)}
    if torch is not None:
      r["torch"] = time_torch_conv(torch, rec, repeats)
    out["convs"].append(r)
    line = f"conv {rec[0]} k{rec[1][:3]} {rec[1][3]}->{rec[1][4]} s{rec[2]} x{len(nets)} {sorted(set(nets))}"
    for k in ("project", "xla3d", "tap_sum", "im2col", "depth_block1", "depth_block2", "depth_block4", "torch"):
      if k in r:
        line += f"\n    {k:8s} fwd {r[k]['fwd_gflops']:6.1f} GFLOP/s ({r[k]['fwd_ms']:7.2f} ms)  " \
                f"fwd+bwd {r[k]['fwdbwd_gflops']:6.1f} GFLOP/s ({r[k]['fwdbwd_ms']:7.2f} ms)"
    print(line, flush=True)
  for rec, nets in seen_n.items():
    r = {"shape": rec[0], "groups": rec[1], "networks": sorted(set(nets)), "calls_per_forward": len(nets),
         **time_jax_norm(rec, repeats)}
    if torch is not None:
      r["torch"] = time_torch_norm(torch, rec, repeats)
    out["norms"].append(r)
    line = f"groupnorm+silu {rec[0]} G{rec[1]} x{len(nets)} {sorted(set(nets))}"
    for k in ("project", "torch"):
      if k in r:
        line += f"\n    {k:8s} fwd {r[k]['fwd_ms']:7.3f} ms ({r[k]['fwd_gbps']:5.2f} GB/s)  fwd+bwd {r[k]['fwdbwd_ms']:7.3f} ms"
    print(line, flush=True)
  return out


# ------------------------------------------------------------------------------------------ networks
def run_nets(config, torch, repeats: int, only: set[str] | None = None) -> dict:
  """Forwards and train steps data-parallel over every CPU device (`--cpu_devices`), placed as train.py
  places them: parameters and optimizer state by `config.mesh.param_sharding`, batches split over the mesh (a
  batch the devices do not split evenly runs on the first device). `only`: a subset of NET_WORKLOADS."""
  want = lambda name: not only or name in only
  from ldae_jax.diffusion import schedule as schedule_lib
  from ldae_jax.parallel import mesh as pmesh
  from ldae_jax.training import autoencoder_stage, ldm_stage, representation_stage, state as st
  lat = cfglib.latent_shape(config)
  img = tuple(config.data.image_shape) + (1,)
  sched = schedule_lib.make_schedule(config.diffusion)
  out = {"devices": jax.device_count()}

  def placed(batch_size):
    """(mesh, replicated sharding, batch sharding) of the devices that split `batch_size`."""
    m = pmesh.local_mesh_splitting(batch_size)
    return m, pmesh.replicated(m), pmesh.batch_sharding(m)

  def place_state(state, m):
    return pmesh.shard_like(state, pmesh.shardings_from_config(state, m, config.mesh))

  def report(name, sec, compile_s, batch):
    out[name] = {"batch": batch, "ms": sec * 1e3, "samples_per_s": batch / sec, "compile_s": compile_s}
    print(f"{name}: {sec * 1e3:8.2f} ms  {batch / sec:7.2f} samples/s  compile {compile_s:5.1f} s", flush=True)

  def time_step(name, step, state, batch, b):
    m, _, data = placed(b)
    state = place_state(state, m)
    batch = jax.device_put(batch, data)
    jitted = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    report(name, statistics.median(times), compile_s, b)

  graphdef, params, rng_state, rest = st.split_model(models.build_unet(config, nnx.Rngs(0, dropout=1)))
  fwd = lambda p, x, t: st.merge_model(graphdef, p, rng_state, rest)(x, t)
  for b in (1, 2, 16) if want("unet_forward") else ():
    _, rep, data = placed(b)
    x = jax.device_put(jax.random.normal(jax.random.key(2), (b,) + lat), data)
    t = jax.device_put(jnp.full((b,), 500, jnp.int32), data)
    sec, cs = time_fn(fwd, jax.device_put(params, rep), x, t, repeats=repeats * 3)
    report(f"unet_forward_b{b}", sec, cs, b)

  cfg = config.train.ldm.copy_and_resolve_references()
  cfg.grad_accum = 1
  for b in (2, 16) if want("ldm_train") else ():
    tx = st.make_optimizer(cfg)
    # A copy: the step donates its state, and `params` is used again.
    state = st.create_state(jax.tree.map(jnp.copy, params), rest, tx, seed=0, with_ema=cfg.ema_decay > 0)
    step = ldm_stage.make_step(graphdef, rng_state, tx, sched, 1.0, cfg)
    time_step(f"ldm_train_b{b}", step, state, {"mu": jax.random.normal(jax.random.key(1), (b,) + lat)}, b)

  if want("autoencoder_train"):
    acfg = config.train.autoencoder.copy_and_resolve_references()
    ae, disc = autoencoder_stage.build_networks(config)
    g_def, gp, g_rngs, g_rest = st.split_model(ae)
    d_def, dp, d_rngs, d_rest = st.split_model(disc)
    tx = {"g": st.make_optimizer(acfg), "d": st.make_optimizer(acfg, lr=acfg.lr_disc)}
    state = st.create_state({"g": gp, "d": dp}, {"g": g_rest, "d": d_rest}, tx, seed=0, with_ema=acfg.ema_decay > 0)
    b = int(acfg.batch_size)
    time_step(f"autoencoder_train_b{b}", autoencoder_stage.make_step(g_def, g_rngs, d_def, d_rngs, tx, acfg), state,
              {"image": jax.random.uniform(jax.random.key(3), (b,) + img)}, b)

  if want("encoder_train"):
    # The semantic encoder alone (forward + gradient of a scalar of its code) at stage 3's batch: which part of
    # the stage-3 step scales with the devices and which does not.
    b = int(config.train.representation.batch_size)
    e_def, ep, e_rngs, e_rest = st.split_model(models.build_encoder(config, nnx.Rngs(params=2, dropout=3)))

    def encoder_step(p, batch):
      loss = lambda q: jnp.mean(jnp.square(st.merge_model(e_def, q, e_rngs, e_rest)(batch["image"])))
      value, grads = jax.value_and_grad(loss)(p)
      return jax.tree.map(lambda w, g: w - 1e-3 * g, p, grads), value

    time_step(f"encoder_train_b{b}", encoder_step, ep, {"image": jax.random.uniform(jax.random.key(7), (b,) + img)}, b)

  if want("stage3_train"):
    rcfg = config.train.representation.copy_and_resolve_references()
    shift = models.build_shift_unet(config, nnx.Rngs(params=0, dropout=1))
    enc = models.build_encoder(config, nnx.Rngs(params=2, dropout=3))
    s_def, sp, s_rngs, s_rest = st.split_model(shift, representation_stage.SHIFT_TRAINABLE)
    e_def, ep, e_rngs, e_rest = st.split_model(enc)
    tx = representation_stage.make_optimizer(rcfg)
    state = st.create_state({"shift": sp, "encoder": ep}, {"shift": s_rest, "encoder": e_rest}, tx, seed=0,
                            with_ema=rcfg.ema_decay > 0)
    b = int(rcfg.batch_size)
    time_step(f"stage3_train_b{b}", representation_stage.make_step(s_def, s_rngs, e_def, e_rngs, tx, sched, 1.0, rcfg),
              state, {"mu": jax.random.normal(jax.random.key(6), (b,) + lat),
                      "image": jax.random.uniform(jax.random.key(7), (b,) + img)}, b)
  if torch is not None and want("torch_resblock"):
    out["torch_resblock"] = torch_resblocks(torch, config, repeats)
  if torch is not None and want("torch_unet"):
    out["torch_unet"] = torch_unet_workloads(torch, config, repeats)
  return out


def torch_unet_workloads(torch, config, repeats: int) -> dict:
  """The reference UNet in PyTorch (`torch_unet.py`, checked against the project's UNet first): forwards at
  batch 1, 2, 16 and the LDM train step (eps-MSE, global-norm clip, Adam, EMA: the reference's step) at
  batch 2 and 16, in contiguous NCDHW and channels-last-3d memory formats, on `torch.get_num_threads()` threads."""
  import torch_unet  # pylint: disable=g-import-not-at-top  (benchmarks/, next to this script)
  from ldae_jax.diffusion import schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional
  res = {"max_rel_diff_to_project": torch_unet.check_against_project(config)}
  print(f"torch UNet vs ldae_jax UNet, same weights: max relative difference {res['max_rel_diff_to_project']:.2e}",
        flush=True)
  lat = cfglib.latent_shape(config)
  shape = (lat[-1],) + tuple(lat[:3])
  abar = torch.tensor(schedule_lib.tables_f64(config.diffusion)["alphas_cumprod"], dtype=torch.float32)
  cfg = config.train.ldm
  for fmt_name, fmt in (("ncdhw", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
    torch.manual_seed(0)
    net = torch_unet.from_config(config).to(memory_format=fmt)
    for b in (1, 2, 16):
      x = torch.randn(b, *shape).contiguous(memory_format=fmt)
      t = torch.full((b,), 500)

      def fwd():
        with torch.inference_mode():
          net.eval()(x, t)

      sec = torch_time(fwd, repeats * 3)
      res[f"forward_b{b}_{fmt_name}_ms"] = sec * 1e3
      print(f"torch unet_forward_b{b} ({fmt_name}): {sec * 1e3:8.2f} ms  {b / sec:7.2f} samples/s", flush=True)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, foreach=True)
    ema = [p.detach().clone() for p in params]
    for b in (2, 16):
      x0 = torch.randn(b, *shape).contiguous(memory_format=fmt)

      def step():
        net.train()
        t = torch.randint(0, len(abar), (b,))
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1, 1)
        loss = F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=True)
        opt.step()
        with torch.no_grad():
          torch._foreach_lerp_(ema, params, 1 - cfg.ema_decay)  # pylint: disable=protected-access

      sec = torch_time(step, repeats)
      res[f"ldm_train_b{b}_{fmt_name}_ms"] = sec * 1e3
      print(f"torch ldm_train_b{b} ({fmt_name}): {sec * 1e3:8.2f} ms  {b / sec:7.2f} samples/s", flush=True)
  return res


def torch_resblocks(torch, config, repeats: int) -> dict:
  """PyTorch guided-diffusion ResBlock (GN-SiLU-conv, scale-shift GN-SiLU-conv, skip) at the UNet's shapes,
  against the project's ResBlock at the same shapes, forward and forward+backward."""
  F = torch.nn.functional
  lat = cfglib.latent_shape(config)
  base, g = int(config.unet.base_channels), int(config.unet.norm_groups)
  emb = 4 * base
  b = int(config.train.ldm.batch_size)
  res = {}
  for cin, cout, spatial in ((base, base, lat[:3]), (2 * base, 2 * base, (lat[0], lat[1] // 2, lat[2] // 2)),
                             (3 * base, 2 * base, (lat[0], lat[1] // 2, lat[2] // 2)), (2 * base, base, lat[:3])):
    x = torch.randn(b, cin, *spatial).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    e = torch.randn(b, emb)
    ps = [torch.ones(cin), torch.zeros(cin), torch.randn(cout, cin, 3, 3, 3) * 0.05, torch.zeros(cout),
          torch.randn(2 * cout, emb) * 0.05, torch.zeros(2 * cout), torch.ones(cout), torch.zeros(cout),
          torch.randn(cout, cout, 3, 3, 3) * 0.05, torch.zeros(cout), torch.randn(cout, cin, 1, 1, 1) * 0.05,
          torch.zeros(cout)]
    ps = [p.requires_grad_() for p in ps]

    def block():
      h = F.conv3d(F.silu(F.group_norm(x, g, ps[0], ps[1])), ps[2], ps[3], padding=1)
      sc, sh = F.linear(F.silu(e), ps[4], ps[5]).chunk(2, dim=1)
      h = F.group_norm(h, g, ps[6], ps[7]) * (1 + sc[..., None, None, None]) + sh[..., None, None, None]
      h = F.conv3d(F.silu(h), ps[8], ps[9], padding=1)
      skip = x if cin == cout else F.conv3d(x, ps[10], ps[11])
      return skip + h

    def fwd():
      with torch.no_grad():
        block()

    def fb():
      torch.autograd.grad(block().square().sum(), [x] + ps, allow_unused=True)

    blk = layers.ResBlock(cin, emb, cout, norm_groups=g, rngs=nnx.Rngs(0))
    gd, st_, other = nnx.split(blk, nnx.Param, ...)
    xj = jax.random.normal(jax.random.key(0), (b, *spatial, cin))
    ej = jax.random.normal(jax.random.key(1), (b, emb))
    jf = lambda s, x, e: nnx.merge(gd, s, other)(x, e)
    jt, _ = time_fn(jf, st_, xj, ej, repeats=repeats * 3)
    jg = jax.grad(lambda s, x, e: jnp.sum(jnp.square(jf(s, x, e))), argnums=(0, 1))
    jb, _ = time_fn(jg, st_, xj, ej, repeats=repeats * 3)
    key = f"resblock_b{b}_{cin}to{cout}_{'x'.join(map(str, spatial))}"
    res[key] = {"torch_fwd_ms": torch_time(fwd, repeats * 3) * 1e3, "torch_fwdbwd_ms": torch_time(fb, repeats * 3) * 1e3,
                "jax_fwd_ms": jt * 1e3, "jax_fwdbwd_ms": jb * 1e3}
    r = res[key]
    print(f"{key}: torch fwd {r['torch_fwd_ms']:.2f} ms fwd+bwd {r['torch_fwdbwd_ms']:.2f} ms | "
          f"ldae_jax fwd {r['jax_fwd_ms']:.2f} ms fwd+bwd {r['jax_fwdbwd_ms']:.2f} ms", flush=True)
  return res


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/quickstart.py")
  p.add_argument("--part", choices=("ops", "nets", "all"), default="all")
  p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--networks", default="", help="ops: comma list of autoencoder,discriminator,unet,shift_unet,encoder")
  p.add_argument("--nets", default="", help="nets: comma list of " + ",".join(NET_WORKLOADS) + " (default all)")
  p.add_argument("--alternatives", action="store_true",
                 help="ops: also time the rejected forms (kD-tap sum of 2D convs, im2col + one matmul)")
  p.add_argument("--cpu_devices", type=int, default=1,
                 help="nets: CPU devices the steps run data-parallel over (0: JAX's default; train.py uses one "
                      "per core, config.mesh.cpu_devices)")
  p.add_argument("--label", default="", help="tag of the JSON file name (e.g. before / after)")
  p.add_argument("--out_dir", default=str(pathlib.Path(__file__).parent / "results"))
  args = p.parse_args()
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before anything starts the backend
  torch = None
  if not args.no_torch:
    try:
      import torch  # noqa: F811 pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.threads)
    except ImportError:
      torch = None
  config = cfglib.load_config(args.config)
  meta = {"cpu": host_cpu_model(), "affinity": sorted(os.sched_getaffinity(0)), "jax": jax.__version__,
          "device": str(jax.devices()[0]), "devices": jax.device_count(), "backend": jax.default_backend(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "torch": None if torch is None else torch.__version__,
          "torch_threads": None if torch is None else torch.get_num_threads(), "config": args.config,
          "latent_shape": cfglib.latent_shape(config), "image_shape": tuple(config.data.image_shape),
          "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")}
  print(json.dumps(meta), flush=True)
  result = {"meta": meta}
  if args.part in ("ops", "all"):
    result["ops"] = run_ops(config, torch, args.repeats, set(filter(None, args.networks.split(","))),
                            args.alternatives)
  if args.part in ("nets", "all"):
    result["nets"] = run_nets(config, torch, args.repeats, set(filter(None, args.nets.split(","))))
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"cpu_ops_{args.label + '_' if args.label else ''}{args.part}_{meta['utc']}.json"
  path.write_text(json.dumps(result, indent=1, default=float))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
