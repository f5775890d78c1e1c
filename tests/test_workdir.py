"""ldae_jax.workdir: the documented layout of a run directory, and the writers put their files where it says."""

from __future__ import annotations

import json
import os
import pathlib

from ldae_jax import workdir as layout
from ldae_jax.workdir import Workdir


def test_layout_paths(tmp_path):
  wd = Workdir(str(tmp_path))
  assert wd.root == tmp_path and os.fspath(wd) == str(tmp_path) and str(wd) == str(tmp_path)
  assert Workdir(wd) == wd and pathlib.Path(wd) == tmp_path  # a Workdir goes wherever a path went
  assert wd.config_json == tmp_path / "config.json"
  assert wd.splits_json == tmp_path / "splits.json"
  assert (wd.cohort_manifest, wd.cohort_json, wd.ground_truth_csv) == tuple(
      tmp_path / "cohort" / n for n in ("manifest.csv", "cohort.json", "ground_truth.csv"))
  assert wd.stage_dir(layout.LDM) == tmp_path / "ldm"
  assert wd.checkpoints(layout.AUTOENCODER) == tmp_path / "autoencoder" / "checkpoints"
  assert wd.metrics(layout.REPRESENTATION) == tmp_path / "representation" / "metrics.jsonl"
  assert wd.events(layout.LDM) == tmp_path / "ldm" / "events"
  assert wd.summary(layout.LATENTS) == tmp_path / "latents" / "summary.json"
  assert wd.shards() == wd.shards("train") == tmp_path / "latents" / "shards" / "train"
  assert [wd.shards(s) for s in layout.SPLITS] == [wd.shard_root / s for s in ("train", "val", "test")]
  assert wd.report == tmp_path / "report"
  assert layout.STAGES == ("autoencoder", "latents", "ldm", "representation")


def test_writers_use_the_layout(tmp_path):
  """Config, split, cohort, metrics, events, checkpoints and summary land on the layout's paths (the stages'
  own runs are checked in test_training and test_pipeline)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from test_volumes import small_config  # pylint: disable=import-outside-toplevel
  from ldae_jax.training import loop, pipeline, volumes  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  wd = Workdir(tmp_path)
  c = small_config(subjects=3)  # one subject per split
  pipeline.write_config(c, tmp_path)
  assert json.loads(wd.config_json.read_text())["data"]["image_shape"] == [32, 40, 32]
  assert volumes.manifest_path(c, tmp_path) == wd.cohort_manifest
  assert wd.cohort_json.is_file() and wd.ground_truth_csv.is_file()
  volumes.splits(c, tmp_path)
  assert set(json.loads(wd.splits_json.read_text())) == set(layout.SPLITS)

  writer = loop.MetricsWriter(wd.stage_dir(layout.LDM))
  writer.write(1, {"loss": 0.5})
  writer.close()
  assert loop.read_metrics(wd.stage_dir(layout.LDM)) == [{"step": 1, "loss": 0.5}]
  assert wd.metrics(layout.LDM).is_file() and wd.events(layout.LDM).is_dir()
  ck = Checkpointer(wd.checkpoints(layout.LDM))
  ck.save(1, {"w": jnp.zeros(2)})
  ck.close()
  assert (wd.checkpoints(layout.LDM) / "1").is_dir()
  loop.finish_stage(wd.stage_dir(layout.LDM), {"stage": layout.LDM, "steps": 1})
  assert loop.is_complete(wd.stage_dir(layout.LDM)) and wd.summary(layout.LDM).is_file()
