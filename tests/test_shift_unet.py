"""ShiftUNet against `shift_unet_tiny` (through the converter): outputs, frozen branch, trainable filter."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldae_jax.convert import shift_unet as convert_shift
from ldae_jax.models.layers import materialize_rng_state
from ldae_jax.models.shift_unet import TRAINABLE, ShiftUNet

TINY = dict(in_channels=3, base_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1,
            attention_resolutions=(2, 4), num_heads=1, dropout=0.1, norm_groups=32, latent_dim=16)
TOL = dict(rtol=1e-4, atol=5e-5)


def ndhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 4, 1)))


def ncdhw(a):
  return np.transpose(np.asarray(a), (0, 4, 1, 2, 3))


@nnx.jit(static_argnames=("deterministic",))
def forward(model, x, t, y, deterministic=True):
  return model(x, t, y, deterministic=deterministic)


@pytest.fixture(scope="module")
def fx(load_fixture):
  return load_fixture("shift_unet_tiny")


@pytest.fixture(scope="module")
def converted(fx):
  model = nnx.eval_shape(lambda: ShiftUNet(**TINY, rngs=nnx.Rngs(0)))
  sd = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
  report = convert_shift.convert(sd, model)
  return materialize_rng_state(model), report


@pytest.fixture(scope="module")
def outputs(converted, fx):
  return forward(converted[0], ndhwc(fx["in/x"]), jnp.asarray(fx["in/t"]), jnp.asarray(fx["in/y"]))


def test_conversion_complete_and_counts(converted, refdir):
  model, report = converted
  meta = json.loads((refdir / "shift_unet_tiny.json").read_text())
  count = lambda f: sum(v.size for v in jax.tree.leaves(nnx.state(model, f)))
  assert count(nnx.Param) == meta["num_unique_parameters"] == 10_027_430
  assert count(TRAINABLE) == 4_572_643
  assert report.consumed == len(meta["state_dict"])
  trainable = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
  assert trainable == {"label_emb", "shift_middle_block", "shift_output_blocks", "shift_out_0", "shift_out_2"}
  frozen = nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("unet")))
  assert count(nnx.Param) - count(TRAINABLE) == sum(v.size for v in jax.tree.leaves(frozen))


def test_matches_reference_outputs(converted, fx, outputs, load_fixture):
  model = converted[0]
  eps, g = outputs
  assert eps.dtype == g.dtype == jnp.float32
  np.testing.assert_allclose(ncdhw(eps), fx["out/eps"], **TOL)
  np.testing.assert_allclose(ncdhw(g), fx["out/shift"], **TOL)
  np.testing.assert_allclose(model.unet.embed_time(jnp.asarray(fx["in/t"])), fx["out/time_emb"], **TOL)
  np.testing.assert_allclose(model.label_emb(jnp.asarray(fx["in/y"])), fx["out/shift_emb"], **TOL)
  np.testing.assert_array_equal(fx["out/eps"], load_fixture("unet_tiny")["out/eps"])  # eps = the UNet's


def test_frozen_branch_gets_no_gradient_and_no_dropout(converted, fx, outputs):
  model = converted[0]
  x, t, y = ndhwc(fx["in/x"][:1, :, :2]), jnp.asarray(fx["in/t"][:1]), jnp.asarray(fx["in/y"][:1])

  @nnx.jit
  def grads(m):
    def loss(m):
      eps, g = m(x, t, y)
      return jnp.mean(eps ** 2) + jnp.mean(g ** 2)
    return nnx.grad(loss)(m)

  g = grads(model)
  frozen = jax.tree.leaves(nnx.state(g, nnx.PathContains("unet")))
  shift = jax.tree.leaves(nnx.state(g, TRAINABLE))
  assert frozen and all(not np.any(np.asarray(a)) for a in frozen)
  assert all(np.any(np.asarray(a)) for a in shift)
  # deterministic=False: dropout in the shift branch only; the frozen eps branch never drops out.
  xs, ts, ys = ndhwc(fx["in/x"]), jnp.asarray(fx["in/t"]), jnp.asarray(fx["in/y"])
  eps_d, g_d = forward(model, xs, ts, ys, deterministic=False)
  np.testing.assert_array_equal(eps_d, outputs[0])
  assert not np.allclose(g_d, outputs[1], atol=1e-4)
