"""Trains LDAE: `python train.py --config configs/X.py --workdir DIR [--config.stage=ldm] [--config.a.b=v]`.

`config.stage` is one of autoencoder | latents | ldm | representation | all. Each stage writes
`DIR/<stage>/{checkpoints/, metrics.jsonl, events/, summary.json}` and resumes from its newest checkpoint
when rerun; `all` skips stages whose summary.json exists.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, shards, cohort).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO lines (orbax, XLA) would bury the progress bars
    logging.set_verbosity(logging.WARNING)
  from ldae_jax.config import validate  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  validate(config)
  from ldae_jax.parallel.distributed import maybe_initialize  # pylint: disable=g-import-not-at-top
  maybe_initialize(config.distributed)
  from ldae_jax.training import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.run(config, _WORKDIR.value)
  print(f"outputs: {_WORKDIR.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
