"""NIfTI I/O and preprocessing: orientation, resampling, pad/crop, intensity, round trip, axis convention."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from ldae_jax.data import nifti


def _asymmetric(shape, seed=0):
  """A volume with no symmetry, so any flip or transpose shows."""
  rng = np.random.default_rng(seed)
  return (rng.random(shape) + np.arange(shape[0])[:, None, None] * 0.1).astype(np.float32)


def _write(path, data, affine):
  nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
  return path


def _flip(affine, data_shape, axes):
  """The affine of `np.flip(data, axes)` describing the same world positions."""
  f = np.eye(4)
  for a in axes:
    f[a, a] = -1.0
    f[a, 3] = data_shape[a] - 1
  return affine @ f


@pytest.mark.parametrize("axcodes", ["LAS", "LPI", "PIR"])
def test_stored_orientation_comes_back_ras_and_identical(tmp_path, axcodes):
  shape, sp = (10, 12, 8), 2.0
  ras = _asymmetric(shape)
  aff = nifti.volume_affine(shape, sp)
  # Store the same physical image in another voxel order: flips, and for PIR also a permutation.
  flips = [i for i, c in enumerate(axcodes) if c in "LPI"]
  data, daff = np.flip(ras, flips), _flip(aff, shape, flips)
  if axcodes == "PIR":  # voxel axes (Y, Z, X) with Y and Z flipped
    data = np.flip(ras, (1, 2)).transpose(1, 2, 0)
    daff = _flip(aff, shape, (1, 2))[:, [1, 2, 0, 3]]
  assert nib.aff2axcodes(daff) == tuple(axcodes)
  got = nifti.load_volume(_write(tmp_path / "x.nii", data, daff), shape=shape, spacing_mm=sp)
  np.testing.assert_array_equal(got, nifti.normalize_intensity(ras))


def test_resampling_keeps_physical_size_and_position():
  # A 30 x 40 x 20 mm box centred at world (5, -10, 8) in a 1 mm volume.
  shape = (60, 80, 50)
  aff = nifti.volume_affine(shape, 1.0)
  world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) @ aff[:3, :3].T + aff[:3, 3]
  box = np.all(np.abs(world - [5.0, -10.0, 8.0]) < [15.0, 20.0, 10.0], axis=-1).astype(np.float32)
  out, out_aff = nifti.resample_isotropic(box, aff, 2.0)
  assert out.shape == (30, 40, 25)
  np.testing.assert_allclose(nifti.voxel_sizes(out_aff), 2.0)
  np.testing.assert_allclose(out.sum() * 8.0, box.sum(), rtol=0.03)  # volume in mm^3
  idx = np.argwhere(out > 0.5)
  centre = out_aff[:3, :3] @ ((out[out > 0.5][:, None] * idx).sum(0) / out[out > 0.5].sum()) + out_aff[:3, 3]
  np.testing.assert_allclose(centre, [5.0, -10.0, 8.0], atol=0.6)
  # The field of view keeps its centre: voxel centre of both grids maps to the same world point.
  c_in = aff @ [*(np.array(shape) - 1) / 2, 1]
  c_out = out_aff @ [*(np.array(out.shape) - 1) / 2, 1]
  np.testing.assert_allclose(c_in, c_out, atol=1e-9)


def test_center_pad_crop_offsets_and_affine():
  data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) + 1.0
  aff = nifti.volume_affine(data.shape, 1.0)
  out, out_aff = nifti.center_pad_crop(data, aff, (8, 4, 7))
  # X padded 5 -> 8: 1 before, 2 after (floor), filled with the minimum; Y cropped 6 -> 4 from index 1.
  np.testing.assert_array_equal(out[1:6], data[:, 1:5])
  np.testing.assert_array_equal(out[0], np.full((4, 7), data.min()))
  np.testing.assert_array_equal(out[6:], np.full((2, 4, 7), data.min()))
  # World positions are preserved: out voxel (1, 0, 0) is input voxel (0, 1, 0).
  np.testing.assert_allclose(out_aff @ [1, 0, 0, 1], aff @ [0, 1, 0, 1])


def test_minmax_and_percentile_clip():
  x = np.linspace(-3.0, 5.0, 1000, dtype=np.float32).reshape(10, 10, 10)
  y = nifti.normalize_intensity(x)
  assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
  np.testing.assert_allclose(y.ravel(), (x.ravel() + 3.0) / 8.0, atol=1e-6)
  hot = x.copy()
  hot[0, 0, 0] = 1000.0  # one hot voxel squashes plain min-max ...
  assert np.median(nifti.normalize_intensity(hot)) < 0.01
  clipped = nifti.normalize_intensity(hot, percentile_clip=99.0)  # ... the clip restores the contrast
  p99, lo = np.percentile(hot, 99.0), hot.min()
  np.testing.assert_allclose(clipped, (np.minimum(hot, p99) - lo) / (p99 - lo), atol=1e-6)
  assert np.all(nifti.normalize_intensity(np.full((2, 2, 2), 7.0)) == 0.0)
  with pytest.raises(ValueError, match="percentile_clip"):
    nifti.normalize_intensity(x, percentile_clip=150.0)


def test_save_load_round_trip_affine_and_determinism(tmp_path):
  shape, sp = (16, 20, 12), 1.5
  vol = nifti.normalize_intensity(_asymmetric(shape, 1))
  p = nifti.save_volume(tmp_path / "v.nii.gz", vol[..., None], spacing_mm=sp)
  img = nib.load(str(p))
  np.testing.assert_allclose(img.affine, nifti.volume_affine(shape, sp))
  np.testing.assert_allclose(img.header.get_zooms(), (sp, sp, sp))
  np.testing.assert_allclose(img.affine @ [*(np.array(shape) - 1) / 2, 1], [0, 0, 0, 1])  # centred at MNI 0
  np.testing.assert_array_equal(nifti.load_volume(p, shape=shape, spacing_mm=sp), vol)
  # Same volume -> same bytes (gzip mtime 0, no file name), and no temp files left behind.
  q = nifti.save_volume(tmp_path / "w.nii.gz", vol, spacing_mm=sp)
  assert p.read_bytes() == q.read_bytes()
  assert sorted(f.name for f in tmp_path.iterdir()) == ["v.nii.gz", "w.nii.gz"]
  assert gzip.decompress(p.read_bytes())[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header inside
  # int16 storage: quantised to 1/32767 of the maximum, and the loader's min-max gives the same scale.
  r = nifti.save_volume(tmp_path / "i.nii", vol, spacing_mm=sp, dtype="int16")
  assert nib.load(str(r)).get_data_dtype() == np.int16
  np.testing.assert_allclose(nifti.load_volume(r, shape=shape, spacing_mm=sp), vol, atol=1.0 / 32767)
  # A non-package affine is written as given.
  aff = np.diag([2.0, 2.0, 2.0, 1.0])
  np.testing.assert_allclose(nib.load(str(nifti.save_volume(tmp_path / "a.nii", vol, affine=aff))).affine, aff)


def test_uint8_labels_and_read_checked_keep_file_voxel_order(tmp_path):
  mask = (_asymmetric((6, 7, 8)) > 0.5).astype(np.uint8)
  aff = _flip(np.diag([1.0, 1.2, 0.9, 1.0]), mask.shape, (0,))  # LAS, anisotropic
  p = nifti.save_volume(tmp_path / "m.nii.gz", mask, affine=aff, dtype="uint8")
  assert nib.load(str(p)).get_data_dtype() == np.uint8
  data, affine = nifti.read_checked(p)
  np.testing.assert_array_equal(data, mask)  # no reorientation, no scaling
  np.testing.assert_allclose(affine, aff)
  with pytest.raises(nifti.NiftiError, match="integer labels"):
    nifti.save_volume(tmp_path / "f.nii", mask * 0.5, dtype="uint8")


def test_axial_slice_convention(tmp_path):
  """volume[:, :, k] is the axial slice at height k, whatever the file's voxel order."""
  shape, sp = (8, 10, 12), 2.0
  aff = nifti.volume_affine(shape, sp)
  # Voxel (i, j, k) sits at world z = (k - (Z - 1) / 2) * spacing, whatever i and j are.
  for ijk in [(0, 0, 3), (7, 9, 3), (4, 2, 3)]:
    assert (aff @ [*ijk, 1])[2] == pytest.approx((3 - 5.5) * sp)
  # A bright superior plate at world z = +7 mm (k = 9), stored as LPI (Z flipped on disk).
  vol = np.zeros(shape, np.float32)
  vol[:, :, 9] = 1.0
  vol[2, 3, 9] = 0.5  # mark left-posterior corner region inside the plate
  path = _write(tmp_path / "lpi.nii", np.flip(vol, (0, 1, 2)), _flip(aff, shape, (0, 1, 2)))
  got = nifti.load_volume(path, shape=shape, spacing_mm=sp)
  heights = np.nonzero(got.max(axis=(0, 1)))[0]
  assert heights.tolist() == [9]
  axial = nifti.axial_slices(got)
  assert axial.shape == (12, 8, 10)
  np.testing.assert_array_equal(axial[9], got[:, :, 9])
  assert axial[9][2, 3] == 0.5  # rows are X (left->right), columns Y (posterior->anterior)


