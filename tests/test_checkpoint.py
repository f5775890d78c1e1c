"""Checkpoints: a TrainState written on 8 simulated devices (FSDP-sharded) restores on 1 device, with the
grain iterator position; keep-last-N. Each device count runs in its own subprocess (XLA_FLAGS is read at
backend start)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from ldae_jax.config import default_config
from ldae_jax.parallel import mesh as pmesh
from ldae_jax.training import state as st
from ldae_jax.training.checkpoint import Checkpointer
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == n, jax.devices()
c = default_config(); c.mesh.data = 1; c.mesh.fsdp = -1; c.mesh.param_sharding = "fsdp"; c.mesh.fsdp_min_size = 16
rng = np.random.default_rng(0)
params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4, 16)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}}
tx = st.make_optimizer(c.train.ldm)
state = st.create_state(params, {"bn": {"mean": jnp.zeros((16,))}}, tx, seed=3, with_ema=True)
mesh = pmesh.make_mesh(c.mesh)
sh = pmesh.shardings_from_config(state, mesh, c.mesh)
state = pmesh.shard_like(state, sh)
ck = Checkpointer(path, keep=2)
if mode == "save":
  assert len(state.params["conv"]["kernel"].sharding.device_set) == n
  for s in (1, 2, 3):
    state = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
    ck.save(s, state, {"next_index": 10 * s})
  np.save(path + "_expected.npy", np.asarray(state.params["conv"]["kernel"]))
else:
  restored, data = ck.restore(state)
  assert ck.all_steps() == [2, 3], ck.all_steps()
  assert int(restored.step) == 3 and data == {"next_index": 30}, (restored.step, data)
  np.testing.assert_array_equal(np.asarray(restored.params["conv"]["kernel"]), np.load(path + "_expected.npy"))
  np.testing.assert_array_equal(np.asarray(restored.ema["conv"]["kernel"]), np.asarray(params["conv"]["kernel"]))
  assert restored.params["conv"]["kernel"].sharding == sh.params["conv"]["kernel"]
  print("RESTORED_OK")
ck.close()
"""


def _run(mode: str, path: str, n: int) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
         "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode, path, str(n)], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  path = str(tmp_path / "ck")
  _run("save", path, 8)
  assert "RESTORED_OK" in _run("restore", path, 1)


def test_data_state_roundtrip_bytes_and_dict():
  from ldae_jax.training.checkpoint import _decode_data_state, _encode_data_state
  for s in (None, b"\x00\x01grain", {"next_index": 5, "nested": [1, 2]}):
    assert _decode_data_state(_encode_data_state(s)) == s
