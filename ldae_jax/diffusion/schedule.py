"""Gaussian diffusion constants and DDIM sub-chains, bit-compatible with the reference.

The reference (PDAE's `GaussianDiffusion` / `DDIM`) builds every table in float64 numpy and casts it to float32
once; the sampler and the losses then work on those float32 tables. We keep the float64 masters (for analysis
and for building DDIM sub-chains) and expose float32 `jnp` tables that equal the reference's bit for bit.

DDIM sub-chains (reference `get_ddim_betas_and_timestep_map`) start from the **float32** alpha-bar. Under the
pinned numpy 1.26 the step-0 beta is computed in float64 and the others as `1 - (float32 ratio)` in float64;
the DDIM tables are then float64 cumulative products cast to float32. We reproduce exactly that (numpy 2 would
run it in float32 and change sqrt(1/abar-1) at k=0 by 537 ulp, which the encoder amplifies by 100x).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine")

# Names of the float32 tables of `GaussianSchedule`, in the reference's naming (`weight` -> `pdae_weight`).
_GAUSSIAN_TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recip_alphas_cumprod_m1",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "x_0_posterior_mean_x_0_coef",
    "x_0_posterior_mean_x_t_coef",
    "noise_posterior_mean_x_t_coef",
    "noise_posterior_mean_noise_coef",
    "shift_coef",
    "pdae_weight",
)

_DDIM_TABLES = (
    "timesteps",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recip_alphas_cumprod_m1",
    "sqrt_alphas_cumprod_prev",
    "sqrt_one_minus_alphas_cumprod_prev",
    "sqrt_alphas_cumprod_next",
    "sqrt_one_minus_alphas_cumprod_next",
)


def _get(cfg: Any, name: str, default: Any) -> Any:
  """Reads `cfg.name` from a ConfigDict/mapping/object, falling back to `default`."""
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    return cfg[name] if name in cfg else default  # ml_collections.ConfigDict supports `in`
  except TypeError:
    return getattr(cfg, name, default)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """The reference's betas: float64 `np.linspace(beta_start, beta_end, T)`."""
  return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021); not used by the paper, offered as an option.

  alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), max_beta),
  the clip keeping the last steps from becoming singular.
  """

  def abar(t):
    return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

  return np.array([min(1 - abar(i + 1) / abar(i), max_beta) for i in range(timesteps)], dtype=np.float64)


@functools.lru_cache(maxsize=16)
def _gaussian_tables_f64(key: tuple) -> dict[str, np.ndarray]:
  """float64 tables of the reference `GaussianDiffusion.__init__` for a (type, T, start, end, gamma) key."""
  kind, timesteps, beta_start, beta_end, gamma = key
  betas = linear_betas(timesteps, beta_start, beta_end) if kind == "linear" else cosine_betas(timesteps)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas, axis=0)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], 0.0)
  posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
  snr = ac / (1.0 - ac)
  t = {
      "betas": betas,
      "alphas": alphas,
      "alphas_cumprod": ac,
      "alphas_cumprod_prev": ac_prev,
      "alphas_cumprod_next": ac_next,
      "sqrt_alphas_cumprod": np.sqrt(ac),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
      "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
      "sqrt_recip_alphas_cumprod_m1": np.sqrt(1.0 / ac - 1.0),
      "posterior_variance": posterior_variance,
      # log(0) at t=0 is avoided by repeating the t=1 value (guided-diffusion convention).
      "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
      "x_0_posterior_mean_x_0_coef": betas * np.sqrt(ac_prev) / (1.0 - ac),
      "x_0_posterior_mean_x_t_coef": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      "noise_posterior_mean_x_t_coef": np.sqrt(1.0 / alphas),
      "noise_posterior_mean_noise_coef": betas / (np.sqrt(alphas) * np.sqrt(1.0 - ac)),
      # Training coefficient of G (PDAE): c_t = -sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t).
      "shift_coef": -np.sqrt(alphas) * (1.0 - ac_prev) / np.sqrt(1.0 - ac),
      # PDAE loss weight lambda_t = SNR^gamma / (1 + SNR).
      "pdae_weight": snr**gamma / (1.0 + snr),
  }
  for v in t.values():
    v.setflags(write=False)
  return t


def _f32(x: np.ndarray) -> jax.Array:
  """Rounds float64 to nearest float32 in numpy (as `torch.tensor(..., dtype=float32)`), then to device."""
  return jnp.asarray(np.asarray(x, dtype=np.float32))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class GaussianSchedule:
  """The T-step diffusion constants: float32 `jnp` tables (pytree leaves) + float64 numpy masters (`f64`).

  Index = DDPM timestep t in [0, T). Passing it through `jax.jit` traces only the float32 tables; the key
  (schedule type, T, betas, gamma) is static, so equal configs share compilations.
  """

  key: tuple
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod_m1: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  x_0_posterior_mean_x_0_coef: jax.Array
  x_0_posterior_mean_x_t_coef: jax.Array
  noise_posterior_mean_x_t_coef: jax.Array
  noise_posterior_mean_noise_coef: jax.Array
  shift_coef: jax.Array
  pdae_weight: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.key[1]

  @property
  def f64(self) -> dict[str, np.ndarray]:
    """The float64 masters (read-only numpy arrays), same names as the float32 fields."""
    return _gaussian_tables_f64(self.key)

  @property
  def alphas_cumprod_f32(self) -> np.ndarray:
    """The float32 alpha-bar as numpy: the reference's input to the DDIM sub-chain construction."""
    return np.asarray(self.f64["alphas_cumprod"], dtype=np.float32)

  def tree_flatten(self):
    return tuple(getattr(self, n) for n in _GAUSSIAN_TABLES), self.key

  @classmethod
  def tree_unflatten(cls, key, leaves):
    return cls(key, *leaves)


