"""Mesh construction, sharding rules, AOT compile, and the 8-device == 1-device training equivalence."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from ldae_jax.config import default_config
from ldae_jax.parallel import mesh as mesh_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent / "multiprocess"))
import harness  # noqa: E402


def mesh_cfg(data=-1, fsdp=1, mode="replicate", min_size=2**16):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, param_sharding=mode, fsdp_min_size=min_size))


# ------------------------------------------------------------------ mesh shape and errors
@pytest.mark.parametrize("data,fsdp,n,expected", [
    (-1, 1, 8, (8, 1)), (-1, 4, 8, (2, 4)), (2, -1, 8, (2, 4)), (2, 4, 8, (2, 4)), (-1, 1, 1, (1, 1))])
def test_mesh_shape_fills_remaining_devices(data, fsdp, n, expected):
  assert mesh_lib.mesh_shape(mesh_cfg(data, fsdp), n) == expected


@pytest.mark.parametrize("data,fsdp,n,match", [
    (-1, 3, 8, "do not divide the 8 devices"),
    (2, 2, 8, "must equal the device count"),
    (-1, -1, 8, "at most one axis may be -1"),
    (0, 1, 8, r"config.mesh.data=0"),
    (-1, -2, 8, r"config.mesh.fsdp=-2")])
def test_mesh_shape_errors_name_the_field(data, fsdp, n, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.mesh_shape(mesh_cfg(data, fsdp), n)


def test_make_mesh_axes_and_auto_types():
  m = mesh_lib.make_mesh(default_config().mesh)
  assert m.axis_names == ("data", "fsdp")
  assert dict(m.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  with pytest.raises(ValueError, match="do not divide"):
    mesh_lib.make_mesh(mesh_cfg(-1, jax.device_count() + 1))


def test_batch_size_per_device():
  m = AbstractMesh((2, 4), ("data", "fsdp"))
  assert mesh_lib.batch_size_per_device(16, m) == 2
  with pytest.raises(ValueError, match="not divisible by data x fsdp = 8"):
    mesh_lib.batch_size_per_device(12, m)


# ------------------------------------------------------------------ FSDP rules
@pytest.mark.parametrize("shape,fsdp,min_size,spec", [
    ((3, 3, 3, 64, 128), 4, 1024, P(None, None, None, None, "fsdp")),  # output channels
    ((3, 3, 3, 128, 128), 4, 1024, P(None, None, None, None, "fsdp")),  # tie -> last dim
    ((3, 3, 3, 128, 64), 4, 1024, P(None, None, None, "fsdp", None)),  # largest divisible dim
    ((3, 3, 3, 128, 6), 4, 1024, P(None, None, None, "fsdp", None)),  # last dim not divisible
    ((3, 3, 3, 6, 6), 4, 16, P()),  # nothing divisible by 4
    ((128,), 4, 1024, P()),  # below min_size
    ((3, 3, 3, 64, 128), 1, 1, P()),  # no fsdp axis to split over
    ((), 4, 0, P()),  # scalar (optimizer step count)
])
def test_fsdp_spec_choices(shape, fsdp, min_size, spec):
  assert mesh_lib.fsdp_spec(shape, fsdp, min_size) == spec


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(16, 32, (3, 3, 3), rngs=rngs)  # kernel 13824 elements
    self.norm = nnx.GroupNorm(32, num_groups=8, rngs=rngs)
    self.head = nnx.Linear(32, 4, rngs=rngs)


@pytest.fixture(scope="module")
def abstract_params():
  return nnx.state(nnx.eval_shape(lambda: _Net(nnx.Rngs(0))), nnx.Param)


def test_param_shardings_on_nnx_state_and_optax_state(abstract_params):
  m = AbstractMesh((2, 4), ("data", "fsdp"))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt = jax.eval_shape(tx.init, abstract_params)
  for tree in (abstract_params, opt):
    sh = mesh_lib.param_shardings(tree, m, mode="fsdp", min_size=1000)
    assert jax.tree.structure(sh) == jax.tree.structure(tree)  # same Variable / namedtuple wrappers
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh)):
      expected = mesh_lib.fsdp_spec(x.shape, 4, 1000)
      assert s.spec == expected
      if x.shape == (3, 3, 3, 16, 32):
        assert s.spec == P(None, None, None, None, "fsdp")
      if x.size < 1000:
        assert s.spec == P()
  # Adam's mu/nu follow the parameters exactly, so updates need no resharding.
  sh_p = mesh_lib.param_shardings(abstract_params, m, mode="fsdp", min_size=1000)
  sh_o = mesh_lib.param_shardings(opt, m, mode="fsdp", min_size=1000)
  assert sh_o[1][0].mu == sh_p and sh_o[1][0].nu == sh_p
  rep = mesh_lib.param_shardings(opt, m, mode="replicate")
  assert all(s.spec == P() for s in jax.tree.leaves(rep))
  with pytest.raises(ValueError, match="config.mesh.param_sharding"):
    mesh_lib.param_shardings(opt, m, mode="zero3")


def test_shard_like_and_aot_compile_on_local_mesh(abstract_params):
  """On this process's devices: placement keeps values; compile_aot returns a working executable."""
  m = mesh_lib.make_mesh(mesh_cfg(fsdp=1, mode="fsdp", min_size=1000))
  params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
  sh = mesh_lib.shardings_from_config(params, m, mesh_cfg(mode="fsdp", min_size=1000))
  placed = mesh_lib.shard_like(params, sh)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(placed), jax.tree.leaves(sh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding == s
  b_sh = mesh_lib.batch_sharding(m)
  x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  assert mesh_lib.process_batch_slice(b_sh, 2) == slice(0, 2)
  gx = mesh_lib.global_batch_from_local({"x": x}, b_sh)["x"]
  np.testing.assert_array_equal(np.asarray(gx), x)

  f = jax.jit(lambda p, v: sum(jnp.sum(l) for l in jax.tree.leaves(p)) * jnp.sum(v),
              in_shardings=(sh, b_sh), out_shardings=mesh_lib.replicated(m))
  aot = mesh_lib.compile_aot(f, mesh_lib.abstract_with_sharding(placed, sh),
                             jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh), name="test")
  compiled, seconds, flops = aot
  assert seconds > 0 and (flops is None or flops > 0)
  np.testing.assert_allclose(aot(placed, gx), f(placed, gx), rtol=1e-6)


