"""Known factors: the synthetic cohort's generating volumes, or a manifest's named numeric columns."""

import csv

import numpy as np
import pytest

from configs import quickstart
from ldae_jax.evaluation import known_factors


def test_synthetic_factors_come_from_the_cohort_ground_truth(tmp_path):
  c = quickstart.get_config()
  assert known_factors.read(c, tmp_path) is None  # no cohort generated yet
  (tmp_path / "cohort").mkdir()
  with open(tmp_path / "cohort" / "ground_truth.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=("scan_id", "subject") + known_factors.SYNTHETIC)
    w.writeheader()
    for i in range(3):
      w.writerow({"scan_id": f"x{i}", "subject": f"s{i}", **{k: 10.0 * i + j for j, k in enumerate(known_factors.SYNTHETIC)}})
  truth = known_factors.read(c, tmp_path)
  t = known_factors.table(truth, ["x2", "x0"], "test")
  assert list(t) == list(known_factors.SYNTHETIC)
  np.testing.assert_array_equal(t["ventricle_ml"], [21.0, 1.0])
  with pytest.raises(ValueError, match=r"1 train scan\(s\).*rerun the latents"):
    known_factors.table(truth, ["x0", "gone"], "train")


def test_known_factors_come_from_named_manifest_columns(tmp_path):
  c = quickstart.get_config()
  for i in range(3):
    (tmp_path / f"s{i}.nii.gz").write_bytes(b"")
  (tmp_path / "m.csv").write_text("subject,path,diagnosis,age,icv_ml\n" + "".join(
      f"s{i},s{i}.nii.gz,CN,70,{1400 + i}\n" for i in range(3)))
  c.data.manifest = str(tmp_path / "m.csv")
  assert known_factors.read(c, tmp_path) is None  # no column asked for
  c.eval.known_factors = ("icv_ml",)
  truth = known_factors.read(c, tmp_path)
  assert sorted(v["icv_ml"] for v in truth.values()) == [1400.0, 1401.0, 1402.0]
  table = known_factors.table(truth, list(truth), "test")
  assert list(table) == ["icv_ml"]
  c.eval.known_factors = ("icv_ml", "gm_ml")
  with pytest.raises(ValueError, match=r"no column \['gm_ml'\]"):
    known_factors.read(c, tmp_path)
