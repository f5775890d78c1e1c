"""Reference (PyTorch) checkpoint -> orbax checkpoint of an ldae_jax network.

  python -m ldae_jax.convert --network {unet,shift_unet,autoencoder,discriminator,encoder} \
      --config configs/X.py[:variant] --input ckpt(.pth|.ckpt|.npz) --output DIR [--prefix P] \
      [--convnext_imagenet PATH] [--force]

The network is built abstractly for the config (`nnx.eval_shape`: no random init, no memory for the
paper-size 865 M-parameter ShiftUNet beyond the converted arrays), every reference tensor is mapped and
checked (`convert/common.py`), and the network's parameters and batch statistics (`nnx.Param`,
`nnx.BatchStat`; RNG streams are not weights) are written with `ocp.StandardCheckpointer` to DIR. Orbax
writes to a temporary folder and renames it when complete, so DIR is either absent or whole.
`load_converted(DIR, model)` restores it into a model built for the same config.

`--convnext_imagenet PATH` (encoder only, instead of --input) starts a fresh encoder (seed config.seed)
whose ConvNeXt backbone is loaded from torchvision ImageNet weights (stem summed to one channel).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax.config import load_config
from ldae_jax.convert import common

# network name -> (converter module under ldae_jax.convert, builder in ldae_jax.models)
NETWORKS = {
    "unet": ("unet", "build_unet"),
    "shift_unet": ("shift_unet", "build_shift_unet"),
    "autoencoder": ("autoencoder", "build_autoencoder"),
    "discriminator": ("discriminator", "build_discriminator"),
    "encoder": ("semantic_encoder", "build_encoder"),
}
SAVED = nnx.Any(nnx.Param, nnx.BatchStat)


def converter(network: str):
  """The `ldae_jax.convert.<module>` for a network name (imported lazily)."""
  if network not in NETWORKS:
    raise ValueError(f"Unknown network {network!r}; choose one of {sorted(NETWORKS)}.")
  return importlib.import_module(f"ldae_jax.convert.{NETWORKS[network][0]}")


def builder(network: str):
  import ldae_jax.models as models  # pylint: disable=import-outside-toplevel
  return getattr(models, NETWORKS[network][1])


def build_abstract(network: str, config: ml_collections.ConfigDict):
  """The network for `config` with abstract (ShapeDtypeStruct) variables: no allocation, no init."""
  build = builder(network)
  return nnx.eval_shape(lambda: build(config, nnx.Rngs(config.seed)))


def saved_state(model) -> nnx.State:
  return nnx.state(model, SAVED)


def save_converted(model, path: str, *, force: bool = False) -> str:
  """Writes the model's parameters and batch statistics as an orbax checkpoint at `path` (atomic)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  if os.path.exists(path) and not force:
    raise FileExistsError(f"Output {path} already exists; remove it or pass --force to overwrite.")
  state = nnx.to_pure_dict(saved_state(model))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, state, force=force)
    ckptr.wait_until_finished()
  return path


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(v.shape)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_converted(path: str, model) -> None:
  """Restores a checkpoint written by `save_converted` / the CLI into `model` (in place).

  `model` may be concrete or abstract (`nnx.eval_shape`; then call `layers.materialize_rng_state` before
  running it if it has dropout streams). Raises FileNotFoundError for a missing path and
  ConversionError naming every parameter whose presence or shape differs (a checkpoint of another config).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Converted checkpoint {path} does not exist (write it with "
                            "`python -m ldae_jax.convert ... --output {path}`).")
  state = saved_state(model)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckptr:
    try:
      meta = ckptr.metadata(path)
    except Exception as e:  # orbax raises several types for a folder that is not a checkpoint
      raise common.ConversionError(f"{path} is not a readable orbax checkpoint ({type(e).__name__}: {e}).") from e
    meta_tree = getattr(meta, "item_metadata", meta)
    have, want = _flat_shapes(meta_tree), _flat_shapes(target)
    problems = [f"missing in checkpoint: {k}" for k in want if k not in have]
    problems += [f"not in the model: {k}" for k in have if k not in want]
    problems += [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in want if k in have and have[k] != want[k]]
    if problems:
      listed = "\n    ".join(problems[:20]) + (f"\n    ... and {len(problems) - 20} more" if len(problems) > 20 else "")
      raise common.ConversionError(f"{path} does not match the model ({len(problems)} problems):\n    {listed}\n"
                                   "Build the model from the same config that was used for the conversion.")
    restored = ckptr.restore(path, target)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)


def convert_file(network: str, config: ml_collections.ConfigDict, input_path: str | None, *,
                 prefix: str | None = None, convnext_imagenet: str | None = None):
  """Builds the network for `config` and fills it from `input_path`; returns (model, report text)."""
  mod = converter(network)
  if convnext_imagenet:
    if network != "encoder":
      raise ValueError("--convnext_imagenet only applies to --network encoder.")
    if input_path:
      raise ValueError("Give either --input (a trained LDAE encoder) or --convnext_imagenet (a fresh encoder "
                       "with an ImageNet backbone), not both.")
    model = builder(network)(config, nnx.Rngs(config.seed))  # the heads need a real random init
    report = mod.load_pretrained_convnext(convnext_imagenet, model)
    return model, report.summary()
  if not input_path:
    raise ValueError("--input is required (a .pth/.ckpt/.npz reference checkpoint).")
  sd = common.load_torch_file(input_path)
  model = build_abstract(network, config)
  kwargs = {"source": input_path}
  if prefix is not None:
    stripped = common.strip_prefix(sd, prefix) if prefix else sd
    if not stripped:
      raise common.ConversionError(f"{input_path}: no keys start with --prefix {prefix!r}; first keys: "
                                   f"{', '.join(list(sd)[:5])}.")
    sd = stripped
    if "prefix" in inspect.signature(mod.convert).parameters:
      kwargs["prefix"] = ""
  report = mod.convert(sd, model, **kwargs)
  return model, report.summary()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ldae_jax.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--network", required=True, choices=sorted(NETWORKS), help="which network the checkpoint holds")
  p.add_argument("--config", required=True, help="configs/X.py[:variant]; sizes must match the checkpoint")
  p.add_argument("--input", help="reference checkpoint: .pth/.pt/.ckpt (needs torch) or .npz")
  p.add_argument("--output", required=True, help="orbax checkpoint folder to create")
  p.add_argument("--prefix", default=None,
                 help="key prefix to strip (default: the converter's known Lightning prefixes, auto-detected)")
  p.add_argument("--convnext_imagenet", default=None,
                 help="encoder only: torchvision ConvNeXt ImageNet state dict for a fresh encoder's backbone")
  # The dashed spelling of earlier versions, kept working but not shown: every CLI of the package spells its
  # flags with underscores, as train.py / evaluate.py's absl flags must.
  p.add_argument("--convnext-imagenet", dest="convnext_imagenet", help=argparse.SUPPRESS)
  p.add_argument("--force", action="store_true", help="overwrite an existing --output")
  args = p.parse_args(argv)
  try:
    config = load_config(args.config)
    model, summary = convert_file(args.network, config, args.input, prefix=args.prefix,
                                  convnext_imagenet=args.convnext_imagenet)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = save_converted(model, args.output, force=args.force)
  except (common.ConversionError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.network}: {summary}; {n:,} parameters written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
