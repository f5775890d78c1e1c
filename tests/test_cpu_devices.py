"""parallel/cpu_devices: how many CPU devices a host is split into, and that the setting reaches the backend."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from ldae_jax import config as cfglib
from ldae_jax.parallel import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_auto_takes_the_most_cores_that_split_every_batch():
  assert cpu_devices.resolve(0, cores=2, batches=[4, 4, 16, 16, 8, 8]) == 2
  assert cpu_devices.resolve(0, cores=6, batches=[4, 16, 8]) == 4
  assert cpu_devices.resolve(0, cores=3, batches=[8, 16]) == 2
  assert cpu_devices.resolve(0, cores=4, batches=[6, 12]) == 3
  assert cpu_devices.resolve(0, cores=8, batches=[5, 10]) == 5
  assert cpu_devices.resolve(0, cores=2, batches=[3]) == 1
  assert cpu_devices.resolve(0, cores=1, batches=[16]) == 1
  # Several processes: every process gets n devices, so n x processes must split the batch.
  assert cpu_devices.resolve(0, cores=2, batches=[4], processes=2) == 2
  assert cpu_devices.resolve(0, cores=4, batches=[4], processes=2) == 2


def test_resolve_explicit_count_is_kept_and_negative_rejected():
  assert cpu_devices.resolve(3, cores=2, batches=[4]) == 3  # the mesh check then names the batch to change
  with pytest.raises(ValueError, match="cpu_devices=-1"):
    cpu_devices.resolve(-1, cores=2, batches=[4])


def test_batch_sizes_include_micro_batches():
  c = cfglib.default_config()
  c.train.autoencoder.batch_size, c.train.autoencoder.grad_accum = 8, 2
  c.train.ldm.batch_size, c.train.ldm.grad_accum = 12, 1
  c.train.representation.batch_size, c.train.representation.grad_accum = 6, 3
  assert sorted(cpu_devices.batch_sizes(c)) == sorted([8, 4, 12, 12, 6, 2])
  assert cpu_devices.resolve(0, cores=4, batches=cpu_devices.batch_sizes(c)) == 2


def test_validate_rejects_negative_cpu_devices():
  c = cfglib.default_config()
  c.mesh.cpu_devices = -2
  with pytest.raises(ValueError, match="mesh.cpu_devices"):
    cfglib.validate(c)


def test_user_set_count_reads_xla_flags():
  assert cpu_devices.user_set_count({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert not cpu_devices.user_set_count({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})


def test_configure_after_backend_start_leaves_devices_alone():
  before = jax.device_count()  # starts the backend, as a test session or notebook has
  c = cfglib.default_config()
  c.mesh.cpu_devices = before + 1
  assert cpu_devices.configure(c, env={}) is None
  assert jax.device_count() == before


def _devices_in_fresh_process(cpu_devices_value: int, xla_flags: str = "") -> dict:
  code = textwrap.dedent(f"""
      import json, os, jax
      from ldae_jax import config as cfglib
      from ldae_jax.parallel import cpu_devices
      c = cfglib.default_config()
      for name in cpu_devices.TRAINING_STAGES:
        c.train[name].batch_size, c.train[name].grad_accum = 12, 1
      c.mesh.cpu_devices = {cpu_devices_value}
      n = cpu_devices.configure(c)
      print(json.dumps({{"set": n, "devices": jax.device_count(), "cores": cpu_devices.available_cores(),
                        "xla_flags": os.environ.get("XLA_FLAGS", "")}}))
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": xla_flags}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_sets_the_backend_device_count_before_start():
  got = _devices_in_fresh_process(3)
  assert {k: got[k] for k in ("set", "devices")} == {"set": 3, "devices": 3}
  # the backend started with the raised collective limits (an unknown XLA flag would have aborted it)
  assert all(f in got["xla_flags"].split() for f in cpu_devices.COLLECTIVE_TIMEOUT_FLAGS)
  auto = _devices_in_fresh_process(0)
  expected = cpu_devices.resolve(0, cores=auto["cores"], batches=[12])
  assert auto["set"] == expected and auto["devices"] == expected


def test_collective_timeouts_keep_the_users_flags():
  env = {"XLA_FLAGS": "--xla_cpu_collective_call_terminate_timeout_seconds=5 --xla_dump_to=/tmp/d"}
  cpu_devices.add_collective_timeouts(env)
  flags = env["XLA_FLAGS"].split()
  assert flags[:2] == ["--xla_cpu_collective_call_terminate_timeout_seconds=5", "--xla_dump_to=/tmp/d"]
  assert sum("terminate_timeout" in f for f in flags) == 1 and any("warn_stuck" in f for f in flags)
  empty = {}
  cpu_devices.add_collective_timeouts(empty)
  assert empty["XLA_FLAGS"].split() == list(cpu_devices.COLLECTIVE_TIMEOUT_FLAGS)


def test_configure_keeps_the_users_xla_flag():
  got = _devices_in_fresh_process(3, xla_flags="--xla_force_host_platform_device_count=5")
  assert got["set"] is None and got["devices"] == 5


def test_map_batched_splits_each_batch_over_the_cpu_devices():
  """Evaluation's per-batch helper runs data-parallel over 2 CPU devices and returns what 1 device returns."""
  code = textwrap.dedent("""
      import json, jax
      jax.config.update("jax_num_cpu_devices", 2)
      import numpy as np
      from ldae_jax.evaluation.reconstruction import map_batched
      seen = []
      @jax.jit
      def fn(w, batch):
        return {"y": batch["x"] @ w, "n": jax.numpy.sum(batch["x"], axis=1)}
      def spy(w, batch):
        seen.append(len(batch["x"].sharding.device_set))
        return fn(w, batch)
      x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
      w = np.arange(6, dtype=np.float32).reshape(3, 2)
      got = map_batched(spy, {"x": x}, 4, w)
      odd = map_batched(fn, {"x": x}, 3, w)  # 3 rows do not split over 2 devices: one device
      print(json.dumps({"devices": seen, "close": bool(np.allclose(got["y"], x @ w, atol=1e-5)),
                        "rows": len(got["y"]), "odd_close": bool(np.allclose(odd["n"], x.sum(1), atol=1e-5))}))
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"devices": [2, 2, 2], "close": True, "rows": 10, "odd_close": True}
