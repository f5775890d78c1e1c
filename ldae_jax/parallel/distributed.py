"""Multi-process start-up: when and how to call `jax.distributed.initialize`.

A multi-host run starts one Python process per host (or per GPU); each must call
`jax.distributed.initialize` before touching any device so that `jax.devices()` lists the devices of all
processes. `maybe_initialize(config.distributed)` decides from the config, the `LDAE_*` environment and
the cluster environment:

- `initialize="never"`: single process, nothing is called.
- explicit settings (`config.distributed.{coordinator_address,num_processes,process_id}` or the
  environment variables `LDAE_COORDINATOR`, `LDAE_NUM_PROCESSES`, `LDAE_PROCESS_ID`; config wins): they are
  passed on, and JAX's own cluster detection fills whatever is left unset.
- `initialize="always"`: initialise, with JAX's auto-detection for the unset values (SLURM, Open MPI,
  Cloud TPU, Kubernetes).
- `initialize="auto"` (default): initialise only when a multi-process environment is detected: a SLURM job
  step with more than one task, a Cloud TPU VM / TPU pod, or the `LDAE_*` variables; otherwise a plain
  single-process run (a laptop, one GPU, an `salloc` shell running python directly).

On SLURM the GPUs a task uses are corrected for the two launches where JAX's default (GPU number
SLURM_LOCALID) is wrong (`slurm_local_device_ids`); `JAX_LOCAL_DEVICE_IDS` (read by JAX itself) overrides.
See docs/multihost.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)  # shown by the CLIs (ldae_jax.cli.common.setup_logging)

MODES = ("auto", "always", "never")
ENV_COORDINATOR = "LDAE_COORDINATOR"
ENV_NUM_PROCESSES = "LDAE_NUM_PROCESSES"
ENV_PROCESS_ID = "LDAE_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """The process layout after start-up (logged, and written to summaries)."""
  initialized: bool  # whether jax.distributed is running (False: single process)
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  reason: str  # why it was (not) initialised


@dataclasses.dataclass(frozen=True)
class InitArgs:
  """Resolved arguments for `jax.distributed.initialize` (None = let JAX auto-detect)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None

  @property
  def any_explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def _int_setting(cfg_value: Any, env: Mapping[str, str], env_name: str, field: str) -> int | None:
  if cfg_value is not None and int(cfg_value) >= 0:
    return int(cfg_value)
  raw = env.get(env_name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"environment variable {env_name}={raw!r} is not an integer "
                     f"(or set --config.distributed.{field}).") from None
  if value < 0:
    raise ValueError(f"environment variable {env_name}={value} must be >= 0.")
  return value


def resolve_init_args(dist_config: Any, env: Mapping[str, str] | None = None) -> InitArgs:
  """Config fields first, then the LDAE_* environment; unset values stay None. Pure (env injectable)."""
  env = os.environ if env is None else env
  coordinator = str(getattr(dist_config, "coordinator_address", "") or "").strip() or \
      env.get(ENV_COORDINATOR, "").strip() or None
  num = _int_setting(getattr(dist_config, "num_processes", -1), env, ENV_NUM_PROCESSES, "num_processes")
  pid = _int_setting(getattr(dist_config, "process_id", -1), env, ENV_PROCESS_ID, "process_id")
  if num is not None and num < 1:
    raise ValueError(f"config.distributed.num_processes={num}: must be >= 1 (or -1 to auto-detect).")
  if num is not None and pid is not None and pid >= num:
    raise ValueError(f"config.distributed.process_id={pid} must be < num_processes={num}.")
  if coordinator is not None and ":" not in coordinator:
    raise ValueError(f"config.distributed.coordinator_address={coordinator!r}: expected HOST:PORT, "
                     f"e.g. 10.0.0.1:1234 (the address of process 0).")
  return InitArgs(coordinator, num, pid)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  try:
    return int(env[name])
  except (KeyError, ValueError):
    return None


def _on_cloud_tpu_vm() -> bool:
  """JAX's own Cloud TPU VM probe (a private flag; False if it moves in a later JAX)."""
  try:
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    return bool(getattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False))
  except Exception:  # noqa: BLE001
    return False


