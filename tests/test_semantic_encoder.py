"""2.5D semantic encoder and ConvNeXt: reference fixture, axial slicing, listing, torchvision import, train mode."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper
from ldae_jax.convert import semantic_encoder as conv_e
from ldae_jax.convert.common import ConversionError, flat_param_shapes, load_into_model
from ldae_jax.models.convnext import ConvNeXt, drop_probabilities, stochastic_depth
from ldae_jax.models.semantic_encoder import SemanticEncoder, build_encoder, positional_table

TOL = dict(rtol=1e-4, atol=5e-5)
TINY = dict(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), stochastic_depth=0.1, emb_dim=128, num_heads=8,
            seq_len=16)


def params_of(z):
  return {k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}


def tiny_model(z, dtype=jnp.float32):
  # Abstract build + conversion: every parameter comes from the fixture (real init would only cost time).
  model = nnx.eval_shape(lambda: SemanticEncoder(**TINY, dtype=dtype, rngs=nnx.Rngs(0)))
  report = conv_e.convert(params_of(z), model)
  model.rngs = nnx.Rngs(dropout=0)
  return model, report


@pytest.fixture(scope="module")
def tiny(load_fixture):
  z = load_fixture("semantic_encoder_tiny")
  model, report = tiny_model(z)
  x = jnp.asarray(z["in/image"].transpose(0, 3, 4, 2, 1))  # (B, 1, Z, X, Y) -> (B, X, Y, Z, 1)
  y, inter = model.forward_with_intermediates(x)
  return z, model, report, x, y, inter


def test_fixture_forward_matches_reference(tiny):
  z, _, report, _, y, inter = tiny
  assert report.duplicates_skipped == 90 and report.ignored == ["positional_encoding.pe"]
  np.testing.assert_allclose(np.asarray(y), z["out/y"], **TOL)
  for name, value in inter.items():
    np.testing.assert_allclose(np.asarray(value), z[f"out/{name}"], **TOL, err_msg=name)
  np.testing.assert_allclose(np.asarray(inter["soft_attention_weights"]).sum(-1), 1.0, rtol=1e-6)


def test_positional_table_equals_reference_buffer(tiny):
  pe = tiny[0]["param/positional_encoding.pe"][0]
  np.testing.assert_allclose(positional_table(16, 128), pe, rtol=0, atol=1e-6)


def torch_like_table(length: int, dim: int, seed: int = 0) -> np.ndarray:
  """The reference buffer as torch builds it: float32 exp of float32 arange * -(ln 10000 / d), sin/cos of the
  float32 product. torch's exp rounds ~40 % of the frequencies to a neighbouring float (1-2 ulp) where
  numpy's does not; emulated here by moving those frequencies (never w_0 = exp(0) = 1, exact in both)."""
  rng = np.random.default_rng(seed)
  freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  ulps = rng.choice([-2, -1, 1, 2], freq.shape) * (rng.random(freq.shape) < 0.4)
  ulps[0] = 0
  freq = (freq + ulps * np.spacing(freq)).astype(np.float32)
  angle = np.arange(length, dtype=np.float32)[:, None] * freq
  pe = np.zeros((length, dim), np.float32)
  pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
  return pe


def test_pe_check_accepts_torch_rounding_refuses_wrong_tables():
  model = SimpleNamespace(emb_dim=768, seq_len=128)
  ours = positional_table(128, 768)
  genuine = torch_like_table(128, 768)
  assert np.abs(genuine - ours).max() > 1e-5  # what a flat atol of 1e-5 refused (1.5e-5, as the real buffer)
  conv_e._check_pe(genuine[None], model, "genuine")
  one_off = genuine.copy()
  one_off[100, 7] += 1e-3
  concatenated = np.concatenate([genuine[:, 0::2], genuine[:, 1::2]], axis=1)  # sin block, then cos block
  swapped = genuine.reshape(128, 384, 2)[..., ::-1].reshape(128, 768)  # cos/sin instead of sin/cos
  for name, bad in [("one entry off", one_off), ("not interleaved", concatenated), ("cos first", swapped),
                    ("width 512", torch_like_table(128, 512))]:
    with pytest.raises(ConversionError, match="positional_encoding.pe"):
      conv_e._check_pe(bad[None], model, name)
  with pytest.raises(ConversionError, match="seq_len"):
    conv_e._check_pe(torch_like_table(160, 768)[None], model, "coronal")


