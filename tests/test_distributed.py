"""Multi-process start-up rules, and 2 localhost processes (jax.distributed, CPU collectives) == 1 process."""

from __future__ import annotations

import pathlib
import sys

import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldae_jax.config import default_config
from ldae_jax.parallel import distributed

sys.path.insert(0, str(pathlib.Path(__file__).parent / "multiprocess"))
import harness  # noqa: E402


def dist_cfg(coordinator="", num=-1, pid=-1, mode="auto"):
  return ml_collections.ConfigDict(dict(coordinator_address=coordinator, num_processes=num, process_id=pid,
                                        initialize=mode))


# ------------------------------------------------------------------ settings: config, then environment
def test_resolve_config_wins_over_env_and_env_fills_gaps():
  env = {"LDAE_COORDINATOR": "10.0.0.2:99", "LDAE_NUM_PROCESSES": "4", "LDAE_PROCESS_ID": "3"}
  assert distributed.resolve_init_args(dist_cfg(), env) == distributed.InitArgs("10.0.0.2:99", 4, 3)
  assert distributed.resolve_init_args(dist_cfg("h:1", 8, 0), env) == distributed.InitArgs("h:1", 8, 0)
  assert distributed.resolve_init_args(dist_cfg(), {}) == distributed.InitArgs(None, None, None)
  assert not distributed.resolve_init_args(default_config().distributed, {}).any_explicit


@pytest.mark.parametrize("cfg,env,match", [
    (dist_cfg(), {"LDAE_NUM_PROCESSES": "two"}, "LDAE_NUM_PROCESSES='two' is not an integer"),
    (dist_cfg(num=2, pid=2), {}, r"process_id=2 must be < num_processes=2"),
    (dist_cfg(num=0), {}, r"num_processes=0: must be >= 1"),
    (dist_cfg("localhost"), {}, "expected HOST:PORT"),
])
def test_resolve_rejects_bad_settings(cfg, env, match):
  with pytest.raises(ValueError, match=match):
    distributed.resolve_init_args(cfg, env)


# ------------------------------------------------------------------ cluster detection for 'auto'
SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "8",
              "SLURM_STEP_NUM_TASKS": "8"}


@pytest.mark.parametrize("env,detected", [
    ({}, False),
    (SLURM_STEP, True),  # srun with 8 tasks
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, False),  # one task: single process
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}, False),  # sbatch/salloc shell, not inside srun
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, False),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
    ({"LDAE_COORDINATOR": "127.0.0.1:1234"}, True),
])
def test_detect_cluster(env, detected):
  assert (distributed.detect_cluster(env, tpu_vm=False) is not None) == detected


def test_detect_cluster_on_tpu_vm():
  assert "TPU" in distributed.detect_cluster({}, tpu_vm=True)


@pytest.mark.parametrize("extra,expected", [
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, None),
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x8)", "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
     [0, 1, 2, 3]),  # one task per node: all GPUs, not just GPU 0
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x8)", "SLURM_LOCALID": "0", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, [0]),  # bound
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x8)", "CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "1"}, None),
])
def test_slurm_local_device_ids(extra, expected):
  assert distributed.slurm_local_device_ids({**SLURM_STEP, **extra}) == expected
  assert distributed.slurm_local_device_ids(extra) is None  # not inside an srun step


def test_maybe_initialize_single_process_paths_and_idempotence():
  """Here (no cluster) 'auto' and 'never' stay single-process, repeatedly; a bad mode names the field."""
  for mode in ("never", "auto", "auto"):
    d = distributed.maybe_initialize(dist_cfg(mode=mode), env={})
    assert not d.initialized and d.process_count == 1 and d.process_index == 0
    assert d.device_count >= d.local_device_count >= 1
  with pytest.raises(ValueError, match="config.distributed.initialize='sometimes'"):
    distributed.maybe_initialize(dist_cfg(mode="sometimes"), env={})


# ------------------------------------------------------------------ 2 processes == 1 process
@pytest.mark.slow
def test_two_processes_match_one_process():
  """2 localhost processes x 2 CPU devices joined by jax.distributed (LDAE_* env -> maybe_initialize),
  each feeding only its half of the global batch, give the 1-device losses (rtol harness.RTOL; observed
  ~1e-7). Layouts: data=2 x fsdp=2 (FSDP inside each process, data across) and fsdp=4 (FSDP across)."""
  outs, ref = harness.run_processes_with_baseline("-1x2:fsdp,1x4:fsdp", num_processes=2,
                                                  devices_per_process=2)
  assert [o["process_index"] for o in outs] == [0, 1]
  assert all(o["initialized"] and o["process_count"] == 2 and o["device_count"] == 4 for o in outs)
  rows = [tuple(r["rows"]) for o in outs for r in o["results"][:1]]
  assert rows == [(0, 8), (8, 16)]  # each process loaded only its half
  for o in outs:
    dp_fsdp, fsdp = o["results"]
    assert dp_fsdp["mesh"] == {"data": 2, "fsdp": 2} and fsdp["mesh"] == {"data": 1, "fsdp": 4}
    assert fsdp["conv2_kernel_spec"] == str(P(None, None, None, None, "fsdp"))
    assert fsdp["conv2_kernel_shard_shape"] == [3, 3, 3, 8, 4]
    for r in o["results"]:
      np.testing.assert_allclose(r["losses"], ref["losses"], rtol=harness.RTOL, err_msg=r["layout"])
      np.testing.assert_allclose(r["param_sq"], ref["param_sq"], rtol=harness.RTOL, err_msg=r["layout"])


def test_a_dead_process_stops_the_others_at_the_barrier_with_an_error():
  """A process that exits without a shutdown (a crashed host) makes the survivor's barrier raise a TimeoutError
  naming the barrier within its timeout, instead of hanging."""
  script = pathlib.Path(__file__).parent / "multiprocess" / "barrier_peer.py"
  (rc0, out0, t0), (rc1, _, _) = harness.run_script(script, [["--timeout_s=4"], ["--die", "--timeout_s=4"]],
                                                     timeout_s=120)
  assert rc1 == 3
  assert rc0 == 2 and "BARRIER_ERROR" in out0, out0[-3000:]
  line = next(l for l in out0.splitlines() if l.startswith("BARRIER_ERROR"))
  assert "'after the peer died'" in line and "config.distributed.barrier_timeout_s" in line
  assert float(line.split()[2]) < 30 and t0 < 110  # bounded by the 4 s timeout, not a hang
