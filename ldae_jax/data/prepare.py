"""Raw T1 scans -> preprocessed volumes, QC and the manifest the rest of the package reads.

`python -m ldae_jax.data.prepare BIDS_DIR --out DIR` (or a CSV of raw scans instead of BIDS_DIR; see
`bids.py` for both layouts). Every scan goes through `prepare_scan` (N4, rigid + affine registration to the
MNI152 2009 template, optional SyN, template-based brain extraction, the package's 1.5 mm 128 x 160 x 128
RAS grid, min-max), in a process pool. DIR then holds

* `manifest.csv`: one row per prepared scan, in the manifest format (`manifest.py`), with a `qc` column:
  `pass`, or `flagged: <why>` for a scan whose QC measures are out of bounds (`qc.py`), which the manifest
  loader then skips with a log line (write `pass` into the cell to keep it after looking at its figure);
* `qc.csv`: every scan, prepared, flagged or failed, with its measures and the error of a failed one;
* `qc/<scan_id>.png`: mid-slices of the registered scan with the brain mask's outline;
* `<subject>/ses-M<months>/anat/<scan_id>_T1w.nii.gz` and its brain masks, affine and QC JSON.

A rerun skips the scans whose outputs exist with the same settings (so an interrupted run resumes). A scan
that fails (corrupt, not 3D, not a T1, ...) is listed with its file and the reason, the others go on, and
the command exits with status 1; a mistake about the whole dataset (no participants.tsv, a bad flag) is one
`error:` line and status 2 (`--verbose` adds the traceback).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Sequence

from ldae_jax.data import bids
from ldae_jax.data import manifest as manifest_lib
from ldae_jax.data import prepare_scan
from ldae_jax.data import qc
from ldae_jax.data import registration

QC_COLUMNS = ("scan_id", "subject", "session_months", "status", *qc.MEASURES, "seconds", "reason", "source")


@dataclasses.dataclass(frozen=True)
class Result:
  manifest: pathlib.Path | None  # None when no scan could be prepared
  qc_table: pathlib.Path
  prepared: tuple[str, ...]  # scan ids processed by this run
  reused: tuple[str, ...]  # scan ids whose outputs existed
  flagged: dict[str, str]  # scan id -> why
  errors: dict[str, str]  # scan id (or the file, for a scan found unusable before processing) -> message


def available_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))  # what taskset / a container allows, not the machine's count
  except AttributeError:
    return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
  registration.set_threads(threads)


def _prepare_one(scan_id: str, source: str, outputs: prepare_scan.ScanOutputs,
                 settings: prepare_scan.Settings) -> tuple[str, dict | None, str]:
  """(scan_id, measures, "") or (scan_id, None, error naming the file): one scan's failure never stops
  the others."""
  try:
    return scan_id, prepare_scan.prepare_scan(source, outputs, settings, scan_id=scan_id), ""
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if source not in message:
      message = f"{source}: {type(e).__name__}: {message}"
    return scan_id, None, message


class _Progress:
  """A tqdm bar on a terminal; one plain line per scan otherwise (a log file gets no carriage returns)."""

  def __init__(self, total: int, enabled: bool):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    self.total, self.done = total, 0
    self.lines = enabled and not sys.stderr.isatty()
    self.bar = tqdm(total=total, desc="prepare", unit="scan", disable=not enabled or self.lines)

  def update(self, scan_id: str, status: str) -> None:
    self.done += 1
    self.bar.update(1)
    if self.lines:
      print(f"prepare: {self.done}/{self.total} {scan_id}: {status}", file=sys.stderr, flush=True)

  def close(self) -> None:
    self.bar.close()


def _run(jobs, settings, workers: int, progress: _Progress) -> dict[str, tuple[dict | None, str]]:
  results: dict[str, tuple[dict | None, str]] = {}

  def finish(scan_id, measures, error):
    results[scan_id] = (measures, error)
    progress.update(scan_id, f"ok ({measures['seconds']:.0f} s)" if measures else "FAILED")

  if workers <= 1:
    for record, outputs in jobs:
      finish(*_prepare_one(record.scan_id, record.path, outputs, settings))
    return results
  # "spawn": a fork of a process that already runs ITK's or JAX's threads can deadlock. Each worker gets an
  # equal share of the cores for ITK's own threads.
  threads = max(1, available_cpus() // workers)
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_init_worker, initargs=(threads,)) as pool:
    futures = [pool.submit(_prepare_one, r.scan_id, r.path, o, settings) for r, o in jobs]
    try:
      for f in concurrent.futures.as_completed(futures):
        finish(*f.result())
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise
  return results


def prepare_dataset(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                    settings: prepare_scan.Settings = prepare_scan.Settings(), workers: int = 1,
                    classes: Sequence[str] = manifest_lib.DEFAULT_CLASSES, diagnosis_column: str = "diagnosis",
                    age_column: str = "age", unknown_diagnosis: str = "error", bounds: qc.Bounds = qc.Bounds(),
                    progress: bool = True) -> Result:
  """Prepares every scan of `source` (a BIDS folder or a CSV of raw scans) into `out_dir`; see the module
  docstring for what it writes. `workers`: processes (0: one per available core)."""
  if workers < 0:
    raise ValueError(f"workers={workers}: need >= 0 (0: one process per CPU core).")
  if unknown_diagnosis not in ("error", "drop"):
    raise ValueError(f"unknown_diagnosis={unknown_diagnosis!r}: 'error' or 'drop'.")
  out = pathlib.Path(out_dir)
  if out.resolve() == pathlib.Path(source).resolve():
    raise ValueError(f"--out {out}: write the prepared scans to a folder of their own, not into the source.")
  records, problems = bids.find_scans(source, classes=classes, diagnosis_column=diagnosis_column,
                                      age_column=age_column, unknown_diagnosis=unknown_diagnosis)
  out.mkdir(parents=True, exist_ok=True)
  outputs = {r.scan_id: prepare_scan.output_paths(out, r.subject, r.session_months, r.scan_id) for r in records}
  measures: dict[str, dict] = {}
  for r in records:
    saved = prepare_scan.done_before(outputs[r.scan_id], r.path, settings)
    if saved is not None:
      measures[r.scan_id] = saved
  reused = tuple(r.scan_id for r in records if r.scan_id in measures)
  jobs = [(r, outputs[r.scan_id]) for r in records if r.scan_id not in measures]
  workers = min(available_cpus() if workers == 0 else workers, max(len(jobs), 1))
  if progress:
    print(f"prepare: {len(records)} scans in {source}; {len(reused)} prepared before, {len(jobs)} to prepare "
          f"({workers} process{'es' if workers > 1 else ''})", file=sys.stderr, flush=True)
  if jobs:
    if workers <= 1 and "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS" not in os.environ:
      registration.set_threads(available_cpus())  # before ITK starts: it reads this once
    registration.import_ants()  # a missing antspyx stops here, once, rather than once per scan
  bar = _Progress(len(jobs), progress)
  try:
    ran = _run(jobs, settings, workers, bar)
  finally:
    bar.close()
  errors = {sid: err for sid, (m, err) in ran.items() if m is None}
  measures.update({sid: m for sid, (m, _) in ran.items() if m is not None})
  errors.update({p.where: p.message for p in problems})
  flagged = qc.flag_outliers({sid: m for sid, m in measures.items()}, bounds)

  rows = []
  for r in records:
    m = measures.get(r.scan_id, {})
    status = "error" if r.scan_id in errors else ("flagged" if r.scan_id in flagged else "ok")
    rows.append(dict(scan_id=r.scan_id, subject=r.subject, session_months=r.session_months, status=status,
                     source=r.path, reason=errors.get(r.scan_id) or flagged.get(r.scan_id, ""),
                     **{k: m[k] for k in (*qc.MEASURES, "seconds") if k in m}))
  rows += [dict(status="error", source=p.where, reason=p.message) for p in problems]
  qc_table = out / "qc.csv"
  qc.write_table(qc_table, QC_COLUMNS, rows)
  prepared = [dataclasses.replace(r, path=str(outputs[r.scan_id].volume.resolve()))
              for r in records if r.scan_id in measures]
  manifest_path = None
  if prepared:
    manifest_path = manifest_lib.write_manifest(
        prepared, out / "manifest.csv", qc={sid: f"flagged: {why}" for sid, why in flagged.items()})
  return Result(manifest=manifest_path, qc_table=qc_table,
                prepared=tuple(sid for sid, (m, _) in ran.items() if m is not None), reused=reused,
                flagged=flagged, errors=errors)


def _shape(text: str) -> tuple[int, int, int]:
  try:
    vals = tuple(int(v) for v in text.split(","))
  except ValueError:
    vals = ()
  if len(vals) != 3 or min(vals) < 1:
    raise argparse.ArgumentTypeError(f"--shape {text!r}: give three comma-separated positive integers (X,Y,Z).")
  return vals


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ldae_jax.data.prepare", description=__doc__.split("\n\n")[0])
  p.add_argument("source", help="BIDS dataset folder, or a CSV of raw scans (subject, path, diagnosis, age"
                                "[, session])")
  p.add_argument("--out", required=True, help="output folder (created); a rerun resumes")
  p.add_argument("--workers", type=int, default=1,
                 help="scans prepared in parallel, one process each (default 1; 0: one per available core)")
  p.add_argument("--diagnosis_column", default="diagnosis", help="participants.tsv column of the diagnosis")
  p.add_argument("--age_column", default="age", help="participants.tsv column of the age (years)")
  p.add_argument("--classes", default=",".join(manifest_lib.DEFAULT_CLASSES),
                 help="comma-separated diagnoses (default AD,CN,MCI)")
  p.add_argument("--unknown_diagnosis", choices=("error", "drop"), default="error",
                 help="a scan whose diagnosis is not in --classes: listed as an error (default) or left out")
  p.add_argument("--deformable", action="store_true",
                 help="add a SyN (deformable) registration of the extracted brain after the affine")
  p.add_argument("--shape", type=_shape, default=prepare_scan.Settings.shape,
                 help="X,Y,Z voxels of the output grid (default 128,160,128)")
  p.add_argument("--spacing", type=float, default=prepare_scan.Settings.spacing_mm,
                 help="isotropic voxel size in mm (default 1.5)")
  p.add_argument("--percentile_clip", type=float, default=0.0,
                 help="clip above this percentile before min-max (default 0: plain min-max, as the reference)")
  p.add_argument("--qc_mad_k", type=float, default=qc.DEFAULT_MAD_K,
                 help=f"flag measures further than k MAD from the dataset's median (default {qc.DEFAULT_MAD_K:g}; "
                      "0: absolute bounds only)")
  p.add_argument("--quiet", action="store_true", help="no progress output")
  p.add_argument("--verbose", action="store_true", help="on an error, print the Python traceback as well")
  args = p.parse_args(argv)
  from ldae_jax.cli import common  # pylint: disable=import-outside-toplevel
  settings = prepare_scan.Settings(shape=tuple(args.shape), spacing_mm=args.spacing,
                                   percentile_clip=args.percentile_clip, deformable=args.deformable)
  t0 = time.time()
  try:
    result = common.run_reporting_user_errors(lambda: prepare_dataset(
        args.source, args.out, settings=settings, workers=args.workers,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        diagnosis_column=args.diagnosis_column, age_column=args.age_column,
        unknown_diagnosis=args.unknown_diagnosis, bounds=qc.Bounds(mad_k=args.qc_mad_k),
        progress=not args.quiet), verbose=args.verbose)
  except registration.MissingDependencyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n_ok = len(result.prepared) + len(result.reused)
  print(f"prepared {n_ok} scans ({len(result.reused)} from an earlier run), {len(result.flagged)} flagged by QC, "
        f"{len(result.errors)} failed, {time.time() - t0:.0f} s -> {result.manifest or 'no manifest'}; "
        f"QC: {result.qc_table}")
  for sid, why in result.flagged.items():
    print(f"  flagged {sid}: {why}")
  for where, message in result.errors.items():
    print(f"  FAILED {where}: {message}", file=sys.stderr)
  return 1 if result.errors else 0


if __name__ == "__main__":
  sys.exit(main())