def test_encoder_sees_axial_slices(tiny):
  _, model, _, x, _, inter = tiny
  k = 5
  x2 = x.at[0, :, :, k, 0].set(jax.random.uniform(jax.random.key(1), x.shape[1:3]))
  feats = np.asarray(model.slice_features(jnp.stack([x[0], x2[0]])))
  diff = np.abs(feats[1] - feats[0]).max(axis=-1)
  assert diff[k] > 1e-3
  assert np.all(np.delete(diff, k) == 0.0)
  np.testing.assert_allclose(feats[0], np.asarray(inter["slice_features"][0]), rtol=1e-5, atol=1e-6)


def test_bf16_close_to_fp32(tiny):
  z, _, _, x, y, _ = tiny
  model, _ = tiny_model(z, jnp.bfloat16)
  y16 = model(x)
  assert y16.dtype == jnp.float32
  # LayerNorm output of magnitude ~1-3: bf16 backbone (8-bit mantissa) stays within a few percent.
  assert np.abs(np.asarray(y16) - np.asarray(y)).max() < 0.1
  assert np.corrcoef(np.asarray(y16).ravel(), np.asarray(y).ravel())[0, 1] > 0.999


def test_train_mode_randomness(tiny):
  _, model, _, x, y, _ = tiny
  xs = x[:1]
  a = model(xs, deterministic=False, rngs=jax.random.key(0))
  b = model(xs, deterministic=False, rngs=jax.random.key(0))
  c = model(xs, deterministic=False)  # the module's own `dropout` stream
  d = model(xs, deterministic=False)  # ...which advances
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(y[:1])).max() > 1e-3
  assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3


