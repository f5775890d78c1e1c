"""Trains LDAE: `ldae-train --config configs/X.py --workdir DIR [--config.stage=ldm] [--config.a.b=v]`
(or `python train.py ...` from the repository).

`config.stage` is one of autoencoder | latents | ldm | representation | all. Each stage writes
`DIR/<stage>/{checkpoints/, metrics.jsonl, events/, summary.json}` and resumes from its newest checkpoint
when rerun; `all` skips stages whose summary.json exists. A mistake in the config, the manifest or its files
ends the run with one `error:` line and exit status 2 (`--verbose` adds the traceback).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ldae_jax.cli.common import describe_in_help

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, configs/*.py[:variant]; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, shards, cohort).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the Python traceback as well.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldae_jax.cli import common  # pylint: disable=import-outside-toplevel
  common.setup_logging(verbosity_given=flags.FLAGS["verbosity"].present)

  def train():
    from ldae_jax.config import validate  # pylint: disable=import-outside-toplevel
    config = _CONFIG.value
    validate(config)
    from ldae_jax.parallel import cpu_devices  # pylint: disable=import-outside-toplevel
    cpu_devices.configure(config)  # before anything starts the backend
    common.use_compilation_cache(config)
    from ldae_jax.parallel.distributed import maybe_initialize  # pylint: disable=import-outside-toplevel
    maybe_initialize(config.distributed)
    common.print_on_first_process_only()
    from ldae_jax.training import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.run(config, _WORKDIR.value)
    print(f"outputs: {_WORKDIR.value}", flush=True)

  common.run_reporting_user_errors(train, verbose=_VERBOSE.value)


def run() -> None:
  """The `ldae-train` console script."""
  describe_in_help(sys.modules[__name__])
  app.run(main)


if __name__ == "__main__":
  run()
