"""Linear probes: subject-grouped folds, train-only standardisation, AD as positive class, recovery of factors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import model_selection

from ldae_jax.evaluation import probes


def _cohort(n_subj, sessions, dim, seed, signal=1.0):
  """Codes = subject offset + diagnosis/age signal + scan noise; several scans per subject."""
  rng = np.random.default_rng(seed)
  diag_s = rng.choice(["AD", "CN", "MCI"], n_subj, p=[0.4, 0.4, 0.2])
  age_s = rng.uniform(60, 85, n_subj)
  offs = rng.normal(size=(n_subj, dim))
  codes, diag, age, subj = [], [], [], []
  for i in range(n_subj):
    for k in range(sessions):
      a = age_s[i] + 0.5 * k
      c = offs[i] + 0.3 * rng.normal(size=dim)
      c[0] += signal * 3.0 * {"AD": 1.0, "CN": -1.0, "MCI": 0.0}[diag_s[i]]
      c[1] += signal * (a - 72.5)
      codes.append(5.0 + 2.0 * c)  # not standardised: the probe must do it
      diag.append(diag_s[i]); age.append(a); subj.append(f"sub-{seed}-{i:03d}")
  return {"codes": np.array(codes), "diagnosis": np.array(diag), "age": np.array(age), "subject": np.array(subj)}


@pytest.fixture(scope="module")
def data():
  return _cohort(40, 3, 12, seed=0), _cohort(16, 3, 12, seed=1)


def test_recovers_known_factors(data):
  train, test = data
  res, fitted = probes.run_probes(train, test, n_folds=4)
  c, a = res["ad_vs_cn"], res["age"]
  assert c["positive_class"] == "AD" and c["test"]["confusion_matrix_labels"] == ["CN", "AD"]
  assert c["test"]["roc_auc"] > 0.95 and c["cv"]["roc_auc"] > 0.95
  assert a["test"]["mae"] < 0.3 * a["test"]["target_std"]
  # AD is positive: the direction points along the AD dimension (+ on dim 0).
  d = probes.manipulation_direction(fitted["ad_vs_cn"])
  assert abs(np.linalg.norm(d) - 1) < 1e-12 and d[0] == d.max() > 0.5
  table = probes.format_table({"trained": res})
  assert table.count("\n| trained |") == 2 and "Positive class: AD" in table
  lo, hi = c["test"]["roc_auc_ci95"]
  assert lo <= c["test"]["roc_auc"] <= hi <= 1.0 and c["test"]["n_subjects"] == len(
      np.unique(test["subject"][np.isin(test["diagnosis"], ["AD", "CN"])]))
  lo, hi = a["test"]["mae_ci95"]
  assert 0 < lo <= a["test"]["mae"] <= hi


def test_standardisation_fitted_on_probe_train_only(data):
  train, test = data
  _, fitted = probes.run_probes(train, test, n_folds=4)
  m = np.isin(train["diagnosis"], ["AD", "CN"])
  np.testing.assert_allclose(fitted["ad_vs_cn"].mean, train["codes"][m].mean(0), rtol=1e-12)
  np.testing.assert_allclose(fitted["ad_vs_cn"].std, train["codes"][m].std(0), rtol=1e-12)
  np.testing.assert_allclose(fitted["age"].mean, train["codes"].mean(0), rtol=1e-12)


def test_grouped_folds_never_split_a_subject(data):
  train, _ = data
  y = (train["diagnosis"] == "AD").astype(int)
  folds = probes._grouped_folds(y, train["subject"], 5, 0)
  assert len(folds) == 5
  for tr, va in folds:
    assert not set(train["subject"][tr]) & set(train["subject"][va])


def test_grouping_removes_subject_leakage():
  """Codes that identify the subject but carry no label signal: a random scan split (the reference's) scores
  far above chance, the grouped protocol does not."""
  d = _cohort(30, 4, 64, seed=3, signal=0.0)
  m = np.isin(d["diagnosis"], ["AD", "CN"])
  x, y, g = d["codes"][m], (d["diagnosis"][m] == "AD").astype(int), d["subject"][m]
  leaky = []
  for seed in range(3):
    tr, va = model_selection.train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed)
    p = probes._fit_logistic(x[tr], y[tr], 10.0, 0)
    leaky.append(probes.classification_metrics(y[va], probes._sigmoid(p.decision(x[va])))["roc_auc"])
  oof = np.zeros(len(y))
  for tr, va in probes._grouped_folds(y, g, 4, 0):
    oof[va] = probes._sigmoid(probes._fit_logistic(x[tr], y[tr], 10.0, 0).decision(x[va]))
  grouped = probes.classification_metrics(y, oof)["roc_auc"]
  assert np.mean(leaky) > 0.8 and grouped < 0.7


def test_classification_metrics_by_hand():
  y = np.array([1, 1, 1, 0, 0, 0, 0])
  p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4])
  m = probes.classification_metrics(y, p)
  assert m["confusion_matrix"] == [[3, 1], [1, 2]]  # rows true [CN, AD]
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(3 / 4) and m["accuracy"] == pytest.approx(5 / 7)
  assert m["roc_auc"] == pytest.approx(8 / 12)  # 8 of the 12 (AD, CN) pairs ranked correctly


def test_subject_bootstrap_resamples_whole_subjects():
  rng = np.random.default_rng(0)
  n = 30
  y = np.arange(n) % 2
  p = y + rng.normal(scale=0.8, size=n)
  subj = np.array([f"s{i:02d}" for i in range(n)])
  one = probes.subject_bootstrap(probes._auc_or_nan, subj, y, p, n_boot=300, seed=3)
  # Three identical scans per subject: resampling subjects draws the same subject sets, and ROC-AUC is
  # invariant to replicating every row the same number of times, so the interval is unchanged. (Resampling
  # scans instead would narrow it, as if the cohort were three times larger.)
  rep = probes.subject_bootstrap(probes._auc_or_nan, np.repeat(subj, 3), np.repeat(y, 3), np.repeat(p, 3),
                                 n_boot=300, seed=3)
  np.testing.assert_allclose(rep, one, rtol=1e-12)
  point = probes._auc_or_nan(y, p)
  assert one[0] < point < one[1] and one[1] - one[0] > 0.1
  # A perfect ranking stays perfect in every resample; a single-class resample is skipped, not counted.
  assert probes.subject_bootstrap(probes._auc_or_nan, subj, y, y.astype(float), n_boot=50) == [1.0, 1.0]
  assert np.isnan(probes.subject_bootstrap(probes._auc_or_nan, subj[:1], y[:1], p[:1], n_boot=5)).all()


def test_factor_recovery_reads_encoded_factors_only(data):
  train, test = data
  # dim 1 of the codes carries age linearly (see _cohort); a factor the codes do not hold scores R^2 ~ <= 0.
  rng = np.random.default_rng(5)
  fac = lambda d: {"age": d["age"], "unrelated": rng.normal(size=len(d["age"]))}
  res = probes.factor_recovery(train["codes"], fac(train), train["subject"], test["codes"], fac(test),
                               test["subject"], n_folds=4)
  assert res["age"]["r2"] > 0.9 and res["unrelated"]["r2"] < 0.1
  assert res["age"]["n_test"] == len(test["age"])


def test_relative_spread_is_scale_free_and_zero_for_a_constant_code():
  rng = np.random.default_rng(0)
  codes = 3.0 + rng.normal(scale=0.5, size=(200, 8))
  s = probes.relative_spread(codes)
  assert s == pytest.approx(0.5 / np.sqrt(9.25), rel=0.1)
  assert probes.relative_spread(10.0 * codes) == pytest.approx(s, rel=1e-12)
  assert probes.relative_spread(np.tile(codes[:1], (50, 1))) < 1e-12


def test_bad_inputs_raise(data):
  train, test = data
  with pytest.raises(ValueError, match="both the probe's train and test"):
    probes.run_probes(train, train)
  only_cn = dict(test, diagnosis=np.where(test["diagnosis"] == "AD", "CN", test["diagnosis"]))
  with pytest.raises(ValueError, match="no AD or no CN"):
    probes.run_probes(train, only_cn)
  with pytest.raises(ValueError, match="lacks"):
    probes.run_probes({"codes": train["codes"]}, test)
