"""Latent shards: bit-exact round trip, atomic writes, disjoint per-process reading, resumable iterators,
clear errors for damaged folders, and global jax.Arrays."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ldae_jax.data import shards as S

N = 10
LATENT = (2, 3, 2, 3)
IMAGE = (4, 6, 4, 1)


def _records(n: int = N, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    out.append(dict(
        mu=rng.normal(size=LATENT).astype(np.float32),
        logvar=rng.normal(size=LATENT).astype(np.float32),
        image=S.quantize_image(rng.uniform(size=IMAGE)),  # quantised before writing: exact round trip
        subject=f"sub-{i // 2:03d}", scan_id=f"sub-{i // 2:03d}_ses-M{12 * (i % 2):02d}",
        session_months=12 * (i % 2), diagnosis=("AD", "CN", "MCI")[i % 3], label=i % 3,
        age=float("nan") if i == 3 else 60.0 + 1.7 * i))
  return out


def _write(out_dir, records, **kw):
  kw.setdefault("records_per_shard", 4)
  kw.setdefault("metadata", {"scale_factor": 0.873, "source_checkpoint": "/ckpt/autoencoder/1000"})
  with S.ShardWriter(out_dir, **kw) as w:
    for r in records:
      w.write(r)
  return w


@pytest.fixture(scope="session")
def written(tmp_path_factory):
  d = tmp_path_factory.mktemp("shards") / "shards"
  recs = _records()
  _write(d, recs)
  return d, recs


def _bits(a) -> bytes:
  a = np.asarray(a)
  return a.dtype.str.encode() + repr(a.shape).encode() + a.tobytes()


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_round_trip_is_bit_exact(written):
  d, recs = written
  got = S.read_all(d, fields=None)
  assert list(got) == list(S.ALL_FIELDS)
  for f in ("mu", "logvar", "image"):
    assert _bits(got[f]) == _bits(np.stack([r[f] for r in recs]))
  assert got["scan_id"].tolist() == [r["scan_id"] for r in recs]
  assert got["subject"].tolist() == [r["subject"] for r in recs]
  assert got["diagnosis"].tolist() == [r["diagnosis"] for r in recs]
  assert _bits(got["label"]) == _bits(np.array([r["label"] for r in recs], np.int32))
  assert _bits(got["session_months"]) == _bits(np.array([r["session_months"] for r in recs], np.int32))
  assert _bits(got["age"]) == _bits(np.array([r["age"] for r in recs], np.float32))  # nan included
  # Random access gives the same record as the bulk read.
  ds = S.LatentDataset(d, fields=("mu", "image", "scan_id"))
  assert _bits(ds[7]["mu"]) == _bits(recs[7]["mu"]) and ds[7]["scan_id"] == recs[7]["scan_id"]


def test_metadata_describes_the_shards(written):
  d, recs = written
  meta = S.verify(d)
  assert meta == S.read_metadata(d)
  assert meta["count"] == N and meta["format_version"] == S.FORMAT_VERSION
  assert [s["records"] for s in meta["shards"]] == [4, 4, 2]
  assert sorted(p.name for p in d.iterdir()) == sorted([s["file"] for s in meta["shards"]] + ["metadata.json"])
  assert meta["fields"]["mu"] == {"shape": list(LATENT), "dtype": "float32"}
  assert meta["fields"]["image"]["stored_dtype"] == "uint16" and meta["image_encoding"] == "uint16"
  assert meta["scale_factor"] == 0.873 and meta["source_checkpoint"] == "/ckpt/autoencoder/1000"
  mu = np.stack([r["mu"] for r in recs]).astype(np.float64)
  np.testing.assert_allclose(meta["stats"]["mu"]["std"], mu.std(), rtol=1e-10)
  np.testing.assert_allclose(meta["stats"]["mu"]["mean"], mu.mean(), rtol=1e-10)
  assert meta["compression"] == "zstd:1"  # images stored -> compressed


def test_image_quantisation_is_idempotent_and_bounded():
  x = np.random.default_rng(1).uniform(size=(3, 5, 7, 1)).astype(np.float32)
  for enc, step in (("uint16", 0.5 / 65535), ("float16", 2.0**-12), ("float32", 0.0)):
    q = S.quantize_image(x, enc)
    assert q.dtype == np.float32 and np.abs(q - x).max() <= step * 1.0001
    assert _bits(S.quantize_image(q, enc)) == _bits(q)
  with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
    S.quantize_image(x + 0.5)


@pytest.mark.parametrize("enc", ["float16", "float32"])
def test_other_image_encodings_round_trip(tmp_path, enc):
  recs = _records(3, seed=2)
  raw = np.random.default_rng(3).uniform(-2, 2, size=IMAGE).astype(np.float32)
  for r in recs:
    r["image"] = S.quantize_image(raw, enc) if enc == "float16" else raw
  _write(tmp_path / "s", recs, image_encoding=enc, compression="uncompressed")
  got = S.read_all(tmp_path / "s", fields=("image",))
  assert _bits(got["image"]) == _bits(np.stack([r["image"] for r in recs]))


def test_write_is_atomic_and_replaces_only_when_complete(tmp_path):
  d = tmp_path / "shards"
  _write(d, _records(4))
  before = S.read_all(d)
  with pytest.raises(RuntimeError, match="encoder blew up"):
    with S.ShardWriter(d, records_per_shard=2, metadata={}) as w:
      for r in _records(6, seed=5)[:3]:
        w.write(r)
      raise RuntimeError("encoder blew up")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp or half-written folder left
  after = S.read_all(d)
  assert all(_bits(before[k]) == _bits(after[k]) for k in ("mu", "logvar", "image"))
  # A complete second write replaces the folder.
  _write(d, _records(6, seed=5), records_per_shard=2)
  assert S.verify(d)["count"] == 6 and len(S.read_metadata(d)["shards"]) == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(mean=r["mu"]), "unknown fields \\['mean'\\]"),
    (lambda r: r.pop("scan_id"), "missing required field 'scan_id'"),
    (lambda r: r.update(mu=r["mu"][None]), "expected \\(X, Y, Z, C\\) without a batch axis"),
    (lambda r: r.update(logvar=r["logvar"][:1]), "shapes differ"),
    (lambda r: r.update(label="AD"), "'label'='AD' must be an int32"),
    (lambda r: r.update(image=r["image"] * 3), "outside \\[0, 1\\]"),
    (lambda r: r.update(scan_id="sub-000_ses-M00"), "duplicate scan_id"),
])
def test_writer_rejects_bad_records(tmp_path, mutate, match):
  recs = _records(2)
  mutate(recs[1])
  with pytest.raises(ValueError, match=match):
    _write(tmp_path / "s", recs)
  assert not any(tmp_path.iterdir())


def test_writer_rejects_bad_metadata_and_empty_datasets(tmp_path):
  with pytest.raises(ValueError, match="written by the writer itself"):
    S.ShardWriter(tmp_path / "s", metadata={"count": 3})
  with pytest.raises(ValueError, match="JSON-serialisable"):
    S.ShardWriter(tmp_path / "s", metadata={"scale_factor": float("nan")})
  with pytest.raises(ValueError, match="no records were written"):
    _write(tmp_path / "s", [])
  assert not any(tmp_path.iterdir())


def _scan_ids(batches):
  return [s for b in batches for s in b["scan_id"].tolist()]


def test_merge_joins_parts_in_order_with_the_statistics_of_one_folder(tmp_path, written):
  one, recs = written
  parts = [tmp_path / f"part{i}" for i in range(3)]
  for part, block in zip(parts, (recs[:3], recs[3:4], recs[4:])):
    _write(part, block, metadata={"scale_factor": None, "source_checkpoint": "/ckpt/autoencoder/1000"})
  meta = S.merge(parts, tmp_path / "merged", metadata={"scale_factor": 0.873})
  assert not any(p.exists() for p in parts)  # moved, then removed
  assert S.verify(tmp_path / "merged")["count"] == N and meta["scale_factor"] == 0.873
  a, b = S.read_all(one), S.read_all(tmp_path / "merged")
  assert all(_bits(x) == _bits(y) for k in a for x, y in zip(a[k], b[k]))
  ref = S.read_metadata(one)["stats"]
  for k in ("mu", "logvar"):
    assert meta["stats"][k]["count"] == ref[k]["count"]
    np.testing.assert_allclose([meta["stats"][k]["mean"], meta["stats"][k]["std"]],
                               [ref[k]["mean"], ref[k]["std"]], rtol=1e-9, atol=1e-12)
  assert S.merged_stats([tmp_path / "merged"]) == meta["stats"]


def test_merge_refuses_parts_of_different_runs_and_writer_keys(tmp_path):
  recs = _records()
  _write(tmp_path / "a", recs[:5])
  _write(tmp_path / "b", recs[5:], metadata={"scale_factor": 0.873, "source_checkpoint": "/ckpt/other"})
  with pytest.raises(S.ShardError, match=r"differs .* in \['metadata'\]"):
    S.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
  with pytest.raises(ValueError, match="written by the writer itself"):
    S.merge([tmp_path / "a"], tmp_path / "m", metadata={"count": 3})
  assert (tmp_path / "a").is_dir() and not (tmp_path / "m").exists()  # a refused merge moves nothing
  with pytest.raises(ValueError, match="no parts"):
    S.merge([], tmp_path / "m")


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_read_disjoint_parts_whose_union_is_the_dataset(written, shuffle):
  d, recs = written
  kw = dict(global_batch_size=4, seed=7, shuffle=shuffle, repeat=False, fields=("scan_id",))
  parts = [_scan_ids(S.make_iterator(d, drop_remainder=False, process_index=p, process_count=2, **kw))
           for p in range(2)]
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(r["scan_id"] for r in recs)
  # Each global batch is split between the processes: process p's k-th batch is its half of the
  # single-process k-th global batch (same seed -> same global order).
  single = list(S.make_iterator(d, drop_remainder=True, process_index=0, process_count=1, **kw))
  halves = [list(S.make_iterator(d, drop_remainder=True, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert len(single) == len(halves[0]) == len(halves[1]) == N // 4  # equal counts: no host waits forever
  for k, g in enumerate(single):
    assert sorted(halves[0][k]["scan_id"].tolist() + halves[1][k]["scan_id"].tolist()) == sorted(
        g["scan_id"].tolist())
  if shuffle:
    assert _scan_ids(single) != [r["scan_id"] for r in recs][:8]
  # The same holds for the infinite stream, across epoch boundaries.
  kw.update(repeat=True, drop_remainder=True)
  its = [S.make_iterator(d, process_index=p, process_count=2, **kw) for p in range(2)]
  for g in _take(S.make_iterator(d, process_index=0, process_count=1, **kw), 6):
    assert sorted(next(its[0])["scan_id"].tolist() + next(its[1])["scan_id"].tolist()) == sorted(
        g["scan_id"].tolist())


def test_shuffle_is_seeded_and_changes_each_epoch(written):
  d, _ = written
  kw = dict(global_batch_size=5, process_index=0, process_count=1, fields=("scan_id",))
  a = _scan_ids(_take(S.make_iterator(d, seed=3, **kw), 4))
  assert a == _scan_ids(_take(S.make_iterator(d, seed=3, **kw), 4))
  assert a != _scan_ids(_take(S.make_iterator(d, seed=4, **kw), 4))
  assert sorted(a[:N]) == sorted(a[N:]) and a[:N] != a[N:]  # every epoch is a full, new permutation


def test_iterator_state_resumes_mid_epoch_json_and_orbax(written, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  d, _ = written
  kw = dict(global_batch_size=4, seed=11, fields=("mu", "scan_id"), process_index=0, process_count=1)
  it = S.make_iterator(d, **kw)
  _take(it, 3)  # 12 records: past the first epoch boundary (N = 10), mid-way through the second
  state = json.dumps(it.get_state())
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 4)

  resumed_json = S.make_iterator(d, **kw)
  resumed_json.set_state(json.loads(state))
  fresh = S.make_iterator(d, **kw)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for resumed in (resumed_json, fresh):
    got = _take(resumed, 4)
    for g, e in zip(got, expected):
      assert _bits(g["mu"]) == _bits(e["mu"]) and g["scan_id"].tolist() == e["scan_id"].tolist()


def test_worker_processes_give_the_same_batches(written):
  d, _ = written
  kw = dict(global_batch_size=2, seed=5, fields=("mu", "scan_id"), process_index=0, process_count=1)
  ref = _take(S.make_iterator(d, **kw), 6)
  it = S.make_iterator(d, num_workers=2, **kw)
  try:
    got = _take(it, 6)
  finally:
    it.close()
  assert [_bits(b["mu"]) for b in got] == [_bits(b["mu"]) for b in ref]


def test_damaged_shards_give_clear_errors(written, tmp_path):
  src, _ = written
  d = tmp_path / "shards"
  shutil.copytree(src, d)
  shard = d / S.read_metadata(d)["shards"][1]["file"]
  data = shard.read_bytes()
  # Same size, one flipped byte: only the checksum sees it.
  shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
  with pytest.raises(S.ShardError, match=f"{shard.name} is corrupted.*--config.stage=latents"):
    S.verify(d)
  # Truncated: caught before grain touches the file, by the reader and by read_all.
  shard.write_bytes(data[: len(data) // 2])
  for call in (lambda: S.make_iterator(d, global_batch_size=2, seed=0, process_index=0, process_count=1),
               lambda: S.read_all(d, verify_checksums=False), lambda: S.verify(d)):
    with pytest.raises(S.ShardError, match=f"{shard.name} is truncated.*--config.stage=latents"):
      call()
  shard.unlink()
  with pytest.raises(S.ShardError, match=f"{shard.name} is missing"):
    S.LatentDataset(d)
  (d / "metadata.json").unlink()
  with pytest.raises(S.ShardError, match="metadata.json not found.*--config.stage=latents"):
    S.read_metadata(d)


def test_reader_rejects_bad_arguments(written):
  d, _ = written
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    S.make_iterator(d, global_batch_size=3, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="fewer than global_batch_size=16"):
    S.make_iterator(d, global_batch_size=16, seed=0, process_index=0, process_count=1)
  with pytest.raises(S.ShardError, match="'weights'.*not stored"):
    S.LatentDataset(d, fields=("mu", "weights"))


def test_global_batch_from_local_builds_sharded_arrays(written):
  import jax
  from ldae_jax.parallel import mesh as pmesh
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  d, _ = written
  batch = next(S.make_iterator(d, global_batch_size=4, seed=0, fields=("mu", "label", "scan_id")))
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  out = pmesh.global_batch_from_local(batch, sharding)
  assert isinstance(out["mu"], jax.Array) and out["mu"].sharding == sharding
  assert _bits(np.asarray(out["mu"])) == _bits(batch["mu"])
  assert _bits(np.asarray(out["label"])) == _bits(batch["label"])
  assert out["scan_id"].tolist() == batch["scan_id"].tolist()  # strings stay process-local numpy


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    pid, port, shard_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ldae_jax.data import shards as S
    from ldae_jax.parallel import mesh as pmesh
    it = S.make_iterator(shard_dir, global_batch_size=4, seed=1, repeat=False, fields=("mu", "scan_id"))
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    ids, shapes = [], []
    for b in it:
      g = pmesh.global_batch_from_local(b, sharding)
      shapes.append(list(g["mu"].shape))
      ids += b["scan_id"].tolist()
    json.dump({"ids": ids, "shapes": shapes, "pc": jax.process_count()}, open(out, "w"))
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_real_two_process_jax_distributed_run(written, tmp_path):
  d, recs = written
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), str(d), str(tmp_path / f"{p}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in range(2)]
  logs = [p.communicate(timeout=120)[0].decode()[-2000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  res = [json.loads((tmp_path / f"{p}.json").read_text()) for p in range(2)]
  assert res[0]["pc"] == res[1]["pc"] == 2
  assert res[0]["shapes"] == res[1]["shapes"] == [[4, *LATENT]] * (N // 4)  # global arrays span both hosts
  assert not set(res[0]["ids"]) & set(res[1]["ids"])
  assert len(res[0]["ids"]) == len(res[1]["ids"]) == 4
  assert set(res[0]["ids"]) | set(res[1]["ids"]) <= {r["scan_id"] for r in recs}
