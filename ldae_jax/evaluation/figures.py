"""PNG figures of volumes: three orthogonal mid-slices per volume, arranged in labelled grids.

Volumes are (X, Y, Z[, 1]) in RAS; slices are shown in radiological-free anatomical orientation (superior /
anterior up) so a reader can compare rows at a glance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
  """Sagittal (Y-Z), coronal (X-Z) and axial (X-Y) mid-slices, transposed so that Z / Y point up."""
  v = np.asarray(vol)
  if v.ndim == 4:
    v = v[..., 0]
  if v.ndim != 3:
    raise ValueError(f"mid_slices expects an (X, Y, Z[, 1]) volume, got shape {np.shape(vol)}.")
  x, y, z = (s // 2 for s in v.shape)
  return [v[x].T[::-1], v[:, y].T[::-1], v[:, :, z].T[::-1]]


def volume_grid(rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, *,
                row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                vmin: float = 0.0, vmax: float = 1.0) -> str:
  """Grid with one cell per volume; each cell shows its three mid-slices side by side. Returns the path."""
  n_r, n_c = len(rows), max(len(r) for r in rows)
  fig, axes = plt.subplots(n_r, 3 * n_c, figsize=(1.6 * 3 * n_c, 1.8 * n_r + 0.4), squeeze=False)
  for i, row in enumerate(rows):
    for j in range(n_c):
      for k in range(3):
        ax = axes[i, 3 * j + k]
        ax.set_axis_off()
        if j < len(row):
          ax.imshow(mid_slices(row[j])[k], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
          if i == 0 and k == 1:
            ax.set_title(col_labels[j], fontsize=8)
    axes[i, 0].text(-0.1, 0.5, row_labels[i], transform=axes[i, 0].transAxes, ha="right", va="center",
                    fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)
