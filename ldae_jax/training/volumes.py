"""The scans a run trains on: the manifest (or the generated synthetic cohort), its subject-level split, and
a grain pipeline of preprocessed volumes for the autoencoder stage.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from ldae_jax.data import grain_pipeline
from ldae_jax.data import manifest as mf
from ldae_jax.parallel import distributed
from ldae_jax.workdir import Workdir

# Below this many bytes the preprocessed volumes are decoded once and kept in memory (a small cohort on a CPU
# would otherwise spend most of each step re-reading NIfTI files).
PRELOAD_LIMIT_BYTES = 1 << 30


def manifest_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """`config.data.manifest`, or the synthetic cohort in `DIR/cohort` (generated on first use, by process 0
  while the others wait)."""
  if config.data.manifest:
    path = pathlib.Path(config.data.manifest)
    if not path.is_file():
      raise FileNotFoundError(f"config.data.manifest={str(path)!r} does not exist; give the CSV path, or leave "
                              "it empty to generate the synthetic cohort into <workdir>/cohort.")
    return path
  wd = Workdir(workdir)
  out = wd.cohort
  wanted = synthetic_cohort_args(config)
  existing, meta_path = wd.cohort_manifest, wd.cohort_json
  if existing.is_file() and meta_path.is_file():
    check_cohort_matches(meta_path, wanted)  # every process: a mismatch fails everywhere, not at the barrier
  elif jax.process_index() == 0:
    from ldae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    # No cohort.json (written last) means an interrupted generation: regenerate, every file is rewritten.
    print(f"config.data.manifest is empty: generating a synthetic cohort of {wanted['subjects']} "
          f"subjects into {out}", flush=True)
    # The worker count is not part of `wanted` (nor of cohort.json): the files do not depend on it.
    synthetic.generate_cohort(out, **wanted, workers=int(config.data.synthetic.workers))
  distributed.barrier(f"synthetic cohort in {out}", float(config.distributed.barrier_timeout_s))
  return existing


def synthetic_cohort_args(config: ml_collections.ConfigDict) -> dict:
  """The `synthetic.generate_cohort` arguments that `config.data` asks for."""
  syn = config.data.synthetic
  return dict(subjects=int(syn.subjects), seed=int(syn.seed), shape=tuple(int(s) for s in config.data.image_shape),
              spacing_mm=float(config.data.spacing_mm), atrophy_scale=float(syn.atrophy_scale),
              nuisance_scale=float(syn.nuisance_scale))


def check_cohort_matches(meta_path: pathlib.Path, wanted: dict) -> None:
  """Raises if the cohort recorded in `meta_path` (cohort.json) is not the one the config asks for.

  Reusing it silently would train (or evaluate) on other scans than the config says, and the workdir's
  checkpoints may come from either cohort, so the choice is left to the user.
  """
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{meta_path}: unreadable ({e}). Delete {meta_path.parent} to regenerate the synthetic "
                     "cohort.") from e
  meta.setdefault("nuisance_scale", 1.0)  # cohorts written before the option existed
  diffs = []
  for key, want in wanted.items():
    have = meta.get(key)
    have = tuple(have) if isinstance(have, list) else have
    if have != want:
      diffs.append(f"{key}: cohort {have!r}, config {want!r}")
  if diffs:
    raise ValueError(f"{meta_path.parent} holds a synthetic cohort that differs from config.data ("
                     + "; ".join(diffs) + "). Use a new --workdir (the stages trained on the old cohort live in "
                     f"this one), or delete {meta_path.parent} to regenerate it here, or set the config back.")

def splits(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, list[mf.ScanRecord]]:
  """{train, val, test} scan records of the run's manifest, split by subject with `config.data.split_seed`.

  The first call in a workdir records the split in `DIR/splits.json` ({split: {subject: [scan ids]}}); every
  later stage checks that the manifest and config still give exactly that split, so that an edited manifest
  (or changed fractions / seed) cannot move a subject the autoencoder trained on into the test split unnoticed.
  """
  records = mf.read_manifest(manifest_path(config, workdir), classes=tuple(config.data.classes))
  out = mf.split_by_subject(records, val_fraction=float(config.data.val_fraction),
                            test_fraction=float(config.data.test_fraction), seed=int(config.data.split_seed))
  now = split_table(out)
  path = Workdir(workdir).splits_json
  if path.is_file():
    check_split_unchanged(json.loads(path.read_text()), now, path)
  elif jax.process_index() == 0:
    from ldae_jax.data import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_bytes(path, json.dumps(now, indent=1, sort_keys=True).encode())
  return out


def split_table(split_records: dict[str, list[mf.ScanRecord]]) -> dict[str, dict[str, list[str]]]:
  """{split: {subject: [scan ids]}}: what splits.json holds."""
  table: dict[str, dict[str, list[str]]] = {}
  for split, recs in split_records.items():
    table[split] = {}
    for r in recs:
      table[split].setdefault(r.subject, []).append(r.scan_id)
  return table


def check_split_unchanged(recorded: dict[str, dict[str, list[str]]], now: dict[str, dict[str, list[str]]],
                          path: pathlib.Path) -> None:
  """Raises ValueError naming every subject that changed split, appeared, disappeared or changed scans."""
  if recorded == now:
    return
  def where(table):
    return {subject: (split, sorted(ids)) for split, subjects in table.items() for subject, ids in subjects.items()}
  old, new = where(recorded), where(now)
  problems = []
  for s in sorted(old.keys() | new.keys()):
    if s not in new:
      problems.append(f"{s}: was in {old[s][0]}, no longer in the manifest")
    elif s not in old:
      problems.append(f"{s}: new subject, now in {new[s][0]}")
    elif old[s][0] != new[s][0]:
      problems.append(f"{s}: moved from {old[s][0]} to {new[s][0]}")
    elif old[s][1] != new[s][1]:
      problems.append(f"{s}: scans {old[s][1]} -> {new[s][1]} (in {new[s][0]})")
  listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
  raise ValueError(f"the manifest (or config.data's split settings) no longer gives the split recorded in {path} "
                   f"when this workdir's first stage ran ({len(problems)} subjects differ):\n  {listed}\n"
                   "The earlier stages trained on the recorded split: restore the manifest and config, or use a "
                   "new --workdir for the new cohort.")


def check_scans(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Reads every file of a user's manifest once (`manifest.check_scan_files`) and raises listing the bad ones.

  The generated synthetic cohort is skipped: its files are written by this package and complete once
  cohort.json exists.
  """
  if not config.data.manifest:
    return
  path = manifest_path(config, workdir)
  records = mf.read_manifest(path, classes=tuple(config.data.classes))
  mf.check_scan_files(records, source=str(path))


