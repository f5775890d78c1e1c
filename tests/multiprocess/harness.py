"""Runs tests/multiprocess/train_equivalence.py in fresh interpreters and parses what it prints.

The device count of a JAX process is fixed at start-up (`--xla_force_host_platform_device_count`), so
every layout runs in a subprocess. The single-device baseline is cached per pytest session and shared by
test_mesh.py and test_distributed.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("train_equivalence.py")
REPO = SCRIPT.parents[2]
TIMEOUT_S = 240
# Float32 results that differ only in reduction order (all-reduce of per-device partial gradients) agree to
# ~1e-7 relative per step; adam over 4 steps keeps it near 1e-6. 2e-5 leaves headroom for XLA versions.
RTOL = 2e-5

_STRIP = ("XLA_FLAGS", "LDAE_COORDINATOR", "LDAE_NUM_PROCESSES", "LDAE_PROCESS_ID", "SLURM_JOB_ID",
          "SLURM_STEP_ID", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "JAX_NUM_CPU_DEVICES")


def _env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _STRIP}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "  # as conftest.FAST_COMPILE_FLAG
             f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
  env.update(extra or {})
  return env


def _start(layouts: str, devices: int, steps: int, extra: dict[str, str] | None = None) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, str(SCRIPT), f"--layouts={layouts}", f"--steps={steps}"], cwd=str(REPO),
      env=_env(devices, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> dict:
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f"train_equivalence.py timed out after {TIMEOUT_S} s:\n{out[-4000:]}") from None
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise AssertionError(f"train_equivalence.py failed (rc={proc.returncode}):\n{out[-6000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def run(layouts: str, devices: int, steps: int = 4) -> dict:
  """One process with `devices` simulated CPU devices running the comma-separated layouts."""
  return _finish(_start(layouts, devices, steps))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(layouts: str, num_processes: int, devices_per_process: int, steps: int = 4) -> list[dict]:
  """`num_processes` local processes joined by jax.distributed (coordinator on a free localhost port,
  passed through the LDAE_* variables that `maybe_initialize` reads)."""
  port = free_port()
  procs = [_start(layouts, devices_per_process, steps, {
      "LDAE_COORDINATOR": f"127.0.0.1:{port}", "LDAE_NUM_PROCESSES": str(num_processes),
      "LDAE_PROCESS_ID": str(i)}) for i in range(num_processes)]
  results = []
  try:
    for p in procs:
      results.append(_finish(p))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def run_script(script: pathlib.Path, args_per_process: list[list[str]], devices_per_process: int = 1,
               timeout_s: float = TIMEOUT_S) -> list[tuple[int, str, float]]:
  """`script` in len(args_per_process) local processes joined by jax.distributed; (returncode, output, seconds
  until it exited) per process."""
  import time  # pylint: disable=import-outside-toplevel
  port = free_port()
  t0 = time.perf_counter()
  procs = [subprocess.Popen(
      [sys.executable, str(script), *args], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=_env(devices_per_process, {
          "LDAE_COORDINATOR": f"127.0.0.1:{port}", "LDAE_NUM_PROCESSES": str(len(args_per_process)),
          "LDAE_PROCESS_ID": str(i)})) for i, args in enumerate(args_per_process)]
  out = []
  try:
    for p in procs:
      try:
        text, _ = p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
      except subprocess.TimeoutExpired:
        p.kill()
        text, _ = p.communicate()
        text += f"\n[harness] killed after {timeout_s:.0f} s"
      out.append((p.returncode, text, time.perf_counter() - t0))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


_BASELINE: list[dict] = []
BASELINE_LAYOUT = "1x1:replicate"


def _start_baseline() -> subprocess.Popen | None:
  return None if _BASELINE else _start(BASELINE_LAYOUT, 1, 4)


def _keep_baseline(proc: subprocess.Popen | None) -> dict:
  if proc is not None:
    _BASELINE.append(_finish(proc)["results"][0])
  return _BASELINE[0]


def run_with_baseline(layouts: str, devices: int) -> tuple[dict, dict]:
  """(`run(layouts, devices)`, the single-device 1x1 baseline), started side by side; the baseline is
  computed once per pytest session."""
  base = _start_baseline()
  out = _finish(_start(layouts, devices, 4))
  return out, _keep_baseline(base)


def run_processes_with_baseline(layouts: str, num_processes: int, devices_per_process: int
                                ) -> tuple[list[dict], dict]:
  """(`run_processes(...)`, the single-device baseline), started side by side."""
  base = _start_baseline()
  outs = run_processes(layouts, num_processes, devices_per_process)
  return outs, _keep_baseline(base)
