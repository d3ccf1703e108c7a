"""Test tooling: synthetic datasets in layouts and conventions cmrprep does not write itself.

``pipelines.synthesize`` writes ACDC, M&Ms and nnU-Net raw folders; users bring
other shapes.  :func:`write_flat` writes one flat folder of ``.nii`` frames
with label files named by a pattern (``X.nii`` + ``X_seg.nii``), file label
values chosen freely (``0/85/170/255``, M&Ms' 1 LV / 3 RV) and other class
sets (LV only, as Sunnybrook; a fifth class inside the myocardium, as scar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cmrprep.synthetic import generate_dataset
from pipelines.synthesize import write_nifti


def lv_only(label: np.ndarray) -> np.ndarray:
    """ACDC labels -> 0 background, 1 LV cavity (the myocardium and RV become background)."""
    return (label == 3).astype(np.uint8)


def with_scar(label: np.ndarray) -> np.ndarray:
    """ACDC labels plus class 4: the myocardium in one quarter of the image plane (a 'scar')."""
    out = label.copy()
    myo = np.argwhere(label == 2)
    if myo.size:
        ci, cj = myo[:, 0].mean(), myo[:, 1].mean()
        ii, jj = np.indices(label.shape[:2])
        sector = (ii > ci) & (jj > cj)
        out[(label == 2) & sector[..., None]] = 4
    return out


def write_flat(root: Path, n_cases: int, seed: int, *, values: tuple[int, ...] = (0, 1, 2, 3),
               classes: Callable[[np.ndarray], np.ndarray] | None = None, ext: str = ".nii",
               label_pattern: str = "{stem}_seg{ext}") -> Path:
    """Write ``n_cases`` synthetic patients (ED and ES frames) into one flat folder.

    Parameters
    ----------
    root : Path
        Output folder (created).
    n_cases, seed : int
        Cases of :func:`cmrprep.synthetic.generate_dataset`.
    values : tuple of int
        File value of class ``k`` is ``values[k]`` (after ``classes``).
    classes : callable, optional
        Maps ACDC labels to another class set (:func:`lv_only`, :func:`with_scar`).
    ext, label_pattern
        ``patientNNN_frameFF<ext>`` images; labels named by ``label_pattern``.
    """
    root.mkdir(parents=True, exist_ok=True)
    lut = np.asarray(values, dtype=np.uint8)
    for case in generate_dataset(n_cases, seed):
        for t in sorted({case.ed, case.es}):
            stem = f"{case.case_id}_frame{t + 1:02d}"
            label = classes(case.labels[t]) if classes else case.labels[t]
            write_nifti(root / f"{stem}{ext}", case.frame(t), case, scaled=True)
            write_nifti(root / label_pattern.format(stem=stem, ext=ext), lut[label], case)
    return root
