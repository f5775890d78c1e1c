"""UNet-family layers: fp32 GroupNorm, time embedding, resampling, ResBlock/attention invariants, dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldae_jax.models import layers


@pytest.fixture(scope="module")
def blocks():
  """One of each block, built under a single jit (eager init compiles every initialiser separately)."""
  def make():
    rngs = nnx.Rngs(0)
    return (layers.ResBlock(8, 16, 8, dropout=0.5, norm_groups=4, rngs=rngs),
            layers.AttentionBlock(8, 2, norm_groups=4, rngs=rngs),
            layers.ResBlockShift(8, 16, 8, norm_groups=4, rngs=rngs),
            layers.ResBlock(8, 16, 12, resample="down", norm_groups=4, rngs=rngs))
  return nnx.jit(make)()


@nnx.jit(static_argnames=("deterministic",))
def run_block(m, x, emb, z=None, deterministic=True, rngs=None):
  if isinstance(m, layers.AttentionBlock):
    return m(x)
  return m(x, emb, z, deterministic=deterministic, rngs=rngs)


X = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 8))
EMB, ZEMB = jax.random.normal(jax.random.key(2), (2, 2, 16))


def np_group_norm(x, scale, bias, groups, eps):
  b, c = x.shape[0], x.shape[-1]
  xg = x.astype(np.float64).reshape(b, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_matches_torch_semantics_and_keeps_fp32_stats():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 3, 4, 2, 8)) * 3 + 1.5).astype(np.float32)
  scale, bias = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  ref = np_group_norm(x, scale, bias, 4, 1e-5)
  out = layers.group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 4, 1e-5)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
  # bf16 input: statistics in fp32 over the bf16 values, result in bf16 (or fp32 when asked).
  xb = jnp.asarray(x, jnp.bfloat16)
  ref_b = np_group_norm(np.asarray(xb.astype(jnp.float32)), scale, bias, 4, 1e-5)
  out_b = layers.group_norm(xb, jnp.asarray(scale), jnp.asarray(bias), 4, 1e-5)
  assert out_b.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_b.astype(jnp.float32)), ref_b, atol=0.05)
  out_f = layers.group_norm(xb, jnp.asarray(scale), jnp.asarray(bias), 4, 1e-5, out_dtype=jnp.float32)
  np.testing.assert_allclose(out_f, ref_b, rtol=1e-5, atol=2e-5)
  with pytest.raises(ValueError, match="not divisible"):
    layers.GroupNorm(12, 8)


def test_timestep_embedding_cos_first_and_reference_values(load_fixture):
  z = load_fixture("unet_tiny")
  emb = layers.timestep_embedding(jnp.asarray(z["in/t"]), 32)
  assert emb.dtype == jnp.float32 and emb.shape == (2, 32)
  np.testing.assert_allclose(emb, z["out/timestep_embedding_sinusoid"], rtol=0, atol=5e-6)
  e0 = np.asarray(layers.timestep_embedding(jnp.zeros((1,), jnp.int32), 8))
  np.testing.assert_array_equal(e0, [[1, 1, 1, 1, 0, 0, 0, 0]])  # [cos, sin] at t=0
  e = np.asarray(layers.timestep_embedding(jnp.asarray([5]), 8))[0]
  f = np.exp(-math.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(e, np.concatenate([np.cos(5 * f), np.sin(5 * f)]), atol=1e-6)


def test_resampling_acts_on_y_z_only():
  x = jnp.arange(2 * 3 * 4 * 6 * 2, dtype=jnp.float32).reshape(2, 3, 4, 6, 2)
  up = layers.upsample_122(x)
  assert up.shape == (2, 3, 8, 12, 2)
  np.testing.assert_array_equal(up[:, :, ::2, ::2], x)
  np.testing.assert_array_equal(up[:, :, 1::2, 1::2], x)
  np.testing.assert_array_equal(layers.avg_pool_122(up), x)  # pooling a nearest-upsampled grid is exact
  down = layers.avg_pool_122(x)
  np.testing.assert_allclose(down[0, 0, 0, 0], np.mean(np.asarray(x)[0, 0, :2, :2], axis=(0, 1)))
  with pytest.raises(ValueError, match="even Y and Z"):
    layers.avg_pool_122(jnp.zeros((1, 2, 3, 4, 1)))


def test_fresh_blocks_are_identity_and_init_is_pytorch_default(blocks):
  """Zero-init of out_layers_3 / proj_out (reference zero_module) makes fresh blocks identities."""
  rb, attn, _, down = blocks
  np.testing.assert_array_equal(run_block(rb, X, EMB), X)
  np.testing.assert_array_equal(run_block(attn, X, EMB), X)
  k = np.asarray(rb.in_layers_2.kernel[...])
  bound = 1 / math.sqrt(8 * 27)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  assert np.abs(np.asarray(rb.in_layers_2.bias[...])).max() <= bound
  assert not np.any(np.asarray(rb.out_layers_3.kernel[...]))
  assert run_block(down, X, EMB).shape == (2, 2, 2, 2, 12) and down.skip_connection is not None


def test_attention_matches_legacy_qkv_order(blocks):
  """Per head the qkv channels are [q; k; v] (QKVAttentionLegacy), softmax scale 1/sqrt(head_dim)."""
  c, heads = 8, 2
  attn = nnx.clone(blocks[1])
  attn.proj_out.kernel[...] = jax.random.normal(jax.random.key(3), (c, c))
  x = X
  out = np.asarray(run_block(attn, x, EMB), np.float64)
  h = np_group_norm(np.asarray(x), np.asarray(attn.norm.scale[...]), np.asarray(attn.norm.bias[...]), 4,
                    1e-5).reshape(2, -1, c)
  qkv = h @ np.asarray(attn.qkv.kernel[...], np.float64) + np.asarray(attn.qkv.bias[...])
  ch = c // heads
  res = []
  for i in range(heads):
    blk = qkv[..., i * 3 * ch:(i + 1) * 3 * ch]
    q, k, v = blk[..., :ch], blk[..., ch:2 * ch], blk[..., 2 * ch:]
    w = np.einsum("btc,bsc->bts", q, k) / math.sqrt(ch)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    res.append(np.einsum("bts,bsc->btc", w, v))
  a = np.concatenate(res, -1)
  ref = np.asarray(x).reshape(2, -1, c) + a @ np.asarray(attn.proj_out.kernel[...]) + np.asarray(
      attn.proj_out.bias[...])
  np.testing.assert_allclose(out.reshape(2, -1, c), ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_when_not_deterministic(blocks):
  rb = nnx.clone(blocks[0])
  rb.out_layers_3.kernel[...] = jax.random.normal(jax.random.key(5), rb.out_layers_3.kernel.shape) * 0.1
  det = run_block(rb, X, EMB)
  np.testing.assert_array_equal(run_block(rb, X, EMB, deterministic=True), det)
  own1 = run_block(rb, X, EMB, deterministic=False)  # the module's stored 'dropout' stream
  own2 = run_block(rb, X, EMB, deterministic=False)
  assert not np.allclose(own1, det) and not np.allclose(own1, own2)
  a = run_block(rb, X, EMB, deterministic=False, rngs=nnx.Rngs(dropout=7))
  b = run_block(rb, X, EMB, deterministic=False, rngs=nnx.Rngs(dropout=7))
  np.testing.assert_array_equal(a, b)  # an explicit stream is reproducible


def test_shift_modulation_form(blocks):
  """h = (1+z_scale)*(GN(h)*(1+scale)+shift)+z_shift, chunks in (scale, shift) order."""
  rs = blocks[2]
  h, emb, z = X, EMB, ZEMB
  got = np.asarray(nnx.jit(lambda m, h, e, z: m._modulate(h, e, z))(rs, h, emb, z))  # pylint: disable=protected-access
  silu = lambda a: a / (1 + np.exp(-a))
  lin = lambda m, a: silu(np.asarray(a, np.float64)) @ np.asarray(m.kernel[...]) + np.asarray(m.bias[...])
  scale, shift = np.split(lin(rs.emb_layers_1, emb), 2, axis=-1)
  z_scale, z_shift = np.split(lin(rs.emb_z_layers_1, z), 2, axis=-1)
  gn = np_group_norm(np.asarray(h), np.asarray(rs.out_layers_0.scale[...]),
                     np.asarray(rs.out_layers_0.bias[...]), 4, 1e-5)
  e = lambda a: a[:, None, None, None, :]
  ref = (1 + e(z_scale)) * (gn * (1 + e(scale)) + e(shift)) + e(z_shift)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="z_emb"):
    rs(h, emb)
