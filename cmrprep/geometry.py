"""Geometry that travels beside every array.

A :class:`Geometry` is the 4x4 voxel-to-world affine (RAS+, millimetres, the
NIfTI/nibabel convention) plus the array shape.  Spacing, origin and direction
are *derived* from the affine, never stored twice.  Arrays are indexed in
NIfTI voxel order ``array[i, j, k]`` where ``k`` is the short-axis slice axis.

SimpleITK works in LPS+ and indexes NumPy arrays as ``[k, j, i]``; use
:func:`to_sitk` / :func:`from_sitk` to cross that boundary, never hand-rolled
flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Geometry", "to_sitk", "from_sitk", "LPS_TO_RAS"]

#: Diagonal that converts LPS world coordinates to RAS and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel-to-world mapping of a 3D volume.

    Parameters
    ----------
    affine : tuple of tuple of float
        4x4 voxel-to-RAS affine in millimetres (row-major nested tuples so the
        object stays hashable and JSON friendly). Use :meth:`from_affine` to
        build one from a NumPy array.
    shape : tuple of int
        Spatial shape ``(I, J, K)`` of the array this geometry describes.

    Examples
    --------
    >>> g = Geometry.from_affine(np.diag([1.5, 1.5, 8.0, 1.0]), (160, 144, 10))
    >>> g.spacing
    (1.5, 1.5, 8.0)
    """

    affine: tuple[tuple[float, ...], ...]
    shape: tuple[int, ...]

    # -- construction -----------------------------------------------------
    @classmethod
    def from_affine(cls, affine: np.ndarray | Sequence[Sequence[float]],
                    shape: Sequence[int]) -> "Geometry":
        """Build a geometry from a 4x4 affine and a spatial shape."""
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {a.shape}")
        return cls(tuple(tuple(float(v) for v in row) for row in a),
                   tuple(int(s) for s in shape))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        """Inverse of :meth:`to_dict` (JSON round trip)."""
        return cls.from_affine(d["affine"], d["shape"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation."""
        return {"affine": [list(r) for r in self.affine], "shape": list(self.shape)}

    # -- derived quantities --------------------------------------------------
    @property
    def matrix(self) -> np.ndarray:
        """The affine as a fresh ``(4, 4)`` float64 array."""
        return np.array(self.affine, dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.matrix[:3, :3], axis=0))

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines (columns are unit vectors of the array axes, RAS)."""
        m = self.matrix[:3, :3]
        return m / np.linalg.norm(m, axis=0)

    @property
    def origin(self) -> tuple[float, ...]:
        """World (RAS, mm) position of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.matrix[:3, 3])

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel coordinates to RAS millimetres."""
        ijk = np.asarray(ijk, dtype=np.float64)
        m = self.matrix
        return ijk @ m[:3, :3].T + m[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` RAS millimetres to (fractional) voxel coordinates."""
        inv = np.linalg.inv(self.matrix)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def with_shape(self, shape: Sequence[int]) -> "Geometry":
        """Same affine, different shape."""
        return Geometry(self.affine, tuple(int(s) for s in shape))

    def max_affine_difference(self, other: "Geometry") -> float:
        """Largest absolute element-wise difference between the two affines."""
        return float(np.max(np.abs(self.matrix - other.matrix)))


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap a NumPy ``array[i, j, k]`` as a SimpleITK image with the same geometry.

    Non-orthonormal direction cosines (seen in some M&Ms cases) are
    orthonormalised by SVD because ITK requires an orthonormal direction.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    lps = LPS_TO_RAS @ geometry.matrix
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    return img


def from_sitk(image) -> tuple[np.ndarray, Geometry]:
    """Inverse of :func:`to_sitk`: returns ``array[i, j, k]`` and its RAS geometry."""
    import SimpleITK as sitk

    arr = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return arr, Geometry.from_affine(LPS_TO_RAS @ lps, arr.shape[:3])
