"""SSIM / MS-SSIM / MSE / PSNR checked against independent implementations (scikit-image, scipy)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.signal
from skimage.metrics import structural_similarity

from ldae_jax.evaluation import metrics


def _pair(shape=(2, 14, 16, 12, 1), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, shape).astype(np.float32)
  # A structured distortion (smooth bias + noise) so SSIM lands mid-range, not near 0 or 1.
  y = np.clip(0.7 * x + 0.2 * np.linspace(0, 1, shape[1])[None, :, None, None, None]
              + 0.05 * rng.normal(size=shape), 0, 1).astype(np.float32)
  return x, y


def _scipy_ssim_maps(a, b, k, sigma=1.5, c1=1e-4, c2=9e-4):
  """Independent MONAI-formula SSIM on one 3D volume with scipy's valid correlation."""
  g = metrics.gaussian_window_1d(k, sigma).astype(np.float64)
  win = g[:, None, None] * g[None, :, None] * g[None, None, :]
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  f = lambda v: scipy.signal.correlate(v, win, mode="valid")
  mx, my = f(a), f(b)
  vx, vy, vxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
  cs = (2 * vxy + c2) / (vx + vy + c2)
  return ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs, cs


def test_gaussian_window_matches_monai_taps():
  # MONAI: dist = arange((1-k)/2, (1+k)/2); k=4 is centred between voxels, so it is symmetric with 4 taps.
  g3 = metrics.gaussian_window_1d(3, 1.5)
  np.testing.assert_allclose(g3, np.exp(-np.array([1, 0, 1]) / 4.5) / np.exp(-np.array([1, 0, 1]) / 4.5).sum(),
                             rtol=1e-6)
  g4 = metrics.gaussian_window_1d(4, 1.5)
  assert g4.shape == (4,) and np.allclose(g4, g4[::-1]) and abs(g4.sum() - 1) < 1e-6


def test_ssim_matches_skimage_nd_gaussian():
  """kernel 11 / sigma 1.5 is what skimage's gaussian_weights=True uses (truncate 3.5); reflect + crop = valid."""
  x, y = _pair(shape=(2, 16, 14, 13, 1))
  ours = np.asarray(metrics.ssim(x, y, kernel_size=11))
  ref = [structural_similarity(x[i, ..., 0], y[i, ..., 0], gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=1.0) for i in range(2)]
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
  assert 0.2 < ours.min() < ours.max() < 0.95


@pytest.mark.parametrize("k", [3, 4])
def test_ssim_matches_scipy_valid_correlation(k):
  x, y = _pair()
  ours = np.asarray(metrics.ssim(x, y, kernel_size=k))
  ref = [_scipy_ssim_maps(x[i, ..., 0], y[i, ..., 0], k)[0].mean() for i in range(2)]
  np.testing.assert_allclose(ours, ref, atol=2e-5)
  s_map, _ = metrics.ssim_and_cs_maps(x, y, kernel_size=k)
  assert s_map.shape == (2, 14 - k + 1, 16 - k + 1, 12 - k + 1, 1)  # valid filtering


def test_ms_ssim_matches_scipy_reference():
  x, y = _pair(shape=(1, 24, 20, 26, 1), seed=1)
  w = metrics.ms_ssim_weights(x.shape[1:4], 3)
  assert len(w) == 3 and abs(sum(w) - sum(metrics.MS_SSIM_WEIGHTS)) < 1e-9  # 20 // 8 = 2 <= 2: only 3 scales fit
  ours = float(metrics.ms_ssim(x, y, weights=w, kernel_size=3)[0])
  a, b = x[0, ..., 0].astype(np.float64), y[0, ..., 0].astype(np.float64)
  ref = 1.0
  for i, wi in enumerate(w):
    s_map, cs_map = _scipy_ssim_maps(a, b, 3)
    ref *= max((s_map if i == len(w) - 1 else cs_map).mean(), 0.0) ** wi
    crop = tuple(slice(0, n // 2 * 2) for n in a.shape)
    pool = lambda v: v[crop].reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean((1, 3, 5))
    a, b = pool(a), pool(b)
  np.testing.assert_allclose(ours, ref, atol=3e-5)


def test_identity_and_bounds():
  x, y = _pair()
  assert np.allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  assert np.allclose(metrics.ms_ssim(x, x, weights=metrics.ms_ssim_weights(x.shape[1:4], 3)), 1.0, atol=1e-5)
  assert np.all(np.isinf(metrics.psnr(x, x)))
  m = metrics.volume_metrics(x, y)
  np.testing.assert_allclose(m["mse"], ((x - y) ** 2).reshape(2, -1).mean(1), rtol=1e-5)
  np.testing.assert_allclose(m["psnr"], -10 * np.log10(m["mse"]), rtol=1e-5)
  assert np.all(np.asarray(m["ssim"]) < 1) and np.all(np.asarray(m["ms_ssim"]) < 1)
  # Jitted and eager paths agree (the evaluation jits one batch function).
  mj = jax.jit(metrics.volume_metrics)(x, y)
  for key in m:
    np.testing.assert_allclose(mj[key], m[key], rtol=1e-4, atol=5e-5)  # float32 fusion order


def test_bad_inputs_raise():
  x, y = _pair()
  with pytest.raises(ValueError, match="shape"):
    metrics.ssim(x, y[:, :-1])
  with pytest.raises(ValueError, match="ssim_kernel"):
    metrics.ssim(x[:, :2], y[:, :2], kernel_size=3)
  with pytest.raises(ValueError, match="MS-SSIM"):
    metrics.ms_ssim(x, y)  # 5 scales do not fit 14x16x12
