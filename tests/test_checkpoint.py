"""Checkpoints: a TrainState written on 8 simulated devices (FSDP-sharded) restores on 1 device, with the
grain iterator position; keep-last-N. Each device count runs in its own subprocess (XLA_FLAGS is read at
backend start); the data position is grain's own per-process file, and each of 2 processes resumes its own.
A later stage's read of the EMA weights alone (`restore_ema_weights`): exactly the newest EMA, the parameters
without one, and errors that name the path and the fix. Asynchronous saves killed mid-write or
overlapped with a donating step restore exactly what was saved."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, grain, numpy as np, jax, jax.numpy as jnp
from ldae_jax.config import default_config
from ldae_jax.parallel import mesh as pmesh
from ldae_jax.training import state as st
from ldae_jax.training.checkpoint import Checkpointer
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == n, jax.devices()
c = default_config(); c.mesh.data = 1; c.mesh.fsdp = -1; c.mesh.param_sharding = "fsdp"; c.mesh.fsdp_min_size = 16
rng = np.random.default_rng(0)
params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4, 16)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}}
tx = st.make_optimizer(c.train.ldm)
state = st.create_state(params, {"bn": {"mean": jnp.zeros((16,))}}, tx, seed=3, with_ema=True)
mesh = pmesh.make_mesh(c.mesh)
sh = pmesh.shardings_from_config(state, mesh, c.mesh)
state = pmesh.shard_like(state, sh)
ck = Checkpointer(path, keep=2)
it = iter(grain.MapDataset.range(1000).to_iter_dataset())
if mode == "save":
  assert len(state.params["conv"]["kernel"].sharding.device_set) == n
  for s in (1, 2, 3):
    state = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
    for _ in range(10):
      next(it)
    ck.save(s, state, it)
  np.save(path + "_expected.npy", np.asarray(state.params["conv"]["kernel"]))
else:
  restored = ck.restore(state, iterator=it)
  assert ck.all_steps() == [2, 3], ck.all_steps()
  position = int(next(it))
  assert int(restored.step) == 3 and position == 30, (restored.step, position)
  np.testing.assert_array_equal(np.asarray(restored.params["conv"]["kernel"]), np.load(path + "_expected.npy"))
  np.testing.assert_array_equal(np.asarray(restored.ema["conv"]["kernel"]), np.asarray(params["conv"]["kernel"]))
  assert restored.params["conv"]["kernel"].sharding == sh.params["conv"]["kernel"]
  print("RESTORED_OK")
ck.close()
"""


def _run(mode: str, path: str, n: int) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0 "  # as conftest.FAST_COMPILE_FLAG
         f"--xla_force_host_platform_device_count={n}",
         "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode, path, str(n)], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  path = str(tmp_path / "ck")
  _run("save", path, 8)
  assert "RESTORED_OK" in _run("restore", path, 1)


KILL_SCRIPT = r"""
import os, sys, grain, numpy as np, jax, jax.numpy as jnp
from ldae_jax.training.checkpoint import Checkpointer
path, mode = sys.argv[1], sys.argv[2]
ck = Checkpointer(path, keep=5)
def at(n):  # a grain iterator at position n
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(n):
    next(it)
  return it
big = lambda v: {"w": jnp.full((64, 1024, 256), v, jnp.float32), "step": jnp.int32(v)}  # 64 MiB
ck.save(1, big(1.0), at(1))
if mode == "donate":  # the step after a save donates the state's buffers while orbax writes them
  state = big(1.0)
  ck.save(2, state, at(2))
  state = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7, s), donate_argnums=0)(state)
  jax.block_until_ready(state)
  ck.close()
  print("DONATED_OK", flush=True)
  sys.exit(0)
ck.wait()
ck.save(2, big(2.0), at(2))
print("SAVE_STARTED", flush=True)
os._exit(9)  # killed mid-save: no wait, no close
"""


def _kill_run(path, mode):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path), mode], env=env, capture_output=True,
                        text=True, timeout=300)