# ------------------------------------------------------------------ equivalence on 8 simulated devices
def _assert_same_run(got: dict, ref: dict) -> None:
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=harness.RTOL, err_msg=got["layout"])
  np.testing.assert_allclose(got["param_sq"], ref["param_sq"], rtol=harness.RTOL, err_msg=got["layout"])


@pytest.mark.slow
def test_eight_devices_data_and_fsdp_match_one_device():
  """Same global batch, same init: data=8 (replicated params) and data=2 x fsdp=4 (FSDP params) give the
  single-device losses to float32 reduction-order precision (observed max relative difference ~1e-6)."""
  out, ref = harness.run_with_baseline("8x1:replicate,2x4:fsdp", devices=8)
  assert out["device_count"] == 8 and out["process_count"] == 1
  dp, fsdp = out["results"]
  assert dp["mesh"] == {"data": 8, "fsdp": 1} and fsdp["mesh"] == {"data": 2, "fsdp": 4}
  # FSDP really split the conv kernel (3,3,3,8,16) along its output channels; data-only kept it whole.
  assert fsdp["conv2_kernel_spec"] == str(P(None, None, None, None, "fsdp"))
  assert fsdp["conv2_kernel_shard_shape"] == [3, 3, 3, 8, 4]
  assert dp["conv2_kernel_shard_shape"] == [3, 3, 3, 8, 16]
  assert len(ref["losses"]) == 4 and len(set(ref["losses"])) == 4  # the model actually trains
  _assert_same_run(dp, ref)
  _assert_same_run(fsdp, ref)
