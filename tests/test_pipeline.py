"""training/pipeline: every stage in order on a tiny synthetic cohort, skipping completed stages on a rerun,
and the latents stage's single-writer rule for multi-process runs."""

from __future__ import annotations

import json

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


def test_latents_other_processes_only_read_what_process_0_wrote(workdir, monkeypatch):
  wd, out = workdir
  root = Workdir(wd).shard_root
  before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
  monkeypatch.setattr(jax, "process_index", lambda: 1)  # the single-process barrier is a no-op
  summary = latents_stage.run(tiny_pipeline_config(), wd)
  assert summary["scale_factor"] == out["latents"]["scale_factor"]
  assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # nothing rewritten


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