def test_corrupt_and_invalid_files_raise_clear_errors(tmp_path):
  garbage = tmp_path / "garbage.nii.gz"
  garbage.write_bytes(b"this is not a nifti file at all" * 10)
  with pytest.raises(nifti.NiftiError, match="garbage.nii.gz.*cannot read"):
    nifti.load_volume(garbage)
  good = nifti.save_volume(tmp_path / "good.nii.gz", _asymmetric((16, 16, 16)), spacing_mm=1.5)
  truncated = tmp_path / "truncated.nii.gz"
  truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  with pytest.raises(nifti.NiftiError, match="truncated.nii.gz"):
    nifti.load_volume(truncated, shape=(16, 16, 16))
  with pytest.raises(nifti.NiftiError, match="no such file"):
    nifti.load_volume(tmp_path / "missing.nii")
  four_d = _write(tmp_path / "4d.nii", np.zeros((4, 4, 4, 3)), np.eye(4))
  with pytest.raises(nifti.NiftiError, match="4d.nii.*not one 3D volume"):
    nifti.load_volume(four_d)
  assert issubclass(nifti.NiftiError, ValueError)
  with pytest.raises(nifti.NiftiError, match=r"\.nii or \.nii\.gz"):
    nifti.save_volume(tmp_path / "x.img", np.zeros((2, 2, 2)))


def test_full_pipeline_from_anisotropic_scan(tmp_path):
  """A 1 x 1.2 x 2 mm LAS scan -> 1.5 mm RAS volume of the requested shape in [0, 1]."""
  shape_in = (90, 80, 40)
  aff = np.diag([-1.0, 1.2, 2.0, 1.0])
  aff[:3, 3] = [45.0, -48.0, -40.0]
  data = _asymmetric(shape_in, 2) * 100.0
  path = _write(tmp_path / "scan.nii.gz", data, aff)
  vol = nifti.load_volume(path, shape=(64, 64, 48), spacing_mm=1.5)
  assert vol.shape == (64, 64, 48) and vol.dtype == np.float32
  assert vol.min() == 0.0 and vol.max() == 1.0
  _, out_aff = nifti.preprocess(data, aff, shape=(64, 64, 48), spacing_mm=1.5, return_affine=True)
  assert nib.aff2axcodes(out_aff) == ("R", "A", "S")
  np.testing.assert_allclose(nifti.voxel_sizes(out_aff), 1.5)
