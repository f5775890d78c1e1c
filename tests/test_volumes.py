"""training/volumes: the run's cohort is the one its config asks for."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest

from ldae_jax.config import default_config
from ldae_jax.data import manifest as mf
from ldae_jax.training import volumes
from ldae_jax.workdir import Workdir


def small_config(subjects=2):
  c = default_config()
  c.data.image_shape = (32, 40, 32)
  c.data.spacing_mm = 6.0
  c.data.synthetic.subjects = subjects
  return c


def test_synthetic_cohort_is_generated_once_and_a_different_config_is_refused(tmp_path, capsys):
  path = volumes.manifest_path(small_config(), tmp_path)
  assert path == tmp_path / "cohort" / "manifest.csv" and "generating" in capsys.readouterr().out
  meta_path = tmp_path / "cohort" / "cohort.json"
  stamp = path.stat().st_mtime_ns
  assert volumes.manifest_path(small_config(), tmp_path) == path  # reused, not rewritten
  assert path.stat().st_mtime_ns == stamp and "generating" not in capsys.readouterr().out

  with pytest.raises(ValueError, match=r"subjects: cohort 2, config 3.*new --workdir") as err:
    volumes.manifest_path(small_config(3), tmp_path)
  assert str(tmp_path / "cohort") in str(err.value)
  c = small_config()
  c.data.synthetic.nuisance_scale = 0.25
  with pytest.raises(ValueError, match="nuisance_scale: cohort 1.0, config 0.25"):
    volumes.manifest_path(c, tmp_path)

  meta = json.loads(meta_path.read_text())
  del meta["nuisance_scale"]  # a cohort written before the option existed had the default
  meta_path.write_text(json.dumps(meta))
  assert volumes.manifest_path(small_config(), tmp_path) == path
  meta_path.write_text("{not json")
  with pytest.raises(ValueError, match="unreadable"):
    volumes.manifest_path(small_config(), tmp_path)

  meta_path.unlink()  # an interrupted generation (cohort.json is written last) is regenerated
  assert volumes.manifest_path(small_config(), tmp_path) == path
  assert meta_path.is_file() and "generating" in capsys.readouterr().out


def test_cohort_worker_count_is_passed_on_and_not_part_of_the_cohort(tmp_path, monkeypatch):
  from ldae_jax.data import synthetic
  seen = []
  real = synthetic.generate_cohort
  monkeypatch.setattr(synthetic, "generate_cohort", lambda out, **kw: seen.append(kw["workers"]) or real(out, **kw))
  c = small_config()
  c.data.synthetic.workers = 2
  path = volumes.manifest_path(c, tmp_path)
  assert seen == [2] and "workers" not in json.loads((path.parent / "cohort.json").read_text())
  c.data.synthetic.workers = 1  # the same files for any count: reused, not refused as a different cohort
  assert volumes.manifest_path(c, tmp_path) == path and seen == [2]


def test_num_workers_reads_in_worker_processes_with_the_same_batches(tmp_path, monkeypatch):
  c = small_config(subjects=2)
  records = mf.read_manifest(volumes.manifest_path(c, tmp_path))
  monkeypatch.setattr(volumes, "PRELOAD_LIMIT_BYTES", 0)  # read from the files, as a large cohort does
  seen = {}
  for workers in (0, 1):
    c.data.num_workers = workers
    it = volumes.make_iterator(records, c, global_batch_size=2, seed=0)
    seen[workers] = [next(it)["image"] for _ in range(2)]
    assert bool(multiprocessing.active_children()) == (workers > 0)
    getattr(it, "close", lambda: None)()
  for a, b in zip(seen[0], seen[1]):
    np.testing.assert_array_equal(a, b)


def test_split_is_recorded_once_and_a_changed_manifest_or_seed_is_refused(tmp_path):
  c = small_config(subjects=6)
  first = volumes.splits(c, tmp_path)
  recorded = json.loads(Workdir(tmp_path).splits_json.read_text())
  assert {s: sorted(t) for s, t in recorded.items()} == {
      s: sorted({r.subject for r in recs}) for s, recs in first.items()}
  assert volumes.splits(c, tmp_path) == first  # the same manifest and config: accepted

  # The user's copy of the manifest, one test subject's rows dropped: named, with the fix.
  cohort = tmp_path / "cohort"
  lines = (cohort / "manifest.csv").read_text().splitlines()
  gone = first["test"][0].subject
  (cohort / "edited.csv").write_text("\n".join(l for l in lines if not l.startswith(gone + ",")) + "\n")
  c.data.manifest = str(cohort / "edited.csv")
  with pytest.raises(ValueError, match=rf"{gone}: was in test, no longer in the manifest[\s\S]*new --workdir"):
    volumes.splits(c, tmp_path)
  c.data.manifest = ""
  c.data.split_seed = 7  # another split of the same subjects
  with pytest.raises(ValueError, match=r"moved from (train|val|test) to (train|val|test)"):
    volumes.splits(c, tmp_path)
