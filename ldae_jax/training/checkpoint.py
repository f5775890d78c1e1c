"""Orbax checkpoints of a stage: the `TrainState` pytree plus the data iterator's position.

One `CheckpointManager` per stage directory (`DIR/<stage>/checkpoints/<step>/`), two items per step:
`state` (parameters, optimizer state, EMA, step, RNG key, non-trainable state; `StandardSave`) and `data`
(the grain iterator's position, written by grain's own orbax handler, `grain.checkpoint.CheckpointSave`: one
`process_<i>-of-<n>.json` per process, so every host resumes its own slice of the stream, taken when the save
is asked for). Saves are asynchronous: orbax
copies the arrays off the devices before `save` returns (so the next step may donate them) and writes them in
a background thread while training goes on; `close` waits for the last one. Each step is written to a
temporary directory and renamed when complete, so a run killed mid-save leaves the previous checkpoint intact
(tests/test_checkpoint.py kills a process during an asynchronous save). Restoring targets the
*current* run's shardings (abstract arrays built from the freshly initialised, sharded state), so a
checkpoint written on 8 devices restores on 1 and vice versa.

A later stage or the evaluation reads only the weights it uses, `restore_ema_weights`: the EMA (or the
parameters) and the parts of the non-trainable state asked for, targets built without initialising a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)  # shown by the CLIs (ldae_jax.cli.common.setup_logging)

PyTree = Any
STATE_ITEM = "state"  # the folder of a step that `Checkpointer.save` writes the TrainState to (its `state=` item)
DATA_ITEM = "data"  # ... and the grain iterator's position to


def _check_data_position(data_dir: pathlib.Path) -> None:
  """grain's handler reads `process_<i>-of-<n>.json`; say what is there instead of its bare 'does not exist'."""
  wanted = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if wanted.exists():
    return
  found = sorted(p.name for p in data_dir.glob("process_*.json")) if data_dir.is_dir() else []
  raise ValueError(
      f"checkpoint {data_dir.parent} holds no data position for process {jax.process_index()} of "
      f"{jax.process_count()} (found: {', '.join(found) or 'none'}): it was written without one, or by a "
      "different number of processes. Resume with the process count that wrote it, or use a fresh --workdir.")


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore target."""
  def one(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves and restores a stage's train state and data position; keeps the newest `keep` steps."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} (config.train.<stage>.keep_checkpoints) must be >= 1.")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: PyTree, iterator: Any = None) -> None:
    """Starts writing checkpoint `step`: `state` and, when given, the position of the grain `iterator` (taken
    now). Returns once the arrays are off the devices; orbax commits the step atomically in the background,
    after the previous save has finished."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    log.info("saving checkpoint %d to %s", step, self.directory)

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self.manager.wait_until_finished()

  def restore(self, target: PyTree, step: int | None = None, iterator: Any = None) -> PyTree:
    """Restores `step` (default: the latest) onto the structure, dtypes and shardings of `target`; when a grain
    `iterator` is given, also moves it to the saved position (in place).

    Raises FileNotFoundError naming the directory when there is nothing to restore, and ValueError when the
    saved tree does not match `target` (different model config) or the step holds no position for this
    process (written without an iterator, or by a different number of processes).
    """
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_like(target))}
    if iterator is not None:
      _check_data_position(self.directory / str(step) / DATA_ITEM)
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the model built from the current config "
          f"(different sizes or networks?): {e}. Use the config that wrote it, or a fresh --workdir.") from e
    return out[STATE_ITEM]

  def close(self) -> None:
    """Waits for the last save, then releases orbax's threads."""
    self.manager.wait_until_finished()
    self.manager.close()


@dataclasses.dataclass(frozen=True)
class StageWeights:
  """What a later stage or the evaluation takes from a stage's newest checkpoint.

  Attributes:
    params: the requested part of the EMA weights, or of the raw parameters when the stage kept no EMA.
    rest: the requested part of `TrainState.rest` (batch statistics, a frozen network); {} when none was asked.
    step: the checkpoint's step.
    from_ema: whether `params` are the EMA.
  """
  params: PyTree
  rest: PyTree
  step: int
  from_ema: bool


