"""N4 bias-field correction and registration to the MNI152 2009 template, with ANTs (PyPI `antspyx`).

The template is the one nilearn's wheel bundles (ICBM 2009a nonlinear symmetric T1 and the brain mask
nilearn derives from it; no download), at 2 mm: an affine has 12 parameters, and 2 mm voxels fix them as
well as 1 mm ones at an eighth of the cost. The template is skull-stripped and the scans are whole heads,
so the registration starts rigid (a head cannot match a brain in scale until it is in place) and refines
to an affine from there; an affine straight from the scanner's position gets stuck when the head is tilted
or far off the MNI origin (measured: 25 degrees and 50 mm give a brain-mask Dice of 0.63, the rigid start
0.95). The optional deformable stage (SyN) registers the extracted brain, since a whole head would pull the
template's brain onto the skull.

antspyx is imported on first use, so the rest of the package works without it; `import_ants` names the
install command when it is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldae_jax.data import brain_mask
from ldae_jax.data import nifti

TEMPLATE_NAME = "MNI152NLin2009aSym"  # nilearn's mni_icbm152_t1_tal_nlin_sym_09a
TEMPLATE_RESOLUTION_MM = 2
# N4 fits its B-spline bias field on a shrunken copy; ~6 mm voxels hold a field that varies over
# ~10 cm, and cost a quarter of the default 4 mm (measured on Colin27: 7 s instead of 29 s on one core).
N4_SHRUNK_VOXEL_MM = 6.0
N4_CONVERGENCE = {"iters": [50, 50, 50], "tol": 1e-6}
# The rigid stage only has to bring the head near the template (the affine's levels refine it): stopping
# at 4 mm halves its time with the same masks (Colin27, also tilted 25 degrees and 50 mm off: Dice 0.955).
RIGID_LEVELS = dict(aff_iterations=(100, 50), aff_shrink_factors=(4, 2), aff_smoothing_sigmas=(2, 1))
AFFINE_LEVELS = dict(aff_iterations=(50, 25), aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0))
SYN_ITERATIONS = (40, 20, 0)  # the 2 mm template's finest level is left out: the mask is refined after
RANDOM_SEED = 1  # the metric's random sampling: the same scan gives the same transform


class MissingDependencyError(ImportError):
  """antspyx is not installed; the message gives the command."""


def import_ants():
  try:
    import ants  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise MissingDependencyError(
        f"the preprocessing needs ANTs for N4 and registration: `pip install antspyx` (import failed: {e})"
    ) from e
  return ants


def set_threads(n: int) -> None:
  """ITK's thread count, read once per process at its first filter: call before any ANTs work."""
  os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n)))


def to_ants(data: np.ndarray, affine: np.ndarray):
  """An ANTs image of `data` (file voxel order) placed in the world by the NIfTI `affine` (RAS mm)."""
  ants = import_ants()
  img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
  img.header.set_xyzt_units("mm", "sec")
  return ants.from_nibabel_nifti(img)


def grid_reference(shape: Sequence[int], spacing_mm: float):
  """An empty ANTs image on the package's grid (`nifti.volume_affine`): what scans are resampled onto."""
  return to_ants(np.zeros(tuple(shape), np.float32), nifti.volume_affine(shape, spacing_mm))


@functools.lru_cache(maxsize=2)
def template(resolution_mm: int = TEMPLATE_RESOLUTION_MM):
  """(T1, brain mask) of nilearn's bundled MNI152 2009 template, as ANTs images."""
  from nilearn import datasets  # pylint: disable=import-outside-toplevel
  t1 = datasets.load_mni152_template(resolution=resolution_mm)
  mask = datasets.load_mni152_brain_mask(resolution=resolution_mm)
  return to_ants(np.asarray(t1.dataobj), t1.affine), to_ants(np.asarray(mask.dataobj), mask.affine)


