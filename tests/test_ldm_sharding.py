"""The real stage-2 step (`ldm_stage.make_step`: UNet eps loss with dropout, clip, Adam, EMA) gives the same
losses on 8 simulated devices - data x FSDP (2 x 4) with sharded parameters, optimizer state and EMA - as on a
1-device mesh for the same global batch, from a step-0 state that the stages' sharded initialisation
(`training.common.initial_state`) builds straight into its shardings and that equals the host build. One
interpreter with 8 host devices runs both meshes (`--xla_force_host_platform_device_count` is read when the
backend starts); the 1-device mesh uses the first device only."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Float32 sums in a different order (per-device partial gradients all-reduced): ~1e-7 per step; Adam over a few
# steps keeps the losses within ~1e-6 relative.
RTOL = 2e-5

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from ldae_jax.config import default_config, latent_shape
from ldae_jax.diffusion.schedule import make_schedule
from ldae_jax.models import build_unet
from ldae_jax.parallel import mesh as pmesh
from ldae_jax.training import common, ldm_stage, state as st

c = default_config()
c.data.image_shape = (16, 16, 16); c.autoencoder.channels = (4, 8, 8)
c.unet.base_channels = 8; c.unet.channel_mult = (1, 2); c.unet.num_res_blocks = 1
c.unet.attention_resolutions = (2,); c.unet.norm_groups = 4
c.train.ldm.batch_size = 8; c.train.ldm.lr = 1e-3
out = {}
for layout in sys.argv[1].split(","):
  data, fsdp, mode = layout.split(":")
  c.mesh.data, c.mesh.fsdp, c.mesh.param_sharding, c.mesh.fsdp_min_size = int(data), int(fsdp), mode, 64
  mesh = pmesh.make_mesh(c.mesh, jax.devices()[:int(data) * int(fsdp)])
  build = lambda: build_unet(c, nnx.Rngs(params=0, dropout=1))
  graphdef, _, rngs, _ = st.abstract_model(build)
  tx = st.make_optimizer(c.train.ldm)

  def init():
    _, params, _, rest = st.split_model(build())
    return st.create_state(params, rest, tx, seed=5, with_ema=True)

  step = ldm_stage.make_step(graphdef, rngs, tx, make_schedule(c.diffusion), 0.9, c.train.ldm)
  # The stages' sharded initialisation: one jit straight into the shardings; it must equal the host build.
  spec = common.StageSpec(name="ldm", init_state=init, step_fn=step, make_iterator=None, batch_shapes={},
                          samples_per_step=8)
  state, shardings = common.initial_state(spec, mesh, c)
  host = init()
  init_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(host)))
  k0 = state.params["output_blocks"][0][0]["in_layers_2"]["kernel"]
  init_shards = sorted({tuple(sh.data.shape) for sh in k0.addressable_shards})
  batch_sh = pmesh.batch_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, pmesh.replicated(mesh)),
                   donate_argnums=(0,))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    batch = {"mu": rng.normal(size=(8,) + tuple(latent_shape(c))).astype(np.float32)}
    state, m = jitted(state, pmesh.global_batch_from_local(batch, batch_sh))
    losses.append(float(m["loss"]))
  kernel = state.params["output_blocks"][0][0]["in_layers_2"]["kernel"]
  out[layout] = {"losses": losses, "devices": int(mesh.devices.size),
                 "ema_sum": float(sum(jnp.sum(x) for x in jax.tree.leaves(state.ema))),
                 "kernel_shards": len(kernel.addressable_shards) if mode == "fsdp" else 0,
                 "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
                 "init_diff": init_diff, "init_shard_shapes": [list(x) for x in init_shards]}
print("RESULT " + json.dumps(out))
"""


def _run(layouts: str, devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "  # as conftest.FAST_COMPILE_FLAG
             f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, layouts], cwd=str(REPO), env=env, capture_output=True,
                        text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-5000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_ldm_step_on_8_devices_matches_1_device():
  runs = _run("1:1:replicate,2:4:fsdp", 8)
  one = runs.pop("1:1:replicate")
  eight = runs
  assert all(np.isfinite(one["losses"]))
  assert one["devices"] == 1 and eight["2:4:fsdp"]["devices"] == 8
  for layout, r in eight.items():
    np.testing.assert_allclose(r["losses"], one["losses"], rtol=RTOL, err_msg=layout)
    np.testing.assert_allclose(r["ema_sum"], one["ema_sum"], rtol=RTOL, err_msg=layout)
  # The jit-initialised step-0 state equals the host-built one (to float32 rounding) and is born sharded.
  assert one["init_diff"] < 1e-6 and eight["2:4:fsdp"]["init_diff"] < 1e-6
  assert eight["2:4:fsdp"]["init_shard_shapes"] == [eight["2:4:fsdp"]["kernel_shard_shape"]]
  # FSDP really split the (3,3,3,cin,cout) kernel over the 4-way fsdp axis (8 devices hold 8 shards).
  assert eight["2:4:fsdp"]["kernel_shards"] == 8
  assert eight["2:4:fsdp"]["kernel_shard_shape"][-1] * 4 == one["kernel_shard_shape"][-1] or \
      np.prod(eight["2:4:fsdp"]["kernel_shard_shape"]) * 4 == np.prod(one["kernel_shard_shape"])
