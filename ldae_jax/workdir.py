"""The layout of a run directory (`--workdir`): every path the stages write and the evaluation reads, named once.

  DIR/config.json               the resolved config of the latest run (training.pipeline)
  DIR/splits.json               the subject split, recorded by the first stage that splits (training.volumes)
  DIR/cohort/                   the synthetic cohort when config.data.manifest is empty: manifest.csv,
                                ground_truth.csv, cohort.json (written last; data.synthetic)
  DIR/<stage>/                  one folder per stage (STAGES)
    checkpoints/<step>/         orbax checkpoints of a trained stage (training.checkpoint)
    metrics.jsonl, events/      logged metrics and TensorBoard events (training.loop)
    profile/process_<i>/        a jax.profiler trace of config.profile_steps steps, when asked for (training.loop)
    summary.json                written last: its presence means "stage complete"
  DIR/latents/shards/<split>/   the latent shards of train, val and test (training.latents_stage); while that
                                stage runs, .<split>.part-<process>/ holds what each process encoded
  DIR/report/                   evaluation outputs; volumes/ holds example NIfTI files (evaluation.report)

This module imports nothing from the project, so every layer (training, evaluation, CLIs, benchmarks) can use it.
A `Workdir` is os.PathLike and prints as its root, so it goes wherever a workdir path went before.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

AUTOENCODER = "autoencoder"
LATENTS = "latents"
LDM = "ldm"
REPRESENTATION = "representation"
STAGES = (AUTOENCODER, LATENTS, LDM, REPRESENTATION)  # in the order they run
TRAINED_STAGES = (AUTOENCODER, LDM, REPRESENTATION)   # the ones with checkpoints, metrics and a step loop
SPLITS = ("train", "val", "test")  # train first: the latents stage takes the scale factor from it

# Names inside one stage folder: training.loop writes them into the folder it is given.
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
EVENTS = "events"
PROFILE = "profile"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of the run directory `root` (a str, a path or another Workdir). Nothing is created or read."""

  root: pathlib.Path

  def __post_init__(self):
    object.__setattr__(self, "root", pathlib.Path(self.root))

  def __fspath__(self) -> str:
    return os.fspath(self.root)

  def __str__(self) -> str:
    return str(self.root)

  # ------------------------------------------------------------------------------------------ run-wide files
  @property
  def config_json(self) -> pathlib.Path:
    return self.root / "config.json"

  @property
  def splits_json(self) -> pathlib.Path:
    return self.root / "splits.json"

  @property
  def cohort(self) -> pathlib.Path:
    return self.root / "cohort"

  @property
  def cohort_manifest(self) -> pathlib.Path:
    return self.cohort / "manifest.csv"

  @property
  def cohort_json(self) -> pathlib.Path:
    return self.cohort / "cohort.json"

  @property
  def ground_truth_csv(self) -> pathlib.Path:
    return self.cohort / "ground_truth.csv"

  # ------------------------------------------------------------------------------------------ stages
  def stage_dir(self, name: str) -> pathlib.Path:
    return self.root / name

  def checkpoints(self, name: str) -> pathlib.Path:
    return self.stage_dir(name) / CHECKPOINTS

  def metrics(self, name: str) -> pathlib.Path:
    return self.stage_dir(name) / METRICS

  def events(self, name: str) -> pathlib.Path:
    return self.stage_dir(name) / EVENTS

  def summary(self, name: str) -> pathlib.Path:
    return self.stage_dir(name) / SUMMARY

  # ------------------------------------------------------------------------------------------ latents
  @property
  def shard_root(self) -> pathlib.Path:
    return self.stage_dir(LATENTS) / "shards"

  def shards(self, split: str = "train") -> pathlib.Path:
    return self.shard_root / split

  def shard_part(self, split: str, process: int) -> pathlib.Path:
    """The shards one process writes before process 0 merges every part into `shards(split)`."""
    return self.shard_root / f".{split}.part-{process:05d}"

  def shard_parts(self, split: str) -> list[pathlib.Path]:
    """Every part folder of `split` on disk, in process order (including stale ones of an earlier run)."""
    return sorted(self.shard_root.glob(f".{split}.part-*")) if self.shard_root.is_dir() else []

  # ------------------------------------------------------------------------------------------ evaluation
  @property
  def report(self) -> pathlib.Path:
    return self.root / "report"