@functools.lru_cache(maxsize=2)
def template_on_grid(shape: tuple[int, int, int], spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """(T1, boolean brain mask) of the template on the package's grid, as RAS arrays: what a registered scan
  is compared with. The template is in MNI space already, so this is a plain resampling."""
  ants = import_ants()
  grid = grid_reference(shape, spacing_mm)
  t1, mask = template()
  return (ants.resample_image_to_target(t1, grid, interp_type="linear").numpy(),
          ants.resample_image_to_target(mask, grid, interp_type="linear").numpy() > 0.5)


def head_mask(data: np.ndarray) -> np.ndarray:
  """The head: voxels above the image's mean intensity (most of a field of view is dark air), its largest
  component, holes filled. (ANTs' get_mask does the same with morphological clean-ups that cost 4 s.)"""
  return ndimage.binary_fill_holes(brain_mask.largest_component(data > data.mean()))


def n4(image):
  """N4 bias-field correction of a whole-head T1, fitted inside its head mask."""
  ants = import_ants()
  mask = ants.from_numpy_like(head_mask(image.numpy()).astype(np.float32), image)
  shrink = max(1, int(round(N4_SHRUNK_VOXEL_MM / float(min(image.spacing)))))
  return ants.n4_bias_field_correction(image, mask=mask, shrink_factor=shrink, convergence=N4_CONVERGENCE)


@dataclasses.dataclass(frozen=True)
class Registration:
  """Scan -> template transforms (ANTs files under a caller's temporary folder).

  `to_template` / `to_scan` are `apply_transforms` lists (with their inversion flags) that map an image of
  the scan into template space and back; `affine` is the affine part alone (the `.mat` to keep).
  """
  to_template: tuple[str, ...]
  to_scan: tuple[str, ...]
  to_scan_invert: tuple[bool, ...]
  affine: str


def _ants_seed(ants) -> None:
  # antspyx passes `--random-seed` only when its module-level seed is set; on=False keeps ITK's thread count.
  ants.config.set_ants_deterministic(on=False, seed_value=RANDOM_SEED)


def register_affine(moving, workdir: str | os.PathLike) -> Registration:
  """Rigid, then affine registration of a (bias-corrected, whole-head) scan to the template."""
  ants = import_ants()
  _ants_seed(ants)
  fixed, _ = template()
  small = ants.resample_image(moving, fixed.spacing, use_voxels=False, interp_type=0)
  prefix = str(pathlib.Path(workdir) / "reg_")
  rigid = ants.registration(fixed, small, type_of_transform="Rigid", outprefix=prefix + "rigid_",
                            **RIGID_LEVELS)
  affine = ants.registration(fixed, small, type_of_transform="Affine", outprefix=prefix + "affine_",
                             initial_transform=rigid["fwdtransforms"][0], **AFFINE_LEVELS)
  mat = affine["fwdtransforms"][0]
  return Registration(to_template=(mat,), to_scan=(mat,), to_scan_invert=(True,), affine=mat)


def register_deformable(moving_brain, affine: Registration, workdir: str | os.PathLike) -> Registration:
  """SyN from the affine result: the extracted brain (background 0) to the template's brain."""
  ants = import_ants()
  _ants_seed(ants)
  fixed, _ = template()
  small = ants.resample_image(moving_brain, fixed.spacing, use_voxels=False, interp_type=0)
  syn = ants.registration(fixed, small, type_of_transform="SyNOnly", initial_transform=affine.affine,
                          reg_iterations=SYN_ITERATIONS, outprefix=str(pathlib.Path(workdir) / "reg_syn_"))
  warp = [f for f in syn["fwdtransforms"] if f.endswith(".nii.gz")]
  inverse = [f for f in syn["invtransforms"] if f.endswith(".nii.gz")]
  if len(warp) != 1 or len(inverse) != 1:
    raise RuntimeError(f"SyN returned unexpected transforms {syn['fwdtransforms']} / {syn['invtransforms']}")
  # Scan -> template applies the affine first, then the warp (ANTs lists the last-applied first).
  return Registration(to_template=(warp[0], affine.affine), to_scan=(affine.affine, inverse[0]),
                      to_scan_invert=(True, False), affine=affine.affine)


def to_template_space(image, reference, reg: Registration, interpolator: str = "linear"):
  """`image` (of the scan) resampled onto `reference` (a template-space grid)."""
  ants = import_ants()
  return ants.apply_transforms(reference, image, list(reg.to_template), interpolator=interpolator)


def to_scan_space(image, scan, reg: Registration, interpolator: str = "linear"):
  """`image` (template space) resampled onto the scan's own voxels."""
  ants = import_ants()
  return ants.apply_transforms(scan, image, list(reg.to_scan), interpolator=interpolator,
                               whichtoinvert=list(reg.to_scan_invert))


def affine_scale(reg: Registration) -> float:
  """Cube root of the affine's determinant: the scan's linear size relative to the template's (ITK maps
  template points to scan points; 1 for an MNI-sized head, and a failed registration shows here first)."""
  ants = import_ants()
  matrix = np.asarray(ants.read_transform(reg.affine).parameters[:9], dtype=np.float64).reshape(3, 3)
  return float(abs(np.linalg.det(matrix)) ** (1.0 / 3.0))
