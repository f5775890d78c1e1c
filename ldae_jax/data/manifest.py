"""The cohort manifest: one CSV row per scan, validated once, and subject-level splits.

Columns (the reference's `BrainMRDataModule` schema, section 3.1 of the reference spec):

| column | required | meaning |
|---|---|---|
| `subject` | yes | subject id; splits group by it |
| `path` | yes | NIfTI of the preprocessed T1; relative paths resolve against the CSV's folder |
| `diagnosis` | yes | one of `classes` (default AD / CN / MCI; matched case-insensitively) |
| `age` | yes | years at the scan; an empty cell or NaN is allowed |
| `session` | no | months since baseline (`12`, `M12`, `ses-M12`); else `ses-M<months>` in `path`; else 0 |
| `qc` | no | `pass` (or empty) keeps the row; anything else (`python -m ldae_jax.data.prepare` writes `flagged: <why>`) skips it, with a log line naming it |

The path pattern is the reference's regex. Extra columns are ignored. Labels are indices into `sorted(classes)` as in the reference (AD=0, CN=1, MCI=2).
A scan is identified by `<subject>_ses-M<months, 3 digits>`; two rows with the same id or the same file are
an error, because they would leak one scan into two splits or count it twice.
A row that failed quality control is skipped rather than an error: the preparation found it, the log names
it, and writing `pass` into its `qc` cell (after looking at its QC figure) brings it back.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import pathlib
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from ldae_jax.data import atomic

REQUIRED_COLUMNS = ("subject", "path", "diagnosis", "age")
OPTIONAL_COLUMNS = ("session", "qc")
WRITE_COLUMNS = ("subject", "path", "diagnosis", "age", "session")
DEFAULT_CLASSES = ("AD", "CN", "MCI")
SESSION_IN_PATH = re.compile(r"ses-M(\d+)")
_SESSION_CELL = re.compile(r"^(?:ses-)?M?(\d+)$", re.IGNORECASE)
_NAN_CELLS = {"", "nan", "na", "n/a", "none", "null"}
QC_PASS = "pass"

log = logging.getLogger(__name__)


class ManifestError(ValueError):
  """The manifest CSV is unusable; the message names the file, the row (CSV line) and the fix."""


@dataclasses.dataclass(frozen=True)
class ScanRecord:
  """One scan of the cohort, with every path absolute."""
  subject: str
  path: str
  diagnosis: str
  label: int
  age: float
  session_months: int
  scan_id: str


def scan_id(subject: str, session_months: int) -> str:
  return f"{subject}_ses-M{int(session_months):03d}"


def canonical_classes(classes: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
  """(sorted class names, lower-case spelling -> name): labels index the first; the second matches cells
  case-insensitively."""
  classes = tuple(sorted(str(c) for c in classes))
  if len(set(c.lower() for c in classes)) != len(classes) or not classes:
    raise ValueError(f"classes={classes} must be non-empty and distinct (config.data.classes).")
  return classes, {c.lower(): c for c in classes}


def parse_age(cell: str) -> float:
  """Years from a table cell; NaN for an empty or n/a cell; ValueError (with the fix) otherwise."""
  cell = (cell or "").strip()
  if cell.lower() in _NAN_CELLS:
    return math.nan
  try:
    age = float(cell)
  except ValueError:
    raise ValueError(f"age {cell!r} is not a number; write years (e.g. 71.5) or leave it empty.") from None
  if not math.isnan(age) and not 0.0 <= age <= 130.0:
    raise ValueError(f"age {age} is outside 0-130 years; fix the cell (years, not months?).")
  return age


def _resolve(cell: str, base: pathlib.Path) -> str:
  p = pathlib.Path(os.path.expanduser(cell))
  return str(p if p.is_absolute() else (base / p).resolve())


def read_manifest(csv_path: str | os.PathLike, *, classes: Sequence[str] = DEFAULT_CLASSES,
                  check_files: bool = True, unknown_diagnosis: str = "error") -> list[ScanRecord]:
  """Reads and validates the manifest; returns its scans in file order.

  `unknown_diagnosis="drop"` skips rows whose diagnosis is not in `classes` (the reference filters the CSV to
  its class list, e.g. AD/CN for the supervised baseline); the default treats them as an error so that a typo
  (`Ad`, `AD `, `Alzheimer`) cannot silently remove scans.
  """
  csv_path = pathlib.Path(csv_path)
  if unknown_diagnosis not in ("error", "drop"):
    raise ValueError(f"unknown_diagnosis={unknown_diagnosis!r}: 'error' or 'drop'.")
  if not csv_path.is_file():
    raise ManifestError(f"{csv_path}: manifest not found; set config.data.manifest to an existing CSV (or leave "
                        "it empty to generate the synthetic cohort).")
  try:
    classes, canon = canonical_classes(classes)
  except ValueError as e:
    raise ManifestError(f"{csv_path}: {e}") from None
  base = csv_path.resolve().parent
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
      hint = ""
      if "path" in missing and "mri_path" in header:
        hint = " (an AXIAL-style CSV: rename 'mri_path' to 'path')"
      raise ManifestError(
          f"{csv_path}: missing column(s) {missing}; found {header}. Add them to the header line{hint}; "
          f"required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)}.")
    reader.fieldnames = header
    rows = list(reader)
  if not rows:
    raise ManifestError(f"{csv_path}: the manifest has a header but no scans; add one row per scan.")

  records: list[ScanRecord] = []
  flagged: list[str] = []
  seen_ids: dict[str, int] = {}
  seen_paths: dict[str, int] = {}
  for i, row in enumerate(rows):
    line = i + 2  # the header is line 1
    where = f"{csv_path}, line {line}"
    cell = {k: (v or "").strip() for k, v in row.items() if k is not None}
    subject = cell.get("subject", "")
    if not subject:
      raise ManifestError(f"{where}: empty 'subject'; give every scan its subject id.")
    qc = cell.get("qc", "")
    if qc and qc.lower() != QC_PASS:
      flagged.append(f"{subject} {cell.get('path', '')} (line {line}: {qc})")
      continue
    dx = cell.get("diagnosis", "")
    if dx.lower() not in canon:
      if unknown_diagnosis == "drop":
        continue
      raise ManifestError(
          f"{where}: unknown diagnosis {dx!r}; expected one of {list(classes)} (config.data.classes). Fix the "
          "cell, add the class to config.data.classes, or drop the row.")
    dx = canon[dx.lower()]
    raw_path = cell.get("path", "")
    if not raw_path:
      raise ManifestError(f"{where}: empty 'path'; give the NIfTI file of this scan.")
    path = _resolve(raw_path, base)
    if check_files and not os.path.isfile(path):
      raise ManifestError(f"{where}: file not found: {path}. Fix the path (relative paths resolve against "
                          f"{base}) or remove the row.")
    try:
      age = parse_age(cell.get("age", ""))
    except ValueError as e:
      raise ManifestError(f"{where}: {e}") from None
    from_path = SESSION_IN_PATH.search(raw_path)
    session_cell = cell.get("session", "")
    if session_cell:
      m = _SESSION_CELL.match(session_cell)
      if not m:
        raise ManifestError(f"{where}: session {session_cell!r} is not months since baseline; write e.g. 12, "
                            "M12 or ses-M12.")
      months = int(m.group(1))
      if from_path and int(from_path.group(1)) != months:
        raise ManifestError(f"{where}: session column says {months} months but the path says "
                            f"{from_path.group(0)}; make them agree.")
    elif from_path:
      months = int(from_path.group(1))
    else:
      months = 0
    sid = scan_id(subject, months)
    if sid in seen_ids:
      raise ManifestError(
          f"{where}: duplicate scan {sid} (also on line {seen_ids[sid]}); each (subject, session) must appear "
          "once. Remove the duplicate or give the sessions (a 'session' column or ses-M<months> in the path).")
    if path in seen_paths:
      raise ManifestError(f"{where}: duplicate scan file {path} (also on line {seen_paths[path]}); remove one "
                          "of the rows.")
    seen_ids[sid] = line
    seen_paths[path] = line
    records.append(ScanRecord(subject=subject, path=path, diagnosis=dx, label=classes.index(dx), age=age,
                              session_months=months, scan_id=sid))
  if flagged:
    log.warning("%s: skipped %d scan(s) that failed quality control (write 'pass' in their qc cell to keep "
                "them): %s", csv_path, len(flagged), "; ".join(flagged))
  if not records and flagged:
    raise ManifestError(f"{csv_path}: every row failed quality control (its 'qc' column); look at the QC "
                        "figures and write 'pass' into the cells of the scans to keep.")
  if not records:
    raise ManifestError(f"{csv_path}: no row has a diagnosis in {list(classes)}; check config.data.classes.")
  return records


def check_scan_files(records: Sequence[ScanRecord], *, source: str = "the manifest",
                     max_workers: int = 8) -> None:
  """Reads every scan's NIfTI (header and data, in a thread pool: zlib and file reads release the GIL) and
  raises one ManifestError listing every unreadable, non-3D, non-finite or affine-less file with its fix.

  Run before any network is built, so that a bad file stops the run in seconds rather than at the stage
  that first reads it, after the earlier ones trained.
  """
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
  from ldae_jax.data.nifti import check_file  # pylint: disable=import-outside-toplevel
  if not records:
    return
  with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(records)))) as pool:
    problems = list(pool.map(lambda r: check_file(r.path), records))
  bad = [f"  {r.scan_id}: {p}" for r, p in zip(records, problems) if p is not None]
  if bad:
    raise ManifestError(f"{len(bad)} of the {len(records)} scans in {source} cannot be used:\n" + "\n".join(bad)
                        + "\nFix or replace these files, or remove their rows from the manifest; nothing was "
                        "trained.")


def _relative(p: str, base: pathlib.Path) -> str:
  """Paths inside the CSV's folder are written relative to it, so the cohort folder can be moved."""
  if not p:
    return ""
  try:
    return pathlib.Path(p).resolve().relative_to(base).as_posix()
  except ValueError:
    return p


