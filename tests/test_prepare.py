"""The raw-scan preparation: brain extraction against a hand-stripped brain, invariance to the file's grid,
per-scan errors, QC flags, the BIDS layout -> manifest, resuming.

Real data: Colin27 (`ch2.nii.gz`, a whole head) and its hand skull-stripped brain (`ch2bet.nii.gz`) from
Debian's `mricron-data` package, fetched once per session with `apt-get download` (never committed); the
tests that need it skip when that fails. The layout / manifest tests use the bundled MNI template as their
scans with the registration replaced by the identity (the template is in MNI space already), so they run in
seconds and test the bookkeeping, not ANTs.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import sys
import pathlib
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ldae_jax.data import brain_mask
from ldae_jax.data import manifest as manifest_lib
from ldae_jax.data import nifti
from ldae_jax.data import qc

from ldae_jax.data import prepare
from ldae_jax.data import prepare_scan
from ldae_jax.data import registration

needs_ants = pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                                reason="antspyx is not installed (pip install antspyx): the preparation needs it "
                                       "for N4 and registration")

MRICRON_TEMPLATES = "usr/share/mricron/templates"


@pytest.fixture(scope="session")
def colin27(tmp_path_factory) -> pathlib.Path:
  """The folder holding ch2.nii.gz and ch2bet.nii.gz (installed, or extracted from the .deb)."""
  installed = pathlib.Path("/") / MRICRON_TEMPLATES
  if (installed / "ch2.nii.gz").is_file() and (installed / "ch2bet.nii.gz").is_file():
    return installed
  if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
    pytest.skip("Colin27 test data: needs apt-get and dpkg-deb (Debian's mricron-data package)")
  work = tmp_path_factory.mktemp("mricron")
  try:
    subprocess.run(["apt-get", "download", "mricron-data"], cwd=work, check=True, capture_output=True,
                   timeout=300)
    deb = next(work.glob("mricron-data_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, capture_output=True, timeout=300)
  except (subprocess.SubprocessError, OSError, StopIteration) as e:
    pytest.skip(f"Colin27 test data: `apt-get download mricron-data` failed ({e}); run `apt-get update` first "
                "or install the package")
  folder = work / "x" / MRICRON_TEMPLATES
  if not (folder / "ch2.nii.gz").is_file():
    pytest.skip(f"Colin27 test data: mricron-data has no {MRICRON_TEMPLATES}/ch2.nii.gz")
  return folder


def _las_anisotropic_cropped_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  """ch2 cropped (air and a little neck), resampled to 1 x 1.2 x 0.9 mm and stored LAS (x flipped)."""
  img = nib.load(str(src))
  data = np.asarray(img.dataobj, dtype=np.float32)[8:173, 6:211, 0:170]  # the brain is in 18..161, 19..198, 4..155
  crop = np.eye(4)
  crop[:3, 3] = (8, 6, 0)
  affine = img.affine @ crop
  zooms = np.array([1.0, 1.2, 0.9])
  shape = np.floor((np.array(data.shape) - 1) / zooms).astype(int) + 1
  # New voxel ijk sits at old voxel (zooms * ijk): a pure scaling of the index grid, same world origin.
  resampled = ndimage.affine_transform(data, np.diag(zooms), output_shape=tuple(shape), order=1, mode="nearest")
  affine = affine @ np.diag([*zooms, 1.0])
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
  las = nib.Nifti1Image(np.flip(resampled, 0).astype(np.float32), affine @ flip)
  assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
  nib.save(las, str(dst))
  return dst


def _prepare(src: pathlib.Path, out: pathlib.Path, scan_id: str):
  registration.set_threads(prepare.available_cpus())
  outputs = prepare_scan.output_paths(out, scan_id.split("_")[0], 0, scan_id)
  return outputs, prepare_scan.prepare_scan(src, outputs, scan_id=scan_id)


@pytest.fixture(scope="module")
def ch2_prepared(colin27, tmp_path_factory):
  return _prepare(colin27 / "ch2.nii.gz", tmp_path_factory.mktemp("ch2"), "sub-colin_ses-M000")


@pytest.fixture(scope="module")
def ch2_las_prepared(colin27, tmp_path_factory):
  work = tmp_path_factory.mktemp("ch2las")
  copy = _las_anisotropic_cropped_copy(colin27 / "ch2.nii.gz", work / "ch2_las.nii.gz")
  return _prepare(copy, work / "out", "sub-colinlas_ses-M000")


@needs_ants
def test_brain_mask_matches_the_hand_stripped_brain(colin27, ch2_prepared):
  outputs, measures = ch2_prepared
  mask, mask_affine = nifti.read_checked(outputs.mask_native)
  bet = nib.load(str(colin27 / "ch2bet.nii.gz"))
  np.testing.assert_allclose(mask_affine, bet.affine)  # the scan's own voxels
  truth = np.asarray(bet.dataobj) > 0
  d = brain_mask.dice(mask > 0, truth)
  print(f"Dice vs ch2bet (native space): {d:.4f}; measures {measures}")
  assert d >= 0.93
  assert measures["brain_ml"] == pytest.approx(brain_mask.volume_ml(truth, (1, 1, 1)), rel=0.1)
  assert 0.9 < measures["affine_scale"] < 1.1  # Colin27 is in MNI space already
  assert measures["ncc"] > qc.ABSOLUTE_BOUNDS["ncc"][0]
  assert qc.flag_outliers({"colin": measures}) == {}
  # The output is on the package's grid, skull-stripped, in [0, 1], and reads back unchanged by the loader.
  img = nib.load(str(outputs.volume))
  np.testing.assert_allclose(img.affine, nifti.volume_affine(nifti.DEFAULT_SHAPE, nifti.DEFAULT_SPACING_MM))
  volume = nifti.load_volume(outputs.volume)
  grid_mask = nifti.load_volume(outputs.mask) > 0.5
  assert volume.shape == nifti.DEFAULT_SHAPE and volume.min() == 0.0 and volume.max() == 1.0
  assert not volume[~grid_mask].any() and np.median(volume[grid_mask]) > 0.2
  # In MNI space the mask lies on the template's brain.
  _, template_mask = registration.template_on_grid(nifti.DEFAULT_SHAPE, nifti.DEFAULT_SPACING_MM)
  assert brain_mask.dice(grid_mask, template_mask) > 0.93
  assert outputs.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads(outputs.measures.read_text())
  assert saved["settings"] == prepare_scan.Settings().as_dict()


@needs_ants
def test_reoriented_resampled_cropped_copy_gives_the_same_mask(ch2_prepared, ch2_las_prepared):
  (a, _), (b, measures) = ch2_prepared, ch2_las_prepared
  mask_a = nifti.load_volume(a.mask) > 0.5
  mask_b = nifti.load_volume(b.mask) > 0.5
  d = brain_mask.dice(mask_a, mask_b)
  print(f"Dice original vs LAS / 1x1.2x0.9 mm / cropped copy (MNI grid): {d:.4f}; measures {measures}")
  assert d >= 0.98
  _, affine = nifti.read_checked(b.mask_native)
  assert nib.aff2axcodes(affine) == ("L", "A", "S")  # the native mask is in the copy's own voxels
  assert measures["brain_ml"] == pytest.approx(json.loads(a.measures.read_text())["brain_ml"], rel=0.03)


# ------------------------------------------------------------------ pure parts: brain mask refinement, QC


def test_refinement_moves_a_shifted_prior_onto_the_tissue_boundary():
  """A bright 'brain' ball in dark CSF inside a bright 'skull' shell; the prior is 3 mm too big and 2 mm
  off-centre. On anisotropic voxels the refined mask finds the ball."""
  voxel = np.array([1.0, 1.5, 0.8])
  shape = (90, 60, 110)
  world = np.stack(np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, voxel)], indexing="ij"), -1)
  centre = np.array(shape) * voxel / 2
  r = np.linalg.norm(world - centre, axis=-1)
  image = np.where(r < 30, 1.0, np.where(r < 34, 0.15, np.where(r < 38, 0.9, 0.0)))
  image = image + np.random.default_rng(0).normal(0, 0.05, shape)
  truth = r < 30
  prior = np.linalg.norm(world - centre - [2.0, 0, 0], axis=-1) < 33
  refined = brain_mask.refine_brain_mask(image, prior.astype(np.float32), voxel)
  assert brain_mask.dice(prior, truth) < 0.93
  assert brain_mask.dice(refined, truth) > 0.98
  with pytest.raises(ValueError, match="no part of the template's brain"):
    brain_mask.refine_brain_mask(image, np.zeros(shape), voxel)


def test_qc_flags_absolute_and_dataset_outliers():
  good = dict(ncc=0.7, brain_ml=1400.0, mask_fraction=1.0, affine_scale=1.0)
  scans = {f"s{i}": dict(good, brain_ml=1400.0 + 20 * i) for i in range(8)}
  scans["big"] = dict(good, brain_ml=2000.0)  # inside the absolute bounds, far from this dataset
  scans["failed"] = dict(good, ncc=0.2)
  flags = qc.flag_outliers(scans)
  assert set(flags) == {"big", "failed"}
  assert "brain_ml 2e+03 outside the dataset's median" in flags["big"]
  assert flags["failed"].startswith("ncc 0.2 < 0.45")
  few = {k: scans[k] for k in ("s0", "s1", "big")}  # too few scans for a median: absolute bounds only
  assert qc.flag_outliers(few) == {}
  assert set(qc.flag_outliers(scans, qc.Bounds(mad_k=0))) == {"failed"}
  assert qc.ncc(np.arange(10.0), -np.arange(10.0), np.ones(10, bool)) == pytest.approx(-1.0)


# ------------------------------------------------------------------ the dataset: BIDS -> manifest, errors


@pytest.fixture()
def identity_registration(monkeypatch):
  """The registration as the identity and no N4: the 'scans' below are the MNI template itself."""

  import ants  # pylint: disable=import-outside-toplevel

  def register_affine(moving, workdir):
    path = str(pathlib.Path(workdir) / "identity.mat")
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), path)
    return registration.Registration(to_template=(path,), to_scan=(path,), to_scan_invert=(True,), affine=path)

  monkeypatch.setattr(registration, "register_affine", register_affine)
  monkeypatch.setattr(registration, "n4", lambda image: image)


def _template_scan(path: pathlib.Path, *, gain: float = 1.0, las: bool = False, t2: bool = False):
  from nilearn import datasets  # pylint: disable=import-outside-toplevel
  img = datasets.load_mni152_template(resolution=registration.TEMPLATE_RESOLUTION_MM)
  data, affine = np.asarray(img.dataobj, np.float32) * gain, img.affine
  if t2:  # inverted contrast inside the head: bright CSF, dark white matter
    data = np.where(data > 0.05, 1.0 - data, 0.0).astype(np.float32)
  if las:
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    data, affine = np.flip(data, 0), affine @ flip
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
  return path


def _bids(root: pathlib.Path) -> pathlib.Path:
  """sub-01: two sessions; sub-02: a truncated file; sub-03: no session folder, stored LAS; sub-04: not in
  participants.tsv; sub-05: a session label without months; sub-06: a 4D file; sub-07: a T2-like image."""
  (root / "participants.tsv").parent.mkdir(parents=True, exist_ok=True)
  (root / "participants.tsv").write_text(
      "participant_id\tgroup\tage_years\n"
      "sub-01\tCN\t70.5\nsub-02\tAD\t71\nsub-03\tmci\tn/a\nsub-05\tCN\t60\nsub-06\tAD\t65\nsub-07\tCN\t66\n")
  _template_scan(root / "sub-01/ses-M000/anat/sub-01_ses-M000_T1w.nii.gz")
  _template_scan(root / "sub-01/ses-M012/anat/sub-01_ses-M012_T1w.nii.gz", gain=0.9)
  good = _template_scan(root / "tmp.nii.gz")
  bad = root / "sub-02/ses-M000/anat/sub-02_ses-M000_T1w.nii.gz"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
  good.unlink()
  _template_scan(root / "sub-03/anat/sub-03_T1w.nii.gz", las=True)
  _template_scan(root / "sub-04/anat/sub-04_T1w.nii.gz")
  _template_scan(root / "sub-05/ses-baseline/anat/sub-05_ses-baseline_T1w.nii.gz")
  four_d = root / "sub-06/anat/sub-06_T1w.nii"
  four_d.parent.mkdir(parents=True)
  nib.save(nib.Nifti1Image(np.zeros((40, 40, 40, 3), np.float32), np.eye(4)), str(four_d))
  _template_scan(root / "sub-07/anat/sub-07_T1w.nii.gz", t2=True)
  (root / "sub-01/ses-M000/anat/sub-01_ses-M000_T2w.nii.gz").write_bytes(b"not read: not a T1w")
  return root


@needs_ants
def test_bids_dataset_to_manifest_with_per_scan_errors_and_resume(tmp_path, identity_registration, capsys):
  root = _bids(tmp_path / "bids")
  out = tmp_path / "prepared"
  code = prepare.main([str(root), "--out", str(out), "--diagnosis_column", "group", "--age_column", "age_years"])
  captured = capsys.readouterr()
  assert code == 1  # some scans failed
  records = manifest_lib.read_manifest(out / "manifest.csv")
  manifest_lib.check_scan_files(records)
  assert [(r.scan_id, r.diagnosis) for r in records] == [
      ("sub-01_ses-M000", "CN"), ("sub-01_ses-M012", "CN"), ("sub-03_ses-M000", "MCI")]
  assert records[0].age == pytest.approx(70.5) and records[1].age == pytest.approx(71.5)  # + 12 months
  assert np.isnan(records[2].age)
  for r in records:
    anat = out / r.subject / f"ses-M{r.session_months:03d}" / "anat"
    assert r.path == str((anat / f"{r.scan_id}_T1w.nii.gz").resolve())
    assert nifti.load_volume(r.path).shape == nifti.DEFAULT_SHAPE
  # The LAS-stored copy of the template lands on the same voxels as the RAS one.
  np.testing.assert_allclose(nifti.load_volume(records[2].path), nifti.load_volume(records[0].path), atol=1e-3)
  with open(out / "qc.csv", newline="") as f:
    table = list(csv.DictReader(f))
  by_source = {pathlib.Path(row["source"]).name: row for row in table}
  assert by_source["sub-01_ses-M000_T1w.nii.gz"]["status"] == "ok"
  assert float(by_source["sub-01_ses-M000_T1w.nii.gz"]["ncc"]) > 0.99
  expected_errors = {
      "sub-02_ses-M000_T1w.nii.gz": "cannot read as NIfTI",
      "sub-04_T1w.nii.gz": "no row in participants.tsv",
      "sub-05_ses-baseline_T1w.nii.gz": "does not give months",
      "sub-06_T1w.nii": "not one 3D volume",
      "sub-07_T1w.nii.gz": "does not look like a T1-weighted scan",
  }
  for name, message in expected_errors.items():
    assert by_source[name]["status"] == "error" and message in by_source[name]["reason"], name
    assert name in by_source[name]["reason"] or name in by_source[name]["source"]
    assert f"FAILED {root}" in captured.err and message in captured.err
  assert "T2w" not in " ".join(by_source)
  for r in records:
    assert (out / "qc" / f"{r.scan_id}.png").is_file()
  assert not list(out.rglob(".tmp-*"))  # atomic writes leave no temporaries

  # A rerun prepares nothing again (same settings) and writes the same manifest.
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*_T1w.nii.gz")}
  manifest_before = (out / "manifest.csv").read_text()
  result = prepare.prepare_dataset(root, out, diagnosis_column="group", age_column="age_years", progress=False)
  assert result.prepared == () and set(result.reused) == {r.scan_id for r in records}
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*_T1w.nii.gz")} == before
  assert (out / "manifest.csv").read_text() == manifest_before
  # Other settings prepare the scans again.
  result = prepare.prepare_dataset(root, out, settings=prepare_scan.Settings(percentile_clip=99.0),
                                   diagnosis_column="group", age_column="age_years", progress=False)
  assert set(result.prepared) == {r.scan_id for r in records}


@needs_ants
def test_flagged_scans_are_marked_in_the_manifest_and_skipped_by_the_loader(tmp_path, identity_registration):
  root = tmp_path / "bids"
  root.mkdir()
  (root / "participants.tsv").write_text("participant_id\tdiagnosis\tage\nsub-01\tAD\t70\nsub-02\tCN\t70\n")
  _template_scan(root / "sub-01/anat/sub-01_T1w.nii.gz")
  _template_scan(root / "sub-02/anat/sub-02_T1w.nii.gz")
  bounds = qc.Bounds(absolute=dict(qc.ABSOLUTE_BOUNDS, brain_ml=(3000.0, 4000.0)))  # every brain too small
  result = prepare.prepare_dataset(root, tmp_path / "out", bounds=bounds, progress=False)
  assert set(result.flagged) == {"sub-01_ses-M000", "sub-02_ses-M000"} and not result.errors
  text = (tmp_path / "out" / "manifest.csv").read_text()
  assert text.count("flagged: brain_ml") == 2
  with pytest.raises(manifest_lib.ManifestError, match="every row failed quality control"):
    manifest_lib.read_manifest(tmp_path / "out" / "manifest.csv")


@needs_ants
def test_csv_input_and_errors_from_worker_processes(tmp_path):
  """A CSV of raw scans, two processes, every scan broken: each error names its file; no manifest."""
  (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(b"\x5c\x01" + b"\0" * 100)[:40])
  nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "tiny.nii"))
  (tmp_path / "raw.csv").write_text("subject,path,diagnosis,age\ns1,trunc.nii.gz,AD,70\ns2,tiny.nii,CN,71\n"
                                    "s3,missing.nii.gz,CN,72\n")
  result = prepare.prepare_dataset(tmp_path / "raw.csv", tmp_path / "out", workers=2, progress=False)
  assert result.manifest is None and not (tmp_path / "out" / "manifest.csv").exists()
  assert set(result.errors) == {"s1_ses-M000", "s2_ses-M000", "s3_ses-M000"}
  assert "trunc.nii.gz" in result.errors["s1_ses-M000"]
  assert "tiny.nii" in result.errors["s2_ses-M000"] and "whole-brain 3D T1" in result.errors["s2_ses-M000"]
  assert "missing.nii.gz: no such file" in result.errors["s3_ses-M000"]


def test_cli_user_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "bids" / "sub-01" / "anat").mkdir(parents=True)
  with pytest.raises(SystemExit) as e:
    prepare.main([str(tmp_path / "bids"), "--out", str(tmp_path / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "participants.tsv: not found" in err and "Traceback" not in err


def test_missing_antspyx_is_one_error_naming_the_install(tmp_path, monkeypatch, capsys):
  root = tmp_path / "bids"
  (root / "sub-01" / "anat").mkdir(parents=True)
  (root / "participants.tsv").write_text("participant_id\tdiagnosis\tage\nsub-01\tCN\t70\n")
  nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(root / "sub-01/anat/sub-01_T1w.nii"))
  monkeypatch.setitem(sys.modules, "ants", None)  # `import ants` now raises ImportError
  assert prepare.main([str(root), "--out", str(tmp_path / "out")]) == 2
  assert "pip install antspyx" in capsys.readouterr().err
