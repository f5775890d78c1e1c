"""How many JAX devices a CPU host is split into, so that the data-parallel mesh runs on every core.

XLA's CPU backend runs one device's convolutions on about one core: on the 2-core development CPU a 2D
convolution at the autoencoder's shapes ran as fast pinned to one core as free on two, while torch's doubled
(benchmarks/RESULTS.md, "CPU cores"). Several CPU devices, though, execute their programs concurrently, so a host
split into one device per core, with the batch split over them by the same ('data', 'fsdp') mesh as on
accelerators, uses the cores: the quickstart's UNet forward at batch 16 ran 1.8x faster on 2 devices than on 1,
its LDM and autoencoder steps 1.4-1.6x, its stage-3 step 1.1x.

`config.mesh.cpu_devices`: 0 (default) = one device per core this process may run on, lowered to the largest
count that splits every training batch evenly (so that no config stops at the mesh's divisibility check); a
positive value = exactly that many. The count must be fixed before the backend starts, so the CLIs call
`configure` first; it leaves alone a device count the user set with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` or `jax_num_cpu_devices`, and a backend already started
(a Python session or a test that used JAX before). Accelerators are unaffected (the setting only shapes the
CPU client, which then is not the default backend).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

log = logging.getLogger(__name__)  # shown by the CLIs (ldae_jax.cli.common.setup_logging)

TRAINING_STAGES = ("autoencoder", "ldm", "representation")
_XLA_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU aborts the process when the devices of one host do not all reach a collective within 40 s. A
# quickstart LDM run on 2 devices of the 2-core box died that way once at step ~560 of 1,000 (2026-12-04, the
# first abort in six 2-device runs; benchmarks/RESULTS.md); a host whose cores are shared can stall a device thread that long, so the
# limits are raised to what a stalled step, not a deadlock, could need.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
                            "--xla_cpu_collective_call_terminate_timeout_seconds=900")


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity, e.g. under `taskset` or a cgroup), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):  # pragma: no cover (no sched_getaffinity: macOS, Windows)
    return max(1, os.cpu_count() or 1)


def batch_sizes(config: Any) -> list[int]:
  """Every global batch the training mesh splits: each stage's batch and its micro-batch under grad_accum."""
  sizes = []
  for name in TRAINING_STAGES:
    s = config.train[name]
    accum = max(1, int(s.get("grad_accum", 1)))
    sizes += [int(s.batch_size), max(1, int(s.batch_size) // accum)]
  return sizes


def resolve(requested: int, cores: int, batches: Sequence[int], processes: int = 1) -> int:
  """The CPU device count per process: `requested` when positive, else the largest n <= `cores` such that
  n x `processes` divides every batch (at least 1)."""
  if requested < 0:
    raise ValueError(f"config.mesh.cpu_devices={requested}: 0 (one per core) or a positive device count.")
  if requested > 0:
    return int(requested)
  for n in range(max(1, cores), 0, -1):
    if all(b % (n * max(1, processes)) == 0 for b in batches):
      return n
  return 1


def user_set_count(env: Mapping[str, str] | None = None) -> bool:
  """Whether the device count was already chosen outside the config (XLA flag or jax config)."""
  env = os.environ if env is None else env
  return _XLA_COUNT_FLAG in env.get("XLA_FLAGS", "") or int(jax.config.jax_num_cpu_devices) >= 0


def add_collective_timeouts(env) -> None:
  """Appends COLLECTIVE_TIMEOUT_FLAGS to env['XLA_FLAGS'] (read when the backend starts), keeping the user's own."""
  flags = env.get("XLA_FLAGS", "")
  extra = [f for f in COLLECTIVE_TIMEOUT_FLAGS if f.split("=")[0] not in flags]
  if extra:
    env["XLA_FLAGS"] = " ".join([flags] + extra).strip()


def configure(config: Any, env: Mapping[str, str] | None = None) -> int | None:
  """Sets `jax_num_cpu_devices` from `config.mesh.cpu_devices`; returns the count set, or None when it was
  left alone (chosen by the user, or the backend already running). Call before anything touches a device."""
  requested = int(config.mesh.get("cpu_devices", 0))
  if user_set_count(env):
    log.info("CPU devices: left as set by XLA_FLAGS / jax_num_cpu_devices (config.mesh.cpu_devices=%d unused)",
             requested)
    return None
  processes = int(config.distributed.get("num_processes", -1))
  n = resolve(requested, available_cores(), batch_sizes(config), processes if processes > 0 else 1)
  try:
    jax.config.update("jax_num_cpu_devices", n)
    if n > 1:
      add_collective_timeouts(os.environ)
  except RuntimeError:  # the backend already started (an interactive session, a test): its devices stay
    log.info("CPU devices: the JAX backend already started; config.mesh.cpu_devices=%d not applied", requested)
    return None
  log.info("CPU devices: %d (config.mesh.cpu_devices=%d: %s; %d cores available)", n, requested,
           "one per core, dividing every batch" if requested == 0 else "as configured", available_cores())
  return n
