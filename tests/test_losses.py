"""q_sample and the two objectives, against `pdae_loss_tiny` (replayed network outputs) and closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldae_jax.config import default_config
from ldae_jax.diffusion import losses, schedule


def ndhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, 1, -1)


@pytest.fixture(scope="module")
def sched():
  return schedule.make_schedule(default_config().diffusion)


def test_q_sample_reproduces_reference_z_t(sched, load_fixture):
  f = load_fixture("pdae_loss_tiny")
  z_t = losses.q_sample(sched, ndhwc(f["in/z_0"]), f["in/t"], ndhwc(f["in/noise"]))
  assert z_t.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(z_t), ndhwc(f["out/z_t"]), rtol=0, atol=1e-6)


def test_pdae_loss_from_recorded_outputs(sched, load_fixture):
  f = load_fixture("pdae_loss_tiny")
  t = f["in/t"]
  np.testing.assert_array_equal(np.asarray(sched.shift_coef)[t], f["out/shift_coef_at_t"])
  np.testing.assert_array_equal(np.asarray(sched.pdae_weight)[t], f["out/weight_at_t"])
  loss = losses.pdae_loss(ndhwc(f["out/eps"]), ndhwc(f["out/shift"]), ndhwc(f["in/noise"]), t, sched)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), float(f["out/loss"]), rtol=1e-5)


def test_pdae_loss_gradients_closed_form(sched):
  """dL/dG = -2 lambda c (noise - eps - c G)/N; eps carries no gradient (the UNet is frozen)."""
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 4, 2)
  eps, g, noise = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  t = jnp.array([5, 700], jnp.int32)
  d_eps, d_g = jax.grad(losses.pdae_loss, argnums=(0, 1))(eps, g, noise, t, sched)
  assert float(jnp.abs(d_eps).max()) == 0.0
  lam = np.asarray(sched.pdae_weight)[np.asarray(t)].reshape(2, 1, 1, 1, 1)
  c = np.asarray(sched.shift_coef)[np.asarray(t)].reshape(2, 1, 1, 1, 1)
  expect = -2 * lam * c * (np.asarray(noise) - np.asarray(eps) - c * np.asarray(g)) / np.prod(shape)
  np.testing.assert_allclose(np.asarray(d_g), expect, rtol=1e-5, atol=1e-10)


def test_eps_loss_and_bf16_inputs():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  b = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  np.testing.assert_allclose(float(losses.eps_loss(a, b)), np.mean((a - b) ** 2), rtol=1e-6)
  assert float(losses.eps_loss(a, a)) == 0.0
  out = losses.eps_loss(jnp.asarray(a, jnp.bfloat16), b)  # a bf16 network output is promoted, not b demoted
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), np.mean((a.astype(jnp.bfloat16).astype(np.float32) - b) ** 2), rtol=1e-6)


def test_q_sample_endpoints_and_errors(sched):
  z0 = jnp.ones((2, 2, 2, 2, 1))
  noise = -jnp.ones((2, 2, 2, 2, 1))
  z = losses.q_sample(sched, z0, jnp.array([0, 999]), noise)
  ac = np.asarray(sched.f64["alphas_cumprod"])
  np.testing.assert_allclose(np.asarray(z[:, 0, 0, 0, 0]), np.sqrt(ac[[0, 999]]) - np.sqrt(1 - ac[[0, 999]]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"shape \(B,\)"):
    losses.q_sample(sched, z0, jnp.array(3), noise)
  with pytest.raises(ValueError, match="same shape"):
    losses.pdae_loss(z0, z0, noise[:1], jnp.array([0, 1]), sched)


@pytest.mark.slow
def test_pdae_loss_and_gradients_with_shift_unet(sched, load_fixture):
  """Stage-3 loss through the real tiny ShiftUNet: loss, dL/dy and shift-branch gradients as the reference."""
  from test_ddim import tiny_network  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ldae_jax.convert import common, shift_unet as convert_shift  # pylint: disable=import-outside-toplevel

  model = tiny_network(load_fixture, "shift_unet")
  f = load_fixture("pdae_loss_tiny")
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("unet")))
  graphdef, params, rest = nnx.split(model, trainable, ...)
  z0, noise, t = ndhwc(f["in/z_0"]), ndhwc(f["in/noise"]), jnp.asarray(f["in/t"], jnp.int32)

  @jax.jit
  def loss_fn(params, y):
    net = nnx.merge(graphdef, params, rest)
    eps, g = net(losses.q_sample(sched, z0, t, noise), t, y)
    return losses.pdae_loss(eps, g, noise, t, sched)

  loss, (g_params, g_y) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, jnp.asarray(f["in/y"]))
  np.testing.assert_allclose(float(loss), float(f["out/loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_y), f["out/grad/y"], atol=1e-6)
  flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(g_params)}
  names = [k[len("out/grad/"):] for k in f if k.startswith("out/grad/") and k != "out/grad/y"]
  assert len(names) == 6
  for name in names:
    path, transform = convert_shift.key_map(name)
    want = common.TRANSFORMS[transform](f[f"out/grad/{name}"])
    np.testing.assert_allclose(np.asarray(flat[tuple(path)]), want, atol=1e-6, err_msg=name)
  # The frozen UNet gets no gradient at all: it is not even among the differentiated leaves.
  assert not any(p[0] == "unet" for p in flat)
