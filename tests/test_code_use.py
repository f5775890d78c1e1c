"""Code-swap diagnostics (ldae_jax/diffusion/code_use.py): pairing, paired losses, and the gap's meaning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldae_jax.config import default_config
from ldae_jax.diffusion import code_use as cu, losses, schedule


@pytest.fixture(scope="module")
def sched():
  return schedule.make_schedule(default_config().diffusion)


def test_pairing_never_pairs_a_subject_with_itself():
  subjects = np.repeat(np.arange(7), [1, 3, 2, 5, 1, 1, 4])
  for seed in range(20):
    perm = cu.other_subject_pairing(subjects, seed=seed)
    assert perm.shape == subjects.shape
    assert np.all(subjects[perm] != subjects)


def test_pairing_needs_two_subjects():
  with pytest.raises(ValueError, match="two subjects"):
    cu.other_subject_pairing(["a", "a", "a"])


def _oracle_models(sched, strength):
  """A frozen 'UNet' that predicts eps as if x0 were 0, and a G that adds the correction implied by a code
  holding `strength` times the true x0 (the code is x0 itself, flattened)."""
  def frozen(x_t, t):
    return (x_t, t), x_t / losses.extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)

  def shift(ctx, y):
    x_t, t = ctx
    x0 = strength * y.reshape(x_t.shape)
    # eps(x_t, x0) - eps(x_t, 0) = -sqrt(abar)/sqrt(1-abar) x0, and the loss uses eps_hat + c_t G.
    corr = -losses.extract(sched.sqrt_alphas_cumprod / sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x0
    return corr / losses.extract(sched.shift_coef, t, x_t.ndim)

  return frozen, shift


def test_oracle_code_scores_lower_than_another_subjects_code(sched):
  z0 = jax.random.normal(jax.random.key(0), (6, 2, 3, 2, 1))
  y = z0.reshape(6, -1)
  perm = cu.other_subject_pairing(np.arange(6), seed=1)
  frozen, shift = _oracle_models(sched, 0.5)
  ts = (100, 475)
  out = jax.device_get(cu.swap_losses_by_t(frozen, shift, z0, y, y[perm], jax.random.key(3), ts, sched))
  assert out["own"].shape == (2, 6)
  # Half the true correction leaves a quarter of the G-off loss; another subject's code leaves more.
  np.testing.assert_allclose(out["own"], 0.25 * out["off"], rtol=1e-4)
  s = cu.summarise(out, ts, n_boot=200)
  assert s["gap_other"] > 0.3 and s["gap_other_ci95"][0] > 0
  assert s["g_gain"] == pytest.approx(0.75, abs=1e-3)
  assert all(r["swap_change"] > 0.3 for r in s["by_t"])


def test_a_shift_branch_that_ignores_the_code_has_zero_gap(sched):
  z0 = jax.random.normal(jax.random.key(0), (5, 2, 2, 2, 1))
  y = jax.random.normal(jax.random.key(1), (5, 4))
  frozen, _ = _oracle_models(sched, 1.0)
  shift = lambda ctx, code: 0.3 * ctx[0]  # depends on x_t only
  out = jax.device_get(cu.swap_losses_by_t(frozen, shift, z0, y, y[::-1], jax.random.key(2), (50, 500), sched))
  s = cu.summarise(out, (50, 500), n_boot=100)
  assert s["gap_other"] == pytest.approx(0.0, abs=1e-7)
  assert s["gap_other_ci95"] == pytest.approx([0.0, 0.0], abs=1e-7)
  assert all(r["swap_change"] == pytest.approx(0.0, abs=1e-7) for r in s["by_t"])


def test_swap_losses_off_matches_the_pdae_loss_with_zero_shift(sched):
  z0 = jax.random.normal(jax.random.key(0), (3, 2, 2, 2, 2))
  noise = jax.random.normal(jax.random.key(1), z0.shape)
  t = jnp.array([10, 300, 800])
  eps_hat = 0.5 * noise
  frozen = lambda x_t, tt: (None, eps_hat)
  shift = lambda ctx, y: jnp.zeros_like(z0)
  y = jnp.zeros((3, 4))
  out = cu.swap_losses(frozen, shift, z0, y, y, y[:1], noise, t, sched)
  for i in range(3):
    want = losses.pdae_loss(eps_hat[i:i + 1], jnp.zeros_like(z0[i:i + 1]), noise[i:i + 1], t[i:i + 1], sched)
    np.testing.assert_allclose(float(out["off"][i]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(out["own"][i]), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["eps_mse"]), 0.25 * np.mean(np.square(noise), axis=(1, 2, 3, 4)),
                             rtol=1e-6)


def test_g_gain_is_on_the_summed_loss_not_ruled_by_a_tiny_late_timestep():
  # G halves the loss at t = 100 and triples a ~1e-5 loss at t = 900: a mean of per-t ratios would read -75 %.
  n = 4
  per_t = {"off": (1.0, 1e-5), "own": (0.5, 3e-5), "other": (0.6, 3e-5), "mean": (0.6, 3e-5), "eps_mse": (1.0, 1e-5),
           "g_rms": (1.0, 1.0), "g_swap_rms": (0.1, 0.1)}
  by_t = {k: np.repeat(np.asarray(v, np.float64)[:, None], n, axis=1) for k, v in per_t.items()}
  s = cu.summarise(by_t, (100, 900), n_boot=10)
  assert [r["g_gain"] for r in s["by_t"]] == pytest.approx([0.5, -2.0])
  assert s["g_gain"] == pytest.approx((1.0 + 1e-5 - 0.5 - 3e-5) / (1.0 + 1e-5))
