"""Linear probes on semantic codes: AD vs CN (logistic regression) and age (ridge regression).

The reference protocol (docs/fidelity.md, "Reference bugs") splits the training embeddings 70/30 at random, so scans
of one subject land on both sides and the validation score leaks; its age scaling also uses the test ages, and it
calls CN the positive class. Here:
* model selection uses subject-grouped K-fold cross-validation on the train split (no subject in two folds), with
  class stratification where it is possible;
* the standardisation (per-dimension mean/std) is fitted on the probe-train part only, inside every fold and again
  on the whole train split for the final probe;
* the final probe is refitted on the whole train split and scored on the test split; both the cross-validated and
  the test figures are reported;
* **AD is the positive class** (label 1): recall = AD sensitivity, ROC-AUC ranks AD above CN;
* the train and test splits must not share a subject (checked; raises otherwise);
* a small test split gives a noisy figure, so the test ROC-AUC and MAE come with a 95 % percentile interval from
  resampling test *subjects* with replacement (`subject_bootstrap`; scans of one subject are not independent).
scikit-learn's `LogisticRegression` / `Ridge` are the default probes (the reference's 1-layer torch nets trained
with Adam/SGD reach the same optimum of a convex problem up to regularisation).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np
from sklearn import linear_model, metrics as skm, model_selection, preprocessing

POSITIVE_CLASS = "AD"
NEGATIVE_CLASS = "CN"
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_ALPHAS = (1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass
class LinearProbe:
  """A fitted probe in the original code space: standardise with (mean, std), then w . z + b."""
  mean: np.ndarray
  std: np.ndarray
  weight: np.ndarray  # in standardised space
  bias: float
  hyper: float  # chosen C (logistic) or alpha (ridge)

  def decision(self, codes: np.ndarray) -> np.ndarray:
    return ((codes - self.mean) / self.std) @ self.weight + self.bias


def check_disjoint_subjects(train_subjects: Sequence[Any], test_subjects: Sequence[Any]) -> None:
  """Raises if a subject appears in both splits (the probe's test figures would leak)."""
  both = sorted(set(map(str, train_subjects)) & set(map(str, test_subjects)))
  if both:
    raise ValueError(
        f"{len(both)} subject(s) appear in both the probe's train and test splits (e.g. {both[:3]}); the splits "
        "must be subject-level (ldae_jax.data.manifest assigns whole subjects to one split).")


def _fit_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  s = preprocessing.StandardScaler().fit(x)
  return s.mean_.astype(np.float64), np.where(s.scale_ > 0, s.scale_, 1.0).astype(np.float64)


def _grouped_folds(y_strat: np.ndarray | None, groups: np.ndarray, n_folds: int, seed: int):
  n_groups = len(np.unique(groups))
  k = min(n_folds, n_groups)
  if k < 2:
    raise ValueError(f"the probe's train split has {n_groups} subject(s); grouped cross-validation needs >= 2.")
  if y_strat is not None:
    # Stratify when every class has at least k subjects; otherwise plain grouped folds.
    per_class = [len(np.unique(groups[y_strat == c])) for c in np.unique(y_strat)]
    if min(per_class) >= k:
      return list(model_selection.StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(
          np.zeros(len(groups)), y_strat, groups))
  return list(model_selection.GroupKFold(k).split(np.zeros(len(groups)), groups=groups))


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
  """Binary metrics with label 1 = AD (positive). Confusion matrix rows = true [CN, AD], columns = predicted."""
  y_true = np.asarray(y_true, int)
  pred = (np.asarray(prob) >= threshold).astype(int)
  cm = skm.confusion_matrix(y_true, pred, labels=[0, 1])
  tn, fp, fn, tp = cm.ravel()
  out = {
      "accuracy": float(skm.accuracy_score(y_true, pred)),
      "precision": float(skm.precision_score(y_true, pred, zero_division=0)),
      "recall": float(skm.recall_score(y_true, pred, zero_division=0)),
      "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
      "f1": float(skm.f1_score(y_true, pred, zero_division=0)),
      "mcc": float(skm.matthews_corrcoef(y_true, pred)),
      "roc_auc": float(skm.roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else float("nan"),
      "confusion_matrix": cm.tolist(),
      "confusion_matrix_labels": [NEGATIVE_CLASS, POSITIVE_CLASS],
      "n": int(len(y_true)),
      "n_positive": int(y_true.sum()),
  }
  return out


def subject_bootstrap(stat, subjects: Sequence[Any], *arrays: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> list[float]:
  """Percentile interval of `stat(*arrays)` over resamples of whole subjects (with replacement).

  Resamples where `stat` is undefined (e.g. one class only, for ROC-AUC) are skipped; [nan, nan] if all are.
  """
  subjects = np.asarray([str(s) for s in subjects])
  uniq, inverse = np.unique(subjects, return_inverse=True)
  rows_of = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(int(n_boot)):
    rows = np.concatenate([rows_of[k] for k in rng.integers(0, len(uniq), len(uniq))])
    v = stat(*(np.asarray(a)[rows] for a in arrays))
    if np.isfinite(v):
      values.append(v)
  if not values:
    return [float("nan"), float("nan")]
  lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]


def _auc_or_nan(y, p):
  return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
  err = np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)
  return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "n": int(len(err)),
          "target_std": float(np.std(y_true))}


