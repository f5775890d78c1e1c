"""LDAE vs image-space DAE throughput in one run; writes benchmarks/results/throughput_<device>_<time>.json.

  python benchmarks/throughput.py --config configs/paper.py:bf16 --dae_config configs/dae_image_space.py:bf16 \
      --batch 8 --steps 100            # GPU, paper size
  python benchmarks/throughput.py      # CPU defaults: quickstart vs dae_image_space:small, batch 2, DDIM-10

`evaluate.py --mode throughput` calls the same code.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ldae_jax.evaluation import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "LDAE config.", lock_config=True)
_DAE = config_flags.DEFINE_config_file("dae_config", "configs/dae_image_space.py:small", "DAE baseline config.",
                                       lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 2, "Volumes per DDIM call (same for LDAE and DAE).")
_STEPS = flags.DEFINE_integer("steps", 10, "DDIM steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per workload (median reported).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: device table; none on CPU).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Optional: a trained workdir whose stage summaries to include.")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Output folder for the JSON.")


def main(argv):
  del argv
  path = report.run_throughput(_CONFIG.value, _DAE.value, batch=_BATCH.value, steps=_STEPS.value,
                               repeats=_REPEATS.value, peak_tflops=_PEAK.value or None,
                               workdir=_WORKDIR.value or None, out_dir=_OUT.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
