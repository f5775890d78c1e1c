"""Interpolation and semantic manipulation (reference section 2.4), correct per batch element.

The reference's SLERP computes one angle over the whole batch (right only for B = 1) and divides by sin(theta)
(NaN for identical inputs, bug list #21). Here the angle is per batch element over all non-batch axes, computed
as 2*atan2(|a^ - b^|, |a^ + b^|) (accurate near 0 and pi, unlike arccos of a rounded cosine), and the weights
fall back to LERP's as theta -> 0, with a NaN-free gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this angle (radians) sin((1-a)t)/sin(t) and (1-a) agree to ~t^2/6 < 1e-9: use the LERP weights.
_SMALL_ANGLE = 1e-4


def _per_example(alpha: jax.Array | float, x: jax.Array) -> jax.Array:
  """alpha as float32 broadcastable to x: a scalar, or one value per batch element (B,)."""
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.ndim == 0:
    return alpha
  if alpha.ndim != 1 or alpha.shape[0] != x.shape[0]:
    raise ValueError(f"alpha must be a scalar or have shape (B,)=({x.shape[0]},), got {alpha.shape}.")
  return alpha.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _check_pair(a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  a = jnp.asarray(a).astype(jnp.float32)
  b = jnp.asarray(b).astype(jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"{name}: a {a.shape} and b {b.shape} must have the same shape.")
  if a.ndim < 2:
    raise ValueError(f"{name}: inputs must be batched (B, ...), got shape {a.shape}.")
  return a, b


def lerp(a: jax.Array, b: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """(1 - alpha) a + alpha b; alpha a scalar or (B,). Used for the semantic code y."""
  a, b = _check_pair(a, b, "lerp")
  w = _per_example(alpha, a)
  return (1.0 - w) * a + w * b


def _safe_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """L2 norm over `axes`, floored at float32 `tiny`: no division by 0 and a finite gradient at x = 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axes), jnp.finfo(jnp.float32).tiny))


def slerp(a: jax.Array, b: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """Spherical interpolation per batch element: sin((1-alpha)t)/sin t * a + sin(alpha t)/sin t * b.

  t is the angle between a[i] and b[i] over all their non-batch axes. Used for the DDIM-encoded noise x_T.
  """
  a, b = _check_pair(a, b, "slerp")
  axes = tuple(range(1, a.ndim))
  keep = (a.shape[0],) + (1,) * (a.ndim - 1)
  ua = a / _safe_norm(a, axes).reshape(keep)
  ub = b / _safe_norm(b, axes).reshape(keep)
  theta = 2.0 * jnp.arctan2(_safe_norm(ua - ub, axes), _safe_norm(ua + ub, axes))
  theta = theta.reshape(keep)
  w = _per_example(alpha, a)
  small = theta < _SMALL_ANGLE
  safe_theta = jnp.where(small, 1.0, theta)  # keeps both branches (and their gradients) finite
  sin_t = jnp.sin(safe_theta)
  wa = jnp.where(small, 1.0 - w, jnp.sin((1.0 - w) * safe_theta) / sin_t)
  wb = jnp.where(small, w, jnp.sin(w * safe_theta) / sin_t)
  return wa * a + wb * b


def manipulate(y: jax.Array, direction: jax.Array, alpha: jax.Array | float, mean: jax.Array,
               std: jax.Array) -> jax.Array:
  """Moves semantic codes along a probe direction in standardised code space (reference manipulation).

  y_n = (y - mean)/std; y_n += alpha * sqrt(d) * w/|w|; return y_n * std + mean, with d = y.shape[-1] (the
  reference uses sqrt(768) = sqrt(emb_dim); its PDAE-legacy variant hard-codes sqrt(512)).
  y: (B, d); direction: (d,) or (1, d) (e.g. a linear probe's weight); mean, std: (d,); alpha: scalar or (B,).
  """
  y = jnp.asarray(y).astype(jnp.float32)
  if y.ndim != 2:
    raise ValueError(f"manipulate: y must be (B, d), got {y.shape}.")
  d = y.shape[-1]
  w = jnp.asarray(direction, jnp.float32).reshape(-1)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  for name, v in (("direction", w), ("mean", mean.reshape(-1)), ("std", std.reshape(-1))):
    if v.shape[0] != d:
      raise ValueError(f"manipulate: {name} has {v.shape[0]} entries, the codes have d={d}.")
  y_n = (y - mean) / std
  step = _per_example(alpha, y) * jnp.sqrt(jnp.float32(d)) * w / jnp.linalg.norm(w)
  return (y_n + step) * std + mean
