"""Deterministic DDIM sampling/encoding (eta = 0) and DDPM ancestral sampling, each one `lax.scan`.

Step rule of the reference (PDAE `DDIM.ddim_sample` / `ddim_encode`), at DDIM index k with eps' the model noise:
  x0   = sqrt(1/abar_k) x - sqrt(1/abar_k - 1) eps'      then clamp(x0, -r, r) (optional; on in the reference)
  eps''= (sqrt(1/abar_k) x - x0) / sqrt(1/abar_k - 1)    (noise made consistent with the clamped x0)
  x'   = sqrt(abar_j) x0 + sqrt(1 - abar_j) eps''        j = k-1 (sample, k = S..1) or k+1 (encode, k = 0..S-1)
Shifted (ShiftUNet, semantic guidance): eps' = eps - sqrt(1 - abar_k) G, the DDIM coefficient (the training loss
uses a different c_t, reference bug list #5). The written order of the float32 operations follows the reference,
so a replay of its recorded network outputs reproduces its trajectory to float32 rounding.

`model_fn(x, t) -> eps` or `-> (eps, G)` with x float32 (B, ...) and t int32 (B,) = timestep_map[k]. The public
functions are `jax.jit`-compiled with `model_fn` static: call them with the same function object to reuse the
compilation. For a large network, do not close over concrete parameters (they would become compile-time
constants); call the sampler inside your own jit and pass the state as an argument instead:

  graphdef, state = nnx.split(model)
  @jax.jit
  def run(state, x_T, y):
    net = nnx.merge(graphdef, state)
    return ddim.sample(lambda x, t: net(x, t, y), x_T, sched, shifted=True)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldae_jax.diffusion.schedule import DDIMSchedule, GaussianSchedule

ModelFn = Callable[[jax.Array, jax.Array], Any]

_STATIC = ("shifted", "clamp", "clamp_range", "stop_percent", "return_trajectory")


def _model_eps(model_fn: ModelFn, x: jax.Array, t: jax.Array, shifted: bool) -> tuple[jax.Array, jax.Array | None]:
  """Calls the network and casts its output(s) to float32 (all sampler arithmetic is float32)."""
  out = model_fn(x, t)
  if shifted:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError("shifted=True: model_fn(x, t) must return (eps, G) (the ShiftUNet's outputs), got "
                       f"{type(out).__name__}.")
    eps, g = out
    return jnp.asarray(eps).astype(jnp.float32), jnp.asarray(g).astype(jnp.float32)
  if isinstance(out, (tuple, list)):
    raise ValueError("shifted=False: model_fn(x, t) must return eps only; for a ShiftUNet pass shifted=True.")
  return jnp.asarray(out).astype(jnp.float32), None


def _check_input(x: jax.Array, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name} must be batched (B, ...), got shape {x.shape}.")
  return x.astype(jnp.float32)


def _ddim_step(x, eps_used, sr, srm1, sqrt_a_to, sqrt_1ma_to, clamp: bool, clamp_range: float):
  """One deterministic DDIM move from level k to the target level (coefficients are float32 scalars)."""
  x0 = sr * x - srm1 * eps_used
  if clamp:
    x0 = jnp.clip(x0, -clamp_range, clamp_range)
    eps_used = (sr * x - x0) / srm1
  return x0 * sqrt_a_to + sqrt_1ma_to * eps_used


def _ddim_loop(model_fn: ModelFn, x: jax.Array, ddim: DDIMSchedule, *, encode: bool, shifted: bool, clamp: bool,
               clamp_range: float, shift_from: int, return_trajectory: bool):
  s = ddim.steps
  ks = jnp.arange(0, s, dtype=jnp.int32) if encode else jnp.arange(s, 0, -1, dtype=jnp.int32)
  a_to = ddim.sqrt_alphas_cumprod_next if encode else ddim.sqrt_alphas_cumprod_prev
  one_minus_to = ddim.sqrt_one_minus_alphas_cumprod_next if encode else ddim.sqrt_one_minus_alphas_cumprod_prev
  batch = x.shape[0]

  def body(x, k):
    t = jnp.full((batch,), ddim.timesteps[k], dtype=jnp.int32)
    eps, g = _model_eps(model_fn, x, t, shifted)
    eps_used = eps
    if shifted:
      shifted_eps = eps - ddim.sqrt_one_minus_alphas_cumprod[k] * g
      eps_used = shifted_eps if encode else jnp.where(k - 1 >= shift_from, shifted_eps, eps)
    x_next = _ddim_step(x, eps_used, ddim.sqrt_recip_alphas_cumprod[k], ddim.sqrt_recip_alphas_cumprod_m1[k],
                        a_to[k], one_minus_to[k], clamp, clamp_range)
    if not return_trajectory:
      return x_next, None
    rec = {"x_t": x, "t": t, "eps": eps}
    if shifted:
      rec["shift"] = g
    return x_next, rec

  x_out, traj = jax.lax.scan(body, x, ks)
  return (x_out, traj) if return_trajectory else x_out


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=_STATIC)
def sample(model_fn: ModelFn, x_T: jax.Array, ddim: DDIMSchedule, *, shifted: bool = False, clamp: bool = True,
           clamp_range: float = 1.0, stop_percent: float = 0.0, return_trajectory: bool = False):
  """DDIM sampling x_T (level S) -> x_0 (level 0) in S network calls, k = S..1.

  shifted: model_fn returns (eps, G) and eps' = eps - sqrt(1 - abar_k) G while (k - 1) >= int(S*stop_percent)
  (reference `shift_ddim_sample_loop`; stop_percent 0 keeps the shift at every step).
  return_trajectory: also return a dict of per-call records in call order: x_t (S, B, ...) the network input,
  t (S, B), eps (S, B, ...) and, when shifted, shift (S, B, ...) (the raw network outputs).
  """
  if not 0.0 <= stop_percent <= 1.0:
    raise ValueError(f"stop_percent={stop_percent}: must be in [0, 1].")
  return _ddim_loop(model_fn, _check_input(x_T, "x_T"), ddim, encode=False, shifted=shifted, clamp=clamp,
                    clamp_range=float(clamp_range), shift_from=int(ddim.steps * stop_percent),
                    return_trajectory=return_trajectory)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=_STATIC[:3] + ("return_trajectory",))
def encode(model_fn: ModelFn, x_0: jax.Array, ddim: DDIMSchedule, *, shifted: bool = False, clamp: bool = True,
           clamp_range: float = 1.0, return_trajectory: bool = False):
  """DDIM inversion x_0 (level 0) -> x_T (level S) in S network calls, k = 0..S-1; the shift is always applied.

  Note (reference fact): at k = 0, sqrt(1/abar - 1) = 0.01, so with the clamp on every |x0| > clamp_range element
  gets a recomputed noise up to (|x0| - r)/0.01; the encoded latents then reach magnitudes of ~50.
  """
  return _ddim_loop(model_fn, _check_input(x_0, "x_0"), ddim, encode=True, shifted=shifted, clamp=clamp,
                    clamp_range=float(clamp_range), shift_from=0, return_trajectory=return_trajectory)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("clamp", "clamp_range"))
def ddpm_sample(model_fn: ModelFn, x_T: jax.Array, sched: GaussianSchedule, key: jax.Array, *, clamp: bool = True,
                clamp_range: float = 1.0) -> jax.Array:
  """Ancestral DDPM sampling over all T steps (reference `p_sample_loop`): one scan, t = T-1..0.

  x0 = sqrt(1/abar_t) x - sqrt(1/abar_t - 1) eps (clamped), mean = posterior mean of q(x_{t-1} | x_t, x0),
  x_{t-1} = mean + exp(0.5 log_var_clipped_t) z with z = N(0, I) from fold_in(key, t), no noise at t = 0.
  """
  x = _check_input(x_T, "x_T")
  batch = x.shape[0]
  ts = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)

  def body(x, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    eps, _ = _model_eps(model_fn, x, t, False)
    x0 = sched.sqrt_recip_alphas_cumprod[t_scalar] * x - sched.sqrt_recip_alphas_cumprod_m1[t_scalar] * eps
    if clamp:
      x0 = jnp.clip(x0, -clamp_range, clamp_range)
    mean = sched.x_0_posterior_mean_x_0_coef[t_scalar] * x0 + sched.x_0_posterior_mean_x_t_coef[t_scalar] * x
    z = jax.random.normal(jax.random.fold_in(key, t_scalar), x.shape, jnp.float32)
    std = jnp.exp(0.5 * sched.posterior_log_variance_clipped[t_scalar])
    return mean + jnp.where(t_scalar > 0, std, 0.0) * z, None

  x_out, _ = jax.lax.scan(body, x, ts)
  return x_out
