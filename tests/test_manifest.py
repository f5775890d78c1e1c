"""Manifest schema, validation errors, sessions, write/read round trip and subject-level splits."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import pytest

from ldae_jax.data import manifest as M


def _cohort(tmp_path, rows, header="subject,path,diagnosis,age,session,latent_path"):
  """Writes a CSV (rows as strings) and touches every referenced scan file under tmp_path."""
  cols = header.split(",")
  for r in rows:
    cells = dict(zip(cols, r.split(",")))
    if cells.get("path") and not cells["path"].startswith("MISSING"):
      f = tmp_path / cells["path"]
      f.parent.mkdir(parents=True, exist_ok=True)
      f.touch()
  csv = tmp_path / "manifest.csv"
  csv.write_text("\n".join([header, *rows]) + "\n")
  return csv


def test_reads_columns_labels_sessions_and_relative_paths(tmp_path):
  csv = _cohort(tmp_path, [
      "s1,s1/ses-M000/a.nii.gz,CN,70.5,,",
      "s1,s1/ses-M012/a.nii.gz,mci,71.5,,lat/s1_12.npz",  # session from the path; case-insensitive class
      "s2,scans/s2_b.nii,AD,,M24,",  # session from the column, NaN age
      "s3,scans/s3.nii,AD,80,ses-M6,",
      "s4,scans/s4.nii,CN,66,,",  # no session anywhere -> 0
  ])
  recs = M.read_manifest(csv)
  assert [r.label for r in recs] == [1, 2, 0, 0, 1]  # sorted(classes): AD=0, CN=1, MCI=2
  assert [r.diagnosis for r in recs] == ["CN", "MCI", "AD", "AD", "CN"]
  assert [r.session_months for r in recs] == [0, 12, 24, 6, 0]
  assert [r.scan_id for r in recs] == ["s1_ses-M000", "s1_ses-M012", "s2_ses-M024", "s3_ses-M006", "s4_ses-M000"]
  assert recs[0].path == str((tmp_path / "s1/ses-M000/a.nii.gz").resolve())
  # A `latent_path` column (written by earlier versions; the latents now live in shards) is ignored.
  assert "latent_path" not in {f.name for f in dataclasses.fields(M.ScanRecord)}
  assert math.isnan(recs[2].age) and recs[0].age == 70.5
  # Optional columns may be absent altogether.
  csv2 = _cohort(tmp_path, ["s9,x/ses-M018/s9.nii,CN,60"], header="subject,path,diagnosis,age")
  (r,) = M.read_manifest(csv2)
  assert r.session_months == 18


def test_missing_column_names_file_and_fix(tmp_path):
  csv = _cohort(tmp_path, ["s1,a.nii,CN"], header="subject,path,diagnosis")
  with pytest.raises(M.ManifestError, match=r"manifest.csv: missing column\(s\) \['age'\].*Add them"):
    M.read_manifest(csv)
  axial = _cohort(tmp_path, ["s1,a.nii,CN,1"], header="subject,mri_path,diagnosis,age")
  with pytest.raises(M.ManifestError, match="rename 'mri_path' to 'path'"):
    M.read_manifest(axial)


def test_missing_file_unknown_diagnosis_and_bad_cells(tmp_path):
  csv = _cohort(tmp_path, ["s1,a.nii,CN,70,,", "s2,MISSING.nii,CN,70,,"])
  with pytest.raises(M.ManifestError, match=r"line 3: file not found: .*MISSING\.nii"):
    M.read_manifest(csv)
  assert len(M.read_manifest(csv, check_files=False)) == 2
  csv = _cohort(tmp_path, ["s1,a.nii,CN,70,,", "s2,b.nii,Alzheimer,70,,"])
  with pytest.raises(M.ManifestError, match=r"line 3: unknown diagnosis 'Alzheimer'.*\['AD', 'CN', 'MCI'\]"):
    M.read_manifest(csv)
  assert [r.subject for r in M.read_manifest(csv, unknown_diagnosis="drop")] == ["s1"]
  # The reference's AD/CN-only setups: MCI rows are dropped, labels follow sorted(classes).
  csv = _cohort(tmp_path, ["s1,a.nii,CN,70,,", "s2,b.nii,MCI,70,,", "s3,c.nii,AD,70,,"])
  recs = M.read_manifest(csv, classes=("CN", "AD"), unknown_diagnosis="drop")
  assert [(r.subject, r.label) for r in recs] == [("s1", 1), ("s3", 0)]
  csv = _cohort(tmp_path, ["s1,a.nii,CN,seventy,,"])
  with pytest.raises(M.ManifestError, match="line 2: age 'seventy' is not a number"):
    M.read_manifest(csv)
  csv = _cohort(tmp_path, ["s1,ses-M06/a.nii,CN,70,12,"])
  with pytest.raises(M.ManifestError, match="session column says 12 months but the path says ses-M06"):
    M.read_manifest(csv)
  csv = tmp_path / "empty.csv"
  csv.write_text("subject,path,diagnosis,age\n")
  with pytest.raises(M.ManifestError, match="no scans"):
    M.read_manifest(csv)
  with pytest.raises(M.ManifestError, match="manifest not found"):
    M.read_manifest(tmp_path / "nope.csv")


def test_duplicate_scans(tmp_path):
  csv = _cohort(tmp_path, ["s1,ses-M012/a.nii,CN,70,,", "s1,other/b.nii,CN,71,12,"])
  with pytest.raises(M.ManifestError, match=r"line 3: duplicate scan s1_ses-M012 \(also on line 2\)"):
    M.read_manifest(csv)
  csv = _cohort(tmp_path, ["s1,a.nii,CN,70,0,", "s2,a.nii,CN,71,0,"])
  with pytest.raises(M.ManifestError, match="line 3: duplicate scan file"):
    M.read_manifest(csv)


def test_write_read_round_trip(tmp_path):
  csv = _cohort(tmp_path, ["s1,d/ses-M000/a.nii,CN,70.25,,", "s2,d/b.nii,AD,,6,/abs/lat.npz"])
  recs = M.read_manifest(csv)
  out = M.write_manifest(recs, tmp_path / "copy.csv")
  assert out.read_text().splitlines()[:2] == ["subject,path,diagnosis,age,session",
                                              "s1,d/ses-M000/a.nii,CN,70.25,0"]  # relative inside the folder
  back = M.read_manifest(out)
  assert [r.scan_id for r in back] == [r.scan_id for r in recs]
  assert [r.path for r in back] == [r.path for r in recs]
  assert math.isnan(back[1].age)
  assert not list(tmp_path.glob(".tmp-*"))


def _records(n_subjects, sessions=3):
  dxs = ("AD", "CN", "MCI")
  return [M.ScanRecord(subject=f"s{i:03d}", path=f"/d/s{i:03d}_{k}.nii", diagnosis=dxs[i % 3], label=i % 3,
                       age=70.0, session_months=6 * k, scan_id=M.scan_id(f"s{i:03d}", 6 * k))
          for i in range(n_subjects) for k in range(sessions)]


def test_split_by_subject_disjoint_deterministic_stratified():
  recs = _records(60)
  a = M.split_by_subject(recs, val_fraction=0.1, test_fraction=0.2, seed=42)
  b = M.split_by_subject(recs, val_fraction=0.1, test_fraction=0.2, seed=42)
  c = M.split_by_subject(recs, val_fraction=0.1, test_fraction=0.2, seed=7)
  subj = {k: {r.subject for r in v} for k, v in a.items()}
  assert not subj["train"] & subj["val"] and not subj["train"] & subj["test"] and not subj["val"] & subj["test"]
  assert sum(len(v) for v in a.values()) == len(recs)  # every scan in exactly one split
  # sklearn GroupShuffleSplit counts: ceil(0.2 * 60) = 12 test, ceil(0.1 * 48) = 5 val subjects.
  assert (len(subj["test"]), len(subj["val"]), len(subj["train"])) == (12, 5, 43)
  assert {k: [r.scan_id for r in v] for k, v in a.items()} == {k: [r.scan_id for r in v] for k, v in b.items()}
  assert {r.subject for r in c["test"]} != subj["test"]
  # Stratified: 12 test subjects from 3 equal classes -> 4 of each.
  assert sorted(sum(1 for s in subj["test"] if int(s[1:]) % 3 == d) for d in range(3)) == [4, 4, 4]
  # The reference's LDAE fractions on a small cohort still give one val subject.
  tiny = M.split_by_subject(_records(20), val_fraction=0.005, test_fraction=0.1, seed=42)
  assert len({r.subject for r in tiny["val"]}) == 1 and len({r.subject for r in tiny["test"]}) == 2
  with pytest.raises(ValueError, match="non-empty train split"):
    M.split_by_subject(_records(2), val_fraction=0.5, test_fraction=0.5, seed=0)


def _bad_cohort(tmp_path):
  """A manifest of one good scan, a truncated .nii.gz, a 4D file and a file with NaN voxels."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ldae_jax.data import nifti  # pylint: disable=import-outside-toplevel
  vol = np.random.default_rng(0).random((8, 10, 8)).astype(np.float32)
  nifti.save_volume(tmp_path / "good.nii.gz", vol)
  full = nifti.save_volume(tmp_path / "cut.nii.gz", vol).read_bytes()
  (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])  # a copy interrupted half way
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  nib.save(nib.Nifti1Image(np.zeros((8, 10, 8, 3), np.float32), np.eye(4)), str(tmp_path / "fmri.nii.gz"))
  nan = vol.copy()
  nan[2, 3, 4] = np.nan
  nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii"))
  csv = tmp_path / "manifest.csv"
  csv.write_text("subject,path,diagnosis,age\ns1,good.nii.gz,CN,70\ns2,cut.nii.gz,AD,71\n"
                 "s3,fmri.nii.gz,MCI,72\ns4,nan.nii,CN,73\n")
  return csv


