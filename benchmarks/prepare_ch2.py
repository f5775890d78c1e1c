"""Raw-scan preparation on Colin27: brain-mask Dice against its hand skull-stripped brain, and time per scan.

Data: `ch2.nii.gz` (Colin27 whole head, 1 mm) and `ch2bet.nii.gz` (its hand-stripped brain) from Debian's
`mricron-data` package, fetched with `apt-get download` into `--data` (default ~/.cache/ldae_jax/mricron)
unless already there. Cases, each one `prepare_scan.prepare_scan` call (N4, rigid + affine, brain mask,
grid, QC figure, files written):

* `original`: ch2 as it is (it is in MNI space already, so this is the easy start);
* `las_aniso_cropped`: cropped, resampled to 1 x 1.2 x 0.9 mm and stored LAS; ch2bet goes through the same
  steps (nearest neighbour) for the native-space Dice;
* `tilted_shifted`: the header turned 25 degrees about x and 12 about y and moved 50 mm (the head is
  somewhere else in the world, as a scanner leaves it; same voxels, so the same ch2bet);
* `original_syn` (with `--deformable`): the original with the SyN stage.

Dice is in each case's native voxels vs ch2bet, and on the MNI grid vs the original's mask.

  taskset -c 1 python benchmarks/prepare_ch2.py             # one core
  python benchmarks/prepare_ch2.py --deformable --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from ldae_jax.data import brain_mask, nifti, prepare, prepare_scan, registration

TEMPLATES = "usr/share/mricron/templates"


def host_cpu_model() -> str:
  # As ldae_jax.evaluation.throughput's, without importing JAX for it.
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def fetch(data: pathlib.Path) -> pathlib.Path:
  for folder in (data, pathlib.Path("/") / TEMPLATES, data / "x" / TEMPLATES):
    if (folder / "ch2.nii.gz").is_file() and (folder / "ch2bet.nii.gz").is_file():
      return folder
  data.mkdir(parents=True, exist_ok=True)
  subprocess.run(["apt-get", "download", "mricron-data"], cwd=data, check=True)
  deb = next(data.glob("mricron-data_*.deb"))
  subprocess.run(["dpkg-deb", "-x", str(deb), str(data / "x")], check=True)
  return data / "x" / TEMPLATES


def las_aniso_cropped(img: nib.Nifti1Image, order: int) -> nib.Nifti1Image:
  data = np.asarray(img.dataobj, dtype=np.float32)[8:173, 6:211, 0:170]
  crop = np.eye(4)
  crop[:3, 3] = (8, 6, 0)
  zooms = np.array([1.0, 1.2, 0.9])
  shape = np.floor((np.array(data.shape) - 1) / zooms).astype(int) + 1
  out = ndimage.affine_transform(data, np.diag(zooms), output_shape=tuple(shape), order=order, mode="nearest")
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
  return nib.Nifti1Image(np.flip(out, 0).copy(), img.affine @ crop @ np.diag([*zooms, 1.0]) @ flip)


def tilted_shifted(img: nib.Nifti1Image) -> nib.Nifti1Image:
  def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    m = np.eye(4)
    i, j = [k for k in range(3) if k != axis]
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    return m
  move = np.eye(4)
  move[:3, 3] = (-15.0, 40.0, -30.0)
  return nib.Nifti1Image(np.asarray(img.dataobj, np.float32), move @ rotation(0, -25) @ rotation(1, 12) @ img.affine)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=str(pathlib.Path.home() / ".cache/ldae_jax/mricron"))
  p.add_argument("--deformable", action="store_true", help="also time the SyN stage on the original")
  p.add_argument("--json", default="", help="write the figures here too")
  args = p.parse_args()
  cpus = prepare.available_cpus()
  registration.set_threads(cpus)
  import ants  # pylint: disable=import-outside-toplevel
  import nilearn  # pylint: disable=import-outside-toplevel
  folder = fetch(pathlib.Path(args.data))
  ch2, bet = nib.load(str(folder / "ch2.nii.gz")), nib.load(str(folder / "ch2bet.nii.gz"))
  machine = dict(cpu=host_cpu_model(), cpus_available=cpus, cpus_machine=os.cpu_count(),
                 itk_threads=os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"], python=platform.python_version(),
                 antspyx=ants.__version__, nilearn=nilearn.__version__)
  print("machine:", json.dumps(machine))
  rows = []
  with tempfile.TemporaryDirectory() as work:
    work = pathlib.Path(work)
    cases = [("original", ch2, bet, prepare_scan.Settings()),
             ("las_aniso_cropped", las_aniso_cropped(ch2, 1), las_aniso_cropped(bet, 0), prepare_scan.Settings()),
             ("tilted_shifted", tilted_shifted(ch2), bet, prepare_scan.Settings())]
    if args.deformable:
      cases.append(("original_syn", ch2, bet, prepare_scan.Settings(deformable=True)))
    reference_grid_mask = None
    for name, img, truth, settings in cases:
      src = work / f"{name}.nii.gz"
      nib.save(img, str(src))
      outputs = prepare_scan.output_paths(work / "out", f"sub-{name.replace('_', '')}", 0, name)
      t0 = time.perf_counter()
      measures = prepare_scan.prepare_scan(src, outputs, settings, scan_id=name)
      seconds = time.perf_counter() - t0
      native, _ = nifti.read_checked(outputs.mask_native)
      grid_mask = nifti.load_volume(outputs.mask) > 0.5
      if reference_grid_mask is None:
        reference_grid_mask = grid_mask
      row = dict(case=name, seconds=round(seconds, 1),
                 dice_native_vs_ch2bet=round(brain_mask.dice(native > 0, np.asarray(truth.dataobj) > 0), 4),
                 dice_grid_vs_original=round(brain_mask.dice(grid_mask, reference_grid_mask), 4),
                 **{k: round(measures[k], 4) for k in ("ncc", "brain_ml", "mask_fraction", "affine_scale")},
                 settings=settings.as_dict())
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
      if args.json:
        shutil.copy(outputs.figure, pathlib.Path(args.json).with_suffix(f".{name}.png"))
  print(f"settings: {json.dumps(prepare_scan.Settings().as_dict())}; N4 shrunk to ~"
        f"{registration.N4_SHRUNK_VOXEL_MM:g} mm voxels, {registration.N4_CONVERGENCE}; rigid {registration.RIGID_LEVELS}; "
        f"affine {registration.AFFINE_LEVELS}; template {registration.TEMPLATE_RESOLUTION_MM} mm")
  print(f"time per scan (s, {cpus} core{'s' if cpus > 1 else ''} available): "
        + ", ".join(f"{r['case']} {r['seconds']}" for r in rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(machine=machine, rows=rows), indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
