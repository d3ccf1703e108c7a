"""Write a synthetic cine-CMR dataset in the ACDC, M&Ms or nnU-Net raw layout.

Usage::

    python -m pipelines.synthesize OUT --cases N --seed S
                                   [--layout acdc|mnms|nnunet|generic|dicom]
                                   [--label-values 0,1,2,3] [--site A|B] [--site-changes LIST]
                                   [--with-4d] [--overwrite]

Layouts follow the real datasets:

* ``acdc``: ``OUT/patientNNN/Info.cfg`` (1-based ``ED``/``ES``), ``patientNNN_frameFF.nii.gz``
  and ``_gt`` for the ED and ES frames, ``patientNNN_4d.nii.gz`` with ``--with-4d``.
* ``mnms``: ``OUT/CODE/CODE_sa.nii.gz`` and ``CODE_sa_gt.nii.gz`` (4D, labels 1 LV,
  2 MYO, 3 RV at ED and ES only) and ``OUT/mnms_info.csv`` (0-based ``ED``/``ES``).
  Without ``--with-4d`` the 4D files hold only frames ``0 .. max(ED, ES)`` (a shortened
  cycle, for speed); the CSV keeps the true indices, which stay valid.
* ``nnunet``: ``imagesTr/patientNNN_frameFF_0000.nii.gz``, ``labelsTr/patientNNN_frameFF.nii.gz``
  and ``dataset.json`` (``--with-4d`` is ignored).
* ``generic``: one flat folder of ``patientNNN_frameFF.nii`` images (uncompressed) and
  ``patientNNN_frameFF_seg.nii`` masks, as in-house exports often are (read it with
  ``--layout generic --image-glob '*.nii' --label-pattern '{stem}_seg{ext}'``).
* ``dicom``: ``OUT/patientNNN/sax_K/IM-*.dcm``, one DICOM series per slice position (as
  the Kaggle DSB exports), and ``cine_gt.nii.gz`` beside them: the 4D labels, on the
  DICOM grid, at the ED and ES frames.

``--site B`` renders the same kind of anatomy as another scanner/site acquires it
(coarser and thicker, noisier, blurred, weaker blood-myocardium contrast, a strong
surface-coil fall-off, stored transposed; :func:`cmrprep.synthetic.site_b`), to
measure how a model trained on site A holds up.  ``--site-changes coil,contrast``
applies only those of site B's changes (``resolution``, ``thickness``, ``contrast``,
``blur``, ``coil``, ``transposed``; default all), with the values they have in the full
site B: which change costs a model how much, on the same patients.

``--label-values`` sets the file value of each class (background, RV, MYO, LV), e.g.
``0,85,170,255`` or M&Ms' ``0,3,2,1``; the default is the layout's own convention.

``OUT/synthesize.json`` records the arguments; ``--overwrite`` only replaces a folder
that holds it (a folder written by this tool).  Exit codes: 0 ok, 2 configuration error,
1 failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from cmrprep import __version__
from cmrprep.plan import ConfigError
from cmrprep.synthetic import SITE_B_CHANGES, SyntheticCase, generate_case
from pipelines.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, help_formatter, plain_text

__all__ = ["synthesize", "main", "LAYOUTS", "write_nifti"]

log = logging.getLogger(__name__)

LAYOUTS = ("acdc", "mnms", "nnunet", "generic", "dicom")
MARKER = "synthesize.json"
MNMS_SWAP = np.array([0, 3, 2, 1], dtype=np.uint8)  # ACDC <-> M&Ms (1 LV, 2 MYO, 3 RV)
MNMS_COLUMNS = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES")
NNUNET_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
_FRAME_MS = 850.0  # nominal RR interval for the time zoom of 4D files


def write_nifti(path: Path, data: np.ndarray, case: SyntheticCase, *,
                scaled: bool = False) -> None:
    """Write ``data`` as NIfTI-1 with the case affine in qform and sform.

    ``scaled`` stores the case's ``scl_slope`` / ``scl_inter`` (image data only).
    """
    img = nib.Nifti1Image(data, case.affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(case.affine, code=1)
    hdr.set_sform(case.affine, code=1)
    zooms = case.geometry.spacing
    if data.ndim == 4:
        zooms = zooms + (_FRAME_MS / case.n_frames,)
    hdr.set_zooms(zooms)
    hdr.set_xyzt_units("mm", "msec")
    if scaled and (case.scl_slope != 1.0 or case.scl_inter != 0.0):
        hdr.set_slope_inter(case.scl_slope, case.scl_inter)
    nib.save(img, str(path))


def _frame_name(case: SyntheticCase, t: int) -> str:
    return f"{case.case_id}_frame{t + 1:02d}"


def _write_acdc(out: Path, case: SyntheticCase, with_4d: bool) -> None:
    folder = out / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    info = (f"ED: {case.ed + 1}\nES: {case.es + 1}\nGroup: {case.group}\n"
            f"Height: {case.height:.1f}\nNbFrame: {case.n_frames}\nWeight: {case.weight:.1f}\n")
    (folder / "Info.cfg").write_text(info)
    for t in sorted({case.ed, case.es}):
        name = _frame_name(case, t)
        write_nifti(folder / f"{name}.nii.gz", case.frame(t), case, scaled=True)
        write_nifti(folder / f"{name}_gt.nii.gz", case.labels[t], case)
    if with_4d:
        write_nifti(folder / f"{case.case_id}_4d.nii.gz", case.cine, case, scaled=True)


def _write_mnms(out: Path, case: SyntheticCase, code: str, values: np.ndarray = MNMS_SWAP) -> dict:
    folder = out / code
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{code}_sa.nii.gz", case.cine, case, scaled=True)
    gt = np.zeros(case.cine.shape, np.uint8)
    for t, lab in case.labels.items():
        gt[..., case.frames.index(t)] = values[lab]
    write_nifti(folder / f"{code}_sa_gt.nii.gz", gt, case)
    return {"External code": code, "VendorName": case.vendor_name, "Vendor": case.vendor,
            "Centre": case.centre, "ED": case.ed, "ES": case.es}


def _write_nnunet(out: Path, case: SyntheticCase) -> int:
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    frames = sorted({case.ed, case.es})
    for t in frames:
        name = _frame_name(case, t)
        write_nifti(out / "imagesTr" / f"{name}_0000.nii.gz", case.frame(t), case, scaled=True)
        write_nifti(out / "labelsTr" / f"{name}.nii.gz", case.labels[t], case)
    return len(frames)


def _write_generic(out: Path, case: SyntheticCase, values: np.ndarray) -> None:
    for t in sorted({case.ed, case.es}):
        name = _frame_name(case, t)
        write_nifti(out / f"{name}.nii", case.frame(t), case, scaled=True)
        write_nifti(out / f"{name}_seg.nii", values[case.labels[t]], case)


def _write_dicom(out: Path, case: SyntheticCase, values: np.ndarray) -> None:
    from pipelines.dicom_export import write_cine_dicom
    from pipelines.ingest.readers import read_header

    physical = case.cine * case.scl_slope + case.scl_inter
    folder = write_cine_dicom(out / case.case_id, physical, case.affine, "per_slice",
                              slope=case.scl_slope, intercept=case.scl_inter)
    geom = read_header(folder, case_id=case.case_id).geometry  # the reader's grid (slice order)
    flip = not np.allclose(np.asarray(geom.affine)[:3, 2], case.affine[:3, 2], atol=1e-3)
    gt = np.zeros(case.cine.shape, np.uint8)
    for t, lab in case.labels.items():
        gt[..., case.frames.index(t)] = values[lab[:, :, ::-1] if flip else lab]
    img = nib.Nifti1Image(gt, np.asarray(geom.affine))
    img.header.set_qform(np.asarray(geom.affine), code=1)
    img.header.set_sform(np.asarray(geom.affine), code=1)
    nib.save(img, str(folder / "cine_gt.nii.gz"))


def _label_values(text: str | None, layout: str) -> np.ndarray:
    """File value per class (background, RV, MYO, LV) from ``--label-values``."""
    if text is None:
        return MNMS_SWAP if layout == "mnms" else np.arange(4, dtype=np.uint8)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or len(set(values)) != 4 or not all(0 <= v <= 255 for v in values):
        raise ConfigError(f"--label-values {text!r} must be 4 distinct values 0..255 (background, RV, "
                          "MYO, LV), e.g. '0,85,170,255'")
    if layout == "nnunet":
        raise ConfigError("--label-values does not apply to the nnunet layout (dataset.json names them)")
    return np.asarray(values, dtype=np.uint8)


def _check_args(out: Path, cases: int, seed: int, layout: str, overwrite: bool) -> None:
    if int(seed) < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    if int(cases) < 1:
        raise ConfigError(f"--cases must be >= 1, got {cases}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"OUT {out} is not empty; choose an empty folder or pass "
                              f"--overwrite to replace a folder written by synthesize")
        if not (out / MARKER).is_file():
            raise ConfigError(f"OUT {out} is not empty and has no {MARKER}, so it was not "
                              f"written by synthesize; refusing to delete it, choose another path")


def _unique_code(code: str, used: set[str], index: int) -> str:
    """Keep M&Ms codes unique (collisions are ~1e-9 likely, but be safe)."""
    rng = np.random.default_rng(index)
    while code in used:
        code = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), 6))
    used.add(code)
    return code


def synthesize(out: str | Path, cases: int, seed: int, layout: str = "acdc",
               with_4d: bool = False, overwrite: bool = False,
               label_values: str | None = None, site: str = "A",
               site_changes: str | None = None) -> list[str]:
    """Generate ``cases`` synthetic cases from ``seed`` and write them under ``out``.

    ``label_values`` (``"0,85,170,255"``) sets the file value of background, RV,
    MYO and LV; ``site="B"`` another site's acquisition (see the module docstring),
    ``site_changes`` (``"coil,contrast"``) only some of its changes.

    Returns
    -------
    list of str
        Case ids written (``patientNNN``, or the M&Ms codes for ``layout="mnms"``).

    Raises
    ------
    ConfigError
        Unknown layout, ``cases < 1`` or a non-empty ``out`` without ``overwrite``.
    """
    out = Path(out)
    _check_args(out, cases, seed, layout, overwrite)
    values = _label_values(label_values, layout)
    if site not in ("A", "B"):
        raise ConfigError(f"--site must be A or B, got {site!r}")
    changes = _site_changes(site_changes, site)
    if out.is_dir() and any(out.iterdir()):
        log.info("overwriting %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if with_4d and layout == "nnunet":
        log.warning("--with-4d is ignored for the nnunet layout (3D frames only)")
    ids, rows, used, n_train = [], [], set(), 0
    for i in tqdm(range(int(cases)), desc=f"synthesize {layout}", unit="case",
                  disable=None):
        case = generate_case(seed, i, full_cine=with_4d and layout not in ("nnunet", "generic"),
                             through_es=layout == "mnms", site=site, site_changes=changes)
        if layout == "acdc":
            _write_acdc(out, case, with_4d)
            ids.append(case.case_id)
        elif layout == "mnms":
            rows.append(_write_mnms(out, case, _unique_code(case.code, used, i), values))
            ids.append(rows[-1]["External code"])
        elif layout == "generic":
            _write_generic(out, case, values)
            ids.append(case.case_id)
        elif layout == "dicom":
            _write_dicom(out, case, values)
            ids.append(case.case_id)
        else:
            n_train += _write_nnunet(out, case)
            ids.append(case.case_id)
    _write_index(out, layout, rows, n_train)
    _write_marker(out, dict(cases=int(cases), seed=int(seed), layout=layout,
                            with_4d=bool(with_4d), label_values=[int(v) for v in values], site=site,
                            site_changes=list(changes) if site == "B" else None,
                            case_ids=ids))
    return ids


def _site_changes(text: str | None, site: str) -> tuple[str, ...]:
    """``"coil,contrast"`` -> ``("coil", "contrast")``; all of site B's changes when ``None``.

    >>> _site_changes("coil, contrast", "B")
    ('coil', 'contrast')
    """
    if text is None:
        return SITE_B_CHANGES
    if site != "B":
        raise ConfigError("--site-changes applies to --site B only")
    changes = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in changes if c not in SITE_B_CHANGES]
    if unknown:
        raise ConfigError(f"--site-changes: unknown change(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(SITE_B_CHANGES)}")
    return changes


def _write_index(out: Path, layout: str, rows: list[dict], n_train: int) -> None:
    if layout == "mnms":
        with open(out / "mnms_info.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MNMS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    elif layout == "nnunet":
        meta = {"channel_names": {"0": "cineMRI"}, "labels": NNUNET_LABELS,
                "numTraining": n_train, "file_ending": ".nii.gz", "name": "cmrprep_synthetic"}
        (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_marker(out: Path, args: dict) -> None:
    record = {"tool": "pipelines.synthesize", "cmrprep_version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **args}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.synthesize",
                                description="Write a synthetic short-axis cine-CMR dataset.",
                                formatter_class=help_formatter())
    p.add_argument("out", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--layout", choices=LAYOUTS, default="acdc", help="folder layout (default acdc)")
    p.add_argument("--with-4d", action="store_true", help="render and write the full cine")
    p.add_argument("--site", choices=("A", "B"), default="A",
                   help="B: another scanner/site's acquisition of the anatomy (domain shift)")
    p.add_argument("--site-changes", metavar="LIST",
                   help="with --site B, only these of its changes, comma-separated: "
                        f"{','.join(SITE_B_CHANGES)} (default all)")
    p.add_argument("--label-values", help="file value of background, RV, MYO, LV, e.g. '0,85,170,255' "
                                          "(default: the layout's convention)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT folder previously written by this tool")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 configuration error, 1 failure)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        ids = synthesize(args.out, args.cases, args.seed, layout=args.layout,
                         with_4d=args.with_4d, overwrite=args.overwrite, label_values=args.label_values,
                         site=args.site, site_changes=args.site_changes)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("writing %s failed: %s", args.out, exc)
        return EXIT_FAILURE
    print(f"wrote {len(ids)} {args.layout} cases to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; files already written are complete, rerun to finish'))
