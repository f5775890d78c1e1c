"""Forward noising and the two diffusion objectives (stage 2: eps-MSE; stage 3: PDAE posterior-mean gap).

All arithmetic is float32 on the schedule's float32 tables (as the reference), whatever dtype the network
computed in: model outputs are cast up before they meet the coefficients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldae_jax.diffusion.schedule import GaussianSchedule


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """table[t] reshaped to (B, 1, ..., 1) with `ndim` axes, ready to broadcast against a (B, ...) batch."""
  t = jnp.asarray(t)
  if t.ndim != 1:
    raise ValueError(f"timesteps t must have shape (B,), got {t.shape}.")
  return jnp.take(table, t.astype(jnp.int32), axis=0).reshape((t.shape[0],) + (1,) * (ndim - 1))


def q_sample(sched: GaussianSchedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, per batch element (t int (B,))."""
  z0 = jnp.asarray(z0, jnp.float32)
  noise = jnp.asarray(noise, jnp.float32)
  if z0.shape != noise.shape:
    raise ValueError(f"q_sample: z0 {z0.shape} and noise {noise.shape} must have the same shape.")
  return (extract(sched.sqrt_alphas_cumprod, t, z0.ndim) * z0
          + extract(sched.sqrt_one_minus_alphas_cumprod, t, z0.ndim) * noise)


def v_target(sched: GaussianSchedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) noise - sqrt(1 - abar_t) z0 (Salimans & Ho 2022), the v-parameterisation's target."""
  z0 = jnp.asarray(z0, jnp.float32)
  return (extract(sched.sqrt_alphas_cumprod, t, z0.ndim) * jnp.asarray(noise, jnp.float32)
          - extract(sched.sqrt_one_minus_alphas_cumprod, t, z0.ndim) * z0)


def eps_loss(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
  """Stage-2 objective: mean over all elements of (noise - eps_pred)^2 (no weighting), float32 scalar."""
  eps_pred = jnp.asarray(eps_pred).astype(jnp.float32)
  return jnp.mean(jnp.square(jnp.asarray(noise, jnp.float32) - eps_pred))


def pdae_loss(eps_pred: jax.Array, shift: jax.Array, noise: jax.Array, t: jax.Array,
              sched: GaussianSchedule) -> jax.Array:
  """Stage-3 objective: mean over all elements of lambda_t * (noise - (eps_pred + c_t * G))^2.

  c_t = `sched.shift_coef` (training coefficient, not the DDIM one) and lambda_t = `sched.pdae_weight`.
  eps_pred comes from the frozen stage-2 UNet; it is stop-gradient'ed here too, so that a caller that forgot to
  freeze it cannot leak gradients into it (the reference's UNet has requires_grad False).
  """
  eps_pred = jax.lax.stop_gradient(jnp.asarray(eps_pred).astype(jnp.float32))
  shift = jnp.asarray(shift).astype(jnp.float32)
  noise = jnp.asarray(noise, jnp.float32)
  if not eps_pred.shape == shift.shape == noise.shape:
    raise ValueError(f"pdae_loss: eps_pred {eps_pred.shape}, shift {shift.shape} and noise {noise.shape} must "
                     "have the same shape.")
  weight = extract(sched.pdae_weight, t, noise.ndim)
  coef = extract(sched.shift_coef, t, noise.ndim)
  return jnp.mean(weight * jnp.square(noise - (eps_pred + coef * shift)))
