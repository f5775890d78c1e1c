"""NIfTI reading, preprocessing and writing for the MRI volumes.

Axis convention (fixed once, for the whole package):

* A volume array is `(X, Y, Z)` in **canonical RAS** voxel order: X grows from Left to Right, Y from
  Posterior to Anterior, Z from Inferior to Superior.
  This is the reference's `(C, X, Y, Z)` minus the channel; the autoencoder and its latents use it as
  `(B, X, Y, Z, 1)` / `(B, X/f, Y/f, Z/f, C)` (NDHWC).
* `volume[:, :, k]` is the **axial** slice at height k (k = 0 lowest): an X x Y image (128 x 160 at paper
  size), left->right along its rows' index 0 and posterior->anterior along index 1. The semantic encoder sees
  exactly these Z slices, slice k at position k (the reference permutes (C, X, Y, Z) -> (C, Z, X, Y));
  `axial_slices(volume)` gives them as a `(Z, X, Y)` stack.
* `volume_affine(shape, spacing_mm)` is the voxel->world (RAS mm) matrix of a volume on the package's grid:
  diagonal `spacing_mm`, with the volume's centre voxel `(shape - 1) / 2` at world (0, 0, 0), the MNI origin.

The pipeline mirrors the reference's MONAI transforms (LoadImage -> Spacingd(1.5) -> ResizeWithPadOrCropd ->
ScaleIntensityd) with two deliberate differences, both explained at the functions: the data are reoriented
to RAS first (MONAI keeps file voxel order, so a LAS-stored file would come out mirrored), and downsampling
applies a small Gaussian anti-alias filter (MONAI's bilinear resampling aliases at large factors).
"""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldae_jax.data import atomic

DEFAULT_SHAPE = (128, 160, 128)
DEFAULT_SPACING_MM = 1.5


class NiftiError(ValueError):
  """A NIfTI file cannot be read or written as a volume; the message names the file and the fix."""


def volume_affine(shape: Sequence[int], spacing_mm: float) -> np.ndarray:
  """RAS voxel->world affine of a `shape` grid with isotropic `spacing_mm`, centred on the MNI origin."""
  shape = np.asarray(tuple(shape)[:3], dtype=np.float64)
  aff = np.diag([float(spacing_mm)] * 3 + [1.0])
  aff[:3, 3] = -0.5 * (shape - 1.0) * float(spacing_mm)
  return aff


def axial_slices(volume: np.ndarray) -> np.ndarray:
  """`(X, Y, Z[, C])` -> `(Z, X, Y[, C])`: the axial slices the semantic encoder sees, slice k = height k."""
  return np.moveaxis(volume, 2, 0)


