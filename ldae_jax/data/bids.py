"""The raw scans to prepare, from a BIDS dataset or a CSV, as manifest records (`path` = the raw file).

BIDS: every `sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]`, with the subject's diagnosis and age from
`participants.tsv` (columns `participant_id` and the two named by the caller). A subject's
`sub-<label>_sessions.tsv` (column `session_id`), where it has those columns, gives per-session values
instead. Sessions are `ses-M<months since baseline>` (Clinica's naming, as the manifest reads them); a
subject without session folders has one scan at month 0. An age from `participants.tsv` is taken as the age
at baseline, so a scan's age is that plus its months / 12.

CSV: a manifest of the raw scans (`subject, path, diagnosis, age[, session]`, as `manifest.read_manifest`
reads it).

What cannot be prepared (a subject missing from participants.tsv, a session label without months, two T1w
images for one session, an unknown diagnosis) comes back as a `Problem` naming the file and the fix, so the
other scans go on; a missing participants.tsv or column is an error for the whole dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
from typing import Sequence

from ldae_jax.data import manifest as manifest_lib

PARTICIPANT_ID = "participant_id"
SESSION_ID = "session_id"


@dataclasses.dataclass(frozen=True)
class Problem:
  """A scan that cannot be prepared, found before any processing: `where` (a file) and what to do."""
  where: str
  message: str


def _read_tsv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f, delimiter="\t")
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    return header, [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _is_t1w(path: pathlib.Path) -> bool:
  return path.is_file() and (path.name.endswith("_T1w.nii") or path.name.endswith("_T1w.nii.gz"))


def _participants(root: pathlib.Path, columns: Sequence[str]) -> dict[str, dict[str, str]]:
  path = root / "participants.tsv"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; a BIDS dataset gives each subject's diagnosis and age there "
                            f"(columns {PARTICIPANT_ID}, {', '.join(columns)}), or list the scans in a CSV "
                            "(subject, path, diagnosis, age[, session]) and pass that instead.")
  header, rows = _read_tsv(path)
  missing = [c for c in (PARTICIPANT_ID, *columns) if c not in header]
  if missing:
    raise ValueError(f"{path}: no column(s) {missing}; found {header}. Name the diagnosis and age columns with "
                     "--diagnosis_column / --age_column.")
  return {r[PARTICIPANT_ID]: r for r in rows if r.get(PARTICIPANT_ID)}


def _sessions(root: pathlib.Path, subject: str) -> dict[str, dict[str, str]]:
  path = root / subject / f"{subject}_sessions.tsv"
  if not path.is_file():
    return {}
  header, rows = _read_tsv(path)
  if SESSION_ID not in header:
    return {}
  return {r[SESSION_ID]: r for r in rows if r.get(SESSION_ID)}


def find_bids_scans(root: str | os.PathLike, *, classes: Sequence[str] = manifest_lib.DEFAULT_CLASSES,
                    diagnosis_column: str = "diagnosis", age_column: str = "age",
                    unknown_diagnosis: str = "error") -> tuple[list[manifest_lib.ScanRecord], list[Problem]]:
  """The T1w scans of a BIDS dataset as records (in subject, session order) and the problems found.

  `unknown_diagnosis="drop"` leaves out scans whose diagnosis is not in `classes` (as `read_manifest`);
  the default reports them.
  """
  root = pathlib.Path(root)
  classes, canon = manifest_lib.canonical_classes(classes)
  participants = _participants(root, (diagnosis_column, age_column))
  files = sorted({*root.glob("sub-*/anat/*_T1w.nii*"), *root.glob("sub-*/ses-*/anat/*_T1w.nii*")})
  files = [f for f in files if _is_t1w(f)]
  if not files:
    raise FileNotFoundError(f"{root}: no sub-*/[ses-*/]anat/*_T1w.nii[.gz] file; is this the BIDS dataset's "
                            "root folder?")
  records: list[manifest_lib.ScanRecord] = []
  problems: list[Problem] = []
  by_scan: dict[str, list[pathlib.Path]] = {}
  sessions_of: dict[str, dict[str, dict[str, str]]] = {}
  for f in files:
    parts = f.relative_to(root).parts
    subject, session = parts[0], (parts[1] if len(parts) == 4 else None)
    if session is None:
      months = 0
    else:
      m = manifest_lib.SESSION_IN_PATH.fullmatch(session)
      if not m:
        problems.append(Problem(str(f), f"session label {session!r} does not give months since baseline; "
                                "rename it ses-M<months> (e.g. ses-M012) or list the scans in a CSV with a "
                                "session column"))
        continue
      months = int(m.group(1))
    if subject not in participants:
      problems.append(Problem(str(f), f"{subject} has no row in participants.tsv; add it (diagnosis, age)"))
      continue
    if subject not in sessions_of:
      sessions_of[subject] = _sessions(root, subject)
    row = participants[subject]
    session_row = sessions_of[subject].get(session or "", {})
    dx = session_row.get(diagnosis_column) or row.get(diagnosis_column, "")
    if dx.lower() not in canon:
      if unknown_diagnosis == "drop":
        continue
      problems.append(Problem(str(f), f"diagnosis {dx!r} of {subject} is not one of {list(classes)}; fix "
                              f"participants.tsv, pass --classes, or --unknown_diagnosis drop"))
      continue
    try:
      if session_row.get(age_column):
        age = manifest_lib.parse_age(session_row[age_column])
      else:
        age = manifest_lib.parse_age(row.get(age_column, ""))
        if not math.isnan(age):
          age += months / 12.0  # participants.tsv's age is the age at baseline
    except ValueError as e:
      problems.append(Problem(str(f), f"{subject}: {e}"))
      continue
    sid = manifest_lib.scan_id(subject, months)
    by_scan.setdefault(sid, []).append(f)
    records.append(manifest_lib.ScanRecord(subject=subject, path=str(f.resolve()), diagnosis=canon[dx.lower()],
                                           label=classes.index(canon[dx.lower()]), age=age,
                                           session_months=months, scan_id=sid))
  duplicated = {sid for sid, fs in by_scan.items() if len(fs) > 1}
  for sid in sorted(duplicated):
    names = ", ".join(p.name for p in by_scan[sid])
    for f in by_scan[sid]:
      problems.append(Problem(str(f), f"{sid} has {len(by_scan[sid])} T1w images ({names}); keep one (e.g. "
                              "move the other runs out of anat/) or list the scans in a CSV"))
  return [r for r in records if r.scan_id not in duplicated], problems


def find_scans(source: str | os.PathLike, *, classes: Sequence[str] = manifest_lib.DEFAULT_CLASSES,
               diagnosis_column: str = "diagnosis", age_column: str = "age",
               unknown_diagnosis: str = "error") -> tuple[list[manifest_lib.ScanRecord], list[Problem]]:
  """A BIDS folder or a CSV of raw scans -> (records, problems). A missing raw file is found later, by the
  scan's own processing, so that it is one failed scan rather than a stopped dataset."""
  source = pathlib.Path(source)
  if source.is_dir():
    return find_bids_scans(source, classes=classes, diagnosis_column=diagnosis_column, age_column=age_column,
                           unknown_diagnosis=unknown_diagnosis)
  if source.is_file():
    return manifest_lib.read_manifest(source, classes=classes, check_files=False,
                                      unknown_diagnosis=unknown_diagnosis), []
  raise FileNotFoundError(f"{source}: neither a BIDS folder nor a CSV file.")
