"""Parameter summary of every LDAE network for a config, without allocating a single weight.

  python -m ldae_jax.models --config configs/paper.py[:variant]

Each network is built under `nnx.eval_shape`, so even the 865 M-parameter ShiftUNet costs no memory. The
paper config must give AutoencoderKL 13,766,248; PatchDiscriminator 11,048,769; UNet 486,927,363;
ShiftUNet 865,339,142 (trainable shift branch 378,411,779); semantic encoder 53,588,065 (the reference's
counts, as in the reference test vectors' `param_counts.json`). A network whose module is not importable is
reported as missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

# (label, builder name in ldae_jax.models, module that defines it)
NETWORKS = (
    ("AutoencoderKL", "build_autoencoder", "autoencoder"),
    ("PatchDiscriminator", "build_discriminator", "discriminator"),
    ("UNet", "build_unet", "unet"),
    ("ShiftUNet", "build_shift_unet", "shift_unet"),
    ("SemanticEncoder", "build_encoder", "semantic_encoder"),
)
SHIFT_TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("unet")))


def count(model, filt=nnx.Param) -> int:
  """Number of scalars in the variables of `model` selected by `filt` (abstract models work)."""
  return int(sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, filt))))


def abstract_model(builder_name: str, config: ml_collections.ConfigDict):
  """Builds `ldae_jax.models.<builder_name>` for `config` under eval_shape; ImportError if the module is absent."""
  module = dict((b, m) for _, b, m in NETWORKS)[builder_name]
  try:
    build = getattr(importlib.import_module(f"ldae_jax.models.{module}"), builder_name)
  except (ModuleNotFoundError, AttributeError) as e:
    raise ImportError(f"builder ldae_jax.models.{builder_name} is missing ({e})") from e
  return nnx.eval_shape(lambda: build(config, nnx.Rngs(0)))


def summary(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{label: {'params': n, ['trainable': n]} or {'missing': reason}} for every network."""
  out = {}
  for label, builder_name, _ in NETWORKS:
    try:
      model = abstract_model(builder_name, config)
    except ImportError as e:
      out[label] = {"missing": str(e)}
      continue
    entry = {"params": count(model)}
    if label == "ShiftUNet":
      entry["trainable"] = count(model, SHIFT_TRAINABLE)
    out[label] = entry
  return out


def format_summary(name: str, table: dict[str, dict]) -> str:
  lines = [f"Parameter counts for config '{name}' (float32 parameters):"]
  for label, entry in table.items():
    if "missing" in entry:
      lines.append(f"  {label:<20} MISSING: {entry['missing']}")
      continue
    line = f"  {label:<20} {entry['params']:>13,}  ({entry['params'] * 4 / 2**20:,.1f} MiB)"
    if "trainable" in entry:
      line += f"; trainable (shift branch) {entry['trainable']:,}"
    lines.append(line)
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ldae_jax.models", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/X.py[:variant]")
  args = p.parse_args(argv)
  from ldae_jax.config import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(args.config)
  table = summary(config)
  print(format_summary(config.name, table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
