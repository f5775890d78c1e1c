"""Evaluates a trained run: `ldae-evaluate --config configs/X.py --workdir DIR --mode M` (or
`python evaluate.py ...` from the repository).

Modes: probe | code_use | recon | interp | manip | report | throughput (see ldae_jax/evaluation/report.py). Outputs go to
DIR/report/ (throughput: benchmarks/results/). A missing stage output or a bad config value ends the run with
one `error:` line and exit status 2 (`--verbose` adds the traceback); a failed run leaves no empty report/.
"""

from __future__ import annotations

import sys
import pathlib

from absl import app, flags
from ml_collections import config_flags

from ldae_jax.cli.common import describe_in_help

MODES = ("probe", "code_use", "recon", "interp", "manip", "report", "throughput")
# The repository's configs/ folder (beside the package in a checkout or an installation), so that the
# default works from any directory.
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file the run was trained with (configs/*.py).",
                                          lock_config=True)
_DAE = config_flags.DEFINE_config_file("dae_config", str(CONFIGS / "dae_image_space.py") + ":small",
                                       "throughput: image-space DAE baseline config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "The run directory train.py wrote (throughput: optional).")
_MODE = flags.DEFINE_enum("mode", "report", MODES, "What to evaluate.")
_BATCH = flags.DEFINE_integer("batch", 2, "throughput: volumes per call.")
_STEPS = flags.DEFINE_integer("steps", 10, "throughput: DDIM steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "throughput: device peak TFLOP/s (0: device table).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the Python traceback as well.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldae_jax.cli import common  # pylint: disable=import-outside-toplevel
  common.setup_logging(verbosity_given=flags.FLAGS["verbosity"].present)
  mode = _MODE.value
  if mode != "throughput" and (not _WORKDIR.value or not pathlib.Path(_WORKDIR.value).is_dir()):
    raise app.UsageError(f"--workdir {_WORKDIR.value!r} is not a directory; pass the folder train.py wrote.")
  from ldae_jax.workdir import Workdir  # pylint: disable=import-outside-toplevel
  out = Workdir(_WORKDIR.value or ".").report
  existed = out.is_dir()

  def evaluate():
    from ldae_jax import config as cfglib  # pylint: disable=import-outside-toplevel
    from ldae_jax.evaluation import report  # pylint: disable=import-outside-toplevel
    config = _CONFIG.value
    cfglib.validate(config)
    from ldae_jax.parallel import cpu_devices  # pylint: disable=import-outside-toplevel
    cpu_devices.configure(config)  # before anything starts the backend
    common.use_compilation_cache(config)
    if mode == "throughput":
      report.run_throughput(config, _DAE.value, batch=_BATCH.value, steps=_STEPS.value,
                            peak_tflops=_PEAK.value or None, workdir=_WORKDIR.value or None)
      return
    out.mkdir(parents=True, exist_ok=True)
    fn = {"probe": report.run_probe, "code_use": report.run_code_use, "recon": report.run_recon,
          "interp": report.run_interp, "manip": report.run_manip}.get(mode)
    if fn is not None:
      fn(config, _WORKDIR.value, out)
    else:
      report.run_report(config, _WORKDIR.value)

  def cleanup():
    if mode != "throughput":
      from ldae_jax.training.common import remove_empty_dirs  # pylint: disable=import-outside-toplevel
      remove_empty_dirs(out, keep_root=existed)

  common.run_reporting_user_errors(evaluate, verbose=_VERBOSE.value, cleanup=cleanup)


def run() -> None:
  """The `ldae-evaluate` console script."""
  describe_in_help(sys.modules[__name__])
  app.run(main)


if __name__ == "__main__":
  run()
