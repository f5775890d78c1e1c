"""`python evaluate.py` (ldae_jax/cli/evaluate.py): --config is required, and a run without trained stages
ends with one error line, no traceback and no empty report/ folder."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _evaluate(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], env=env, capture_output=True,
                        text=True, timeout=600, cwd=cwd)


def test_config_is_required_and_every_flag_has_help(tmp_path):
  out = _evaluate("--workdir", str(tmp_path), cwd=tmp_path)
  assert out.returncode != 0 and "--config" in out.stderr and "Traceback" not in out.stderr
  helptext = _evaluate("--help", cwd=tmp_path).stdout  # from another folder: the default --dae_config resolves
  for flag in ("--config", "--dae_config", "--workdir", "--mode", "--batch", "--steps", "--peak_tflops",
               "--verbose"):
    line = next(l for l in helptext.splitlines() if l.strip().startswith(flag + ":") or
                l.strip().startswith(f"--[no]{flag[2:]}:"))
    assert len(line.split(":", 1)[1].strip()) > 5, line


def test_missing_stage_outputs_give_one_error_and_no_report_folder(tmp_path):
  out = _evaluate("--config", str(REPO / "configs" / "quickstart.py"), "--workdir", str(tmp_path),
                  "--mode", "probe", cwd=tmp_path)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "error: " in out.stderr and "run the autoencoder stage first" in out.stderr
  assert not (tmp_path / "report").exists()
