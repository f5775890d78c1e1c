"""LERP / SLERP per batch element (reference bug #21 fixed) and semantic manipulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldae_jax.diffusion import interpolate


def slerp_np(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
  """The reference formula for one pair, in float64."""
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  theta = np.arccos(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  return (np.sin((1 - alpha) * theta) * a + np.sin(alpha * theta) * b) / np.sin(theta)


@pytest.fixture(scope="module")
def pair():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 2, 3, 2, 3)).astype(np.float32),
          rng.standard_normal((2, 2, 3, 2, 3)).astype(np.float32))


def test_slerp_per_batch_element_matches_reference_formula(pair):
  a, b = pair
  b = b.copy()
  b[1] = 0.3 * a[1] + 0.1 * b[1]  # very different angles in the two batch elements
  for alpha in (0.25, 0.7):
    both = np.asarray(interpolate.slerp(a, b, alpha))
    for i in range(2):
      single = np.asarray(interpolate.slerp(a[i:i + 1], b[i:i + 1], alpha))
      np.testing.assert_allclose(both[i:i + 1], single, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(both[i], slerp_np(a[i], b[i], alpha), rtol=1e-4, atol=1e-5)


def test_slerp_endpoints_and_per_example_alpha(pair):
  a, b = pair
  np.testing.assert_allclose(np.asarray(interpolate.slerp(a, b, 0.0)), a, atol=1e-5)
  np.testing.assert_allclose(np.asarray(interpolate.slerp(a, b, 1.0)), b, atol=1e-5)
  mixed = np.asarray(interpolate.slerp(a, b, jnp.array([0.0, 1.0])))
  np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], b[1], atol=1e-5)
  with pytest.raises(ValueError, match=r"\(B,\)"):
    interpolate.slerp(a, b, jnp.array([0.1, 0.2, 0.3]))


def test_slerp_keeps_norm_between_orthogonal_unit_vectors():
  a = np.zeros((1, 4), np.float32)
  b = np.zeros((1, 4), np.float32)
  a[0, 0] = b[0, 1] = 1.0
  mid = np.asarray(interpolate.slerp(a, b, 0.5))
  np.testing.assert_allclose(mid, [[np.sqrt(0.5), np.sqrt(0.5), 0, 0]], atol=1e-6)


def test_slerp_identical_and_near_identical_inputs_are_finite(pair):
  a, _ = pair
  same = interpolate.slerp(a, a, 0.3)
  np.testing.assert_allclose(np.asarray(same), a, rtol=1e-6, atol=1e-6)
  near = a + 1e-6 * np.ones_like(a)
  np.testing.assert_allclose(np.asarray(interpolate.slerp(a, near, 0.5)), 0.5 * (a + near), atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(interpolate.slerp(x, x, 0.3)))(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(grad)))
  zero = np.zeros_like(a)
  assert np.all(np.isfinite(np.asarray(interpolate.slerp(zero, a, 0.5))))


def test_lerp(pair):
  a, b = pair
  np.testing.assert_allclose(np.asarray(interpolate.lerp(a, b, 0.25)), 0.75 * a + 0.25 * b, rtol=1e-6)
  out = np.asarray(interpolate.lerp(a, b, jnp.array([0.0, 1.0])))
  np.testing.assert_array_equal(out[0], a[0])
  np.testing.assert_array_equal(out[1], b[1])
  with pytest.raises(ValueError, match="same shape"):
    interpolate.lerp(a, b[:1], 0.5)


def test_manipulate_standardised_step():
  rng = np.random.default_rng(3)
  d = 16
  y = rng.standard_normal((3, d)).astype(np.float32)
  mean = rng.standard_normal(d).astype(np.float32)
  std = rng.uniform(0.5, 2.0, d).astype(np.float32)
  w = rng.standard_normal((1, d)).astype(np.float32)  # a probe's (1, d) weight
  np.testing.assert_allclose(np.asarray(interpolate.manipulate(y, w, 0.0, mean, std)), y, rtol=1e-5, atol=1e-5)
  alpha = 2.5
  out = np.asarray(interpolate.manipulate(y, w, alpha, mean, std))
  step = (out - mean) / std - (y - mean) / std  # the move in standardised space
  np.testing.assert_allclose(np.linalg.norm(step, axis=1), alpha * np.sqrt(d), rtol=1e-5)
  np.testing.assert_allclose(step / np.linalg.norm(step, axis=1, keepdims=True),
                             np.repeat(w / np.linalg.norm(w), 3, axis=0), atol=1e-5)
  # The direction's scale does not matter; alpha may differ per example.
  np.testing.assert_allclose(np.asarray(interpolate.manipulate(y, 7.0 * w[0], alpha, mean, std)), out, rtol=1e-5,
                             atol=1e-5)
  per = np.asarray(interpolate.manipulate(y, w, jnp.array([0.0, alpha, -alpha]), mean, std))
  np.testing.assert_allclose(per[1], out[1], rtol=1e-6)
  np.testing.assert_allclose(per[0], y[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="direction has 8 entries"):
    interpolate.manipulate(y, w[:, :8], alpha, mean, std)