def test_a_kill_during_an_async_save_leaves_only_checkpoints_that_restore_right(tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  out = _kill_run(tmp_path / "ck", "kill")
  assert out.returncode == 9 and "SAVE_STARTED" in out.stdout, out.stderr[-3000:]
  ck = Checkpointer(tmp_path / "ck", asynchronous=False)
  assert ck.latest_step() in (1, 2)  # step 2 counts only if it was committed before the kill
  for step in ck.all_steps():
    target = {"w": jax.ShapeDtypeStruct((64, 1024, 256), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    state = ck.restore(target, step, iterator=it)
    assert int(state["step"]) == step and int(next(it)) == step
    assert float(np.min(state["w"])) == float(np.max(state["w"])) == float(step)
  ck.close()
  out = _kill_run(tmp_path / "donate", "donate")
  assert out.returncode == 0 and "DONATED_OK" in out.stdout, out.stderr[-3000:]
  ck = Checkpointer(tmp_path / "donate", asynchronous=False)
  assert ck.all_steps() == [1, 2]
  state = ck.restore({"w": jax.ShapeDtypeStruct((64, 1024, 256), np.float32),
                      "step": jax.ShapeDtypeStruct((), np.int32)}, 2)
  assert float(np.max(np.abs(np.asarray(state["w"]) - 1.0))) == 0.0  # the saved values, not the donated step's
  ck.close()


def test_a_missing_data_position_is_an_error_naming_what_is_there(tmp_path, monkeypatch):
  import grain  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  target = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  ck = Checkpointer(tmp_path / "no_data", asynchronous=False)
  ck.save(1, {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"no data position for process 0 of 1 \(found: none\)"):
    ck.restore(target, iterator=iter(grain.MapDataset.range(5).to_iter_dataset()))
  assert float(ck.restore(target)["w"][0]) == 1.0  # the weights alone still restore
  ck.close()
  ck = Checkpointer(tmp_path / "one_process", asynchronous=False)
  it = iter(grain.MapDataset.range(5).to_iter_dataset())
  next(it)
  ck.save(1, {"w": jnp.ones(3)}, it)
  assert (tmp_path / "one_process/1/data/process_0-of-1.json").exists()  # grain's own per-process file
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # resumed by a job with another process count
  with pytest.raises(ValueError, match=r"process 0 of 2 \(found: process_0-of-1.json\).*process count"):
    ck.restore(target, iterator=iter(grain.MapDataset.range(5).to_iter_dataset()))
  ck.close()


def test_each_process_resumes_its_own_data_position(tmp_path):
  """2 processes save one checkpoint with iterators at different positions; each restores its own (the orbax
  JSON item used before was written by process 0 alone: every process resumed at process 0's position, which
  was harmless only while all positions were equal)."""
  sys.path.insert(0, str(pathlib.Path(__file__).parent / "multiprocess"))
  import grain  # pylint: disable=import-outside-toplevel
  import harness  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  script = pathlib.Path(__file__).parent / "multiprocess" / "checkpoint_peer.py"
  for mode in ("save", "restore"):
    runs = harness.run_script(script, [[f"--dir={tmp_path / 'ck'}", f"--mode={mode}"]] * 2, timeout_s=180)
    assert all(rc == 0 for rc, _, _ in runs), "\n".join(out[-2000:] for _, out, _ in runs)
  assert [l for _, out, _ in runs for l in out.splitlines() if l.startswith("POSITION")] == ["POSITION 3",
                                                                                          "POSITION 7"]
  assert sorted(p.name for p in (tmp_path / "ck/1/data").glob("process_*")) == ["process_0-of-2.json",
                                                                       "process_1-of-2.json"]
  ck = Checkpointer(tmp_path / "ck", asynchronous=False)  # one process resuming a 2-process run's stream
  with pytest.raises(ValueError, match=r"process 0 of 1 \(found: process_0-of-2.json, process_1-of-2.json\)"):
    ck.restore({"w": jax.ShapeDtypeStruct((4,), np.float32)},
               iterator=iter(grain.MapDataset.range(100).to_iter_dataset()))
  ck.close()


# ---------------------------------------------------------------------------------------- restore_ema_weights
def _save_state(directory, *, with_ema: bool, steps=(1, 2)):
  """A two-network TrainState (params 'g' and 'd', a 'g' statistic) saved at `steps`; the EMA is params + 10 *
  step, so parameters, EMA and steps all differ. Returns the last state saved."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ldae_jax.config import default_config  # pylint: disable=import-outside-toplevel
  from ldae_jax.training import state as st  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  params = {"g": {"blocks": {0: {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}},
                  "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "d": {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  rest = {"g": {"stat": jnp.full((4,), 7.0)}, "d": {"bn": jnp.ones((5,))}}
  tx = st.make_optimizer(default_config().train.ldm)
  state = st.create_state(params, rest, {"g": tx, "d": tx}, seed=0, with_ema=with_ema)
  ck = Checkpointer(directory)
  for s in steps:
    state = state.replace(step=jnp.int32(s))
    if with_ema:
      state = state.replace(ema=jax.tree.map(lambda p: p + 10.0 * s, params))
    ck.save(s, state)
  ck.close()
  return state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _restore(directory, params, rest=None, **kw):
  from ldae_jax.training.checkpoint import restore_ema_weights  # pylint: disable=import-outside-toplevel
  return restore_ema_weights(directory, params, rest, what="test weights", missing_fix="train it first",
                             mismatch_fix="use the config it was trained with", **kw)


def test_restore_ema_weights_reads_exactly_the_newest_ema(tmp_path):
  saved = _save_state(tmp_path / "ck", with_ema=True)
  w = _restore(tmp_path / "ck", {"g": _abstract(saved.params["g"])}, {"g": _abstract(saved.rest["g"])})
  assert w.step == 2 and w.from_ema
  assert jax.tree.structure(w.params) == jax.tree.structure({"g": saved.ema["g"]})  # no discriminator
  for got, want in zip(jax.tree.leaves(w.params), jax.tree.leaves({"g": saved.ema["g"]})):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(w.rest["g"]["stat"]), np.full((4,), 7.0, np.float32))
  leaf = w.params["g"]["blocks"][0]["w"]
  # Placed as a freshly built model's arrays are: on the default device, free to move into any sharding.
  assert isinstance(leaf, jax.Array) and not leaf.committed


def test_restore_ema_weights_from_a_relative_directory(tmp_path, monkeypatch):
  # The quickstart's default workdir is relative (runs/quickstart); orbax itself refuses relative paths.
  saved = _save_state(tmp_path / "ck", with_ema=True)
  monkeypatch.chdir(tmp_path)
  w = _restore("ck", {"d": _abstract(saved.params["d"])})
  assert w.step == 2
  np.testing.assert_array_equal(np.asarray(w.params["d"]["w"]), np.asarray(saved.ema["d"]["w"]))


def test_restore_ema_weights_without_ema_reads_the_parameters(tmp_path):
  saved = _save_state(tmp_path / "ck", with_ema=False)
  w = _restore(tmp_path / "ck", _abstract(saved.params))
  assert not w.from_ema and w.rest == {}
  np.testing.assert_array_equal(np.asarray(w.params["d"]["w"]), np.asarray(saved.params["d"]["w"]))


def test_restore_ema_weights_into_a_given_sharding(tmp_path):
  saved = _save_state(tmp_path / "ck", with_ema=True)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
  w = _restore(tmp_path / "ck", {"d": _abstract(saved.params["d"])}, sharding=sharding)
  assert w.params["d"]["w"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(w.params["d"]["w"]), np.asarray(saved.ema["d"]["w"]))


def test_restore_ema_weights_errors_name_path_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"test weights not found: .*nowhere has no checkpoint; train it first\."):
    _restore(tmp_path / "nowhere", {})
  saved = _save_state(tmp_path / "ck", with_ema=True)
  wrong = _abstract(saved.params)
  wrong["g"]["blocks"][0]["w"] = jax.ShapeDtypeStruct((3, 5), np.float32)
  with pytest.raises(ValueError, match=r"test weights in .*ck does not match this run's config \(checkpoint 2: "
                                       r"ema/g/blocks/0/w: checkpoint \(3, 4\), model \(3, 5\)\); use the config"):
    _restore(tmp_path / "ck", wrong)
  # An array the checkpoint lacks is an error too (a partial restore would hand back the target unread).
  with pytest.raises(ValueError, match=r"ema/g/extra not in the checkpoint"):
    _restore(tmp_path / "ck", {"g": {"extra": jax.ShapeDtypeStruct((2,), np.float32)}})