def write_manifest(records: Iterable[ScanRecord], csv_path: str | os.PathLike,
                   qc: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes records as a manifest CSV (temp file + rename); `read_manifest` gives them back.

  `qc` (scan_id -> verdict) adds the `qc` column: `pass` for a scan missing from it.
  """
  csv_path = pathlib.Path(csv_path)
  base = csv_path.parent.resolve()
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(WRITE_COLUMNS + (("qc",) if qc is not None else ()))
  for r in records:
    age = "" if r.age is None or math.isnan(r.age) else f"{r.age:.2f}"
    row = [r.subject, _relative(r.path, base), r.diagnosis, age, int(r.session_months)]
    if qc is not None:
      row.append(qc.get(r.scan_id) or QC_PASS)
    w.writerow(row)
  return atomic.write_bytes(csv_path, buf.getvalue().encode("utf-8"))


def split_by_subject(records: Sequence[ScanRecord], *, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[ScanRecord]]:
  """Seeded train/val/test split of *subjects*, stratified by each subject's baseline diagnosis.

  Counts follow sklearn's GroupShuffleSplit as the reference uses it: `ceil(test_fraction * n_subjects)` test
  subjects, then `ceil(val_fraction * n_remaining)` val subjects (0 when a fraction is 0). Stratification:
  subjects are shuffled within each diagnosis and interleaved by their relative rank, so any prefix of the
  order holds the classes in proportion; test takes the first subjects, val the next. The subject sets match
  the reference's in size, not in membership (a different random stream). Records keep their input order.
  """
  if not 0.0 <= test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
                     "(config.data.val_fraction / test_fraction).")
  baseline: dict[str, tuple[int, str]] = {}
  for r in records:
    if r.subject not in baseline or r.session_months < baseline[r.subject][0]:
      baseline[r.subject] = (r.session_months, r.diagnosis)
  subjects = sorted(baseline)
  n = len(subjects)
  n_test = math.ceil(test_fraction * n) if test_fraction > 0 else 0
  n_val = math.ceil(val_fraction * (n - n_test)) if val_fraction > 0 else 0
  if n - n_test - n_val < 1:
    raise ValueError(f"split_by_subject: {n} subjects cannot give {n_test} test + {n_val} val subjects and a "
                     "non-empty train split; lower config.data.val_fraction / test_fraction or add subjects.")
  rng = np.random.default_rng(seed)
  keys: dict[str, float] = {}
  for dx in sorted({d for _, d in baseline.values()}):
    group = [s for s in subjects if baseline[s][1] == dx]
    order = rng.permutation(len(group))
    jitter = rng.random(len(group))
    for rank, idx in enumerate(order):
      keys[group[idx]] = (rank + jitter[rank]) / len(group)
  ordered = sorted(subjects, key=lambda s: (keys[s], s))
  which = {s: "test" for s in ordered[:n_test]}
  which.update({s: "val" for s in ordered[n_test:n_test + n_val]})
  out: dict[str, list[ScanRecord]] = {"train": [], "val": [], "test": []}
  for r in records:
    out[which.get(r.subject, "train")].append(r)
  return out