def test_check_scan_files_lists_every_bad_file_at_once(tmp_path):
  recs = M.read_manifest(_bad_cohort(tmp_path))
  with pytest.raises(M.ManifestError) as e:
    M.check_scan_files(recs, source="manifest.csv")
  msg = str(e.value)
  assert msg.startswith("3 of the 4 scans in manifest.csv cannot be used")
  assert "good.nii.gz" not in msg
  lines = msg.splitlines()
  assert any("s2_ses-M000" in l and "cut.nii.gz" in l and "cannot read" in l for l in lines)
  assert any("s3_ses-M000" in l and "fmri.nii.gz" in l and "not one 3D volume" in l for l in lines)
  assert any("s4_ses-M000" in l and "nan.nii" in l and "NaN" in l for l in lines)
  assert "remove their rows" in msg
  M.check_scan_files(recs[:1])  # the good one alone passes


def test_rows_that_failed_qc_are_skipped_and_logged(tmp_path, caplog):
  csv = _cohort(tmp_path, [
      "s1,s1/ses-M000/a.nii.gz,CN,70,,pass",
      "s2,s2/ses-M000/a.nii.gz,AD,71,,flagged: ncc 0.31 < 0.5",
      "s3,s3/ses-M000/a.nii.gz,MCI,72,,",  # empty = not checked: kept
  ], header="subject,path,diagnosis,age,session,qc")
  with caplog.at_level("WARNING", logger="ldae_jax.data.manifest"):
    recs = M.read_manifest(csv)
  assert [r.subject for r in recs] == ["s1", "s3"]
  assert "s2 s2/ses-M000/a.nii.gz (line 3: flagged: ncc 0.31 < 0.5)" in caplog.text
  (tmp_path / "all_flagged.csv").write_text("subject,path,diagnosis,age,qc\ns2,s2/ses-M000/a.nii.gz,AD,71,bad\n")
  with pytest.raises(M.ManifestError, match="every row failed quality control"):
    M.read_manifest(tmp_path / "all_flagged.csv")


def test_write_manifest_qc_column_round_trip(tmp_path):
  recs = [M.ScanRecord("s1", str(tmp_path / "a.nii"), "CN", 1, 70.0, 0, "s1_ses-M000"),
          M.ScanRecord("s2", str(tmp_path / "b.nii"), "AD", 0, 71.0, 0, "s2_ses-M000")]
  for r in recs:
    pathlib.Path(r.path).touch()
  out = M.write_manifest(recs, tmp_path / "m.csv", qc={"s2_ses-M000": "flagged: brain 400 ml"})
  assert out.read_text().splitlines()[0] == "subject,path,diagnosis,age,session,qc"
  assert [r.scan_id for r in M.read_manifest(out)] == ["s1_ses-M000"]
  assert "qc" not in M.write_manifest(recs, tmp_path / "n.csv").read_text().splitlines()[0]