def test_stochastic_depth_row_mode():
  x = jnp.ones((4000, 2, 2, 3))
  out = np.asarray(stochastic_depth(x, 0.25, jax.random.key(0)))
  per_image = out.reshape(4000, -1)
  assert np.all(per_image.min(1) == per_image.max(1))  # whole images kept or dropped
  assert set(np.unique(per_image)) <= {0.0, np.float32(1.0 / 0.75)}
  assert abs((per_image[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(np.asarray(stochastic_depth(x, 0.25, None)), np.asarray(x))
  probs = drop_probabilities((3, 3, 27, 3), 0.4)
  assert len(probs) == 36 and probs[0] == 0.0 and probs[-1] == pytest.approx(0.4)
  np.testing.assert_allclose(np.diff(probs), 0.4 / 35)


def test_paper_listing_maps_completely(paper_listing):
  sd = paper_listing("attention_semantic_encoder_paper.txt")
  sd["positional_encoding.pe"] = positional_table(128, 768)[None]
  model = nnx.eval_shape(lambda: build_encoder(paper.get_config(), nnx.Rngs(0)))
  # A Lightning stage-3 checkpoint holds `encoder.` and `ema_encoder.`; the EMA copy is chosen.
  ckpt = {f"ema_encoder.{k}": v for k, v in sd.items()} | {f"encoder.{k}": v[..., :0] for k, v in sd.items()}
  flat, report = conv_e.map_state_dict(ckpt, model)
  # 342 backbone tensors registered twice (the README's "343" counts the listing's header line too).
  n_dup = sum(k.startswith("slice_distributed.module.backbone.") for k in sd)
  assert n_dup == 342 and report.duplicates_skipped == n_dup and report.ignored == ["positional_encoding.pe"]
  assert report.consumed == len(flat) == len(flat_param_shapes(model)) == len(sd) - n_dup - 1
  n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n == 53_588_065
  bad = dict(sd, **{"positional_encoding.pe": positional_table(128, 768)[None] + 1.0})
  with pytest.raises(ConversionError, match="positional_encoding.pe"):
    conv_e.map_state_dict(bad, model)


def test_import_torchvision_sums_the_stem(tiny):
  z = tiny[0]
  rng = np.random.default_rng(0)
  tv = {k[len("backbone.backbone."):]: v for k, v in params_of(z).items() if k.startswith("backbone.backbone.")}
  rgb = rng.normal(0, 0.1, (16, 3, 4, 4)).astype(np.float32)
  tv["features.0.0.weight"] = rgb
  tv["classifier.2.weight"] = np.zeros((1000, 128), np.float32)
  tv["classifier.2.bias"] = np.zeros((1000,), np.float32)
  model = nnx.eval_shape(lambda: SemanticEncoder(**TINY, rngs=nnx.Rngs(0)))
  report = conv_e.import_torchvision_convnext(tv, model)
  assert report.consumed == len(tv) - 2
  np.testing.assert_allclose(np.asarray(model.backbone.features[0][0].kernel[...]),
                             rgb.sum(1, keepdims=True).transpose(2, 3, 1, 0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(model.backbone.features[5][1].block_3.kernel[...]),
                                tv["features.5.1.block.3.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.backbone.features[1][0].layer_scale[...]),
                                tv["features.1.0.layer_scale"].reshape(-1))


def test_remat_gives_same_gradients():
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  grads = []
  for remat in (False, True):
    m = nnx.eval_shape(lambda r=remat: ConvNeXt(dims=(4, 8), depths=(1, 1), remat=r, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    load_into_model(m, {p: rng.normal(0, 0.3, s).astype(np.float32) for p, s in flat_param_shapes(m).items()})
    grads.append(nnx.to_flat_state(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)))
  for (p1, g1), (p2, g2) in zip(*grads):
    assert p1 == p2
    np.testing.assert_allclose(np.asarray(g1.get_value()), np.asarray(g2.get_value()), rtol=1e-5, atol=1e-7)


def test_bad_configuration_and_input_raise(tiny):
  with pytest.raises(ValueError, match="emb_dim"):
    nnx.eval_shape(lambda: SemanticEncoder(**dict(TINY, emb_dim=64), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="seq_len"):
    tiny[1](jnp.zeros((1, 32, 40, 17, 1)))


def test_patch_size_keeps_the_feature_maps_of_a_finer_image():
  """patch_size 1 on a 4x coarser slice == torchvision's 4x4 stem on that slice upsampled 4x (same weights
  elsewhere, stem kernel spread over the patch): the quickstart's 6 mm encoder sees the paper's feature maps."""
  x = jax.random.uniform(jax.random.key(0), (2, 8, 10, 1))
  fine = nnx.eval_shape(lambda: ConvNeXt(dims=(4, 8), depths=(1, 1), rngs=nnx.Rngs(0)))
  coarse = nnx.eval_shape(lambda: ConvNeXt(dims=(4, 8), depths=(1, 1), patch_size=1, rngs=nnx.Rngs(0)))
  stem = ("features", 0, 0, "kernel")
  shapes = flat_param_shapes(coarse)
  assert shapes[stem] == (1, 1, 1, 4) and flat_param_shapes(fine)[stem] == (4, 4, 1, 4)
  rng = np.random.default_rng(2)
  weights = {p: rng.normal(0, 0.3, s).astype(np.float32) for p, s in shapes.items()}
  load_into_model(coarse, weights)
  load_into_model(fine, {**weights, stem: np.tile(weights[stem] / 16, (4, 4, 1, 1))})
  up = jnp.repeat(jnp.repeat(x, 4, axis=1), 4, axis=2)
  np.testing.assert_allclose(np.asarray(coarse(x)), np.asarray(fine(up)), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="patch_size"):
    ConvNeXt(dims=(4, 8), depths=(1, 1), patch_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="patch_size=1"):
    conv_e.import_torchvision_convnext({}, coarse)


def test_random_init_has_no_degenerate_layernorm_on_background():
  """A skull-stripped slice is mostly exact zeros. With torchvision's zero stem bias those patches reach the
  stem LayerNorm as all-zero vectors and the gradient is scaled by 1/sqrt(eps) per LayerNorm; the random
  stem bias keeps the gradient of a half-background image on the scale of a textured one."""
  textured = jax.random.uniform(jax.random.key(0), (2, 32, 40, 1))
  half_background = textured.at[:, :, 20:, :].set(0.0)
  r = jax.random.normal(jax.random.key(1), (2, 16))

  def grad_norm(model, x):
    g = nnx.grad(lambda m: jnp.sum(m(x) * r))(model)
    return float(jnp.sqrt(sum(jnp.sum(v.get_value() ** 2) for _, v in nnx.to_flat_state(g))))

  model = ConvNeXt(dims=(8, 16), depths=(1, 1), rngs=nnx.Rngs(0))
  stem_bias = model.features[0][0].bias
  assert float(jnp.std(stem_bias[...])) > 0.05  # U(+-1/4) for a 1x4x4 kernel
  ratio = grad_norm(model, half_background) / grad_norm(model, textured)
  assert ratio < 10.0, ratio
  stem_bias[...] = jnp.zeros_like(stem_bias[...])  # torchvision's init: the pathology this avoids
  assert grad_norm(model, half_background) / grad_norm(model, textured) > 1e3


def test_template_code_norm_standardises_relative_codes_and_uses_running_statistics_when_deterministic():
  small = dict(dims=(8, 16), depths=(1, 1), stochastic_depth=0.0, emb_dim=16, num_heads=2, seq_len=4,
               attn_dropout=0.0)
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 4, 1))
  template = jnp.mean(x, axis=0)
  plain = SemanticEncoder(**small, rngs=nnx.Rngs(0))
  normed = SemanticEncoder(**small, code_norm="template", code_norm_momentum=0.9, template_shape=(8, 8, 4, 1),
                           rngs=nnx.Rngs(0))
  normed.set_template(template)
  rel = np.asarray(plain(x), np.float64) - np.asarray(plain(template[None]), np.float64)
  y = normed(x, deterministic=False, rngs=jax.random.key(1))  # the batch's own statistics
  np.testing.assert_allclose(np.asarray(y), (rel - rel.mean(0)) / rel.std(0), rtol=1e-3, atol=1e-3)
  assert float(normed.code_norm.weight[...]) == 0.0  # a training forward leaves the running statistics alone
  np.testing.assert_allclose(np.asarray(normed(x)), rel, rtol=1e-4, atol=1e-5)  # no statistics yet: as it is
  normed.update_code_statistics(x)
  # Bias-corrected: after a single update the running statistics are that batch's, whatever the momentum.
  np.testing.assert_allclose(np.asarray(normed(x)), (rel - rel.mean(0)) / rel.std(0), rtol=1e-3, atol=1e-3)
  normed.update_code_statistics(x[:3])
  normed.update_code_statistics(x[3:])
  w = 1 - 0.9 ** 3
  m = (0.9 * 0.1 * rel.mean(0) + 0.1 * rel[:3].mean(0)) * 0.9 + 0.1 * rel[3:].mean(0)
  np.testing.assert_allclose(float(normed.code_norm.weight[...]), w, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(normed.code_norm.mean[...]), m, rtol=1e-4, atol=1e-6)
  # The template's own code is the origin.
  np.testing.assert_allclose(np.asarray(normed(template[None]))[0],
                             -np.asarray(normed.code_norm.mean[...]) / w / np.sqrt(np.asarray(
                                 normed.code_norm.var[...]) / w), rtol=1e-3, atol=1e-3)
  plain.update_code_statistics(x)  # no code norm: nothing to update
  with pytest.raises(ValueError, match="code_norm"):
    SemanticEncoder(**small, code_norm="layer", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="code_norm_momentum"):
    SemanticEncoder(**small, code_norm="template", code_norm_momentum=1.0, template_shape=(8, 8, 4, 1),
                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="template image of shape"):
    normed.set_template(jnp.zeros((8, 8, 5, 1)))
