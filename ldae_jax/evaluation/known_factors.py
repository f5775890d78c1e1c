"""Known factors of each scan that the probes read out of a code: the synthetic cohort's generating volumes
(`cohort/ground_truth.csv`), or for a user's manifest the numeric columns named in `config.eval.known_factors`
(e.g. regional volumes from a segmentation)."""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Sequence

import ml_collections
import numpy as np

from ldae_jax.workdir import Workdir

# Generative factors of the synthetic cohort whose linear read-out the report shows.
SYNTHETIC = ("hippocampus_ml", "ventricle_ml", "gm_ml", "icv_ml")


def read(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, dict[str, float]] | None:
  """{scan_id: {factor: value}}, or None when the run has none (a manifest without `config.eval.known_factors`)."""
  if config.data.manifest:
    names = tuple(config.eval.known_factors)
    if not names:
      return None
    from ldae_jax.data import manifest as mf  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(config.data.manifest)
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    missing = [n for n in names if rows and n not in rows[0]]
    if missing:
      raise ValueError(f"{path}: no column {missing} (config.eval.known_factors={names}); add the columns or "
                       "drop them from config.eval.known_factors.")
    records = mf.read_manifest(path, classes=tuple(config.data.classes))
    out = {}
    for record, row in zip(records, rows):
      try:
        out[record.scan_id] = {n: float(row[n]) for n in names}
      except ValueError as e:
        raise ValueError(f"{path}: scan {record.scan_id} has a non-numeric known factor ({e}).") from e
    return out
  path = Workdir(workdir).ground_truth_csv
  if not path.is_file():
    return None
  with open(path, newline="") as f:
    return {row["scan_id"]: {k: float(row[k]) for k in SYNTHETIC} for row in csv.DictReader(f)}


def table(truth: dict[str, dict[str, float]], scan_ids: Sequence, split: str) -> dict[str, np.ndarray]:
  """{factor: values in the order of `scan_ids`}; a scan without factors is an error naming the split."""
  missing = [str(s) for s in scan_ids if str(s) not in truth]
  if missing:
    raise ValueError(f"{len(missing)} {split} scan(s) (e.g. {missing[:2]}) have no known factors (the cohort's "
                     "ground_truth.csv or the manifest): the shards and the manifest disagree; rerun the latents "
                     "stage.")
  names = next(iter(truth.values())).keys()
  return {k: np.array([truth[str(s)][k] for s in scan_ids]) for k in names}
