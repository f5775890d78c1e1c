"""Orbax checkpoints of a stage: the `TrainState` pytree plus the data iterator's position.

One `CheckpointManager` per stage directory (`DIR/<stage>/checkpoints/<step>/`), two items per step:
`state` (parameters, optimizer state, EMA, step, RNG key, non-trainable state; `StandardSave`) and `data`
(the grain iterator's `get_state()`, JSON). Orbax writes each step to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact. Restoring targets the
*current* run's shardings (abstract arrays built from the freshly initialised, sharded state), so a
checkpoint written on 8 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import base64
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)  # shown by the CLIs (ldae_jax.cli.common.setup_logging)

PyTree = Any


def _encode_data_state(state: Any) -> Any:
  """grain iterator states are dicts (Dataset API) or bytes (DataLoader); JSON needs text."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "b64": base64.b64encode(bytes(state)).decode("ascii")}
  return {"kind": "json", "value": state}


def _decode_data_state(blob: Any) -> Any:
  kind = blob.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(blob["b64"])
  if kind == "json":
    return blob["value"]
  raise ValueError(f"checkpoint data item has unknown kind {kind!r}")


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore target."""
  def one(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves and restores a stage's train state and data position; keeps the newest `keep` steps."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} (config.train.<stage>.keep_checkpoints) must be >= 1.")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: PyTree, data_state: Any = None) -> None:
    """Writes checkpoint `step` (blocking; orbax commits it atomically)."""
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_encode_data_state(data_state))), force=True)
    self.manager.wait_until_finished()
    log.info("saved checkpoint %d to %s", step, self.directory)

  def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, Any]:
    """Restores `step` (default: the latest) onto the structure, dtypes and shardings of `target`.

    Returns (state, data_state). Raises FileNotFoundError naming the directory when there is nothing to
    restore, and ValueError when the saved tree does not match `target` (different model config).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(target)), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the model built from the current config "
          f"(different sizes or networks?): {e}. Use the config that wrote it, or a fresh --workdir.") from e
    return out["state"], _decode_data_state(out["data"])

  def close(self) -> None:
    self.manager.close()


def restore_newest(directory: str | os.PathLike, target: PyTree, *, what: str, missing_fix: str,
                   mismatch_fix: str) -> tuple[PyTree, int]:
  """The newest checkpoint's `state` restored onto `target`, and its step: how a later stage or the
  evaluation picks up an earlier stage's weights.

  Raises FileNotFoundError ("<what> not found: <dir> has no checkpoint; <missing_fix>.") when there is none,
  and ValueError naming `what` and `mismatch_fix` when it was written for other network sizes.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise FileNotFoundError(f"{what} not found: {directory} has no checkpoint; {missing_fix}.")
  ckpt = Checkpointer(directory, keep=1000)
  try:
    try:
      restored, _ = ckpt.restore(target)
    except ValueError as e:
      raise ValueError(f"{what} in {directory} does not match this run's config ({e}); {mismatch_fix}.") from e
    return restored, int(ckpt.latest_step())
  finally:
    ckpt.close()
