"""Brain extraction without a trained model: the MNI template's brain mask, carried into the scan by the
registration, then moved onto the scan's own tissue boundary.

Why this works: after an affine registration the template's mask is right to within a few millimetres
(the registration's error plus the subject's own anatomy), so what it can get wrong is a thin band around
its edge, where brain tissue meets CSF, dura and skull. Inside that band a bias-corrected T1 has two
classes, tissue (bright) and CSF / bone / dura (dark), so an Otsu threshold over the band's voxels alone
separates them; a morphological opening then cuts the thin bright bridges (vessels, dura, marrow) by which
the band's tissue can touch the scalp. Deeper than the band the template is trusted, so the ventricles and
deep CSF stay inside the mask, as in a hand-drawn brain mask.

Everything is in millimetres (the voxel edge lengths are passed in), so an anisotropic scan gets the same
band and the same opening as an isotropic one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import filters

DEFAULT_BAND_MM = 4.0
DEFAULT_OPENING_MM = 2.0


def ellipsoid(radius_mm: float, voxel_mm: Sequence[float]) -> np.ndarray:
  """Boolean structuring element: the voxels within `radius_mm` of the centre, for these voxel sizes."""
  voxel_mm = np.asarray(voxel_mm, dtype=np.float64)
  half = np.maximum(np.floor(radius_mm / voxel_mm), 0).astype(int)
  grid = np.meshgrid(*[np.arange(-h, h + 1) * v for h, v in zip(half, voxel_mm)], indexing="ij")
  return sum(g * g for g in grid) <= radius_mm * radius_mm + 1e-9


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 6-connected component of `mask` (the brain; loose islands of bright tissue are not)."""
  labels, n = ndimage.label(mask)
  if n <= 1:
    return mask.astype(bool)
  sizes = np.bincount(labels.ravel())[1:]
  return labels == (1 + int(np.argmax(sizes)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice overlap of two boolean masks of one grid (1 = identical; 0 when both are empty)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  total = int(a.sum()) + int(b.sum())
  return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def volume_ml(mask: np.ndarray, voxel_mm: Sequence[float]) -> float:
  return float(np.count_nonzero(mask)) * float(np.prod(voxel_mm)) / 1000.0


def _bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
  idx = np.nonzero(mask)
  return tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + m + 1, n))
               for i, m, n in zip(idx, margin, mask.shape))


def refine_brain_mask(image: np.ndarray, prior: np.ndarray, voxel_mm: Sequence[float], *,
                      band_mm: float = DEFAULT_BAND_MM, opening_mm: float = DEFAULT_OPENING_MM) -> np.ndarray:
  """Boolean brain mask of `image` (a bias-corrected T1, any voxel order) from `prior` (the template's
  mask resampled onto the image, values in [0, 1]; > 0.5 is brain).

  Voxels deeper than `band_mm` inside the prior are brain; voxels within `band_mm` of its edge (either side)
  are brain when brighter than the Otsu threshold of that band. Then an opening of radius `opening_mm`, the
  largest connected component, and the holes filled.
  """
  image = np.asarray(image, dtype=np.float32)
  inside = np.asarray(prior) > 0.5
  if image.shape != inside.shape:
    raise ValueError(f"refine_brain_mask: image {image.shape} and prior {inside.shape} differ in shape.")
  if not inside.any():
    raise ValueError("the registration put no part of the template's brain inside the scan's field of view")
  voxel_mm = np.asarray(voxel_mm, dtype=np.float64)
  # Work in the prior's bounding box (plus the band and the opening): the rest of the field of view is far
  # from any brain, and the distance transforms cost in proportion to the voxels they see.
  margin = np.ceil((band_mm + 2.0 * opening_mm) / voxel_mm).astype(int) + 1
  box = _bounding_box(inside, margin)
  x, p = image[box], inside[box]
  depth = ndimage.distance_transform_edt(p, sampling=voxel_mm)
  distance_out = ndimage.distance_transform_edt(~p, sampling=voxel_mm)
  core = depth > band_mm
  band = ~core & (distance_out <= band_mm)
  values = x[band]
  if values.size < 2 or float(values.max()) <= float(values.min()):
    refined = p
  else:
    refined = core | (band & (x > filters.threshold_otsu(values)))
    if opening_mm > 0:
      refined = ndimage.binary_opening(refined, structure=ellipsoid(opening_mm, voxel_mm))
    refined = largest_component(refined)
    refined = ndimage.binary_fill_holes(refined)
  out = np.zeros(inside.shape, dtype=bool)
  out[box] = refined
  if not out.any():
    raise ValueError("brain extraction left an empty mask (the scan has no tissue where the registered "
                     "template has its brain)")
  return out