# ---------------------------------------------------------------------------------------------- steps


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flips/permutes voxel axes so that they run R, A, S (closest canonical); exact, no interpolation.

  Oblique acquisitions keep their residual rotation in the returned affine (as nibabel's
  `as_closest_canonical`), so the data are never interpolated here.
  """
  ornt = nib.orientations.io_orientation(affine)
  target = nib.orientations.axcodes2ornt(("R", "A", "S"))
  transform = nib.orientations.ornt_transform(ornt, target)
  out = nib.orientations.apply_orientation(data, transform)
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
  return np.ascontiguousarray(out), new_affine


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths in mm (the column norms of the affine's 3x3 part)."""
  return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def resample_isotropic(data: np.ndarray, affine: np.ndarray, spacing_mm: float,
                       *, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Linear resampling to `spacing_mm` voxels, keeping the field of view's centre and physical extent.

  Output size per axis is `round(n * zoom / spacing)`; output voxel i samples input voxel
  `D * i + o` with `D = spacing / zoom` and `o` chosen so that both grids share their centre. When an axis is
  downsampled (D > 1) the data are first smoothed with sigma `(D - 1) / 2` input voxels (skimage's rule), so
  a 1 mm -> 6 mm resampling does not alias; MONAI's Spacingd does not filter (the difference at 1 -> 1.5 mm
  is a 0.25-voxel blur).
  """
  zooms = voxel_sizes(affine)
  step = float(spacing_mm) / zooms
  in_shape = np.asarray(data.shape[:3], dtype=np.float64)
  if np.allclose(step, 1.0, rtol=0, atol=1e-5):
    return data, affine
  out_shape = np.maximum(np.rint(in_shape / step), 1).astype(int)
  offset = 0.5 * (in_shape - 1.0) - step * 0.5 * (out_shape - 1.0)
  src = data.astype(np.float32, copy=False)
  if antialias and np.any(step > 1.0):
    sigma = np.maximum(step - 1.0, 0.0) / 2.0
    src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
  out = ndimage.affine_transform(src, step, offset=offset, output_shape=tuple(out_shape), order=1,
                                 mode="nearest", output=np.float32)
  sample = np.eye(4)
  sample[:3, :3] = np.diag(step)
  sample[:3, 3] = offset
  return out, affine @ sample


def center_pad_crop(data: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                    *, pad_value: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Centre pad/crop to `shape` as MONAI's ResizeWithPadOrCrop (the smaller half goes before).

  Padding uses `pad_value`, by default the volume minimum (the reference's mode='minimum', which is the
  background of a skull-stripped scan). The affine is shifted so that world positions are unchanged.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape={shape}: need three positive sizes (X, Y, Z).")
  fill = float(np.min(data)) if pad_value is None else float(pad_value)
  out = np.full(shape, fill, dtype=data.dtype)
  src_sl, dst_sl, start = [], [], []
  for n_in, n_out in zip(data.shape[:3], shape):
    # Crop starts at floor((in - out) / 2); padding puts floor((out - in) / 2) before (MONAI's both ways).
    s = (n_in - n_out) // 2 if n_in >= n_out else -((n_out - n_in) // 2)
    start.append(s)
    if s >= 0:
      src_sl.append(slice(s, s + n_out))
      dst_sl.append(slice(0, n_out))
    else:
      src_sl.append(slice(0, n_in))
      dst_sl.append(slice(-s, -s + n_in))
  out[tuple(dst_sl)] = data[tuple(src_sl)]
  shift = np.eye(4)
  shift[:3, 3] = start
  return out, affine @ shift


def normalize_intensity(data: np.ndarray, percentile_clip: float = 0.0) -> np.ndarray:
  """Per-volume min-max to [0, 1] (the reference's ScaleIntensityd); optional upper percentile clip first.

  `percentile_clip=99.5` clips every voxel above the 99.5th percentile of the whole volume (background
  included) before scaling, so a few hot voxels cannot squash the tissue contrast. A constant volume maps
  to zeros (as MONAI), since there is no contrast to scale.
  """
  x = data.astype(np.float32, copy=True)
  if percentile_clip:
    if not 0.0 < percentile_clip <= 100.0:
      raise ValueError(f"percentile_clip={percentile_clip}: use 0 (off) or a percentile in (0, 100].")
    np.minimum(x, np.float32(np.percentile(x, percentile_clip)), out=x)
  lo, hi = float(x.min()), float(x.max())
  if hi <= lo:
    return np.zeros_like(x)
  x -= np.float32(lo)
  x *= np.float32(1.0 / (hi - lo))
  np.clip(x, 0.0, 1.0, out=x)
  return x


# ---------------------------------------------------------------------------------------------- API


def preprocess(data: np.ndarray, affine: np.ndarray, *, shape: Sequence[int] = DEFAULT_SHAPE,
               spacing_mm: float = DEFAULT_SPACING_MM, percentile_clip: float = 0.0,
               return_affine: bool = False):
  """Array + affine -> float32 `(X, Y, Z)` RAS volume in [0, 1] on the package grid.

  Steps: reorient to RAS, resample to isotropic `spacing_mm`, centre pad/crop to `shape`, min-max (after an
  optional percentile clip). With `return_affine=True` returns `(volume, affine)`, the affine of the output
  voxels in the input's world space (what `save_volume(..., affine=...)` needs to put it back in place).
  """
  data = np.asarray(data)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ValueError(f"preprocess: expected a 3D volume (X, Y, Z) or (X, Y, Z, 1), got shape {data.shape}.")
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise ValueError(f"preprocess: the affine must be a finite, invertible 4x4 matrix, got\n{affine}.")
  if not np.all(np.isfinite(data)):
    raise ValueError("preprocess: the volume holds NaN or Inf values; fix or mask them before loading.")
  vol, aff = reorient_to_ras(data.astype(np.float32, copy=False), affine)
  vol, aff = resample_isotropic(vol, aff, spacing_mm)
  vol, aff = center_pad_crop(vol, aff, shape)
  vol = normalize_intensity(vol, percentile_clip)
  return (vol, aff) if return_affine else vol


def _read(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  fix = "re-export it as a valid .nii/.nii.gz (e.g. with nibabel or dcm2niix) or remove it from the manifest"
  if not path.is_file():
    raise NiftiError(f"{path}: no such file; check the path (relative manifest paths resolve against the CSV's "
                     "folder).")
  try:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
  except Exception as e:  # nibabel raises many types for truncated / corrupt files (EOFError, zlib, ...)
    raise NiftiError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}); {fix}.") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise NiftiError(f"{path}: holds an array of shape {data.shape}, not one 3D volume; extract a single "
                     "3D T1 image (e.g. `fslroi` / nibabel's `image.slicer`).")
  if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise NiftiError(f"{path}: its affine (sform/qform) is missing or singular; {fix} with a valid affine.")
  if not np.all(np.isfinite(data)):
    raise NiftiError(f"{path}: holds NaN/Inf voxels; {fix} after replacing them (e.g. with 0).")
  return data, affine


def read_checked(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """The raw float32 `(X, Y, Z)` data (file voxel order) and affine of a NIfTI, after `check_file`'s checks;
  a NiftiError names the file and the fix. For steps that need the scan before any resampling."""
  return _read(pathlib.Path(path))


def check_file(path: str | os.PathLike) -> str | None:
  """None if `path` reads as one finite 3D volume with a usable affine, else the problem (and its fix).

  The same header and data checks as `load_volume` (the whole file is decompressed, so a truncated .nii.gz
  is found), without the preprocessing: for checking a cohort before training starts.
  """
  try:
    _read(pathlib.Path(path))
  except NiftiError as e:
    return str(e)
  return None


def load_volume(path: str | os.PathLike, *, shape: Sequence[int] = DEFAULT_SHAPE,
                spacing_mm: float = DEFAULT_SPACING_MM, percentile_clip: float = 0.0) -> np.ndarray:
  """Reads any NIfTI (nibabel) and returns the preprocessed float32 `(X, Y, Z)` RAS volume in [0, 1]."""
  path = pathlib.Path(path)
  data, affine = _read(path)
  return preprocess(data, affine, shape=shape, spacing_mm=spacing_mm, percentile_clip=percentile_clip)


def save_volume(path: str | os.PathLike, volume: np.ndarray, *, spacing_mm: float = DEFAULT_SPACING_MM,
                affine: np.ndarray | None = None, dtype: str = "float32") -> pathlib.Path:
  """Writes `(X, Y, Z)` or `(X, Y, Z, 1)` as NIfTI-1 (`.nii` or `.nii.gz`), atomically and reproducibly.

  `affine=None` uses `volume_affine(shape, spacing_mm)`. `dtype="int16"` stores a [0, max] volume as int16
  with `scl_slope = max / 32767` (the usual T1 storage, 2x smaller); reading it back gives the quantised values.
  `dtype="uint8"` stores integer labels (a brain mask) unscaled.
  `.nii.gz` is compressed here with gzip mtime 0 and no file name in the header, so the same volume always
  gives the same bytes; the file appears under its name only when complete (temp file + rename).
  """
  path = pathlib.Path(path)
  name = path.name
  if not (name.endswith(".nii") or name.endswith(".nii.gz")):
    raise NiftiError(f"{path}: the file name must end in .nii or .nii.gz.")
  vol = np.asarray(volume)
  if vol.ndim == 4 and vol.shape[3] == 1:
    vol = vol[..., 0]
  if vol.ndim != 3:
    raise NiftiError(f"{path}: cannot save an array of shape {vol.shape}; pass (X, Y, Z) or (X, Y, Z, 1).")
  if not np.all(np.isfinite(vol)):
    raise NiftiError(f"{path}: the volume holds NaN/Inf values; clean it before saving.")
  aff = volume_affine(vol.shape, spacing_mm) if affine is None else np.asarray(affine, dtype=np.float64)
  if dtype == "float32":
    img = nib.Nifti1Image(vol.astype(np.float32), aff)
    img.header.set_data_dtype(np.float32)
  elif dtype == "int16":
    if vol.min() < 0:
      raise NiftiError(f"{path}: int16 storage here is for non-negative volumes; use dtype='float32'.")
    vmax = float(vol.max())
    slope = vmax / 32767.0 if vmax > 0 else 1.0
    img = nib.Nifti1Image(np.rint(vol / slope).astype(np.int16), aff)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, 0.0)
  elif dtype == "uint8":  # label images (brain masks): stored as they are, no scaling
    if vol.min() < 0 or vol.max() > 255 or not np.all(np.equal(np.mod(vol, 1), 0)):
      raise NiftiError(f"{path}: uint8 storage is for integer labels in 0..255; use dtype='float32'.")
    img = nib.Nifti1Image(vol.astype(np.uint8), aff)
    img.header.set_data_dtype(np.uint8)
  else:
    raise NiftiError(f"{path}: dtype={dtype!r}; use 'float32', 'int16' or 'uint8'.")
  img.set_qform(aff, code=2)
  img.set_sform(aff, code=2)
  img.header.set_xyzt_units("mm", "sec")
  raw = img.to_bytes()
  if name.endswith(".gz"):
    raw = gzip.compress(raw, compresslevel=1, mtime=0)
  return atomic.write_bytes(path, raw)
