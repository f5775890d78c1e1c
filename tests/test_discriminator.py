"""PatchDiscriminator: reference fixture (eval), batch statistics in train mode, init, paper listing and sizes."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper
from ldae_jax.convert import discriminator as conv_d
from ldae_jax.models.discriminator import PatchDiscriminator, build_discriminator

TOL = dict(rtol=1e-4, atol=5e-5)


@pytest.fixture(scope="module")
def tiny(load_fixture):
  z = load_fixture("patch_discriminator_tiny")
  model = nnx.eval_shape(lambda: PatchDiscriminator(channels=8, num_layers=2, rngs=nnx.Rngs(0)))
  report = conv_d.convert({k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}, model)
  return z, model, report, jnp.asarray(z["in/x"].transpose(0, 2, 3, 4, 1))


def test_eval_mode_matches_reference(tiny):
  z, model, report, x = tiny
  assert report.consumed == 14 and sorted(report.ignored) == ["0.adn.N.num_batches_tracked",
                                                               "1.adn.N.num_batches_tracked"]
  feats = model(x, train=False)
  assert len(feats) == 4
  for i, f in enumerate(feats):
    np.testing.assert_allclose(np.asarray(f).transpose(0, 4, 1, 2, 3), z[f"out/features_{i}"], **TOL)
  np.testing.assert_allclose(np.asarray(feats[-1]).transpose(0, 4, 1, 2, 3), z["out/logits"], **TOL)


def test_train_mode_uses_batch_statistics(tiny):
  z, model, _, x = tiny
  model = nnx.clone(model)
  layer = model.layers[0]
  old_mean = np.asarray(layer.norm.mean[...])
  old_var = np.asarray(layer.norm.var[...])
  feats = model(x, train=True)
  h = np.asarray(layer.conv(feats[0]), np.float64)  # the conv before the norm
  mu, var = h.mean(axis=(0, 1, 2, 3)), h.var(axis=(0, 1, 2, 3))
  scale, bias = np.asarray(layer.norm.scale[...]), np.asarray(layer.norm.bias[...])
  expect = (h - mu) / np.sqrt(var + 1e-5) * scale + bias
  expect = np.where(expect > 0, expect, 0.2 * expect)
  np.testing.assert_allclose(np.asarray(feats[1]), expect, rtol=1e-4, atol=5e-5)
  # Batch statistics differ from the stored ones, so train and eval outputs differ...
  assert np.abs(np.asarray(feats[1]).transpose(0, 4, 1, 2, 3) - z["out/features_1"]).max() > 1e-2
  # ...and the running statistics moved by PyTorch's momentum 0.1.
  np.testing.assert_allclose(np.asarray(layer.norm.mean[...]), 0.9 * old_mean + 0.1 * mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.norm.var[...]), 0.9 * old_var + 0.1 * var, rtol=1e-4, atol=1e-6)


def test_initialisation_follows_monai():
  model = PatchDiscriminator(channels=16, num_layers=2, rngs=nnx.Rngs(0))
  w = np.asarray(model.layers[1].conv.kernel[...])  # 32*64*64 = 131k draws
  assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
  s = np.concatenate([np.asarray(l.norm.scale[...]) for l in model.layers])
  assert abs(s.mean() - 1.0) < 0.01 and 0.01 < s.std() < 0.03
  for bias in (model.initial_conv.conv.bias, model.final_conv.conv.bias, model.layers[0].norm.bias):
    assert not np.asarray(bias[...]).any()
  assert model.layers[0].conv.bias is None  # bias=False in the middle layers


def test_paper_listing_maps_completely(paper_listing):
  sd = paper_listing("patch_discriminator_paper.txt")
  model = nnx.eval_shape(lambda: build_discriminator(paper.get_config(), nnx.Rngs(0)))
  flat, report = conv_d.map_state_dict({"discriminator." + k: v for k, v in sd.items()}, model)
  assert report.consumed == len(flat) == len(sd) - 3 and len(report.ignored) == 3
  paths = set(flat)
  assert ("layers", 2, "norm", "mean") in paths and ("layers", 2, "norm", "var") in paths


def test_paper_size_and_logit_shape():
  cfg = paper.get_config()
  model = nnx.eval_shape(lambda: build_discriminator(cfg, nnx.Rngs(0)))
  n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n == 11_048_769
  x = jax.ShapeDtypeStruct((1, 128, 160, 128, 1), jnp.float32)
  feats = jax.eval_shape(lambda v: build_discriminator(cfg, nnx.Rngs(0))(v, train=False), x)
  assert [f.shape for f in feats] == [(1, 64, 80, 64, 64), (1, 32, 40, 32, 128), (1, 16, 20, 16, 256),
                                      (1, 15, 19, 15, 512), (1, 14, 18, 14, 1)]


def test_bad_input_raises(tiny):
  with pytest.raises(ValueError, match="NDHWC"):
    tiny[1](jnp.zeros((1, 1, 32, 32, 32)), train=False)