def restore_ema_weights(directory: str | os.PathLike, params: PyTree, rest: PyTree = None, *, what: str,
                        missing_fix: str, mismatch_fix: str,
                        sharding: jax.sharding.Sharding | None = None) -> StageWeights:
  """The EMA weights (else the parameters) of the newest checkpoint in `directory`, and nothing else.

  `params` and `rest` are abstract trees (anything with .shape and .dtype, e.g. from `nnx.eval_shape`) of the
  parts wanted, keyed as in the saved `TrainState.params` / `.rest`: `{"g": ...}` reads the autoencoder without
  the discriminator. Only those arrays are read (an orbax partial restore): no optimizer moments, no raw
  parameters beside the EMA. Without `sharding` the arrays land, uncommitted, on the default device, as a freshly
  built model's would; with it, every array is restored straight into that sharding.

  Raises FileNotFoundError ("<what> not found: <dir> has no checkpoint; <missing_fix>.") when there is none,
  and ValueError naming `what`, the differing arrays and `mismatch_fix` when it was written for other network
  sizes.
  """
  directory = pathlib.Path(directory)
  step = _newest_step(directory, what=what, missing_fix=missing_fix)
  item_dir = directory.absolute() / str(step) / STATE_ITEM  # orbax reads absolute paths only
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = handler.metadata(item_dir).tree
    weights_key = "ema" if flatten_paths(saved.get("ema")) else "params"
    wanted = {weights_key: params, "rest": {} if rest is None else rest}
    problems = _mismatches(wanted, saved)
    if problems:
      raise ValueError(f"{what} in {directory} does not match this run's config (checkpoint {step}: "
                       f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}); {mismatch_fix}.")
    # Parts without arrays (a network without state) are not asked for: orbax cannot match an empty request.
    item = {k: v for k, v in wanted.items() if jax.tree.leaves(v)}
    restored = {} if not item else handler.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=jax.tree.map(lambda x: _restore_args(x, sharding), item), partial_restore=True))
  finally:
    handler.close()
  if sharding is None:
    restored = jax.device_put(restored)  # host arrays -> uncommitted arrays on the default device
  restored = {k: restored.get(k, v) for k, v in wanted.items()}
  return StageWeights(params=restored[weights_key], rest=restored["rest"], step=step, from_ema=weights_key == "ema")


def _newest_step(directory: pathlib.Path, *, what: str, missing_fix: str) -> int:
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise FileNotFoundError(f"{what} not found: {directory} has no checkpoint; {missing_fix}.")
  ckpt = Checkpointer(directory, keep=1000, asynchronous=False)  # a reader: keep= high, never deletes a step
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  if step is None:  # only uncommitted (interrupted) saves
    raise FileNotFoundError(f"{what} not found: {directory} has no complete checkpoint; {missing_fix}.")
  return int(step)


def flatten_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path: leaf} of nested dicts and lists, keys as text (orbax stores `0` as "0"); None and empty nodes drop out."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  elif tree is None:
    return {}
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(flatten_paths(v, prefix + (str(k),)))
  return out


def _mismatches(wanted: PyTree, saved: PyTree) -> list[str]:
  """What differs between the wanted arrays and the checkpoint's metadata: absent arrays and other shapes.

  Checked before reading because a partial restore would quietly hand back the target for an absent array."""
  have = flatten_paths(saved)
  out = []
  for path, want in flatten_paths(wanted).items():
    name = "/".join(path)
    if path not in have:
      out.append(f"{name} not in the checkpoint")
    elif tuple(have[path].shape) != tuple(want.shape):
      out.append(f"{name}: checkpoint {tuple(have[path].shape)}, model {tuple(want.shape)}")
  return out


def _restore_args(leaf, sharding: jax.sharding.Sharding | None) -> ocp.RestoreArgs:
  """Host numpy arrays without a sharding (any device count reads them), else arrays in `sharding`; cast to the
  model's dtype as the full-state restore does."""
  if sharding is None:
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)
