"""Corrupt chosen cases of an ACDC-layout folder in place, one defect each.

Used to check that ingest quarantines exactly the defective cases::

    python tests/defects.py ROOT --seed 0 [--kinds truncated_gzip,empty_file]

writes ``ROOT/defects.json`` = ``{case_id: defect}``.  Only run it on a
throw-away copy: files are overwritten.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from cmrprep.cases import CaseSpec
from cmrprep.plan import ConfigError

__all__ = ["DEFECTS", "EXPECTED_CHECK", "inject_defects", "main"]

log = logging.getLogger(__name__)


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


def _rewrite_header(path: Path, mutate: Callable) -> None:
    """Edit the raw NIfTI-1 header of ``path`` (no nibabel fixes), keep the data bytes."""
    import nibabel as nib

    with _open(path, "rb") as fh:
        raw = fh.read()
    hdr = nib.Nifti1Header(raw[:348], check=False)
    mutate(hdr)
    with _open(path, "wb") as fh:
        fh.write(hdr.binaryblock + raw[348:])


def _resave(path: Path, transform: Callable, dtype=None) -> None:
    """Load ``path``, apply ``transform(data, affine) -> (data, affine)``, save in place."""
    import nibabel as nib

    img = nib.load(str(path))
    data, affine = transform(np.asanyarray(img.dataobj), img.affine.copy())
    hdr = img.header.copy()
    if dtype is not None:
        hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(None, None)
    nib.save(nib.Nifti1Image(data, affine, hdr), str(path))


def _truncated_gzip(case: CaseSpec) -> None:
    path = Path(case.frames[0].image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty_file(case: CaseSpec) -> None:
    Path(case.frames[0].image).write_bytes(b"")


def _wrong_format(case: CaseSpec) -> None:
    Path(case.frames[0].image).write_text("this is a text file, not a NIfTI volume\n")


def _shape_mismatch(case: CaseSpec) -> None:
    _resave(Path(case.frames[0].label), lambda d, a: (d[:-1], a))


def _affine_mismatch(case: CaseSpec) -> None:
    def shift(d, a):
        a[:3, 3] += 5.0
        return d, a
    _resave(Path(case.frames[0].label), shift)


def _float_labels(case: CaseSpec) -> None:
    def blur(d, a):
        out = d.astype(np.float32)
        out[out > 0] += 0.5
        return out, a
    _resave(Path(case.frames[0].label), blur, np.float32)


def _label_out_of_range(case: CaseSpec) -> None:
    def seven(d, a):
        out = d.copy()
        out[tuple(s // 2 for s in out.shape)] = 7
        return out, a
    _resave(Path(case.frames[0].label), seven)


def _nan_intensity(case: CaseSpec) -> None:
    def nans(d, a):
        out = d.astype(np.float32)
        out[0, 0, :] = np.nan
        return out, a
    _resave(Path(case.frames[0].image), nans, np.float32)


def _header_bomb(case: CaseSpec) -> None:
    def bomb(hdr):
        hdr["dim"][:4] = [3, 10_000, 10_000, 1_000]  # 1e11 voxels, file stays tiny
    _rewrite_header(Path(case.frames[0].image), bomb)


def _bad_spacing(case: CaseSpec) -> None:
    def zero(hdr):
        hdr["pixdim"][1:3] = [-1.5, 0.0]
    _rewrite_header(Path(case.frames[0].image), zero)


def _missing_ed(case: CaseSpec) -> None:
    info = Path(case.metadata["source"])
    lines = [ln for ln in info.read_text().splitlines() if not ln.strip().startswith("ED")]
    info.write_text("\n".join(lines) + "\n")


#: Defect name -> function corrupting one ACDC case in place.
DEFECTS: dict[str, Callable[[CaseSpec], None]] = {
    "truncated_gzip": _truncated_gzip, "empty_file": _empty_file, "wrong_format": _wrong_format,
    "shape_mismatch": _shape_mismatch, "affine_mismatch": _affine_mismatch,
    "float_labels": _float_labels, "label_out_of_range": _label_out_of_range,
    "nan_intensity": _nan_intensity, "header_bomb": _header_bomb, "bad_spacing": _bad_spacing,
    "missing_ed": _missing_ed,
}
#: The ``Problem.check`` ingest is expected to report for each defect.
EXPECTED_CHECK: dict[str, str] = {
    "truncated_gzip": "readable", "empty_file": "readable", "wrong_format": "readable",
    "shape_mismatch": "shape", "affine_mismatch": "affine", "float_labels": "label_values",
    "label_out_of_range": "label_values", "nan_intensity": "intensity",
    "header_bomb": "dimensions", "bad_spacing": "spacing", "missing_ed": "metadata",
}


def inject_defects(root: str | Path, seed: int, kinds: list[str] | None = None) -> dict[str, str]:
    """Corrupt ``len(kinds)`` randomly chosen labelled ACDC cases under ``root``, one defect each.

    Parameters
    ----------
    root : str or Path
        ACDC-layout folder (modified in place).
    seed : int
        Seed of the case choice and assignment.
    kinds : list of str, optional
        Defects to inject (default: all of :data:`DEFECTS`).

    Returns
    -------
    dict
        ``{case_id: defect}``, also written to ``root/defects.json``.

    Raises
    ------
    ConfigError
        Unknown defect, or fewer labelled valid cases than defects.
    """
    from pipelines.ingest import discover

    kinds = list(DEFECTS) if kinds is None else list(kinds)
    unknown = sorted(set(kinds) - set(DEFECTS))
    if unknown:
        raise ConfigError(f"unknown defects {unknown}; choose from {sorted(DEFECTS)}.")
    cases = [c for c in discover(root, "acdc").cases if c.has_labels]
    if len(cases) < len(kinds):
        raise ConfigError(f"{len(kinds)} defects need as many labelled cases; {root} has {len(cases)}.")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(cases), size=len(kinds), replace=False)
    applied = {}
    for idx, kind in zip(chosen, kinds):
        DEFECTS[kind](cases[idx])
        applied[cases[idx].case_id] = kind
        log.info("injected %s into %s", kind, cases[idx].case_id)
    applied = dict(sorted(applied.items()))
    (Path(root) / "defects.json").write_text(json.dumps(applied, indent=2) + "\n")
    return applied


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python tests/defects.py ROOT --seed S [--kinds a,b]``."""
    p = argparse.ArgumentParser(prog="python tests/defects.py", description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--kinds", help=f"comma-separated subset of {','.join(DEFECTS)}")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        applied = inject_defects(args.root, args.seed, args.kinds.split(",") if args.kinds else None)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    print(json.dumps(applied, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
