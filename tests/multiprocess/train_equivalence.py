"""A few real training steps of a small NNX conv model under given meshes; prints the losses as JSON.

Run by tests/test_mesh.py and tests/test_distributed.py in fresh interpreters, because the number of
(simulated) devices is fixed when JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multiprocess/train_equivalence.py \
      --layouts 8x1:replicate,2x4:fsdp

Each layout is DATAxFSDP:MODE (-1 allowed, as in config.mesh). With LDAE_COORDINATOR / LDAE_NUM_PROCESSES /
LDAE_PROCESS_ID set, every process runs this script and `maybe_initialize` joins them; each process then
feeds only its own rows of the global batch (`process_batch_slice` + `global_batch_from_local`).

The step is the production pattern: nnx.split state, optax adam with global-norm clipping, one jitted
step with in/out shardings and the state donated, compiled ahead of time with `compile_aot`. The global
batch and the initial parameters are the same for every layout, so the losses must agree up to float32
reduction order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ldae_jax.parallel import distributed, mesh as mesh_lib  # noqa: E402

GLOBAL_BATCH = 16
SHAPE = (8, 8, 8, 1)
FSDP_MIN_SIZE = 128  # small enough that both conv kernels are split, the linear layer is not


class TinyConvNet(nnx.Module):
  """Conv -> GroupNorm -> SiLU -> strided conv -> SiLU -> mean -> linear: a 3D NDHWC regressor."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3, 3), strides=(2, 2, 2), rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.norm(self.conv1(x)))
    h = jax.nn.silu(self.conv2(h))
    return self.head(h.mean(axis=(1, 2, 3)))


def batch_for_step(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1000 + step)
  return {"x": rng.standard_normal((GLOBAL_BATCH, *SHAPE), dtype=np.float32),
          "y": rng.standard_normal((GLOBAL_BATCH, 2), dtype=np.float32)}


def run_layout(data: int, fsdp: int, mode: str, steps: int) -> dict:
  cfg = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, param_sharding=mode, fsdp_min_size=FSDP_MIN_SIZE))
  mesh = mesh_lib.make_mesh(cfg)
  graphdef, params = nnx.split(TinyConvNet(nnx.Rngs(0)), nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(3e-2))

  p_shard = mesh_lib.shardings_from_config(params, mesh, cfg)
  o_shard = mesh_lib.shardings_from_config(jax.eval_shape(tx.init, params), mesh, cfg)
  b_shard = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  params = mesh_lib.shard_like(params, p_shard)
  opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)

  def loss_fn(p, batch):
    pred = nnx.merge(graphdef, p)(batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)

  def train_step(state, batch):
    p, o = state
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o, p)
    p = optax.apply_updates(p, updates)
    sq = sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(p))
    return (p, o), {"loss": loss, "param_sq": sq}

  step = jax.jit(train_step, in_shardings=((p_shard, o_shard), b_shard),
                 out_shardings=((p_shard, o_shard), rep), donate_argnums=(0,))
  sl = mesh_lib.process_batch_slice(b_shard, GLOBAL_BATCH)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard) for k, v in batch_for_step(0).items()}
  abstract_state = mesh_lib.abstract_with_sharding((params, opt_state), (p_shard, o_shard))
  compiled = mesh_lib.compile_aot(step, abstract_state, abstract_batch, name=f"step[{data}x{fsdp}:{mode}]")

  state, losses, sq = (params, opt_state), [], None
  for i in range(steps):
    local = {k: v[sl] for k, v in batch_for_step(i).items()}
    batch = mesh_lib.global_batch_from_local(local, b_shard)
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
    sq = float(metrics["param_sq"])
  kernel = state[0]["conv2"]["kernel"]
  return {"layout": f"{data}x{fsdp}:{mode}", "mesh": dict(mesh.shape), "losses": losses, "param_sq": sq,
          "rows": [sl.start, sl.stop], "conv2_kernel_spec": str(kernel.sharding.spec),
          "conv2_kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
          "compile_s": compiled.seconds, "flops": compiled.flops}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layouts", default="-1x1:replicate", help="comma-separated DATAxFSDP:MODE")
  ap.add_argument("--steps", type=int, default=4)
  args = ap.parse_args()
  dist = distributed.maybe_initialize(ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=-1, process_id=-1, initialize="auto")))
  results = []
  for layout in args.layouts.split(","):
    sizes, mode = layout.split(":")
    data, fsdp = (int(s) for s in sizes.split("x"))
    results.append(run_layout(data, fsdp, mode, args.steps))
  print("RESULT " + json.dumps({"process_index": dist.process_index, "process_count": dist.process_count,
                                "device_count": dist.device_count, "initialized": dist.initialized,
                                "results": results}), flush=True)


if __name__ == "__main__":
  main()
