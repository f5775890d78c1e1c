"""Image-similarity metrics for 3D volumes: SSIM and MS-SSIM (MONAI formulation), MSE, PSNR.

The reference's reconstruction evaluation logs MONAI-Generative's `SSIMMetric` / `MultiScaleSSIMMetric`: a separable
Gaussian window (kernel 3 since 2025-09, 4 when the paper's numbers were produced, 4 in the interpolation script),
sigma 1.5, K1 0.01, K2 0.03, data range 1, *valid* filtering (no padding) and the mean of the SSIM map per volume.
The statistics are the population (not sample) variances, as in MONAI. These functions reproduce that formula in
pure `jax.numpy` so they can be jitted beside the sampler; the window is applied as a weighted sum of shifted
slices, so no convolution or matmul is involved and accelerator matmul precision (TF32/bf16 passes) cannot change
the result.

All inputs are NDHWC volumes `(B, X, Y, Z, C)`; every function returns one value per batch element `(B,)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# MONAI / Wang et al. 2003 five-scale weights.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window_1d(kernel_size: int, sigma: float) -> np.ndarray:
  """MONAI's normalised 1D Gaussian: taps at arange((1-k)/2, (1+k)/2), so even sizes are centred between voxels."""
  if kernel_size < 1:
    raise ValueError(f"SSIM kernel_size={kernel_size}: must be >= 1 (config.eval.ssim_kernel).")
  if sigma <= 0:
    raise ValueError(f"SSIM sigma={sigma}: must be > 0.")
  dist = np.arange((1 - kernel_size) / 2, (1 + kernel_size) / 2, 1.0)
  g = np.exp(-((dist / sigma) ** 2) / 2)
  return (g / g.sum()).astype(np.float32)


def _check_pair(x: jax.Array, y: jax.Array, min_size: int) -> None:
  if x.shape != y.shape:
    raise ValueError(f"metric inputs differ in shape: {x.shape} vs {y.shape}; pass matching NDHWC volumes.")
  if x.ndim != 5:
    raise ValueError(f"metric inputs must be NDHWC (B, X, Y, Z, C); got shape {x.shape}.")
  if min(x.shape[1:4]) < min_size:
    raise ValueError(
        f"volume spatial shape {x.shape[1:4]} is smaller than the SSIM window {min_size}; lower "
        "config.eval.ssim_kernel.")


def _filter_valid(v: jax.Array, w: np.ndarray) -> jax.Array:
  """Separable valid filtering over axes 1, 2, 3 as a weighted sum of shifted slices (exact, precision-free)."""
  k = len(w)
  for axis in (1, 2, 3):
    n = v.shape[axis] - k + 1
    acc = None
    for i in range(k):
      term = float(w[i]) * jax.lax.slice_in_dim(v, i, i + n, axis=axis)
      acc = term if acc is None else acc + term
    v = acc
  return v