def detect_cluster(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> str | None:
  """A short description of a multi-process environment, or None for a single-process run.

  SLURM counts only inside a job *step* (srun sets SLURM_STEP_ID and SLURM_PROCID): a batch script or
  `salloc` shell running python directly has SLURM_JOB_ID too, but initialising there would wait for
  tasks that never start. TPU: the pod worker list (GKE / multislice variables) or a Cloud TPU VM, where
  JAX reads the worker list from the metadata server (a single-host TPU VM initialises as 1 process).
  """
  env = os.environ if env is None else env
  if any(env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
    return "LDAE_* environment variables"
  ntasks = _env_int(env, "SLURM_STEP_NUM_TASKS") or _env_int(env, "SLURM_NTASKS")
  if env.get("SLURM_JOB_ID") and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and (ntasks or 1) > 1:
    return f"SLURM job {env['SLURM_JOB_ID']} step with {ntasks} tasks"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return f"TPU pod with workers {hosts}"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)"
  if (_on_cloud_tpu_vm() if tpu_vm is None else tpu_vm):
    return "Cloud TPU VM"
  return None


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
  """Tasks of this step on each node ('4', '4(x2)'); None when unknown or different across nodes."""
  raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or \
      env.get("SLURM_NTASKS_PER_NODE") or ""
  parts = {p.split("(")[0] for p in raw.split(",") if p.strip()}
  if len(parts) != 1:
    return None
  try:
    return int(parts.pop())
  except ValueError:
    return None


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """Which local GPUs this SLURM task should use, where JAX's default would pick wrong; else None.

  JAX's SLURM detection gives each task the single GPU number SLURM_LOCALID (one task per GPU, all GPUs
  visible). Two common launches break that (jax-ml/jax #16788, #23452; maxtext #865):
  - one task per node: the task would see only GPU 0 -> use all GPUs visible on the node;
  - `--gpus-per-task=1` / `--gpu-bind`: SLURM already narrowed CUDA_VISIBLE_DEVICES to one GPU, which is
    device 0 in the task, so GPU number SLURM_LOCALID does not exist -> use [0].
  `JAX_LOCAL_DEVICE_IDS` (read by JAX) always wins; this returns None when it is set.
  """
  env = os.environ if env is None else env
  if env.get("JAX_LOCAL_DEVICE_IDS") or "SLURM_STEP_ID" not in env:
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  per_node = _tasks_per_node(env)
  if per_node == 1:
    n = len(visible) or _env_int(env, "SLURM_GPUS_ON_NODE") or 0
    return list(range(n)) if n > 1 else None
  if len(visible) == 1 and (_env_int(env, "SLURM_LOCALID") or 0) > 0:
    return [0]
  return None


def info(initialized: bool, reason: str) -> DistributedInfo:
  return DistributedInfo(
      initialized=initialized,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      device_count=jax.device_count(),
      reason=reason)


def _log(d: DistributedInfo) -> None:
  log.info("process %d of %d; %d local / %d global devices (%s); distributed %s: %s",
               d.process_index, d.process_count, d.local_device_count, d.device_count,
               jax.local_devices()[0].platform if jax.local_devices() else "none",
               "initialised" if d.initialized else "not initialised", d.reason)


def maybe_initialize(dist_config: Any, env: Mapping[str, str] | None = None) -> DistributedInfo:
  """Initialises `jax.distributed` when the config or the environment asks for it; idempotent.

  Must run before the first use of any device (`jax.devices()`, array creation), since the device list is
  fixed at backend start. A second call, or a call after someone else initialised, only reports.
  """
  mode = str(getattr(dist_config, "initialize", "auto"))
  if mode not in MODES:
    raise ValueError(f"config.distributed.initialize={mode!r}: one of {MODES}.")
  if jax.distributed.is_initialized():
    d = info(True, "already initialised")
    _log(d)
    return d
  if mode == "never":
    d = info(False, "config.distributed.initialize='never'")
    _log(d)
    return d
  args = resolve_init_args(dist_config, env)
  if mode == "always":
    reason = "config.distributed.initialize='always'"
  elif args.any_explicit:
    reason = "explicit coordinator/num_processes/process_id"
  else:
    cluster = detect_cluster(env)
    if cluster is None:
      d = info(False, "no multi-process environment detected (auto)")
      _log(d)
      return d
    reason = f"auto-detected {cluster}"
  local_ids = slurm_local_device_ids(env)
  log.info("jax.distributed.initialize(coordinator_address=%s, num_processes=%s, process_id=%s, "
               "local_device_ids=%s) [%s]", args.coordinator_address, args.num_processes, args.process_id,
               local_ids, reason)
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id,
                             local_device_ids=local_ids)
  d = info(True, reason)
  _log(d)
  return d


_barrier_uses: dict[str, int] = {}


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Blocks until every process reaches `name`; a no-op in a single-process run.

  Used where one process writes files that the others then read (the synthetic cohort, the merged latent
  shards): without it a fast process would read a half-written or absent folder. A process that died or hangs
  would leave the others waiting for ever; past `timeout_s` they raise instead, naming the barrier.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None or not hasattr(client, "wait_at_barrier"):  # a JAX without the coordination client
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  # Every process passes the same barriers in the same order, so a per-name count keeps the ids unique.
  uses = _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
  try:
    client.wait_at_barrier(f"ldae:{name}:{uses}", int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-exception-caught  # jax raises its runtime error type
    raise TimeoutError(
        f"process {jax.process_index()} of {jax.process_count()}: not every process reached '{name}' within "
        f"{timeout_s:.0f} s (config.distributed.barrier_timeout_s); another process died or is stuck: see its "
        f"log. ({str(e).splitlines()[0]})") from e
