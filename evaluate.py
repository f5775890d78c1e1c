"""Evaluation entry point: python evaluate.py --config configs/X.py --workdir DIR --mode M.

Modes: probe | code_use | recon | interp | manip | report | throughput (see ldae_jax/evaluation/report.py). Outputs go to
DIR/report/ (throughput: benchmarks/results/).
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from ldae_jax import config as cfglib
from ldae_jax.evaluation import report

MODES = ("probe", "code_use", "recon", "interp", "manip", "report", "throughput")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_DAE = config_flags.DEFINE_config_file("dae_config", "configs/dae_image_space.py:small",
                                       "Image-space DAE baseline config (throughput mode).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "The run directory train.py wrote.")
_MODE = flags.DEFINE_enum("mode", "report", MODES, "What to evaluate.")
_BATCH = flags.DEFINE_integer("batch", 2, "throughput: volumes per call.")
_STEPS = flags.DEFINE_integer("steps", 10, "throughput: DDIM steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "throughput: device peak TFLOP/s (0: device table).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # library INFO lines (orbax, XLA) would bury the progress bars
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. --config configs/quickstart.py).")
  cfglib.validate(config)
  mode = _MODE.value
  if mode == "throughput":
    report.run_throughput(config, _DAE.value, batch=_BATCH.value, steps=_STEPS.value,
                          peak_tflops=_PEAK.value or None, workdir=_WORKDIR.value or None)
    return
  if not _WORKDIR.value or not pathlib.Path(_WORKDIR.value).is_dir():
    raise app.UsageError(f"--workdir {_WORKDIR.value!r} is not a directory; pass the folder train.py wrote.")
  out = pathlib.Path(_WORKDIR.value) / "report"
  out.mkdir(parents=True, exist_ok=True)
  fn = {"probe": report.run_probe, "code_use": report.run_code_use, "recon": report.run_recon, "interp": report.run_interp,
        "manip": report.run_manip}.get(mode)
  if fn is not None:
    fn(config, _WORKDIR.value, out)
  else:
    report.run_report(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
