"""training/pipeline: every stage in order on a tiny synthetic cohort, skipping completed stages on a rerun,
and the latents stage's per-process parts merged into the records one process writes."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from ldae_jax.config import validate
from ldae_jax.data import shards
from ldae_jax.training import latents_stage, loop, pipeline
from ldae_jax import workdir as layout
from ldae_jax.workdir import Workdir
from test_training import tiny_config


def tiny_pipeline_config():
  c = tiny_config()  # test_training's tiny networks, on the smallest grid the synthetic brain fits at 6 mm
  c.data.image_shape = (32, 40, 32)
  c.data.spacing_mm = 6.0
  c.data.synthetic.subjects = 6
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.autoencoder.channels = (4, 4, 4)
  c.autoencoder.num_res_blocks = 1
  c.discriminator.num_layers = 1
  c.discriminator.channels = 4
  c.encoder.seq_len = 32
  c.encoder.patch_size = 2
  for s, batch in ((c.train.autoencoder, 2), (c.train.ldm, 4), (c.train.representation, 2)):
    s.batch_size, s.grad_accum, s.steps, s.log_every, s.checkpoint_every = batch, 1, 2, 1, 2
  c.train.latents_batch_size = 8
  c.stage = "all"
  validate(c)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("pipeline")
  out = pipeline.run(tiny_pipeline_config(), wd)
  return wd, out


def test_all_stages_run_in_order_and_a_rerun_skips_them(workdir, capsys):
  wd, out = workdir
  assert list(out) == list(pipeline.ORDER)
  for stage in pipeline.ORDER:
    assert loop.is_complete(Workdir(wd).stage_dir(stage)), stage
  # The resolved config and the subject split are recorded beside the stages.
  assert json.loads(Workdir(wd).config_json.read_text())["data"]["image_shape"] == [32, 40, 32]
  assert sum(len(v) for v in json.loads(Workdir(wd).splits_json.read_text()).values()) == 6  # subjects
  for stage in layout.TRAINED_STAGES:  # each wrote where the layout says
    assert out[stage]["steps"] == 2 and np.isfinite(out[stage]["final_loss"]), stage
    assert Workdir(wd).metrics(stage).is_file() and (Workdir(wd).checkpoints(stage) / "2").is_dir(), stage
  # Latents: one record per scan of each split, images stored for stage 3, and the scale factor is
  # 1 / std of every element of the train split's mu.
  counts = out["latents"]["scans"]
  assert sum(counts.values()) == len(Workdir(wd).cohort_manifest.read_text().splitlines()) - 1
  train = shards.read_all(Workdir(wd).shards("train"), fields=("mu", "image"))
  assert len(train["mu"]) == counts["train"] and train["image"].shape[1:] == (32, 40, 32, 1)
  scale = out["latents"]["scale_factor"]
  np.testing.assert_allclose(scale, 1.0 / train["mu"].std(), rtol=1e-4)
  assert shards.read_metadata(Workdir(wd).shards("test"))["scale_factor"] == scale
  capsys.readouterr()
  again = pipeline.run(tiny_pipeline_config(), wd)
  printed = capsys.readouterr().out
  assert all(f"[{s}] already complete" in printed for s in pipeline.ORDER)
  assert again["latents"] == out["latents"]


def _copy_without_latents(src, dst):
  import shutil  # pylint: disable=import-outside-toplevel
  for name in ("autoencoder", "cohort"):
    shutil.copytree(src / name, dst / name)
  for name in ("splits.json", "config.json"):
    shutil.copy(src / name, dst / name)
  return dst


class _AsProcess:
  """jax as process `index` of `count` would see it."""

  def __init__(self, index, count):
    self._index, self._count = index, count

  def __getattr__(self, name):
    return getattr(jax, name)

  def process_index(self):
    return self._index

  def process_count(self):
    return self._count


def _same_records(a_dir, b_dir):
  a, b = (shards.read_all(d, ("scan_id", "mu", "image")) for d in (a_dir, b_dir))
  assert list(a["scan_id"]) == list(b["scan_id"])  # the order one process writes, not just the same set
  np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a["image"], b["image"])


def test_latents_of_two_processes_are_the_records_of_one(workdir, tmp_path, monkeypatch):
  """Each process encodes its block of every split into its own part; process 0 merges them in process order
  (simulated in one interpreter: the barriers are where the processes would wait for each other)."""
  wd, out = workdir
  new = _copy_without_latents(wd, tmp_path)
  monkeypatch.setattr(latents_stage.distributed, "barrier", lambda *a, **k: None)
  (Workdir(new).shard_part("train", 7)).mkdir(parents=True)  # a stale part of an earlier 8-process run
  monkeypatch.setattr(latents_stage, "jax", _AsProcess(1, 2))  # only the stage's view: orbax sees 1 process
  with pytest.raises(shards.ShardError):  # process 1 does not merge: nothing to read until process 0 has
    latents_stage.run(tiny_pipeline_config(), new)
  assert [p.name for p in Workdir(new).shard_parts("train")] == [".train.part-00001", ".train.part-00007"]
  monkeypatch.setattr(latents_stage, "jax", _AsProcess(0, 2))
  summary = latents_stage.run(tiny_pipeline_config(), new)
  np.testing.assert_allclose(summary["scale_factor"], out["latents"]["scale_factor"], rtol=1e-6)
  for split in ("train", "val", "test"):
    _same_records(Workdir(wd).shards(split), Workdir(new).shards(split))
    assert not Workdir(new).shard_parts(split)  # parts consumed, stale ones removed
    meta = shards.read_metadata(Workdir(new).shards(split))
    assert meta["scale_factor"] == summary["scale_factor"] and meta["split"] == split
  stats = shards.read_metadata(Workdir(new).shards("train"))["stats"]["mu"]
  ref = shards.read_metadata(Workdir(wd).shards("train"))["stats"]["mu"]
  assert stats["count"] == ref["count"]
  np.testing.assert_allclose([stats["mean"], stats["std"]], [ref["mean"], ref["std"]], rtol=1e-5)


def test_latents_in_two_real_processes_match_one_process(workdir, tmp_path):
  """Two processes joined by jax.distributed write the records one process writes."""
  sys.path.insert(0, str(pathlib.Path(__file__).parent / "multiprocess"))
  import harness  # pylint: disable=import-outside-toplevel
  wd, out = workdir
  new = _copy_without_latents(wd, tmp_path)
  script = pathlib.Path(__file__).parent / "multiprocess" / "latents_run.py"
  runs = harness.run_script(script, [[f"--workdir={new}"]] * 2)
  for rc, text, _ in runs:
    assert rc == 0 and "RESULT " in text, text[-4000:]
  summaries = [json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:]) for _, text, _ in runs]
  assert all(s["processes"] == 2 for s in summaries)
  assert summaries[0]["scale_factor"] == summaries[1]["scale_factor"]
  np.testing.assert_allclose(summaries[0]["scale_factor"], out["latents"]["scale_factor"], rtol=1e-6)
  for split in ("train", "val", "test"):
    _same_records(Workdir(wd).shards(split), Workdir(new).shards(split))


def test_bad_scan_files_stop_the_run_before_anything_is_built(tmp_path):
  from test_manifest import _bad_cohort  # pylint: disable=import-outside-toplevel
  from ldae_jax.data.manifest import ManifestError  # pylint: disable=import-outside-toplevel
  c = tiny_pipeline_config()
  (tmp_path / "data").mkdir()
  c.data.manifest = str(_bad_cohort(tmp_path / "data"))
  wd = tmp_path / "run"
  with pytest.raises(ManifestError, match="3 of the 4 scans"):
    pipeline.run(c, wd)
  assert not wd.exists()  # no stage folder, nothing compiled