def load(record: mf.ScanRecord, config: ml_collections.ConfigDict) -> np.ndarray:
  """One preprocessed volume as float32 (X, Y, Z, 1)."""
  from ldae_jax.data.nifti import load_volume  # pylint: disable=g-import-not-at-top
  vol = load_volume(record.path, shape=tuple(config.data.image_shape), spacing_mm=float(config.data.spacing_mm),
                    percentile_clip=float(config.data.percentile_clip))
  return np.asarray(vol, np.float32)[..., None]


class VolumeSource:
  """Random-access source of {'image': (X, Y, Z, 1)} for grain; preloads small cohorts into memory."""

  def __init__(self, records: Sequence[mf.ScanRecord], config: ml_collections.ConfigDict):
    self.records = list(records)
    self.config = config
    nbytes = len(self.records) * int(np.prod(config.data.image_shape)) * 4
    self._cache = None
    if nbytes <= PRELOAD_LIMIT_BYTES:
      self._cache = np.stack([load(r, config) for r in self.records]) if self.records else None

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    img = self._cache[i] if self._cache is not None else load(self.records[i], self.config)
    return {"image": img}


def make_iterator(records: Sequence[mf.ScanRecord], config: ml_collections.ConfigDict, *, global_batch_size: int,
                  seed: int) -> Any:
  """Shuffled, repeated grain iterator of process-local volume batches (get_state/set_state for resuming).

  The latent shards' pipeline (`grain_pipeline.batched`): one global seeded shuffle per epoch, then each process
  takes every process_count-th element, so processes read disjoint scans; `config.data.num_workers` > 0 reads
  them in that many grain worker processes (the same batches in the same order).
  """
  if not records:
    raise ValueError("the training split is empty: check config.data.manifest and config.data.test_fraction / "
                     "val_fraction.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch {global_batch_size} (config.train.autoencoder.batch_size x grad_accum) must "
                     f"be a multiple of the {jax.process_count()} processes.")
  # Worker processes decode the NIfTI files of a cohort too large to preload.
  return iter(grain_pipeline.batched(VolumeSource(records, config), global_batch_size=global_batch_size,
                                     seed=seed, num_workers=int(config.data.num_workers)))
