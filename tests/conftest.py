"""Shared fixtures: tiny NIfTI volumes and a small ACDC-layout folder."""

from __future__ import annotations

import os
from pathlib import Path

# The tests run Keras on PyTorch, as the CLIs do; the library itself never sets a backend
# (tests/test_backend.py checks that in a clean process).
os.environ.setdefault("KERAS_BACKEND", "torch")

import nibabel as nib
import numpy as np
import pytest

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 20.0], [0, 0, 8.0, 5.0], [0, 0, 0, 1]])
SHAPE = (12, 10, 3)


def _write_nifti(path, data, affine=AFFINE, nifti2=False, slope=None, inter=None):
    """Save ``data`` as NIfTI-1 (or -2) with optional scl_slope/scl_inter; returns the path."""
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(np.asarray(data), np.asarray(affine, dtype=float))
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def tiny_image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Random int16 image."""
    return np.random.default_rng(seed).integers(0, 1000, size=shape, dtype=np.int16)


def tiny_label(shape=SHAPE) -> np.ndarray:
    """uint8 label with RV (1), MYO (2) and LV (3) blobs."""
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:5, 2:5, :] = 1
    lab[6:10, 3:8, :] = 2
    lab[7:9, 4:7, :] = 3
    return lab


@pytest.fixture
def write_nifti():
    """``write_nifti(path, data, affine=AFFINE, nifti2=False, slope=None, inter=None)``."""
    return _write_nifti


def make_acdc_case(root: Path, n: int, ed: int = 1, es: int = 3, n_frames: int = 4) -> Path:
    """One ACDC patient folder with Info.cfg, ED/ES frames + _gt and a 4D cine."""
    cid = f"patient{n:03d}"
    folder = root / cid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\n"
                                     f"NbFrame: {n_frames}\nWeight: 80.0\n")
    cine = np.stack([tiny_image(n * 10 + t) for t in range(n_frames)], axis=-1)
    _write_nifti(folder / f"{cid}_4d.nii.gz", cine)
    for f in (ed, es):
        _write_nifti(folder / f"{cid}_frame{f:02d}.nii.gz", cine[..., f - 1])
        _write_nifti(folder / f"{cid}_frame{f:02d}_gt.nii.gz", tiny_label())
    return folder


@pytest.fixture
def acdc_root(tmp_path) -> Path:
    """``tmp_path/database/training`` with 3 valid ACDC patients."""
    root = tmp_path / "database" / "training"
    for n in (1, 2, 3):
        make_acdc_case(root, n)
    return root


@pytest.fixture
def make_case():
    """``make_case(root, n, ed=1, es=3, n_frames=4)`` -> ACDC patient folder."""
    return make_acdc_case


@pytest.fixture
def tiny():
    """Helpers ``tiny.image(seed)``, ``tiny.label()`` and constants ``tiny.affine``, ``tiny.shape``."""
    from types import SimpleNamespace
    return SimpleNamespace(image=tiny_image, label=tiny_label, affine=AFFINE, shape=SHAPE)