def make_schedule(diffusion_config: Any) -> GaussianSchedule:
  """Builds the schedule from `config.diffusion` (timesteps, beta_schedule, beta_start, beta_end, pdae_gamma)."""
  kind = _get(diffusion_config, "beta_schedule", "linear")
  if kind not in BETA_SCHEDULES:
    raise ValueError(f"config.diffusion.beta_schedule={kind!r}: must be one of {BETA_SCHEDULES}.")
  timesteps = int(_get(diffusion_config, "timesteps", 1000))
  if timesteps < 2:
    raise ValueError(f"config.diffusion.timesteps={timesteps}: need at least 2 diffusion steps.")
  beta_start = float(_get(diffusion_config, "beta_start", 1e-4))
  beta_end = float(_get(diffusion_config, "beta_end", 0.02))
  if kind == "linear" and not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"config.diffusion.beta_start={beta_start}, beta_end={beta_end}: need 0 < beta_start <= beta_end < 1.")
  gamma = float(_get(diffusion_config, "pdae_gamma", 0.1))
  key = (kind, timesteps, beta_start, beta_end, gamma)
  t64 = _gaussian_tables_f64(key)
  return GaussianSchedule(key, *(_f32(t64[n]) for n in _GAUSSIAN_TABLES))


def tables_f64(diffusion_config: Any) -> dict[str, np.ndarray]:
  """The schedule's float64 numpy tables (read-only), e.g. for constants built while JAX traces (eval_shape)."""
  return _gaussian_tables_f64(make_schedule(diffusion_config).key)


def ddim_timestep_map(num_timesteps: int, steps: int) -> np.ndarray:
  """Sorted set of int(linspace(0, T-1, S+1)) (reference `ddimS`): S+1 entries, always holds 0 and T-1."""
  if not 1 <= steps < num_timesteps:
    raise ValueError(f"DDIM steps={steps}: must be in [1, {num_timesteps - 1}] for a {num_timesteps}-step schedule "
                     "(config.eval.ddim_steps / the sampler's `steps`).")
  m = np.array(sorted({int(s) for s in np.linspace(0, num_timesteps - 1, steps + 1)}), dtype=np.int64)
  if m.shape[0] != steps + 1:  # int() truncation merged two entries; cannot happen for S < T but be explicit
    raise ValueError(f"DDIM steps={steps}: the timestep map has {m.shape[0]} distinct entries, not {steps + 1}.")
  return m


