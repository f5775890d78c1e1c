"""Quality control of the preprocessed scans: per-scan measures, the outliers of a dataset, the QC figure.

Measures (one row of `qc.csv` per scan):

* `ncc`: normalised cross-correlation of the registered (bias-corrected, unmasked) scan with the template,
  inside the template's brain mask. Measured on Colin27: 0.67 registered; the same scan moved 6 mm off
  0.52, 10 mm 0.40, turned 10 degrees 0.52, scaled by 0.85 0.25; with its contrast inverted (as a T2 or
  FLAIR, dark white matter) -0.65, which is an error rather than a flag.
* `brain_ml`: the brain mask's volume in the scan's own space (millilitres).
* `mask_fraction`: the brain mask's volume over the registered template mask's (the prior): how far the
  intensity refinement moved the mask; near 1 when it only adjusted the boundary.
* `affine_scale`: the scan's linear size relative to the template (cube root of the affine's determinant).

A scan is flagged when a measure is outside absolute sanity bounds, or (datasets of `MIN_SCANS_FOR_MAD`
scans or more) further than `k` median absolute deviations from the dataset's median. Flagged scans stay
in the manifest with the reason in its `qc` column, and the manifest loader skips them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np

from ldae_jax.data import atomic

MEASURES = ("ncc", "brain_ml", "mask_fraction", "affine_scale")
# Wide enough for any adult head that registered (brain masks here hold the ventricles and some sulcal CSF),
# narrow enough to catch a mask that took the skull or lost a lobe.
ABSOLUTE_BOUNDS = {
    "ncc": (0.45, 1.0),  # below: misregistered by ~8 mm or more (see above)
    "brain_ml": (800.0, 2400.0),
    "mask_fraction": (0.8, 1.2),
    "affine_scale": (0.75, 1.35),
}
DEFAULT_MAD_K = 5.0  # 5 MAD ~ 3.4 standard deviations of a normal sample
MIN_SCANS_FOR_MAD = 5  # fewer scans do not give a median and a MAD to judge by
# A MAD of near zero (a homogeneous cohort, or repeated scans) would flag tiny differences: floor it at this
# fraction of the median.
MIN_RELATIVE_MAD = 0.01
MIN_T1_NCC = 0.0  # at or below: inverted contrast, not a T1


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """Normalised cross-correlation of two images inside a boolean mask (0 when either is constant there)."""
  mask = np.asarray(mask, bool)
  x = np.asarray(a, np.float64)[mask]
  y = np.asarray(b, np.float64)[mask]
  if x.size < 2:
    return 0.0
  x -= x.mean()
  y -= y.mean()
  denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
  return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0)) if denom > 0 else 0.0  # no 1 + 1e-16


@dataclasses.dataclass(frozen=True)
class Bounds:
  absolute: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=lambda: dict(ABSOLUTE_BOUNDS))
  mad_k: float = DEFAULT_MAD_K  # 0: no dataset-relative bounds


def flag_outliers(measures: Mapping[str, Mapping[str, float]], bounds: Bounds = Bounds()) -> dict[str, str]:
  """scan_id -> why it is flagged (`"ncc 0.31 < 0.5; ..."`), for the flagged scans only."""
  reasons: dict[str, list[str]] = {sid: [] for sid in measures}
  for name in MEASURES:
    values = {sid: float(m[name]) for sid, m in measures.items() if name in m}
    lo, hi = bounds.absolute.get(name, (-math.inf, math.inf))
    for sid, v in values.items():
      if not math.isfinite(v) or v < lo:
        reasons[sid].append(f"{name} {v:.3g} < {lo:g}")
      elif v > hi:
        reasons[sid].append(f"{name} {v:.3g} > {hi:g}")
    finite = np.array([v for v in values.values() if math.isfinite(v)])
    if bounds.mad_k <= 0 or finite.size < MIN_SCANS_FOR_MAD:
      continue
    median = float(np.median(finite))
    mad = max(float(np.median(np.abs(finite - median))), MIN_RELATIVE_MAD * abs(median))
    lo, hi = median - bounds.mad_k * mad, median + bounds.mad_k * mad
    for sid, v in values.items():
      if math.isfinite(v) and not lo <= v <= hi:
        reasons[sid].append(f"{name} {v:.3g} outside the dataset's median {median:.3g} +- {bounds.mad_k:g} MAD "
                            f"({lo:.3g}..{hi:.3g})")
  return {sid: "; ".join(r) for sid, r in reasons.items() if r}


def _mid_slices(volume: np.ndarray, mask: np.ndarray):
  """Sagittal, coronal and axial slices (RAS volume) through the mask's centre, each displayed with its
  superior / anterior side up."""
  centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)] if mask.any() else \
      [s // 2 for s in volume.shape]
  i, j, k = centre
  return [("sagittal", volume[i].T, mask[i].T), ("coronal", volume[:, j].T, mask[:, j].T),
          ("axial", volume[:, :, k].T, mask[:, :, k].T)]


def save_figure(path: str | os.PathLike, volume: np.ndarray, mask: np.ndarray, title: str) -> None:
  """PNG of the registered scan's mid-slices with the brain mask's outline (written atomically)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  # A Figure without pyplot: no global state and no GUI backend in the worker processes.
  fig = Figure(figsize=(12, 4.4), dpi=80)
  FigureCanvasAgg(fig)
  vmax = float(np.percentile(volume[mask], 99.5)) if mask.any() else float(volume.max())
  for n, (name, image, outline) in enumerate(_mid_slices(volume, mask.astype(bool))):
    ax = fig.add_subplot(1, 3, n + 1)
    ax.imshow(image, cmap="gray", origin="lower", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
    if outline.any() and not outline.all():
      ax.contour(outline.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(name, fontsize=9)
    ax.set_axis_off()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  atomic.write_bytes(path, buf.getvalue())


def write_table(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
  """CSV of `rows` (dicts; missing cells empty, floats to 6 significant digits), written atomically."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  for r in rows:
    w.writerow([f"{r[h]:.6g}" if isinstance(r.get(h), float) else r.get(h, "") for h in header])
  atomic.write_bytes(path, buf.getvalue().encode("utf-8"))