def _fit_logistic(x, y, c, seed):
  m, s = _fit_scaler(x)
  clf = linear_model.LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((x - m) / s, y)
  return LinearProbe(m, s, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), c)


def _fit_ridge(x, y, alpha):
  m, s = _fit_scaler(x)
  r = linear_model.Ridge(alpha=alpha, fit_intercept=True).fit((x - m) / s, y)
  return LinearProbe(m, s, r.coef_.astype(np.float64), float(r.intercept_), alpha)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def ad_cn_probe(train_codes: np.ndarray, train_diagnosis: Sequence[str], train_subjects: Sequence[Any],
                test_codes: np.ndarray, test_diagnosis: Sequence[str], test_subjects: Sequence[Any], *,
                cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 0) -> tuple[dict, LinearProbe]:
  """AD-vs-CN logistic probe (MCI and other labels dropped). Returns (results dict, probe fitted on all of train).

  C is chosen by the pooled out-of-fold ROC-AUC over subject-grouped folds of the train split.
  """
  check_disjoint_subjects(train_subjects, test_subjects)

  def keep(codes, diag, subj, split):
    diag = np.asarray([str(d) for d in diag])
    mask = np.isin(diag, [POSITIVE_CLASS, NEGATIVE_CLASS])
    y = (diag[mask] == POSITIVE_CLASS).astype(int)
    if len(np.unique(y)) < 2:
      raise ValueError(f"the {split} split has no {POSITIVE_CLASS} or no {NEGATIVE_CLASS} scans "
                       f"(diagnoses present: {sorted(set(diag))}); the AD-vs-CN probe needs both.")
    return np.asarray(codes, np.float64)[mask], y, np.asarray([str(s) for s in subj])[mask]

  xtr, ytr, gtr = keep(train_codes, train_diagnosis, train_subjects, "train")
  xte, yte, gte = keep(test_codes, test_diagnosis, test_subjects, "test")
  folds = _grouped_folds(ytr, gtr, n_folds, seed)
  cv = {}
  for c in cs:
    oof = np.zeros(len(ytr))
    for tr, va in folds:
      if len(np.unique(ytr[tr])) < 2:
        raise ValueError("a cross-validation fold has a single class; use fewer folds (n_folds).")
      oof[va] = _sigmoid(_fit_logistic(xtr[tr], ytr[tr], c, seed).decision(xtr[va]))
    cv[c] = classification_metrics(ytr, oof)
  best = max(cs, key=lambda c: (cv[c]["roc_auc"], -abs(np.log10(c))))
  probe = _fit_logistic(xtr, ytr, best, seed)
  pte = _sigmoid(probe.decision(xte))
  test = classification_metrics(yte, pte)
  test["roc_auc_ci95"] = subject_bootstrap(_auc_or_nan, gte, yte, pte, seed=seed)
  test["n_subjects"] = int(len(np.unique(gte)))
  return {
      "task": "AD vs CN (logistic regression)", "positive_class": POSITIVE_CLASS,
      "negative_class": NEGATIVE_CLASS, "C": best, "n_folds": len(folds), "cv": cv[best], "test": test,
      "cv_by_C": {str(c): cv[c]["roc_auc"] for c in cs}, "n_train_subjects": int(len(np.unique(gtr))),
  }, probe


