"""AutoencoderKL: reference fixture through the converter, the log-var clamp, paper listing and sizes."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper, quickstart
from ldae_jax.config import latent_shape
from ldae_jax.convert import autoencoder as conv_ae
from ldae_jax.convert.common import ConversionError, flat_param_shapes, load_into_model
from ldae_jax.models.autoencoder import AutoencoderKL, build_autoencoder

TOL = dict(rtol=1e-4, atol=5e-5)
TINY = dict(channels=(8, 16, 16), latent_channels=3, num_res_blocks=1, norm_groups=8)


def ncdhw(a):
  return np.asarray(a, np.float32).transpose(0, 4, 1, 2, 3)


def filled(ctor, seed=0):
  """Builds abstractly (nnx.eval_shape) and fills random weights: PyTorch-style init compiles one kernel per
  shape and costs tens of seconds on the shared CPUs; these tests only need *some* weights."""
  model = nnx.eval_shape(ctor)
  rng = np.random.default_rng(seed)
  load_into_model(model, {p: rng.normal(1.0 if p[-1] == "scale" else 0.0, 0.1, s).astype(np.float32)
                          for p, s in flat_param_shapes(model).items()})
  return model


@pytest.fixture(scope="module")
def tiny(load_fixture):
  z = load_fixture("autoencoder_kl_tiny")
  model = nnx.eval_shape(lambda: AutoencoderKL(**TINY, rngs=nnx.Rngs(0)))  # every parameter comes from z
  report = conv_ae.convert({k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}, model)
  x = jnp.asarray(z["in/x"].transpose(0, 2, 3, 4, 1))

  # Eager on purpose: the op-by-op kernels are cached across calls, one whole-graph compile per call is not.
  h = model.encoder(x)
  mu, sigma = model.encode(x)
  _, logvar = model.encode_moments(x)
  out = dict(encoder_out=h, z_mu=mu, z_sigma=sigma, logvar=logvar,
             z_log_var_preclamp=model.quant_conv_log_sigma(h), post_quant_conv_out=model.post_quant_conv(mu),
             reconstruction=model.decode(mu))
  return z, model, report, x, out


def test_fixture_forward_matches_reference(tiny):
  z, _, report, _, out = tiny
  assert report.consumed == len([k for k in z if k.startswith("param/")])
  for name in ("encoder_out", "z_log_var_preclamp", "z_mu", "post_quant_conv_out", "reconstruction"):
    np.testing.assert_allclose(ncdhw(out[name]), z[f"out/{name}"], **TOL, err_msg=name)
  np.testing.assert_allclose(ncdhw(out["z_sigma"]), z["out/z_sigma"], rtol=1e-4, err_msg="z_sigma")


def test_log_variance_clamp(tiny):
  z, _, _, _, out = tiny
  pre = z["out/z_log_var_preclamp"]
  logvar = ncdhw(out["logvar"])
  np.testing.assert_allclose(logvar, np.clip(pre, -30, 20), **TOL)
  # The fixture drives channel 0 below -30 and channel 2 above 20 (39 and 68 of 96 values).
  assert (logvar[:, 0] == -30.0).sum() == (pre[:, 0] < -30).sum() == 39
  assert (logvar[:, 2] == 20.0).sum() == (pre[:, 2] > 20).sum() == 68
  sigma = ncdhw(out["z_sigma"])
  np.testing.assert_allclose(sigma[logvar == -30.0], np.exp(-15.0), rtol=1e-6)
  np.testing.assert_allclose(sigma[logvar == 20.0], np.exp(10.0), rtol=1e-6)


def test_call_is_decode_of_sample(tiny):
  _, model, _, x, out = tiny
  key = jax.random.key(3)
  x_hat, mu, sigma = model(x, key)
  np.testing.assert_allclose(np.asarray(mu), np.asarray(out["z_mu"]), rtol=1e-6, atol=1e-6)
  z_s = model.sample(mu, sigma, key)
  np.testing.assert_allclose(np.asarray(x_hat), np.asarray(model.decode(z_s)), rtol=1e-5, atol=1e-5)
  eps = (np.asarray(z_s) - np.asarray(mu)) / np.asarray(sigma)
  ch1 = eps[..., 1].ravel()  # unclamped channel: standardised draws
  assert abs(ch1.mean()) < 0.4 and 0.6 < ch1.std() < 1.4


def test_bf16_close_to_fp32(tiny):
  z, _, _, x, out = tiny
  model = nnx.eval_shape(lambda: AutoencoderKL(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  conv_ae.convert({k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}, model)
  mu, _ = model.encode(x)
  rec = model.decode(out["z_mu"])
  assert mu.dtype == jnp.float32 and rec.dtype == jnp.float32
  ref_mu, ref_rec = np.asarray(out["z_mu"]), np.asarray(out["reconstruction"])
  assert np.abs(np.asarray(mu) - ref_mu).max() < 0.05 * np.abs(ref_mu).max()
  assert np.abs(np.asarray(rec) - ref_rec).max() < 0.05 * np.abs(ref_rec).max()


def test_paper_listing_maps_completely(paper_listing):
  sd = paper_listing("autoencoder_kl_paper.txt")
  model = nnx.eval_shape(lambda: build_autoencoder(paper.get_config(), nnx.Rngs(0)))
  flat, report = conv_ae.map_state_dict({"model." + k: v for k, v in sd.items()}, model)  # Lightning prefix
  assert report.consumed == len(sd) == len(flat)
  assert report.duplicates_skipped == 0 and not report.ignored
  with pytest.raises(ConversionError, match="encoder.blocks.1.norm1.weight"):
    conv_ae.map_state_dict({k: v for k, v in sd.items() if k != "encoder.blocks.1.norm1.weight"} |
                           {"encoder.blocks.1.norm1.weightx": sd["encoder.blocks.1.norm1.weight"]}, model)


def test_paper_and_quickstart_sizes():
  cfg = paper.get_config()
  model = nnx.eval_shape(lambda: build_autoencoder(cfg, nnx.Rngs(0)))
  n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n == 13_766_248
  for c in (cfg, quickstart.get_config()):
    x = jax.ShapeDtypeStruct((2,) + tuple(c.data.image_shape) + (1,), jnp.float32)
    mu, sigma = jax.eval_shape(lambda v, c=c: build_autoencoder(c, nnx.Rngs(0)).encode(v), x)
    assert mu.shape == sigma.shape == (2,) + latent_shape(c)
    rec = jax.eval_shape(lambda v, c=c: build_autoencoder(c, nnx.Rngs(0)).decode(v), mu)
    assert rec.shape == x.shape


def test_remat_gives_same_gradients():
  cfg = quickstart.get_config()
  cfg.autoencoder.channels, cfg.autoencoder.norm_groups = (4,), 2  # one level: one ResBlock each side
  x = jax.random.uniform(jax.random.key(0), (1, 4, 4, 4, 1))
  grads = []
  for remat in (False, True):
    cfg.remat = remat
    m = filled(lambda: build_autoencoder(cfg, nnx.Rngs(1)), seed=1)
    loss = lambda m: jnp.mean(jnp.abs(m.decode(m.encode(x)[0]) - x))
    grads.append(nnx.to_flat_state(nnx.grad(loss)(m)))
  for (p1, g1), (p2, g2) in zip(*grads):
    assert p1 == p2
    np.testing.assert_allclose(np.asarray(g1.get_value()), np.asarray(g2.get_value()), rtol=1e-5, atol=1e-7)


def test_bad_input_raises():
  m = filled(lambda: AutoencoderKL(**TINY, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="divisible"):
    m.encode(jnp.zeros((1, 10, 8, 8, 1)))
  with pytest.raises(ValueError, match="NDHWC"):
    m.encode(jnp.zeros((1, 1, 8, 8, 8)))
