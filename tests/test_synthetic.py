"""Synthetic cohort: file format, determinism, and that the ageing / disease factors are in the images."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from ldae_jax.data import manifest, nifti, synthetic

SMALL = dict(shape=(32, 40, 32), spacing_mm=6.0)  # the quickstart grid
MID = dict(shape=(64, 80, 64), spacing_mm=3.0)  # fine enough to measure ventricles from the image


def measured_ventricle_ml(volume: np.ndarray, spacing_mm: float) -> float:
  """Dark (CSF-like) voxels in a box around the lateral ventricles, from the image alone."""
  inv = np.linalg.inv(nifti.volume_affine(volume.shape, spacing_mm))
  lo = np.floor(inv @ [-30.0, -50.0, 0.0, 1.0])[:3].astype(int)
  hi = np.ceil(inv @ [30.0, 25.0, 35.0, 1.0])[:3].astype(int) + 1
  box = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
  white = np.percentile(volume[volume > 0], 90)  # ~ white matter, robust to bias and noise
  return float(((box > 0) & (box < 0.45 * white)).sum() * spacing_mm**3 / 1000.0)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
  out = tmp_path_factory.mktemp("cohort")
  return synthetic.generate_cohort(out, subjects=4, seed=0, progress=False, **SMALL)


def test_cohort_files_manifest_and_ground_truth(cohort):
  recs = manifest.read_manifest(cohort)  # the project's own loader accepts it
  subjects = {r.subject for r in recs}
  assert len(subjects) == 4
  for s in subjects:
    months = sorted(r.session_months for r in recs if r.subject == s)
    assert 2 <= len(months) <= 5 and months == list(range(0, 6 * len(months), 6))
  img = nib.load(recs[0].path)
  assert img.shape == SMALL["shape"]
  np.testing.assert_allclose(img.affine, nifti.volume_affine(SMALL["shape"], 6.0))
  vol = nifti.load_volume(recs[0].path, **SMALL)
  assert vol.min() == 0.0 and vol.max() == 1.0
  with open(cohort.parent / "ground_truth.csv") as f:
    truth = list(csv.DictReader(f))
  assert [t["scan_id"] for t in truth] == [r.scan_id for r in recs]
  for s in subjects:  # atrophy only progresses within a subject
    vent = [float(t["ventricle_ml"]) for t in truth if t["subject"] == s]
    hip = [float(t["hippocampus_ml"]) for t in truth if t["subject"] == s]
    assert vent == sorted(vent) and hip == sorted(hip, reverse=True)
  # Ages at sessions advance with the session months.
  r0 = [r for r in recs if r.subject == recs[0].subject]
  np.testing.assert_allclose(np.diff([r.age for r in r0]), 0.5, atol=0.011)


def test_same_seed_byte_identical_other_seed_differs(cohort, tmp_path, capsys):
  assert synthetic.main(["--out", str(tmp_path / "a"), "--subjects", "2", "--seed", "0", "--shape", "32,40,32",
                         "--spacing", "6", "--quiet"]) == 0
  assert "2 subjects" in capsys.readouterr().out
  ref = cohort.parent
  for f in sorted((tmp_path / "a").rglob("*.nii.gz")):
    assert f.read_bytes() == (ref / f.relative_to(tmp_path / "a")).read_bytes(), f  # subject i = SeedSeq(seed, i)
  b = synthetic.generate_cohort(tmp_path / "b", subjects=2, seed=1, progress=False, **SMALL)
  first_a = sorted((tmp_path / "a").rglob("*.nii.gz"))[0]
  first_b = sorted(b.parent.rglob("*.nii.gz"))[0]
  assert first_a.read_bytes() != first_b.read_bytes()
  with pytest.raises(ValueError, match="field of view"):
    synthetic.generate_cohort(tmp_path / "c", subjects=1, seed=0, shape=(32, 40, 32), spacing_mm=1.5)


def test_atrophy_model_is_monotone():
  for dx in synthetic.DIAGNOSES:
    radii = np.array([synthetic.atrophy_radii(age, dx, 0.0) for age in (55, 65, 75, 85, 90)])
    assert np.all(np.diff(radii, axis=0) > 0)  # every radius grows with age
  at75 = {dx: synthetic.atrophy_radii(75, dx, 1.0) for dx in synthetic.DIAGNOSES}
  assert all(a < b < c for a, b, c in zip(at75["CN"], at75["MCI"], at75["AD"]))


@pytest.fixture(scope="session")
def anatomy():
  return synthetic.build_anatomy(MID["shape"], MID["spacing_mm"], np.random.default_rng(123))


def _scan(anatomy, age, dx, seed=0):
  return synthetic.render_scan(anatomy, age=age, diagnosis=dx, years=0.0, rng=np.random.default_rng(seed))


def test_ventricles_in_the_image_grow_with_age_and_are_larger_in_ad(anatomy):
  sp = MID["spacing_mm"]
  cn = [measured_ventricle_ml(_scan(anatomy, age, "CN", seed=i)[0], sp) for i, age in enumerate((58, 70, 80, 89))]
  assert np.all(np.diff(cn) > 1.0), cn  # mL, clear monotone ageing effect
  for age in (62, 78):
    v_cn = measured_ventricle_ml(_scan(anatomy, age, "CN", seed=5)[0], sp)
    v_ad = measured_ventricle_ml(_scan(anatomy, age, "AD", seed=6)[0], sp)
    assert v_ad > v_cn + 5.0, (age, v_cn, v_ad)  # same anatomy and age, disease only
  # The image measure tracks the ground truth across ages and diagnoses.
  pairs = [(measured_ventricle_ml(v, sp), m["ventricle_ml"])
           for v, m in (_scan(anatomy, a, d, seed=9) for a in (60, 75, 88) for d in synthetic.DIAGNOSES)]
  assert np.corrcoef(np.array(pairs).T)[0, 1] > 0.95


def test_hippocampus_and_grey_matter_shrink_with_disease(anatomy):
  cn = _scan(anatomy, 75, "CN")[1]
  mci = _scan(anatomy, 75, "MCI")[1]
  ad = _scan(anatomy, 75, "AD")[1]
  assert cn["hippocampus_ml"] > mci["hippocampus_ml"] > ad["hippocampus_ml"]
  assert ad["hippocampus_ml"] < 0.85 * cn["hippocampus_ml"]  # a clearly visible AD effect
  assert cn["gm_ml"] > ad["gm_ml"] and cn["icv_ml"] == ad["icv_ml"]  # atrophy, not a smaller head
  # The lost hippocampal tissue is visible: mean intensity in the hippocampal region drops.
  vol_cn, vol_ad = _scan(anatomy, 75, "CN", seed=1)[0], _scan(anatomy, 75, "AD", seed=1)[0]
  region = np.zeros(anatomy.shape, bool).ravel()
  region[anatomy.index[anatomy.hippocampus_sdf < 0]] = True
  region = region.reshape(anatomy.shape)
  assert vol_ad[region].mean() < vol_cn[region].mean() - 0.03


def test_atrophy_scale_multiplies_every_radius_and_the_image_effect(anatomy):
  base = np.array(synthetic.atrophy_radii(75, "AD", 1.0, 1.1))
  np.testing.assert_allclose(synthetic.atrophy_radii(75, "AD", 1.0, 1.1, scale=3.0), 3.0 * base, rtol=1e-12)

  def ad_minus_cn(scale):
    kw = dict(years=0.0, atrophy_scale=scale)
    ad = synthetic.render_scan(anatomy, age=75, diagnosis="AD", rng=np.random.default_rng(1), **kw)[1]
    cn = synthetic.render_scan(anatomy, age=75, diagnosis="CN", rng=np.random.default_rng(1), **kw)[1]
    return ad["ventricle_ml"] - cn["ventricle_ml"]

  assert ad_minus_cn(3.0) > 2.0 * ad_minus_cn(1.0) > 0


def test_nuisance_scale_shrinks_pose_size_and_bias_but_keeps_subjects_and_anatomy(tmp_path):
  def cohort(scale):
    out = tmp_path / f"n{scale}"
    synthetic.generate_cohort(out, subjects=3, seed=0, progress=False, nuisance_scale=scale, **SMALL)
    with open(out / "ground_truth.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    vols = [nifti.load_volume(r.path, **SMALL) for r in manifest.read_manifest(out / "manifest.csv")]
    return rows, vols

  raw, raw_vols = cohort(1.0)
  reg, reg_vols = cohort(0.0)
  # The same subjects, sessions, diagnoses and ages: only the nuisance draws are scaled, not skipped.
  assert [(r["scan_id"], r["diagnosis"], r["age"]) for r in raw] == [(r["scan_id"], r["diagnosis"], r["age"])
                                                                     for r in reg]
  # No head-size variation left, and every subject's ICV equals the template's (whose own deformation,
  # unaffected by the scale, moves it by well under the 4 % head-size spread).
  assert all(float(r["head_scale"]) == 1.0 for r in reg)
  assert len({round(float(r["head_scale"]), 6) for r in raw}) == len({r["subject"] for r in raw}) > 1
  icv_spread = lambda rows: np.std([float(r["icv_ml"]) for r in rows]) / np.mean([float(r["icv_ml"]) for r in rows])
  assert icv_spread(reg) < 0.5 * icv_spread(raw)
  # Two sessions of one subject 6 months apart: without the per-scan bias field they differ by little more
  # than atrophy progression and noise.
  assert raw[0]["subject"] == raw[1]["subject"]
  change = lambda v: float(np.abs(v[0] - v[1]).mean())
  assert change(reg_vols) < 0.8 * change(raw_vols)


def test_two_worker_processes_write_the_same_cohort_as_one(cohort, tmp_path):
  """Subjects are rendered in parallel from (seed, i) alone: 2 processes give byte-identical files, listed in
  subject order, to the 1-process fixture cohort."""
  two = synthetic.generate_cohort(tmp_path / "two", subjects=4, seed=0, progress=False, workers=2, **SMALL)
  one_dir, two_dir = cohort.parent, two.parent
  files = sorted(p.relative_to(one_dir) for p in one_dir.rglob("*.nii.gz"))
  assert files and files == sorted(p.relative_to(two_dir) for p in two_dir.rglob("*.nii.gz"))
  for f in files:
    assert (one_dir / f).read_bytes() == (two_dir / f).read_bytes(), f
  for name in ("ground_truth.csv", "cohort.json"):
    assert (one_dir / name).read_bytes() == (two_dir / name).read_bytes(), name
  # The manifest holds absolute paths: equal once each folder is named the same.
  assert (one_dir / "manifest.csv").read_text().replace(str(one_dir.resolve()), "D") == \
      (two_dir / "manifest.csv").read_text().replace(str(two_dir.resolve()), "D")
  with pytest.raises(ValueError, match="workers"):
    synthetic.generate_cohort(tmp_path / "bad", subjects=1, seed=0, workers=-1, **SMALL)
