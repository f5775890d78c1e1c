"""UNet against the reference `unet_tiny` fixture (through the converter), bf16 path, dropout, remat."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldae_jax.convert import unet as convert_unet
from ldae_jax.models.layers import AttentionBlock, ResBlock, apply_sequence, materialize_rng_state
from ldae_jax.models.unet import UNet

TINY = dict(in_channels=3, base_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1,
            attention_resolutions=(2, 4), num_heads=1, dropout=0.1, norm_groups=32)
TOL = dict(rtol=1e-4, atol=5e-5)


def ndhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 4, 1)))


def ncdhw(a):
  return np.transpose(np.asarray(a), (0, 4, 1, 2, 3))


def tiny_unet(fixture, dtype=jnp.float32, remat=False):
  """Abstract build + conversion (no random init to compile) + concrete dropout streams."""
  model = nnx.eval_shape(lambda: UNet(**TINY, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
  sd = {k[len("param/"):]: v for k, v in fixture.items() if k.startswith("param/")}
  report = convert_unet.convert(sd, model)
  return materialize_rng_state(model), report


@nnx.jit(static_argnames=("deterministic",))
def forward(model, x, t, deterministic=True):
  return model(x, t, deterministic=deterministic)


@pytest.fixture(scope="module")
def fx(load_fixture):
  return load_fixture("unet_tiny")


@pytest.fixture(scope="module")
def model(fx):
  return tiny_unet(fx)[0]


@pytest.fixture(scope="module")
def eps32(model, fx):
  return forward(model, ndhwc(fx["in/x"]), jnp.asarray(fx["in/t"]))


def test_conversion_complete_and_param_count(fx, refdir):
  model, report = tiny_unet(fx)
  meta = json.loads((refdir / "unet_tiny.json").read_text())
  n = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == meta["num_unique_parameters"] == 5_454_787
  assert report.consumed == len(meta["state_dict"])


def test_matches_reference_outputs(model, fx, eps32):
  assert eps32.dtype == jnp.float32 and eps32.shape == (2, 8, 12, 8, 3)
  np.testing.assert_allclose(ncdhw(eps32), fx["out/eps"], **TOL)
  np.testing.assert_allclose(model.embed_time(jnp.asarray(fx["in/t"])), fx["out/time_emb"], **TOL)


def test_dropout_only_when_not_deterministic(model, fx, eps32):
  x, t = ndhwc(fx["in/x"]), jnp.asarray(fx["in/t"])
  a = forward(model, x, t, deterministic=False)
  b = forward(model, x, t, deterministic=False)  # the stored stream advances
  assert not np.allclose(a, eps32, atol=1e-4) and not np.allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(forward(model, x, t), eps32)


def test_bf16_close_to_fp32_with_fp32_output(fx, eps32):
  model16, _ = tiny_unet(fx, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  out = forward(model16, ndhwc(fx["in/x"]), jnp.asarray(fx["in/t"]))
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - np.asarray(eps32))
  scale = np.abs(np.asarray(eps32)).max()
  assert err.max() < 0.05 * scale and err.mean() < 0.01 * scale, (err.max(), err.mean(), scale)


def test_remat_same_values_and_gradients():
  """nnx.remat (config.remat) changes memory, not maths: same output and parameter gradients."""
  def make():
    rngs = nnx.Rngs(3)
    return ResBlock(8, 16, 12, dropout=0.0, resample="down", norm_groups=4, rngs=rngs), AttentionBlock(
        12, 1, norm_groups=4, rngs=rngs)
  blocks = nnx.jit(make)()
  state = jax.tree.map(lambda v: v + 0.05, nnx.state(blocks, nnx.Param))  # non-zero output convs
  nnx.update(blocks, state)
  x = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 8))
  emb = jax.random.normal(jax.random.key(1), (1, 16))

  def loss(blocks, remat):
    return jnp.mean(apply_sequence(blocks, x, emb, remat=remat) ** 2)

  grad = nnx.jit(nnx.value_and_grad(loss), static_argnums=1)
  (l1, g1), (l2, g2) = grad(blocks, False), grad(blocks, True)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)  # fusion order differs, values do not
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5 * float(jnp.abs(a).max()))
  assert all(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g1))


def test_v_parameterisation_returns_eps_and_is_exact_on_the_v_target(model, fx, eps32):
  """`config.diffusion.prediction="v"`: the head's v becomes eps = sqrt(1-abar) x_t + sqrt(abar) v, so a head
  that outputs the true v gives back exactly the noise; the ShiftUNet's frozen eps is the UNet's."""
  from ldae_jax.config import default_config
  from ldae_jax.diffusion import losses, schedule as schedule_lib
  from ldae_jax.models.shift_unet import ShiftUNet
  from ldae_jax.models.unet import v_coefs
  c = default_config()
  assert v_coefs(c) is None  # the reference's eps
  c.diffusion.prediction = "v"
  coefs = v_coefs(c)
  sched = schedule_lib.make_schedule(c.diffusion)
  # Built abstractly and given the converted reference weights: no random init, and every forward is one
  # compiled program (eager calls would compile each op of the UNet separately).
  vmodel = nnx.eval_shape(lambda: UNet(**TINY, v_coefs=coefs, rngs=nnx.Rngs(0)))
  nnx.update(vmodel, nnx.state(model, nnx.Param))  # same weights as the converted reference UNet
  vmodel = materialize_rng_state(vmodel)
  x = ndhwc(fx["in/x"])
  t = jnp.asarray(fx["in/t"])
  raw, eps_v = nnx.jit(lambda m, x, t: (m.raw(x, t), m(x, t)))(vmodel, x, t)
  np.testing.assert_allclose(raw, eps32, **TOL)  # the head is the reference's
  a = np.sqrt(1.0 - np.asarray(sched.alphas_cumprod, np.float64))[np.asarray(t)][:, None, None, None, None]
  np.testing.assert_allclose(eps_v, a * np.asarray(x) + np.sqrt(1 - a**2) * np.asarray(raw), rtol=1e-5, atol=1e-5)
  z0 = jax.random.normal(jax.random.key(1), x.shape)
  noise = jax.random.normal(jax.random.key(2), x.shape)
  x_t = losses.q_sample(sched, z0, t, noise)
  np.testing.assert_allclose(vmodel.to_eps(losses.v_target(sched, z0, t, noise), x_t, t), noise, atol=2e-5)
  # The frozen branch gets the v-UNet's weights, the shift branch zeros: only the frozen eps is compared.
  shift = nnx.eval_shape(lambda: ShiftUNet(**TINY, latent_dim=16, v_coefs=coefs, rngs=nnx.Rngs(0)))
  nnx.update(shift, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nnx.state(shift, nnx.Param)))
  nnx.update(shift.unet, nnx.state(vmodel, nnx.Param))
  shift = materialize_rng_state(shift)
  eps, _ = nnx.jit(lambda m, x, t, y: m(x, t, y))(shift, x, t, jnp.zeros((x.shape[0], 16)))
  np.testing.assert_allclose(eps, eps_v, rtol=1e-5, atol=1e-5)
  c.diffusion.prediction = "x0"
  with pytest.raises(ValueError, match="prediction"):
    v_coefs(c)
