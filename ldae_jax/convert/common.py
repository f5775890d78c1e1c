"""Reference (PyTorch) state dicts -> ldae_jax parameters: the shared machinery.

Every network's converter (`convert/<network>.py`) only says, for one PyTorch key, which Flax parameter path
it fills and how the tensor is laid out (`key_map`). This module does the rest and checks completeness:
every reference tensor is consumed exactly once (duplicated registrations de-duplicated), every Flax
parameter is filled, and every shape matches after the layout change. Works on plain numpy dicts; torch
is imported only to unpickle `.pth`/`.ckpt` files.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np

FlaxPath = tuple  # e.g. ('input_blocks', 1, 0, 'in_layers_0', 'scale')

# How a PyTorch tensor becomes a Flax one.
#   conv:      (O, I, *k) -> (*k, I, O)   Conv1d/2d/3d, depthwise (groups=C) included
#   linear:    (O, I) -> (I, O)
#   conv1x1:   (O, I, 1[,1,1]) -> (I, O)  1x1 conv used as a Dense layer (UNet attention qkv / proj_out)
#   flatten:   any -> (-1,)               ConvNeXt layer_scale (C,1,1)
#   identity:  unchanged                  biases, norm scales, BatchNorm statistics
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)),
    "linear": lambda w: np.transpose(w),
    "conv1x1": lambda w: np.transpose(w.reshape(w.shape[0], w.shape[1])),
    "flatten": lambda w: w.reshape(-1),
    "identity": lambda w: w,
}


class ConversionError(ValueError):
  """A reference checkpoint does not fit the network: names every offending key."""


@dataclasses.dataclass
class ConversionReport:
  consumed: int
  duplicates_skipped: int
  ignored: list[str]

  def summary(self) -> str:
    return (f"{self.consumed} tensors converted, {self.duplicates_skipped} duplicate registrations "
            f"skipped, {len(self.ignored)} ignored buffers")


def path_str(path: Iterable) -> str:
  return "/".join(str(p) for p in path)


def convert_state_dict(
    torch_sd: Mapping[str, np.ndarray],
    target_shapes: Mapping[FlaxPath, tuple[int, ...]],
    key_map: Callable[[str], tuple[FlaxPath, str] | None],
    *,
    duplicates: Mapping[str, str] | None = None,
    ignore: Callable[[str], bool] = lambda k: False,
    source: str = "<state dict>",
) -> tuple[dict[FlaxPath, np.ndarray], ConversionReport]:
  """Maps a PyTorch state dict onto Flax parameter paths and checks it is complete.

  Args:
    torch_sd: PyTorch key -> numpy array (prefixes already stripped).
    target_shapes: every Flax path the model needs -> its shape.
    key_map: PyTorch key -> (Flax path, transform name), or None for keys that are not parameters.
    duplicates: key -> original key, for tensors registered twice (the encoder's backbone). When absent,
      identical-content tensors with the same `key_map` target are still accepted once.
    ignore: keys to skip silently (e.g. `num_batches_tracked`, fixed positional tables).
    source: file name for error messages.
  Returns:
    (Flax path -> array, report).
  Raises:
    ConversionError listing unknown keys, shape mismatches, double fills and missing parameters.
  """
  duplicates = dict(duplicates or {})
  out: dict[FlaxPath, np.ndarray] = {}
  filled_by: dict[FlaxPath, str] = {}
  unknown, mismatched, doubled, ignored = [], [], [], []
  n_dup = 0
  for key, value in torch_sd.items():
    if key in duplicates:
      n_dup += 1
      continue
    if ignore(key):
      ignored.append(key)
      continue
    mapped = key_map(key)
    if mapped is None:
      unknown.append(key)
      continue
    path, kind = mapped
    path = tuple(path)
    arr = TRANSFORMS[kind](np.asarray(value))
    if path not in target_shapes:
      unknown.append(f"{key} -> {path_str(path)} (no such Flax parameter)")
      continue
    if tuple(arr.shape) != tuple(target_shapes[path]):
      mismatched.append(f"{key} {tuple(np.shape(value))} -> {path_str(path)}: got {arr.shape} after "
                        f"'{kind}', the model needs {tuple(target_shapes[path])}")
      continue
    if path in out:
      if np.array_equal(out[path], arr):  # the same tensor under a second name
        n_dup += 1
        continue
      doubled.append(f"{key} and {filled_by[path]} both fill {path_str(path)}")
      continue
    out[path] = arr
    filled_by[path] = key
  missing = [path_str(p) for p in target_shapes if p not in out]
  problems = []
  for title, items in (("unknown keys", unknown), ("shape mismatches", mismatched),
                       ("parameters filled twice", doubled), ("Flax parameters not filled", missing)):
    if items:
      listed = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
      problems.append(f"  {len(items)} {title}:\n    {listed}")
  if problems:
    raise ConversionError(
        f"{source} does not match the network configuration:\n" + "\n".join(problems) +
        "\nCheck that the config (--config) has the same sizes as the model that wrote the checkpoint, "
        "and that the right prefix/network was chosen.")
  return out, ConversionReport(consumed=len(out), duplicates_skipped=n_dup, ignored=ignored)


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keys starting with `prefix` (e.g. 'ema_unet.'), with it removed; other keys dropped."""
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Loads a `.pth`/`.pt`/`.ckpt` (plain state_dict or Lightning `state_dict` entry) or a fixture `.npz`.

  `.npz` files are read with numpy alone (keys `param/<torch key>` as in ../shared/reference, or plain
  torch keys). PyTorch pickles need `torch` (an optional dependency).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Reference checkpoint {path!r} does not exist.")
  if path.endswith(".npz"):
    try:
      with np.load(path) as z:
        sd = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
      raise ConversionError(f"{path} is not a readable .npz file ({e}).") from e
    if any(k.startswith("param/") for k in sd):
      sd = {k[len("param/"):]: v for k, v in sd.items() if k.startswith("param/")}
    return sd
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs PyTorch to unpickle it: pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu (or save the state dict as .npz with numpy).") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # torch raises many types for corrupt files
    raise ConversionError(f"{path} could not be read by torch.load ({type(e).__name__}: {e}).") from e
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
          for k, v in obj.items() if hasattr(v, "detach")}


def flat_param_shapes(model) -> dict[FlaxPath, tuple[int, ...]]:
  """Flax path -> shape of every `nnx.Param` and `nnx.BatchStat` in `model` (abstract models work)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  shapes = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    shapes[tuple(path)] = tuple(var.get_value().shape)
  return shapes


def load_into_model(model, flat: Mapping[FlaxPath, np.ndarray]) -> None:
  """Writes converted arrays into `model` in place (keeping each variable's dtype)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  for path, var in nnx.to_flat_state(state):
    arr = flat[tuple(path)]
    var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
  nnx.update(model, state)
