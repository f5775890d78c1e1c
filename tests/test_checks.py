"""ldae_jax.evaluation.checks: each acceptance check passes or fails on its figure against its baseline."""

import copy

from ldae_jax.evaluation import checks


def _sections():
  probe = lambda auc, cv, mae, r2: {"ad_vs_cn": {"test": {"roc_auc": auc}, "cv": {"roc_auc": cv}},
                                    "age": {"test": {"mae": mae}}, "known_factors": {"icv_ml": {"r2": r2}}}
  return {
      "code_use": {"loss": {"gap_other": 0.04, "gap_other_ci95": [0.03, 0.05]},
                   "decode": {"semantic_own_vs_other": 0.8, "semantic_own_vs_cohort_mean": 1.5}},
      "manip": {"AD_to_CN": {"n": 2, "p_ad_reencoded_by_alpha": [0.9, 0.5, 0.2],
                             "mean_abs_change_by_alpha": [0.0, 0.01, 0.02]},
                "CN_to_AD": {"n": 2, "p_ad_reencoded_by_alpha": [0.1, 0.4, 0.8],
                             "mean_abs_change_by_alpha": [0.0, 0.01, 0.02]}},
      "probe": {"trained": probe(0.95, 0.94, 5.0, 0.9), "untrained": probe(0.90, 0.90, 5.5, 0.8)},
      "recon": {"by_steps": {"10": {"ae_vs_image/ssim": {"mean": 0.85},
                                    "cohort_mean_vs_image/ssim": {"mean": 0.7}}}},
  }


def test_a_run_that_shows_the_method_passes_every_check():
  got = checks.run_checks(_sections())
  assert len(got) == 9 and all(c["passed"] for c in got)
  assert "9 of 9 checks pass" in checks.markdown(got)


def _failed(sections):
  return [c["check"] for c in checks.run_checks(sections) if not c["passed"]]


def test_each_baseline_reached_fails_its_check():
  s = _sections()
  s["code_use"]["loss"]["gap_other_ci95"] = [-0.001, 0.05]  # interval includes 0
  s["code_use"]["decode"]["semantic_own_vs_cohort_mean"] = 12.0  # off the data manifold
  s["manip"]["CN_to_AD"]["p_ad_reencoded_by_alpha"] = [0.36, 0.40, 0.39]  # not monotonic
  s["probe"]["trained"]["ad_vs_cn"]["test"]["roc_auc"] = 0.91  # under untrained + 0.02, CV not ahead enough
  s["probe"]["trained"]["ad_vs_cn"]["cv"]["roc_auc"] = 0.91
  s["probe"]["trained"]["known_factors"]["icv_ml"]["r2"] = 0.7
  s["recon"]["by_steps"]["10"]["ae_vs_image/ssim"]["mean"] = 0.79
  failed = _failed(s)
  assert len(failed) == 6 and "**FAIL**" in checks.markdown(checks.run_checks(s))
  assert any("CN to AD" in f for f in failed) and not any("AD to CN" in f for f in failed)


def test_probe_margin_may_come_from_cv_when_test_is_not_behind():
  s = _sections()
  s["probe"]["trained"]["ad_vs_cn"]["test"]["roc_auc"] = 0.905  # +0.005 on test
  assert not _failed(s)  # CV +0.04
  s2 = copy.deepcopy(s)
  s2["probe"]["trained"]["ad_vs_cn"]["test"]["roc_auc"] = 0.899  # test behind the untrained encoder
  assert len(_failed(s2)) == 1  # behind (and under 0.9)


def test_missing_sections_are_left_out():
  assert checks.run_checks({}) == [] and "No checks" in checks.markdown([])
  s = {"code_use": {"skipped": "no stage 3"}, "probe": _sections()["probe"]}
  assert len(checks.run_checks(s)) == 3