def ddim_betas_and_timestep_map(alphas_cumprod_f32: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference `get_ddim_betas_and_timestep_map` under numpy 1.26: float64 new_betas, int64 map.

  beta'_0 = 1 - abar_{M0} / 1.0 in float64; beta'_k = 1 - (abar_{Mk} / abar_{M(k-1)} in float32), the
  subtraction in float64 (numpy-1 scalar promotion). Matches the fixture's `ddimS/new_betas` exactly.
  """
  ac = np.asarray(alphas_cumprod_f32, dtype=np.float32)
  m = ddim_timestep_map(ac.shape[0], steps)
  sub = ac[m]
  ratio = np.empty(sub.shape, np.float64)
  ratio[0] = np.float64(sub[0]) / 1.0
  ratio[1:] = (sub[1:] / sub[:-1]).astype(np.float64)  # float32 division, as numpy-1 float32 scalars
  return 1.0 - ratio, m


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DDIMSchedule:
  """A DDIM sub-chain of S steps: every table has S+1 entries, index = DDIM index k (k=0: t=0, k=S: t=T-1).

  `timesteps[k]` is the DDPM timestep the network receives. `*_prev` / `*_next` hold the coefficients of the
  target level of a sampling (k -> k-1) / encoding (k -> k+1) step; their square roots are float32 roots of the
  float32 tables, as the reference computes them with torch at run time.
  """

  timesteps: jax.Array  # int32 (S+1,)
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod_m1: jax.Array
  sqrt_alphas_cumprod_prev: jax.Array
  sqrt_one_minus_alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod_next: jax.Array
  sqrt_one_minus_alphas_cumprod_next: jax.Array

  @property
  def steps(self) -> int:
    return int(self.timesteps.shape[0]) - 1

  def tree_flatten(self):
    return tuple(getattr(self, n) for n in _DDIM_TABLES), None

  @classmethod
  def tree_unflatten(cls, _, leaves):
    return cls(*leaves)


def ddim_tables_f64(base: GaussianSchedule, steps: int) -> dict[str, np.ndarray]:
  """float64 DDIM tables (reference `DDIM.__init__`) before the float32 cast, plus new_betas and the map."""
  new_betas, m = ddim_betas_and_timestep_map(base.alphas_cumprod_f32, steps)
  ac = np.cumprod(1.0 - new_betas, axis=0)
  return {
      "new_betas": new_betas,
      "timestep_map": m,
      "alphas_cumprod": ac,
      "alphas_cumprod_prev": np.append(1.0, ac[:-1]),
      "alphas_cumprod_next": np.append(ac[1:], 0.0),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
      "sqrt_recip_alphas_cumprod_m1": np.sqrt(1.0 / ac - 1.0),
  }


def ddim_schedule(base: GaussianSchedule, steps: int) -> DDIMSchedule:
  """The `ddim<steps>` sub-chain of `base`, float32 tables equal to the reference's (numpy 1.26)."""
  t = ddim_tables_f64(base, int(steps))
  f32 = {k: np.asarray(v, np.float32) for k, v in t.items() if k not in ("new_betas", "timestep_map")}
  one = np.float32(1.0)
  derived = {
      # float32 arithmetic on the float32 tables, exactly as torch does inside the reference's step.
      "sqrt_alphas_cumprod": np.sqrt(f32["alphas_cumprod"]),
      "sqrt_alphas_cumprod_prev": np.sqrt(f32["alphas_cumprod_prev"]),
      "sqrt_one_minus_alphas_cumprod_prev": np.sqrt(one - f32["alphas_cumprod_prev"]),
      "sqrt_alphas_cumprod_next": np.sqrt(f32["alphas_cumprod_next"]),
      "sqrt_one_minus_alphas_cumprod_next": np.sqrt(one - f32["alphas_cumprod_next"]),
  }
  f32.update(derived)
  return DDIMSchedule(
      timesteps=jnp.asarray(t["timestep_map"].astype(np.int32)),
      **{k: jnp.asarray(f32[k]) for k in _DDIM_TABLES if k != "timesteps"})
