"""Does a run show the method working? The report's checks, each a measured figure beside its baseline.

Every check compares the trained model with what needs no training (an untrained encoder, another subject's
code, the cohort-mean latent, the autoencoder alone), so that a figure a random baseline also reaches cannot
pass. Thresholds are the project's acceptance criteria for the quickstart (README, "What the quickstart shows").
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_CODE_GAP = 0.01  # (other subject's code - own) / own PDAE loss, mean over t
MAX_SEMANTIC_OWN_OVER_OTHER = 0.9  # own code >= 10 % closer than another subject's
MAX_SEMANTIC_OWN_OVER_MEAN = 2.0  # an ideal unconditional sample lands at exactly 2
MIN_PROBE_AUC = 0.9
MIN_PROBE_MARGIN = 0.02  # over the untrained encoder
MIN_AE_SSIM = 0.8


def _monotonic(values, increasing: bool) -> bool:
  d = np.diff(np.asarray(values, np.float64))
  return bool(np.all(d > 0) if increasing else np.all(d < 0))


def run_checks(sections: dict[str, Any]) -> list[dict[str, Any]]:
  """[{check, measured, baseline, passed}] from the report's sections (probe, code_use, recon, manip); a check
  whose section is missing or skipped is left out."""
  out = []

  def add(check, measured, baseline, passed):
    out.append({"check": check, "measured": measured, "baseline": baseline, "passed": bool(passed)})

  cu = sections.get("code_use", {})
  if "loss" in cu:
    lo, de = cu["loss"], cu["decode"]
    ci = lo["gap_other_ci95"]
    add("decoding uses the code: loss gap (other subject's code - own) / own >= 1 %, interval above 0",
        f"{100 * lo['gap_other']:+.2f} % [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]", "0 % (a code G ignores)",
        lo["gap_other"] >= MIN_CODE_GAP and ci[0] > 0)
    add("semantic-only decode: own code >= 10 % closer to the scan's latent than another subject's",
        f"own / other MSE {de['semantic_own_vs_other']:.3f}", "1.000 (the code carries nothing)",
        de["semantic_own_vs_other"] <= MAX_SEMANTIC_OWN_OVER_OTHER)
    add("semantic-only decode stays on the data: MSE < 2x the cohort-mean latent's",
        f"{de['semantic_own_vs_cohort_mean']:.2f}x", "2x (an ideal unconditional sample)",
        de["semantic_own_vs_cohort_mean"] < MAX_SEMANTIC_OWN_OVER_MEAN)
  mp = sections.get("manip", {})
  for name, increasing in (("AD_to_CN", False), ("CN_to_AD", True)):
    d = mp.get(name, {})
    if d.get("n"):
      p, ch = d["p_ad_reencoded_by_alpha"], d["mean_abs_change_by_alpha"]
      add(f"manipulation {name.replace('_', ' ')}: re-encoded p(AD) {'rises' if increasing else 'falls'} "
          "monotonically with alpha, the decoded change grows",
          f"p(AD) {np.round(p, 3).tolist()}; change {np.round(ch, 4).tolist()}", "alpha 0 (the unedited decode)",
          _monotonic(p, increasing) and _monotonic(ch, True))
  pr = sections.get("probe", {})
  if "trained" in pr and "untrained" in pr:
    t, u = pr["trained"], pr["untrained"]
    ta, ua = t["ad_vs_cn"]["test"]["roc_auc"], u["ad_vs_cn"]["test"]["roc_auc"]
    tc, uc = t["ad_vs_cn"]["cv"]["roc_auc"], u["ad_vs_cn"]["cv"]["roc_auc"]
    ahead = ta >= ua + MIN_PROBE_MARGIN or (tc >= uc + MIN_PROBE_MARGIN and ta >= ua)
    add("AD-vs-CN probe: test ROC-AUC >= 0.9 and >= 0.02 ahead of the untrained encoder (test, or grouped CV "
        "with test not behind)", f"test {ta:.3f}, CV {tc:.3f}", f"untrained: test {ua:.3f}, CV {uc:.3f}",
        ta >= MIN_PROBE_AUC and ahead)
    tm, um = t["age"]["test"]["mae"], u["age"]["test"]["mae"]
    add("age probe: test MAE no worse than the untrained encoder's", f"{tm:.2f} y", f"untrained {um:.2f} y",
        tm <= um)
    if "known_factors" in t and "known_factors" in u:
      worse = [f for f in t["known_factors"] if t["known_factors"][f]["r2"] < u["known_factors"][f]["r2"]]
      add("every known factor read out at least as well as from the untrained encoder (test R^2)",
          ", ".join(f"{f} {v['r2']:.3f}" for f, v in t["known_factors"].items()),
          ", ".join(f"{f} {v['r2']:.3f}" for f, v in u["known_factors"].items()), not worse)
  rc = sections.get("recon", {})
  if "by_steps" in rc:
    s = next(iter(rc["by_steps"].values()))
    ssim = s["ae_vs_image/ssim"]["mean"]
    add("autoencoder reconstruction SSIM against the image >= 0.80", f"{ssim:.4f}",
        f"cohort-mean image {s['cohort_mean_vs_image/ssim']['mean']:.4f}", ssim >= MIN_AE_SSIM)
  return out


def markdown(checks: list[dict[str, Any]]) -> str:
  if not checks:
    return "No checks: the report's sections are missing.\n"
  rows = ["| check | measured | baseline | |", "|---|---|---|---|"]
  rows += [f"| {c['check']} | {c['measured']} | {c['baseline']} | {'pass' if c['passed'] else '**FAIL**'} |"
           for c in checks]
  n = sum(c["passed"] for c in checks)
  return "\n".join(rows) + f"\n\n{n} of {len(checks)} checks pass.\n"
