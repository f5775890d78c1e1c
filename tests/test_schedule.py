"""Schedule tables against the reference fixture `diffusion_schedule` and the spec's spot values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldae_jax.config import default_config
from ldae_jax.diffusion import schedule

DDIM_KEYS = ("alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_one_minus_alphas_cumprod",
             "sqrt_recip_alphas_cumprod", "sqrt_recip_alphas_cumprod_m1")


@pytest.fixture(scope="module")
def sched():
  return schedule.make_schedule(default_config().diffusion)


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  assert a.shape == b.shape
  return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_gaussian_tables_bit_identical(sched, load_fixture):
  ref = load_fixture("diffusion_schedule")
  for name in schedule._GAUSSIAN_TABLES:
    key = "out/weight" if name == "pdae_weight" else f"out/{name}"
    ours = np.asarray(getattr(sched, name))
    assert ours.dtype == np.float32 and ours.shape == (1000,), name
    assert _ulp_diff(ours, ref[key]) == 0, name


@pytest.mark.parametrize("steps", [10, 20, 50, 100])
def test_ddim_subchain_bit_identical(sched, load_fixture, steps):
  ref = load_fixture("diffusion_schedule")
  d = schedule.ddim_schedule(sched, steps)
  t64 = schedule.ddim_tables_f64(sched, steps)
  np.testing.assert_array_equal(np.asarray(d.timesteps), ref[f"out/ddim{steps}/timestep_map"])
  assert d.timesteps.dtype == jnp.int32 and d.steps == steps
  # new_betas float64 exactly as numpy 1.26 computed them (not the numpy-2 float32 ones).
  assert t64["new_betas"].dtype == np.float64
  np.testing.assert_array_equal(t64["new_betas"], ref[f"out/ddim{steps}/new_betas"])
  for name in DDIM_KEYS:
    assert _ulp_diff(getattr(d, name), ref[f"out/ddim{steps}/ddim_{name}"]) == 0, name
  # Derived float32 tables are float32 arithmetic on the float32 ones, as torch does inside the step.
  np.testing.assert_array_equal(np.asarray(d.sqrt_alphas_cumprod_prev),
                                np.sqrt(ref[f"out/ddim{steps}/ddim_alphas_cumprod_prev"]))
  np.testing.assert_array_equal(np.asarray(d.sqrt_one_minus_alphas_cumprod_next),
                                np.sqrt(np.float32(1) - ref[f"out/ddim{steps}/ddim_alphas_cumprod_next"]))
  # The sub-chain's alpha-bar is the base alpha-bar at the mapped timesteps (to float64 cumprod rounding).
  np.testing.assert_allclose(np.asarray(d.alphas_cumprod), np.asarray(sched.alphas_cumprod)[np.asarray(d.timesteps)],
                             rtol=1e-6)


def test_numpy1_not_numpy2_at_step0(sched, load_fixture):
  """k=0 sqrt(1/abar - 1) is where numpy 2's float32 arithmetic differs (537 ulp); we follow numpy 1.26."""
  ref = load_fixture("diffusion_schedule")
  d = schedule.ddim_schedule(sched, 10)
  ours = np.asarray(d.sqrt_recip_alphas_cumprod_m1)[0]
  assert ours == ref["out/ddim10/ddim_sqrt_recip_alphas_cumprod_m1"][0]
  assert _ulp_diff(ours, ref["out/numpy2/ddim10/ddim_sqrt_recip_alphas_cumprod_m1"][0]) > 100


def test_timestep_maps_from_spec():
  assert list(schedule.ddim_timestep_map(1000, 10)) == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
  for s, step in ((20, 49), (50, 19), (100, 9)):
    m = schedule.ddim_timestep_map(1000, s)
    assert m.shape == (s + 1,) and m[0] == 0 and m[1] == step and m[-1] == 999
    assert np.all(np.diff(m) > 0)
  with pytest.raises(ValueError, match="DDIM steps=1000"):
    schedule.ddim_timestep_map(1000, 1000)


def test_spec_spot_values(sched):
  c = np.asarray(sched.shift_coef)
  lam = np.asarray(sched.pdae_weight)
  assert c[0] == 0.0
  np.testing.assert_allclose(c[[99, 499, 999]], [-0.315, -0.954, -0.990], atol=1e-3)
  np.testing.assert_allclose(lam[[0, 99, 999]], [2.5e-4, 0.128, 0.364], rtol=1e-2)
  assert int(np.argmax(lam)) == 475 and abs(lam[475] - 0.7225) < 1e-4
  ac = np.asarray(sched.alphas_cumprod)
  np.testing.assert_allclose([ac[0], ac[999]], [0.9999, 4.04e-5], rtol=2e-3)  # spec rounds to 3 digits
  # Identity c_t = -sqrt(alpha_t)(1 - abar_{t-1})/sqrt(1 - abar_t) from the float64 masters.
  f = sched.f64
  np.testing.assert_allclose(
      f["shift_coef"], -np.sqrt(f["alphas"]) * (1 - f["alphas_cumprod_prev"]) / f["sqrt_one_minus_alphas_cumprod"])
  assert f["betas"].dtype == np.float64 and not f["betas"].flags.writeable


def test_cosine_schedule_is_valid():
  cfg = default_config().diffusion
  cfg.beta_schedule = "cosine"
  s = schedule.make_schedule(cfg)
  b = s.f64["betas"]
  assert b.shape == (1000,) and np.all(b > 0) and np.all(b <= 0.999)
  ac = s.f64["alphas_cumprod"]
  assert np.all(np.diff(ac) < 0) and ac[0] > 0.9999 and ac[-1] < 1e-3
  np.testing.assert_array_equal(np.asarray(s.betas), b.astype(np.float32))
  assert s.key[0] == "cosine" and schedule.ddim_schedule(s, 10).steps == 10


def test_bad_config_names_the_field():
  cfg = default_config().diffusion
  cfg.beta_schedule = "quadratic"
  with pytest.raises(ValueError, match="config.diffusion.beta_schedule"):
    schedule.make_schedule(cfg)
  cfg = ml_collections.ConfigDict({"timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.03,
                                   "beta_end": 0.02, "pdae_gamma": 0.1})
  with pytest.raises(ValueError, match="beta_start"):
    schedule.make_schedule(cfg)


def test_schedules_are_pytrees(sched):
  d = schedule.ddim_schedule(sched, 10)

  @jax.jit
  def f(s, dd):
    return s.sqrt_alphas_cumprod[dd.timesteps]

  np.testing.assert_array_equal(np.asarray(f(sched, d)), np.asarray(sched.sqrt_alphas_cumprod)[[0, 99, 199, 299,
                                                                                               399, 499, 599, 699,
                                                                                               799, 899, 999]])
  leaves, treedef = jax.tree_util.tree_flatten(sched)
  assert len(leaves) == len(schedule._GAUSSIAN_TABLES)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.num_timesteps == 1000 and rebuilt.f64 is sched.f64
