"""A synthetic longitudinal T1 cohort with known ageing and disease factors, built on a real brain.

Why: the pipeline needs data that a user without ADNI access can run end to end, and whose ground truth is
known, so that the representation probes have something real to find. Every subject is the MNI152 2009
anatomy that nilearn ships (T1, grey/white-matter probability maps, brain mask; no download) under a random
smooth deformation (head size, shape), with:

* ageing and disease atrophy, as three radii in template millimetres: the lateral ventricles dilate by
  `r_v`, a hippocampal region erodes by `r_h` (the lost tissue becomes CSF) and the cortex thins by `r_c`
  from its CSF side; all grow with age and faster with disease (`atrophy_radii`), and CN < MCI < AD at the
  same age;
* T1 contrast (WM 1, GM ~0.62, CSF ~0.2, per-subject jitter), a smooth multiplicative bias field and Rician
  noise, inside a hard brain mask (skull-stripped data, background 0, as the reference's preprocessed scans).

Sessions of a subject share its anatomy and diagnosis (no conversions) and differ by atrophy progression,
bias and noise. Diagnoses are balanced (each block of 3 subjects holds CN, MCI and AD) and share one baseline
age distribution, so age and disease are not confounded. The files are
written as a real cohort would be (BIDS-like `sub-XXXX/ses-MYYY/anat/*_T1w.nii.gz`, int16 + scale, RAS,
`nifti.volume_affine` geometry) with `manifest.csv` in the project's manifest format and `ground_truth.csv`
holding the factors and per-scan volumes (mL) measured on the simulated tissue maps.

Subject i is drawn from `SeedSequence([seed, i])` alone, so a cohort's first n subjects equal the n-subject
cohort of the same seed, and the same seed gives byte-identical files.

CLI: `python -m ldae_jax.data.synthetic --out DIR --subjects N --seed S [--shape X,Y,Z] [--spacing MM]
[--workers K]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Sequence

import numpy as np
from scipy import ndimage, special

from ldae_jax.data import atomic
from ldae_jax.data import manifest as manifest_lib
from ldae_jax.data import nifti

DIAGNOSES = ("CN", "MCI", "AD")
# Disease severity (dimensionless) at baseline and its growth per year, by diagnosis.
SEVERITY_BASELINE = {"CN": 0.0, "MCI": 0.6, "AD": 1.5}
SEVERITY_RATE = {"CN": 0.0, "MCI": 0.15, "AD": 0.4}
# World (MNI, mm) landmarks used to label the template once.
_VENTRICLE_SEEDS = ((-15.0, -18.0, 16.0), (15.0, -18.0, 16.0))
_VENTRICLE_BOX = ((-35.0, 35.0), (-50.0, 30.0), (-5.0, 40.0))
_HIPPO_CENTRES = ((-27.0, -22.0, -13.0), (27.0, -22.0, -13.0))
_HIPPO_AXES_MM = (7.0, 18.0, 6.0)  # lateral, long (tilted in the sagittal plane), vertical
_HIPPO_PITCH_DEG = 30.0  # the posterior end is higher
_SDF_FAR_MM = 25.0  # signed distances are only computed this far from a structure


def atrophy_radii(age: float, diagnosis: str, years: float,
                  susceptibility: float = 1.0, scale: float = 1.0) -> tuple[float, float, float]:
  """(ventricle dilation, hippocampal erosion, cortical thinning) in mm for one scan.

  Ageing enters through decades past 50 (`a`, convex for the ventricles as in real cohorts); disease through
  a severity `s` = baseline + rate * years since baseline, so AD both starts worse and progresses faster.
  `susceptibility` is the subject's random effect (log-normal around 1). `scale` multiplies every radius:
  1 gives volumes in the range of real cohorts (visible at 1.5 mm); coarse grids need it larger (at the
  quickstart's 6 mm voxels a 1-2 mm dilation is a fraction of a voxel and drowns in the other variation).
  """
  if diagnosis not in SEVERITY_BASELINE:
    raise ValueError(f"diagnosis {diagnosis!r}: one of {DIAGNOSES}.")
  a = max(float(age) - 50.0, 0.0) / 10.0
  s = SEVERITY_BASELINE[diagnosis] + SEVERITY_RATE[diagnosis] * max(float(years), 0.0)
  k = float(susceptibility) * float(scale)
  r_v = k * (0.5 * a + 0.12 * a * a + 1.1 * s)
  r_h = k * (0.12 * a + 0.45 * s)
  r_c = k * (0.08 * a + 0.15 * s)
  return r_v, r_h, r_c


# ---------------------------------------------------------------------------------------------- atlas


MAPS = ("gm", "wm", "brain", "ventricle_sdf", "hippocampus_sdf", "depth")


@dataclasses.dataclass(frozen=True)
class Atlas:
  """Template maps on the 1 mm MNI grid, cropped to the brain, stacked as `(x, y, z, len(MAPS))`.

  GM/WM/brain are probabilities, pre-smoothed for the target spacing; `ventricle_sdf` / `hippocampus_sdf`
  are signed distances in mm (< 0 inside); `depth` is the distance in mm from the nearest CSF/background
  into GM+WM. `support` marks where brain can appear (dilated mask); `world_to_voxel` maps MNI mm to the
  cropped grid.
  """
  maps: np.ndarray
  support: np.ndarray
  world_to_voxel: np.ndarray


def _signed_distance(mask: np.ndarray, margin: int) -> np.ndarray:
  """Signed distance (voxels, boundary at 0, < 0 inside) computed in the mask's bounding box + margin."""
  out = np.full(mask.shape, float(margin), dtype=np.float32)
  idx = np.argwhere(mask)
  lo = np.maximum(idx.min(0) - margin, 0)
  hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  m = mask[box]
  inside = ndimage.distance_transform_edt(m) - 0.5
  outside = ndimage.distance_transform_edt(~m) - 0.5
  out[box] = np.minimum(np.where(m, -inside, outside), margin).astype(np.float32)
  return out


def _world_to_index(inv: np.ndarray, p: Sequence[float]) -> np.ndarray:
  return np.rint(inv @ np.array([*p, 1.0]))[:3].astype(int)


def _mni152_files() -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """nilearn's bundled MNI152 2009 T1 / GM / WM files, found without importing nilearn.datasets (~6 s)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("the synthetic cohort needs nilearn (pip install nilearn); it ships the MNI152 template.")
  data = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
  files = tuple(data / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz" for t in ("t1", "gm", "wm"))
  if not all(f.is_file() for f in files):
    from nilearn.datasets import struct  # pylint: disable=g-import-not-at-top
    files = tuple(pathlib.Path(p) for p in (struct.MNI152_FILE_PATH, struct.GM_MNI152_FILE_PATH,
                                            struct.WM_MNI152_FILE_PATH))
  return files


@functools.lru_cache(maxsize=1)
def _base_atlas() -> tuple[np.ndarray, np.ndarray]:
  """Loads the MNI152 2009 maps and labels ventricles, hippocampal regions and tissue depth (once).

  Returns the stacked maps cropped to the brain's bounding box (+ margin) and the cropped world->voxel matrix.
  The maps are scaled as nilearn's `load_mni152_*` do (divided by their maximum; brain mask = T1 > 0.2).
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top

  t1_img, gm_img, wm_img = (nib.load(str(f)) for f in _mni152_files())
  affine = np.asarray(t1_img.affine, dtype=np.float64)
  t1, gm, wm = (np.asarray(i.dataobj, dtype=np.float32) for i in (t1_img, gm_img, wm_img))
  if not (np.allclose(np.abs(np.diag(affine)[:3]), 1.0) and t1.shape == gm.shape == wm.shape
          and np.allclose(gm_img.affine, affine)):
    raise RuntimeError(f"nilearn's MNI152 maps are not the expected 1 mm grid (affine\n{affine}); "
                       "update ldae_jax/data/synthetic.py for this nilearn version.")
  # Crop to the brain (+ margin for deformations and distance fields) to keep every later pass small.
  brain = (t1 / t1.max() > 0.2).astype(np.float32)
  idx = np.argwhere(brain > 0)
  lo = np.maximum(idx.min(0) - 12, 0)
  hi = np.minimum(idx.max(0) + 13, brain.shape)
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  shift = np.eye(4)
  shift[:3, 3] = lo
  affine = affine @ shift
  inv = np.linalg.inv(affine)
  brain = brain[crop]
  gm = np.minimum(gm[crop] / gm.max(), brain)
  wm = np.minimum(wm[crop] / wm.max(), np.clip(brain - gm, 0.0, 1.0))
  csf = np.clip(brain - gm - wm, 0.0, 1.0)

  # Lateral ventricles: the CSF components around two seed points, searched inside a central box.
  blo = _world_to_index(inv, [b[0] for b in _VENTRICLE_BOX])
  bhi = _world_to_index(inv, [b[1] for b in _VENTRICLE_BOX])
  box = tuple(slice(max(min(a, b), 0), max(a, b) + 1) for a, b in zip(blo, bhi))
  labels, _ = ndimage.label(csf[box] > 0.7)
  keep = set()
  for seed in _VENTRICLE_SEEDS:
    i, j, k = _world_to_index(inv, seed) - np.array([s.start for s in box])
    near = labels[max(i - 6, 0):i + 7, max(j - 6, 0):j + 7, max(k - 6, 0):k + 7]
    counts = np.bincount(near.ravel())
    counts[0] = 0
    if counts.max() == 0:
      raise RuntimeError(f"no ventricle CSF near MNI {seed} in nilearn's template; update the seeds.")
    keep.add(int(counts.argmax()))  # the component that fills most of the seed's neighbourhood
  ventricles = np.zeros(brain.shape, dtype=bool)
  ventricles[box] = np.isin(labels, sorted(keep))
  vent_ml = ventricles.sum() / 1000.0
  if not 5.0 < vent_ml < 60.0:
    raise RuntimeError(f"template ventricles measure {vent_ml:.1f} mL; expected 5-60 mL. Check the seeds.")

  # Hippocampal regions: grey matter inside two tilted ellipsoids at the hippocampi's MNI position.
  th = math.radians(_HIPPO_PITCH_DEG)
  axes = np.array([[1.0, 0.0, 0.0], [0.0, -math.cos(th), math.sin(th)], [0.0, math.sin(th), math.cos(th)]])
  hippo = np.zeros(brain.shape, dtype=bool)
  reach = max(_HIPPO_AXES_MM) + 2.0
  for c in _HIPPO_CENTRES:
    clo = np.maximum(_world_to_index(inv, np.asarray(c) - reach), 0)
    chi = _world_to_index(inv, np.asarray(c) + reach) + 1
    sub = tuple(slice(a, b) for a, b in zip(clo, chi))
    grid = np.stack(np.meshgrid(*[np.arange(s.start, min(s.stop, n)) for s, n in zip(sub, brain.shape)],
                                indexing="ij"), -1).astype(np.float64)
    local = (grid @ affine[:3, :3].T + affine[:3, 3] - np.asarray(c)) @ axes.T
    hippo[sub] |= ((local / np.asarray(_HIPPO_AXES_MM)) ** 2).sum(-1) <= 1.0
  hippo &= gm > 0.5

  # Tissue depth: distance from CSF / background into GM+WM.
  depth = np.maximum(ndimage.distance_transform_edt((gm + wm) > 0.5) - 0.5, 0.0).astype(np.float32)
  margin = int(_SDF_FAR_MM)
  maps = np.stack([gm, wm, brain, _signed_distance(ventricles, margin), _signed_distance(hippo, margin), depth],
                  axis=-1)
  return maps, inv


@functools.lru_cache(maxsize=2)
def load_atlas(spacing_mm: float) -> Atlas:
  """The template maps, with GM/WM/brain smoothed by sigma (spacing - 1) / 2 mm against aliasing."""
  maps, inv = _base_atlas()
  sigma = max(float(spacing_mm) - 1.0, 0.0) / 2.0
  if sigma >= 0.3:
    maps = maps.copy()
    for c in range(3):
      maps[..., c] = ndimage.gaussian_filter(maps[..., c], sigma)
  reach = int(math.ceil(max(float(spacing_mm), 2.0)))
  support = ndimage.maximum_filter(maps[..., 2] > 0.01, size=2 * reach + 1)
  support[[0, -1]] = False
  support[:, [0, -1]] = False
  support[:, :, [0, -1]] = False
  return Atlas(maps=np.ascontiguousarray(maps), support=support, world_to_voxel=inv)


def _trilinear(maps: np.ndarray, pts: np.ndarray) -> np.ndarray:
  """Samples every channel of `maps` (x, y, z, C) at `pts` (3, P) in one pass: (C, P) float32.

  One set of corner indices and weights serves all channels, about 4x faster than one
  `ndimage.map_coordinates` per channel. Points must lie in [0, n - 1] (the support mask ensures it).
  """
  nx, ny, nz, ch = maps.shape
  flat = maps.reshape(-1, ch)
  shape = np.array([nx, ny, nz])
  i0 = np.clip(np.floor(pts).astype(np.int64), 0, (shape - 2)[:, None])
  f = np.clip(pts - i0, 0.0, 1.0).astype(np.float32)
  base = (i0[0] * ny + i0[1]) * nz + i0[2]
  out = np.zeros((pts.shape[1], ch), dtype=np.float32)
  for dx in (0, 1):
    wx = f[0] if dx else 1.0 - f[0]
    for dy in (0, 1):
      wxy = wx * (f[1] if dy else 1.0 - f[1])
      for dz in (0, 1):
        wgt = wxy * (f[2] if dz else 1.0 - f[2])
        out += flat[base + ((dx * ny + dy) * nz + dz)] * wgt[:, None]
  return out.T


# ---------------------------------------------------------------------------------------------- subjects


@dataclasses.dataclass
class Anatomy:
  """One subject's template maps sampled at the brain voxels (flat indices `index`) of the output grid."""
  shape: tuple[int, int, int]
  spacing_mm: float
  index: np.ndarray  # (P,) flat indices into the (X, Y, Z) volume
  coords: np.ndarray  # (3, P) output-grid positions scaled to [-1, 1] (for the bias field)
  gm: np.ndarray
  wm: np.ndarray
  brain: np.ndarray
  ventricle_sdf: np.ndarray
  hippocampus_sdf: np.ndarray
  depth: np.ndarray
  head_scale: float
  gm_contrast: float
  csf_contrast: float
  susceptibility: float


def _cosine_basis(n: int, k: int) -> np.ndarray:
  t = (np.arange(n, dtype=np.float32) + 0.5) / n
  return np.stack([np.cos(np.pi * (i + 1) * t) for i in range(k)], axis=1)  # (n, k), no constant term


def build_anatomy(shape: Sequence[int], spacing_mm: float, rng: np.random.Generator,
                  pose_scale: float = 1.0) -> Anatomy:
  """Draws a subject: a random similarity transform plus a smooth displacement of the template.

  Output voxel x (world mm, `nifti.volume_affine` grid) reads the template at
  `R diag(1/s) (x - c) + c + t + d(x)`, with per-axis head scale s ~ 1 +- 4 %, rotations ~ 2 deg, shift
  ~ 1.5 mm about the brain centre c (all three times `pose_scale`), and d a low-frequency cosine field
  (3 modes per axis, ~2 mm: the subject's own anatomy, which affine registration does not remove).
  Only output voxels whose template position can hold brain are sampled afterwards.
  """
  shape = tuple(int(s) for s in shape)
  atlas = load_atlas(float(spacing_mm))
  aff = nifti.volume_affine(shape, spacing_mm)
  axes_mm = [(np.arange(n) * aff[a, a] + aff[a, 3]).astype(np.float32) for a, n in enumerate(shape)]
  pose_scale = float(pose_scale)
  scale = np.clip(1.0 + 0.04 * pose_scale * rng.standard_normal(3), 0.9, 1.1)
  angles = np.deg2rad(2.0 * pose_scale * rng.standard_normal(3))
  shift = 1.5 * pose_scale * rng.standard_normal(3)
  k = 3
  coef = rng.standard_normal((3, k, k, k)) * (2.0 / (1.0 + np.add.outer(np.add.outer(
      np.arange(k), np.arange(k)), np.arange(k))))[None]
  susceptibility = float(np.exp(0.15 * rng.standard_normal()))
  gm_contrast = float(np.clip(0.62 + 0.03 * rng.standard_normal(), 0.5, 0.72))
  csf_contrast = float(np.clip(0.2 + 0.03 * rng.standard_normal(), 0.1, 0.3))

  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
  lin = (atlas.world_to_voxel[:3, :3] @ rot @ np.diag(1.0 / scale)).astype(np.float32)
  centre = np.array([0.0, -18.0, 8.0])
  off = (atlas.world_to_voxel[:3, :3] @ (centre + shift - rot @ np.diag(1.0 / scale) @ centre)
         + atlas.world_to_voxel[:3, 3]).astype(np.float32)
  bases = [_cosine_basis(n, k) for n in shape]
  disp_w = np.einsum("cijk,xi,yj,zk->cxyz", coef.astype(np.float32), *bases, optimize=True)
  disp_v = np.einsum("ac,cxyz->axyz", atlas.world_to_voxel[:3, :3].astype(np.float32), disp_w)
  X, Y, Z = (axes_mm[0][:, None, None], axes_mm[1][None, :, None], axes_mm[2][None, None, :])
  vox = np.stack([lin[a, 0] * X + lin[a, 1] * Y + lin[a, 2] * Z + off[a] + disp_v[a] for a in range(3)])
  del disp_v, disp_w

  near = np.rint(vox).astype(np.int32)
  inside = np.ones(shape, dtype=bool)
  for a in range(3):
    inside &= (near[a] >= 0) & (near[a] < atlas.support.shape[a])
    np.clip(near[a], 0, atlas.support.shape[a] - 1, out=near[a])
  inside &= atlas.support[near[0], near[1], near[2]]
  del near
  index = np.flatnonzero(inside)
  sampled = _trilinear(atlas.maps, vox.reshape(3, -1)[:, index])
  grid_pos = np.stack(np.unravel_index(index, shape)).astype(np.float32)
  coords = grid_pos / (np.asarray(shape, np.float32)[:, None] - 1.0) * 2.0 - 1.0
  return Anatomy(
      shape=shape, spacing_mm=float(spacing_mm), index=index, coords=coords,
      **{name: np.ascontiguousarray(sampled[c]) for c, name in enumerate(MAPS)},
      head_scale=float(np.prod(scale) ** (1.0 / 3.0)), gm_contrast=gm_contrast, csf_contrast=csf_contrast,
      susceptibility=susceptibility)


def render_scan(anatomy: Anatomy, *, age: float, diagnosis: str, years: float,
                rng: np.random.Generator, atrophy_scale: float = 1.0,
                bias_scale: float = 1.0) -> tuple[np.ndarray, dict[str, float]]:
  """One session: atrophy for (age, diagnosis, years), T1 contrast, bias (log-polynomial coefficients
  ~ 0.06 * `bias_scale`) and noise.

  Returns the float32 `(X, Y, Z)` volume scaled to [0, 1] and the ground-truth measures (mL, radii, noise).
  """
  an = anatomy
  r_v, r_h, r_c = atrophy_radii(age, diagnosis, years, an.susceptibility, atrophy_scale)
  w = np.float32(max(0.5, 0.35 * an.spacing_mm))  # edge softness (mm) ~ partial volume at this spacing
  f_c = special.expit((np.float32(r_c) - an.depth) / w) - special.expit(-an.depth / w)
  h0 = special.expit(-an.hippocampus_sdf / w)
  h_t = special.expit((-an.hippocampus_sdf - np.float32(r_h)) / w)
  v_t = special.expit((np.float32(r_v) - an.ventricle_sdf) / w) * an.brain
  keep = (1.0 - (h0 - h_t)) * (1.0 - v_t)
  gm = an.gm * (1.0 - f_c) * keep
  wm = an.wm * keep
  csf = np.clip(an.brain - gm - wm, 0.0, None)
  signal = wm + np.float32(an.gm_contrast) * gm + np.float32(an.csf_contrast) * csf

  x, y, z = an.coords
  terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
  bias_coef = 0.06 * float(bias_scale) * rng.standard_normal(len(terms))
  log_bias = sum(np.float32(c) * t for c, t in zip(bias_coef, terms))
  noise_sd = float(rng.uniform(0.015, 0.035))
  n1 = rng.standard_normal(signal.shape, dtype=np.float32)
  n2 = rng.standard_normal(signal.shape, dtype=np.float32)
  s = signal * np.exp(log_bias)
  vals = np.sqrt((s + np.float32(noise_sd) * n1) ** 2 + (np.float32(noise_sd) * n2) ** 2)
  vals *= an.brain >= 0.5
  vol = np.zeros(int(np.prod(an.shape)), dtype=np.float32)
  vol[an.index] = vals
  vol /= max(float(vals.max()), 1e-6)
  ml = an.spacing_mm ** 3 / 1000.0
  measures = dict(
      ventricle_ml=float(v_t.sum() * ml), hippocampus_ml=float(h_t.sum() * ml), gm_ml=float(gm.sum() * ml),
      wm_ml=float(wm.sum() * ml), csf_ml=float(csf.sum() * ml), brain_ml=float((gm + wm).sum() * ml),
      icv_ml=float(an.brain.sum() * ml), r_ventricle_mm=r_v, r_hippocampus_mm=r_h, r_cortex_mm=r_c,
      noise_sd=noise_sd, head_scale=an.head_scale, susceptibility=an.susceptibility)
  return vol.reshape(an.shape), measures


# ---------------------------------------------------------------------------------------------- cohort


def _subject_plan(seed: int, i: int, sessions: tuple[int, int], interval_months: int):
  """Factors of subject i: diagnosis (balanced in blocks of 3), baseline age, session months."""
  block = np.random.default_rng(np.random.SeedSequence([seed, 2**31 + i // 3]))
  diagnosis = DIAGNOSES[int(block.permutation(3)[i % 3])]
  rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
  n = int(rng.integers(sessions[0], sessions[1] + 1))
  follow_up = (n - 1) * interval_months / 12.0
  age0 = float(rng.uniform(55.0, 90.0 - follow_up))
  return diagnosis, age0, [k * interval_months for k in range(n)], rng


def _write_csv(path: pathlib.Path, header: Sequence[str], rows: list[Sequence]) -> None:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  atomic.write_bytes(path, buf.getvalue().encode("utf-8"))


def _write_subject(out: pathlib.Path, i: int, *, seed: int, shape: tuple[int, ...], spacing_mm: float,
                   sessions: tuple[int, int], interval_months: int, width: int, atrophy_scale: float,
                   nuisance_scale: float) -> tuple[list, list]:
  """Renders and writes every session of subject i; returns its manifest records and ground-truth rows."""
  records, truth = [], []
  diagnosis, age0, months_list, rng = _subject_plan(seed, i, sessions, interval_months)
  anatomy = build_anatomy(shape, spacing_mm, rng, pose_scale=nuisance_scale)
  subject = f"sub-{i + 1:0{width}d}"
  for j, months in enumerate(months_list):
    years = months / 12.0
    age = round(age0 + years, 2)
    scan_rng = np.random.default_rng(np.random.SeedSequence([seed, i, j + 1]))
    volume, measures = render_scan(anatomy, age=age, diagnosis=diagnosis, years=years, rng=scan_rng,
                                   atrophy_scale=atrophy_scale, bias_scale=nuisance_scale)
    ses = f"ses-M{months:03d}"
    rel = f"{subject}/{ses}/anat/{subject}_{ses}_T1w.nii.gz"
    nifti.save_volume(out / rel, volume, spacing_mm=spacing_mm, dtype="int16")
    records.append(manifest_lib.ScanRecord(
        subject=subject, path=str((out / rel).resolve()), diagnosis=diagnosis,
        label=sorted(manifest_lib.DEFAULT_CLASSES).index(diagnosis), age=age, session_months=months,
        scan_id=manifest_lib.scan_id(subject, months)))
    truth.append(dict(scan_id=manifest_lib.scan_id(subject, months), subject=subject,
                      session_months=months, diagnosis=diagnosis, age=age, years_from_baseline=years,
                      **measures))
  return records, truth


def generate_cohort(out_dir: str | os.PathLike, *, subjects: int, seed: int,
                    shape: Sequence[int] = nifti.DEFAULT_SHAPE, spacing_mm: float = nifti.DEFAULT_SPACING_MM,
                    sessions: tuple[int, int] = (2, 5), interval_months: int = 6,
                    atrophy_scale: float = 1.0, nuisance_scale: float = 1.0,
                    workers: int = 1, progress: bool = True) -> pathlib.Path:
  """Writes the cohort under `out_dir`; returns `out_dir/manifest.csv`.

  `sessions=(lo, hi)`: each subject gets lo..hi sessions (inclusive), `interval_months` apart, from a
  baseline age in 55..90 minus the follow-up. Also writes `ground_truth.csv` (one row per scan) and
  `cohort.json` (the arguments, so a caller can tell whether an existing cohort matches its config).
  `atrophy_scale` multiplies the age and disease atrophy radii (see `atrophy_radii`). `nuisance_scale`
  multiplies the variation that preprocessing removes in a real cohort: head pose and size (affine
  registration to MNI) and the bias field (N4). 1 gives scanner-space scans; ~0.25 leaves the residuals of
  the paper's preprocessing. The subject's own anatomy (the smooth deformation) is unaffected.
  `workers`: processes rendering subjects in parallel (0: one per CPU core); the files are the same for any
  number.
  """
  from ldae_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top

  shape = tuple(int(s) for s in shape)
  if subjects < 1:
    raise ValueError(f"subjects={subjects}: need at least one subject.")
  if workers < 0:
    raise ValueError(f"workers={workers}: need >= 0 (0: one process per CPU core).")
  if len(shape) != 3 or min(shape) < 8:
    raise ValueError(f"shape={shape}: three sizes >= 8 (X, Y, Z).")
  lo, hi = (int(s) for s in sessions)
  if not 1 <= lo <= hi:
    raise ValueError(f"sessions={sessions}: need 1 <= lo <= hi.")
  fov = np.asarray(shape) * spacing_mm
  if np.any(fov < (150.0, 185.0, 160.0)):
    raise ValueError(f"shape={shape} x spacing {spacing_mm} mm = field of view {fov.tolist()} mm is smaller "
                     "than a brain (about 150 x 185 x 160 mm); enlarge the shape or the spacing.")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  width = max(4, len(str(subjects)))
  records, truth = [], []
  load_atlas(float(spacing_mm))
  job = functools.partial(_write_subject, out, seed=seed, shape=shape, spacing_mm=float(spacing_mm),
                          sessions=(lo, hi), interval_months=interval_months, width=width,
                          atrophy_scale=atrophy_scale, nuisance_scale=nuisance_scale)
  workers = min(os.cpu_count() or 1, subjects) if workers == 0 else min(int(workers), subjects)
  bar = progress_lib.bar(total=subjects, desc="synthetic cohort", unit="subject", disable=not progress)
  if workers <= 1:
    results = map(job, range(subjects))
    pool = None
  else:
    # "spawn": the caller (train.py) has usually started JAX's threads already, and a fork of a threaded
    # process can deadlock. Each subject depends on (seed, i) alone, so the files do not depend on `workers`.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    results = pool.map(job, range(subjects), chunksize=max(1, subjects // (8 * workers)))
  try:
    for subject_records, subject_truth in results:  # in subject order, whatever finished first
      records += subject_records
      truth += subject_truth
      bar.update(1)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  bar.close()
  manifest_path = manifest_lib.write_manifest(records, out / "manifest.csv")
  header = list(truth[0])
  _write_csv(out / "ground_truth.csv", header,
             [[f"{r[h]:.6g}" if isinstance(r[h], float) else r[h] for h in header] for r in truth])
  meta = dict(subjects=subjects, seed=seed, shape=list(shape), spacing_mm=float(spacing_mm),
              sessions=[lo, hi], interval_months=interval_months, atrophy_scale=float(atrophy_scale),
              nuisance_scale=float(nuisance_scale),
              scans=len(records))
  atomic.write_bytes(out / "cohort.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
  return manifest_path


def _ints(text: str, n: int, name: str) -> tuple[int, ...]:
  try:
    vals = tuple(int(v) for v in text.split(","))
  except ValueError:
    vals = ()
  if len(vals) != n:
    raise argparse.ArgumentTypeError(f"--{name} {text!r}: give {n} comma-separated integers.")
  return vals


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ldae_jax.data.synthetic", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--subjects", type=int, default=200, help="number of subjects (default 200)")
  p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default 0)")
  p.add_argument("--shape", default="128,160,128", help="X,Y,Z voxels (default 128,160,128)")
  p.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
  p.add_argument("--sessions", default="2,5", help="min,max sessions per subject (default 2,5)")
  p.add_argument("--interval", type=int, default=6, help="months between sessions (default 6)")
  p.add_argument("--atrophy_scale", type=float, default=1.0,
                 help="multiplies the age/disease atrophy (default 1: real-cohort volumes; >1 for coarse grids)")
  p.add_argument("--nuisance_scale", type=float, default=1.0,
                 help="multiplies head pose/size and bias-field variation (default 1: unregistered, uncorrected "
                      "scans; ~0.25: residuals after affine registration to MNI and N4)")
  # The dashed spellings of earlier versions, kept working but not shown: every CLI of the package spells
  # its flags with underscores, as train.py / evaluate.py's absl flags must.
  p.add_argument("--atrophy-scale", dest="atrophy_scale", type=float, help=argparse.SUPPRESS)
  p.add_argument("--nuisance-scale", dest="nuisance_scale", type=float, help=argparse.SUPPRESS)
  p.add_argument("--workers", type=int, default=1,
                 help="processes rendering subjects in parallel (default 1; 0: one per CPU core); same files")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  try:
    shape = _ints(args.shape, 3, "shape")
    sessions = _ints(args.sessions, 2, "sessions")
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  t0 = time.time()
  path = generate_cohort(args.out, subjects=args.subjects, seed=args.seed, shape=shape,
                         spacing_mm=args.spacing, sessions=sessions, interval_months=args.interval,
                         atrophy_scale=args.atrophy_scale, nuisance_scale=args.nuisance_scale,
                         workers=args.workers, progress=not args.quiet)
  with open(path) as f:
    n_scans = sum(1 for _ in f) - 1
  print(f"synthetic cohort: {args.subjects} subjects, {n_scans} scans, {shape} at {args.spacing} mm, "
        f"{time.time() - t0:.1f} s -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