def age_probe(train_codes: np.ndarray, train_age: Sequence[float], train_subjects: Sequence[Any],
              test_codes: np.ndarray, test_age: Sequence[float], test_subjects: Sequence[Any], *,
              alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5, seed: int = 0) -> tuple[dict, LinearProbe]:
  """Age ridge probe over every scan with a finite age; alpha chosen by grouped-CV MAE. Ages in years."""
  check_disjoint_subjects(train_subjects, test_subjects)

  def keep(codes, age, subj):
    age = np.asarray(age, np.float64)
    mask = np.isfinite(age)
    return np.asarray(codes, np.float64)[mask], age[mask], np.asarray([str(s) for s in subj])[mask]

  xtr, ytr, gtr = keep(train_codes, train_age, train_subjects)
  xte, yte, gte = keep(test_codes, test_age, test_subjects)
  if len(ytr) == 0 or len(yte) == 0:
    raise ValueError("no finite ages in the probe's train or test split; the manifest's `age` column is empty.")
  folds = _grouped_folds(None, gtr, n_folds, seed)
  cv = {}
  for a in alphas:
    oof = np.zeros(len(ytr))
    for tr, va in folds:
      oof[va] = _fit_ridge(xtr[tr], ytr[tr], a).decision(xtr[va])
    cv[a] = regression_metrics(ytr, oof)
  best = min(alphas, key=lambda a: cv[a]["mae"])
  probe = _fit_ridge(xtr, ytr, best)
  pte = probe.decision(xte)
  test = regression_metrics(yte, pte)
  test["mae_ci95"] = subject_bootstrap(lambda y, p: float(np.abs(p - y).mean()), gte, yte, pte, seed=seed)
  test["n_subjects"] = int(len(np.unique(gte)))
  return {"task": "age (ridge regression, years)", "alpha": best, "n_folds": len(folds), "cv": cv[best],
          "test": test, "cv_mae_by_alpha": {str(a): cv[a]["mae"] for a in alphas},
          "n_train_subjects": int(len(np.unique(gtr)))}, probe


def run_probes(train: dict[str, Any], test: dict[str, Any], *, n_folds: int = 5, seed: int = 0) -> tuple[dict, dict]:
  """Both probes on dicts with keys codes (N, D), diagnosis, age, subject. Returns (results, fitted probes)."""
  for name, d in (("train", train), ("test", test)):
    missing = {"codes", "diagnosis", "age", "subject"} - set(d)
    if missing:
      raise ValueError(f"probe {name} data lacks {sorted(missing)}.")
  cls, cls_probe = ad_cn_probe(train["codes"], train["diagnosis"], train["subject"], test["codes"],
                               test["diagnosis"], test["subject"], n_folds=n_folds, seed=seed)
  reg, reg_probe = age_probe(train["codes"], train["age"], train["subject"], test["codes"], test["age"],
                             test["subject"], n_folds=n_folds, seed=seed)
  return {"ad_vs_cn": cls, "age": reg}, {"ad_vs_cn": cls_probe, "age": reg_probe}


def relative_spread(codes: np.ndarray) -> float:
  """Mean over code dimensions of the std across scans, divided by the codes' RMS: ~0 for a collapsed encoder
  whose output hardly depends on its input (a linear probe may still read tiny variations; a decoder
  conditioned on the code will not)."""
  codes = np.asarray(codes, np.float64)
  rms = float(np.sqrt(np.mean(codes**2)))
  return float(codes.std(axis=0).mean() / rms) if rms > 0 else 0.0