def ssim_and_cs_maps(x: jax.Array, y: jax.Array, *, kernel_size: int = 3, sigma: float = 1.5,
                     k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """SSIM map and contrast-sensitivity map (MONAI `compute_ssim_and_cs`), each `(B, X-k+1, Y-k+1, Z-k+1, C)`."""
  _check_pair(x, y, kernel_size)
  w = gaussian_window_1d(kernel_size, sigma)
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  mu_x = _filter_valid(x, w)
  mu_y = _filter_valid(y, w)
  mu_xx = _filter_valid(x * x, w)
  mu_yy = _filter_valid(y * y, w)
  mu_xy = _filter_valid(x * y, w)
  sigma_x = mu_xx - mu_x * mu_x
  sigma_y = mu_yy - mu_y * mu_y
  sigma_xy = mu_xy - mu_x * mu_y
  cs = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
  ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * cs
  return ssim_map, cs


def ssim(x: jax.Array, y: jax.Array, *, kernel_size: int = 3, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> jax.Array:
  """Mean 3D SSIM per volume `(B,)` (MONAI `SSIMMetric`, valid window)."""
  s, _ = ssim_and_cs_maps(x, y, kernel_size=kernel_size, sigma=sigma, k1=k1, k2=k2, data_range=data_range)
  return s.reshape(s.shape[0], -1).mean(axis=1)


def ms_ssim_weights(spatial_shape: Sequence[int], kernel_size: int,
                    weights: Sequence[float] = MS_SSIM_WEIGHTS) -> tuple[float, ...]:
  """The leading MS-SSIM weights that fit the volume, rescaled to the full set's total.

  MONAI refuses volumes whose coarsest scale (size // 2**(n-1)) is not larger than kernel_size - 1; at quickstart
  size (32x40x32) five scales do not fit. Rather than fail, small volumes use fewer scales: the first n weights
  rescaled to the same total. At paper size (128x160x128) all five scales fit and the weights are unchanged.
  """
  for n in range(len(weights), 0, -1):
    if all(s // 2 ** (n - 1) > kernel_size - 1 for s in spatial_shape):
      w = np.asarray(weights[:n], np.float64)
      return tuple(float(v) for v in w / w.sum() * float(np.sum(weights)))
  raise ValueError(
      f"volume {tuple(spatial_shape)} is too small for even one SSIM scale with kernel {kernel_size}; lower "
      "config.eval.ssim_kernel.")


def _avg_pool2(v: jax.Array) -> jax.Array:
  """torch `avg_pool3d(kernel_size=2)`: non-overlapping 2x2x2 means, odd trailing voxels dropped."""
  b, nx, ny, nz, c = v.shape
  v = v[:, : nx // 2 * 2, : ny // 2 * 2, : nz // 2 * 2]
  return v.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c).mean(axis=(2, 4, 6))


def ms_ssim(x: jax.Array, y: jax.Array, *, weights: Sequence[float] = MS_SSIM_WEIGHTS, kernel_size: int = 3,
            sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> jax.Array:
  """Multi-scale SSIM per volume `(B,)` (MONAI `MultiScaleSSIMMetric`): prod_i relu(cs_i)^w_i, SSIM at the last scale.

  Raises if the coarsest scale is not larger than the window; use `ms_ssim_weights` to pick weights that fit.
  """
  n = len(weights)
  if any(s // 2 ** (n - 1) <= kernel_size - 1 for s in x.shape[1:4]):
    raise ValueError(
        f"MS-SSIM with {n} scales and kernel {kernel_size} needs every spatial size // {2 ** (n - 1)} > "
        f"{kernel_size - 1}; got {x.shape[1:4]}. Pass weights=ms_ssim_weights(shape, kernel).")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  factors = []
  for i in range(n):
    s_map, cs_map = ssim_and_cs_maps(x, y, kernel_size=kernel_size, sigma=sigma, k1=k1, k2=k2,
                                     data_range=data_range)
    last = i == n - 1
    m = (s_map if last else cs_map)
    factors.append(jax.nn.relu(m.reshape(m.shape[0], -1).mean(axis=1)) ** weights[i])
    if not last:
      x, y = _avg_pool2(x), _avg_pool2(y)
  return jnp.prod(jnp.stack(factors), axis=0)


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error per volume `(B,)`."""
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  return (d * d).reshape(d.shape[0], -1).mean(axis=1)


def psnr(x: jax.Array, y: jax.Array, *, data_range: float = 1.0) -> jax.Array:
  """PSNR in dB per volume `(B,)`; +inf for identical volumes."""
  return 10.0 * jnp.log10(data_range**2 / mse(x, y))


def volume_metrics(pred: jax.Array, target: jax.Array, *, kernel_size: int = 3,
                   ms_weights: Sequence[float] | None = None) -> dict[str, jax.Array]:
  """SSIM, MS-SSIM, MSE and PSNR of `pred` against `target`, each `(B,)`; one function to jit per batch shape.

  Intensities are compared as they are (images in [0, 1], data range 1; the reference does not clip decoded
  volumes either).
  """
  if ms_weights is None:
    ms_weights = ms_ssim_weights(pred.shape[1:4], kernel_size)
  return {
      "ssim": ssim(pred, target, kernel_size=kernel_size),
      "ms_ssim": ms_ssim(pred, target, weights=ms_weights, kernel_size=kernel_size),
      "mse": mse(pred, target),
      "psnr": psnr(pred, target),
  }
