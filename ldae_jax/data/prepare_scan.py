"""One raw T1 scan -> the preprocessed volume the rest of the package reads, its brain masks and its QC.

Steps: read and check the file (one finite 3D volume covering a head) -> N4 bias-field correction -> rigid
then affine registration to the MNI152 2009 template (optionally SyN after it) -> brain mask (the
template's, carried into the scan and refined on the scan's intensities, `brain_mask`) -> the package's
grid (`nifti.volume_affine`: 1.5 mm, 128 x 160 x 128, RAS, centred on the MNI origin) -> skull-stripped and
min-max scaled as `nifti.normalize_intensity` does.

Outputs (`ScanOutputs`): the volume (int16 + scale, as the synthetic cohort's), the brain mask on the same
grid and in the scan's own voxels, the scan -> MNI affine (ANTs .mat), the QC figure, and a JSON of the
QC measures and the settings, written last: a scan whose JSON exists with the same settings is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
import time
from typing import Sequence

import numpy as np

from ldae_jax.data import atomic
from ldae_jax.data import brain_mask
from ldae_jax.data import nifti
from ldae_jax.data import qc
from ldae_jax.data import registration

# A whole-brain 3D T1 covers the brain (~140 x 175 x 120 mm) along every axis; a slab or a 2D stack does not.
MIN_FIELD_OF_VIEW_MM = 100.0
MIN_VOXELS_PER_AXIS = 16


@dataclasses.dataclass(frozen=True)
class Settings:
  """What changes the outputs (a scan prepared with other settings is prepared again)."""
  shape: tuple[int, int, int] = nifti.DEFAULT_SHAPE
  spacing_mm: float = nifti.DEFAULT_SPACING_MM
  percentile_clip: float = 0.0
  deformable: bool = False
  band_mm: float = brain_mask.DEFAULT_BAND_MM
  opening_mm: float = brain_mask.DEFAULT_OPENING_MM

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["shape"] = list(self.shape)
    d["template"] = registration.TEMPLATE_NAME
    return d


@dataclasses.dataclass(frozen=True)
class ScanOutputs:
  volume: pathlib.Path
  mask: pathlib.Path
  mask_native: pathlib.Path
  transform: pathlib.Path
  figure: pathlib.Path
  measures: pathlib.Path

  def files(self) -> tuple[pathlib.Path, ...]:
    return (self.volume, self.mask, self.mask_native, self.transform, self.figure, self.measures)


def output_paths(out_dir: str | os.PathLike, subject: str, session_months: int, scan_id: str) -> ScanOutputs:
  """`OUT/<subject>/ses-M<months>/anat/<scan_id>_*` (the path names the session, as the manifest reads it);
  the figures in `OUT/qc/`, to look through in one folder."""
  if not subject or any(c in subject for c in "/\\") or subject in (".", ".."):
    raise ValueError(f"subject {subject!r}: a subject id must be usable as a folder name")
  out = pathlib.Path(out_dir)
  anat = out / subject / f"ses-M{int(session_months):03d}" / "anat"
  return ScanOutputs(volume=anat / f"{scan_id}_T1w.nii.gz", mask=anat / f"{scan_id}_brainmask.nii.gz",
                     mask_native=anat / f"{scan_id}_brainmask_native.nii.gz",
                     transform=anat / f"{scan_id}_to_{registration.TEMPLATE_NAME}.mat",
                     figure=out / "qc" / f"{scan_id}.png", measures=anat / f"{scan_id}_qc.json")


def done_before(outputs: ScanOutputs, source: str, settings: Settings) -> dict | None:
  """The saved measures when every output exists and was made from `source` with `settings`, else None."""
  if not all(p.is_file() for p in outputs.files()):
    return None
  try:
    saved = json.loads(outputs.measures.read_text())
  except (OSError, ValueError):
    return None
  if saved.get("source") != str(source) or saved.get("settings") != settings.as_dict():
    return None
  return saved


def check_head_coverage(data: np.ndarray, affine: np.ndarray, path: str) -> None:
  zooms = nifti.voxel_sizes(affine)
  fov = np.asarray(data.shape[:3]) * zooms
  if min(data.shape[:3]) < MIN_VOXELS_PER_AXIS or fov.min() < MIN_FIELD_OF_VIEW_MM:
    raise nifti.NiftiError(
        f"{path}: {data.shape[:3]} voxels of {np.round(zooms, 2).tolist()} mm cover "
        f"{np.round(fov).astype(int).tolist()} mm; a whole-brain 3D T1 covers at least "
        f"{MIN_FIELD_OF_VIEW_MM:g} mm along every axis (a slab, a localiser or a 2D slice stack cannot be "
        "registered to MNI); remove it from the dataset")
  if float(data.max()) <= float(data.min()):
    raise nifti.NiftiError(f"{path}: every voxel holds {float(data.min())}; the image is empty")


def _save_mask(path: pathlib.Path, mask: np.ndarray, affine: np.ndarray) -> None:
  nifti.save_volume(path, mask.astype(np.uint8), affine=affine, dtype="uint8")


def prepare_scan(source: str | os.PathLike, outputs: ScanOutputs, settings: Settings = Settings(),
                 *, scan_id: str = "") -> dict:
  """Runs every step on one scan, writes `outputs`, and returns the QC measures (as saved in the JSON).

  Raises NiftiError (a ValueError) naming the file for an unreadable, non-3D or non-T1 input.
  """
  t0 = time.time()
  source = str(source)
  data, affine = nifti.read_checked(source)
  check_head_coverage(data, affine, source)
  voxel_mm = nifti.voxel_sizes(affine)
  scan = registration.to_ants(data, affine)
  corrected = registration.n4(scan)
  _, template_mask = registration.template()
  with tempfile.TemporaryDirectory(prefix="ldae_prepare_") as work:
    reg = registration.register_affine(corrected, work)
    prior = registration.to_scan_space(template_mask, corrected, reg).numpy()
    image = corrected.numpy()
    mask = brain_mask.refine_brain_mask(image, prior, voxel_mm, band_mm=settings.band_mm,
                                        opening_mm=settings.opening_mm)
    if settings.deformable:
      brain = corrected * registration.to_ants(mask.astype(np.float32), affine)
      reg = registration.register_deformable(brain, reg, work)
      prior = registration.to_scan_space(template_mask, corrected, reg).numpy()
      mask = brain_mask.refine_brain_mask(image, prior, voxel_mm, band_mm=settings.band_mm,
                                          opening_mm=settings.opening_mm)
    grid = registration.grid_reference(settings.shape, settings.spacing_mm)
    on_grid = registration.to_template_space(corrected, grid, reg).numpy()
    mask_on_grid = registration.to_template_space(registration.to_ants(mask.astype(np.float32), affine),
                                                  grid, reg).numpy() > 0.5
    template_on_grid, template_mask_on_grid = registration.template_on_grid(tuple(settings.shape),
                                                                            float(settings.spacing_mm))
    similarity = qc.ncc(on_grid, template_on_grid, template_mask_on_grid)
    if similarity <= qc.MIN_T1_NCC:
      raise nifti.NiftiError(
          f"{source}: does not look like a T1-weighted scan (intensity correlation with the T1 template "
          f"{similarity:.2f} inside the brain; T2, FLAIR and PD images have darker white matter than grey); "
          "remove it, or give the T1w image of this session")
    transform_bytes = pathlib.Path(reg.affine).read_bytes()
    measures = dict(ncc=similarity, brain_ml=brain_mask.volume_ml(mask, voxel_mm),
                    mask_fraction=float(mask.sum()) / max(float((prior > 0.5).sum()), 1.0),
                    affine_scale=registration.affine_scale(reg))
  volume = nifti.normalize_intensity(np.where(mask_on_grid, on_grid, 0.0).astype(np.float32),
                                     settings.percentile_clip)
  grid_affine = nifti.volume_affine(settings.shape, settings.spacing_mm)
  nifti.save_volume(outputs.volume, volume, affine=grid_affine, dtype="int16")
  _save_mask(outputs.mask, mask_on_grid, grid_affine)
  _save_mask(outputs.mask_native, mask, affine)
  atomic.write_bytes(outputs.transform, transform_bytes)
  title = f"{scan_id or pathlib.Path(source).name}: " + ", ".join(f"{k} {v:.4g}" for k, v in measures.items())
  # The figure shows the registered head, not the stripped volume: what the mask left out is what to check.
  qc.save_figure(outputs.figure, nifti.normalize_intensity(on_grid), mask_on_grid, title)
  saved = dict(source=source, settings=settings.as_dict(), seconds=round(time.time() - t0, 2), **measures)
  atomic.write_bytes(outputs.measures, (json.dumps(saved, indent=1) + "\n").encode("utf-8"))
  return saved