def factor_recovery(train_codes: np.ndarray, train_factors: dict[str, np.ndarray], train_subjects: Sequence[Any],
                    test_codes: np.ndarray, test_factors: dict[str, np.ndarray], test_subjects: Sequence[Any], *,
                    alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5, seed: int = 0) -> dict[str, dict]:
  """How linearly each known generative factor (e.g. the synthetic cohort's hippocampal volume) can be read
  from the codes: a ridge probe per factor, alpha by grouped CV on train, R^2 on the test scans."""
  check_disjoint_subjects(train_subjects, test_subjects)
  groups = np.asarray([str(s) for s in train_subjects])
  folds = _grouped_folds(None, groups, n_folds, seed)
  xtr, xte = np.asarray(train_codes, np.float64), np.asarray(test_codes, np.float64)
  out = {}
  for name, ytr in train_factors.items():
    ytr, yte = np.asarray(ytr, np.float64), np.asarray(test_factors[name], np.float64)

    def cv_mse(a, ytr=ytr):
      return float(np.mean([np.mean((_fit_ridge(xtr[tr], ytr[tr], a).decision(xtr[va]) - ytr[va]) ** 2)
                            for tr, va in folds]))
    best = min(alphas, key=cv_mse)
    pred = _fit_ridge(xtr, ytr, best).decision(xte)
    out[name] = {"r2": float(skm.r2_score(yte, pred)), "alpha": best, "n_test": int(len(yte))}
  return out


def manipulation_direction(probe: LinearProbe) -> np.ndarray:
  """Unit direction in standardised code space pointing towards AD (the positive class); negate for AD->CN."""
  w = np.asarray(probe.weight, np.float64)
  return w / np.linalg.norm(w)


def format_table(results_by_encoder: dict[str, dict]) -> str:
  """Markdown table: one row per (encoder, split) with the classification and age figures."""
  head = ("| codes | split | Acc | Precision | Recall | F1 | ROC-AUC | MAE (y) | RMSE (y) |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
  rows = []
  for name, res in results_by_encoder.items():
    for split in ("cv", "test"):
      c, r = res["ad_vs_cn"][split], res["age"][split]
      rows.append(f"| {name} | {split} | {c['accuracy']:.3f} | {c['precision']:.3f} | {c['recall']:.3f} | "
                  f"{c['f1']:.3f} | {c['roc_auc']:.3f} | {r['mae']:.2f} | {r['rmse']:.2f} |")
  notes = [f"Positive class: {POSITIVE_CLASS} (recall = {POSITIVE_CLASS} sensitivity). cv: pooled out-of-fold "
           "predictions of subject-grouped folds of the train split; test: probe refitted on all of train."]
  for name, res in results_by_encoder.items():
    c, r = res["ad_vs_cn"]["test"], res["age"]["test"]
    if "roc_auc_ci95" in c:
      notes.append(f"{name}, test ({c['n_subjects']} AD/CN subjects, {c['n']} scans): ROC-AUC 95 % subject-bootstrap "
                   f"interval [{c['roc_auc_ci95'][0]:.3f}, {c['roc_auc_ci95'][1]:.3f}]; age MAE "
                   f"[{r['mae_ci95'][0]:.2f}, {r['mae_ci95'][1]:.2f}] y.")
  return head + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def format_factor_table(factors_by_encoder: dict[str, dict[str, dict]]) -> str:
  """Markdown: test R^2 of a ridge read-out of each known factor, one column per encoder."""
  names = list(factors_by_encoder)
  factor_names = list(next(iter(factors_by_encoder.values())))
  head = "| known factor | " + " | ".join(f"R^2 ({n} codes)" for n in names) + " |\n|---|" + "---|" * len(names)
  rows = [f"| {f} | " + " | ".join(f"{factors_by_encoder[n][f]['r2']:.3f}" for n in names) + " |"
          for f in factor_names]
  return (head + "\n" + "\n".join(rows) + "\n\nRidge on the train codes (alpha by grouped CV), R^2 on the test "
          "scans: how linearly each generative factor of the synthetic cohort can be read from the codes.\n")
