"""What every trained stage does the same way: place the state on the mesh, compile the step ahead of
time, resume from the newest checkpoint, run the loop and write the summary.

A stage module gives a function that builds its step-0 `TrainState`, a pure step function `(state, batch) ->
(state, metrics)`, a grain iterator and abstract batch shapes; `train_stage` does the rest. The step-0 state is
built by one `jax.jit(init_state, out_shardings=...)` (big_vision's and maxdiffusion's sharded initialisation):
each device computes only its own shards of the weights, optimizer moments and EMA, so a state sharded over
the mesh never has to exist whole on one device or on the host.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from ldae_jax.parallel import mesh as pmesh
from ldae_jax.training import loop
from ldae_jax.training.checkpoint import Checkpointer
from ldae_jax.training.state import TrainState, count_params
from ldae_jax.workdir import Workdir

PyTree = Any


@dataclasses.dataclass
class StageSpec:
  """A trained stage, ready to run.

  Attributes:
    name: stage name (directory under the workdir, config.train block).
    init_state: pure `(*init_args) -> step-0 TrainState`, traced once by `jax.eval_shape` (for the shardings)
      and once by `jax.jit(..., out_shardings=...)`; networks are built inside it.
    init_args: host pytrees `init_state` needs (weights loaded from files, e.g. stage 3's frozen UNet), placed
      replicated before the call; () when everything is initialised from the seed.
    step_fn: pure `(state, batch) -> (state, metrics)`; metrics are float32 scalars.
    make_iterator: `() -> grain DatasetIterator` of process-local host batches (checkpointed by grain's
      orbax handler).
    batch_shapes: `{field: jax.ShapeDtypeStruct}` of one *global* batch (for AOT compilation).
    samples_per_step: examples consumed per optimizer step (global batch x accumulation).
    extra_summary: stage facts for summary.json (parameter counts, scale factor, ...).
    heldout_fn: optional pure `state -> {name: scalar}` on a fixed held-out batch, logged (prefixed
      `heldout_`) at every log step so that a run that stops learning what it is for shows it early.
  """
  name: str
  init_state: Callable[..., TrainState]
  step_fn: Callable[[TrainState, PyTree], tuple[TrainState, dict]]
  make_iterator: Callable[[], Iterator]
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  samples_per_step: int
  extra_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
  heldout_fn: Callable[[TrainState], dict] | None = None
  init_args: tuple = ()


def remove_empty_dirs(root: str | os.PathLike, *, keep_root: bool = False) -> None:
  """Removes every empty folder under `root` (bottom up), and `root` itself when it ends up empty unless
  `keep_root`: a failed run leaves no empty `autoencoder/checkpoints/` that looks like a started stage."""
  root = pathlib.Path(root)
  if not root.is_dir():
    return
  for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):  # deepest first
    if (keep_root and pathlib.Path(dirpath) == root) or any(os.scandir(dirpath)):
      continue
    os.rmdir(dirpath)


def state_shardings(state: TrainState, mesh, config: ml_collections.ConfigDict) -> PyTree:
  """Parameters, optimizer moments and EMA follow `config.mesh.param_sharding`; scalars stay replicated."""
  return pmesh.shardings_from_config(state, mesh, config.mesh)


def initial_state(spec: StageSpec, mesh, config: ml_collections.ConfigDict) -> tuple[TrainState, PyTree]:
  """(step-0 state built straight into its shardings, those shardings)."""
  abstract = jax.eval_shape(spec.init_state, *spec.init_args)
  shardings = state_shardings(abstract, mesh, config)
  replicated = pmesh.replicated(mesh)
  args = pmesh.shard_like(spec.init_args, jax.tree.map(lambda _: replicated, spec.init_args))
  return jax.jit(spec.init_state, out_shardings=shardings)(*args), shardings


def train_stage(spec: StageSpec, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                mesh=None, stop_at: int | None = None) -> dict[str, Any] | None:
  """Places, compiles, resumes and runs `spec`; returns the summary (None when stopped at `stop_at`)."""
  cfg = config.train[spec.name]
  wd = Workdir(workdir)
  sdir = wd.stage_dir(spec.name)
  sdir.mkdir(parents=True, exist_ok=True)
  mesh = pmesh.make_mesh(config.mesh) if mesh is None else mesh
  state, shardings = initial_state(spec, mesh, config)
  data_sharding = pmesh.batch_sharding(mesh)
  for k, s in spec.batch_shapes.items():
    pmesh.batch_size_per_device(s.shape[0], mesh)  # raises naming the config field when uneven
  replicated = pmesh.replicated(mesh)
  jitted = jax.jit(spec.step_fn, in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))
  abstract_batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=data_sharding)
                    for k, s in spec.batch_shapes.items()}
  compiled = pmesh.compile_aot(jitted, pmesh.abstract_with_sharding(state, shardings), abstract_batch,
                               name=f"{spec.name} step")
  print(f"[{spec.name}] step compiled in {compiled.seconds:.1f} s on {mesh.devices.size} device(s), mesh "
        f"{dict(mesh.shape)}; trainable parameters {count_params(state.params):,}", flush=True)

  ckpt = Checkpointer(wd.checkpoints(spec.name), keep=cfg.keep_checkpoints)
  iterator = spec.make_iterator()
  start = 0
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, iterator=iterator)
    start = int(jax.device_get(state.step))
    print(f"[{spec.name}] resumed from {ckpt.directory}/{start}", flush=True)
  fields = tuple(spec.batch_shapes)
  heldout = None if spec.heldout_fn is None else jax.jit(spec.heldout_fn, out_shardings=replicated)

  def to_device(host_batch):
    return pmesh.global_batch_from_local({k: host_batch[k] for k in fields}, data_sharding)

  try:
    state, summary = loop.run_steps(
        name=spec.name, stage_dir=sdir, step_fn=compiled, state=state, iterator=iterator, to_device=to_device,
        ckpt=ckpt, total_steps=int(cfg.steps), log_every=max(1, int(cfg.log_every)),
        checkpoint_every=max(1, int(cfg.checkpoint_every)), samples_per_step=spec.samples_per_step,
        compile_seconds=compiled.seconds, start_step=start, stop_at=stop_at, heldout_fn=heldout,
        profile_steps=int(config.profile_steps),
        extra_summary={"mesh": dict(mesh.shape), "num_devices": int(mesh.devices.size),
                       "trainable_parameters": count_params(state.params), **spec.extra_summary})
  finally:
    ckpt.close()
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
  if summary is not None:
    loop.finish_stage(sdir, summary)
  return summary
