"""Diagnose your own Keras set-up: python -m pipelines.doctor MODEL DATA [--loss NAME] [--json FILE].

MODEL is a saved Keras model (.keras); its compile config gives the loss and the
optimizer (--loss overrides the loss). DATA is a .npz with arrays x and y (how
Keras users hold data), a cmrprep build output or store, or a raw dataset
folder in any supported layout. The doctor inspects, without training:
output activation vs loss (from_logits), label encoding vs loss (one-hot with a
sparse loss, integers with a categorical one, 0/255 masks, float or RGB masks,
values beyond the head's classes), class shares, empty slices and the prior
entropy against ln C, the optimizer and learning rate, and input scaling. With
--probe-steps N it fits N batches as wired and says whether the loss gets below
the prior entropy.

Each finding has a stable code, a severity (error: it cannot learn as wired;
warning: it will likely train poorly), a message naming the value, and the fix.
Exit codes: 0 no error, 3 at least one error, 2 the inputs cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.plan import ConfigError
from pipelines.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_QUARANTINE, help_formatter, plain_text

log = logging.getLogger("pipelines.doctor")

#: Slices read from a store or a raw dataset for the inspection.
SAMPLE_SLICES = 512


def load_data(path: str | Path, limit: int = SAMPLE_SLICES) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, kind)`` from a ``.npz`` (``x``, ``y``), a cmrprep store, or a raw dataset folder.

    Raises
    ------
    ConfigError
        Unreadable or missing data, with the path and the reason.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data {p} does not exist")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise ConfigError(f"{p} has arrays {z.files}; the doctor needs 'x' (images) and "
                                      "'y' (masks): np.savez(path, x=images, y=masks)")
                return np.asarray(z["x"]), np.asarray(z["y"]), "npz"
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"cannot read {p} ({type(exc).__name__}: {exc}); is it a .npz "
                              "written by np.savez?") from exc
    if (p / "store.zarr").exists() or (p / "zarr.json").exists():
        from model.reader import ShardStore

        store = ShardStore(p)
        real = np.flatnonzero(np.asarray(store.case_index) >= 0) if store.case_index is not None \
            else np.arange(store.n_slices)
        idx = np.random.default_rng(0).choice(real, size=min(limit, real.size), replace=False)
        x, y = store.get(np.sort(idx))
        return x[..., None], y.astype(np.int64), "store"
    if p.is_dir():
        return _raw_sample(p, limit) + ("raw",)
    raise ConfigError(f"data {p} is neither a .npz, a cmrprep store nor a dataset folder")


def _raw_sample(root: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices of labelled frames of a raw dataset, as the files hold them (label values unmapped)."""
    from cmrprep.cases import CaseError
    from pipelines.ingest import discover, read_volume

    found = discover(root)
    xs, ys, shape = [], [], None
    for case in found.cases:
        for fr in case.frames:
            if fr.label is None:
                continue
            try:
                img, _ = read_volume(fr.image, case_id=case.case_id, frame=fr.image_frame)
                lab, _ = read_volume(fr.label, case_id=case.case_id, frame=fr.label_frame)
            except CaseError as exc:
                log.warning("skipped: %s", exc)
                continue
            if shape is None:
                shape = img.shape[:2]
            if img.shape[:2] != shape or lab.shape != img.shape:
                continue
            xs.extend(np.moveaxis(img, 2, 0))
            ys.extend(np.moveaxis(lab, 2, 0))
            if len(xs) >= limit:
                break
        if len(xs) >= limit:
            break
    if not xs:
        raise ConfigError(f"no labelled frame could be read under {root} ({len(found.cases)} cases "
                          f"found, {len(found.problems)} problems); run python -m pipelines.ingest on it")
    return np.stack(xs)[..., None].astype(np.float32), np.stack(ys)


def load_model_and_loss(path: str | Path, loss_name: str | None) -> tuple[Any, Any, Any]:
    """``(net, loss, optimizer)``: the saved model and its compile config (``--loss`` overrides)."""
    from model.saving import load_model_file

    try:
        net = load_model_file(path, compile=True)
    except ConfigError:
        net = load_model_file(path, compile=False)  # a custom loss without its code: inspect the rest
        log.warning("%s loaded without its compile config (custom objects?); pass --loss", path)
    loss = loss_name or getattr(net, "loss", None)
    optimizer = getattr(net, "optimizer", None) if getattr(net, "compiled", False) else None
    if loss_name is not None and optimizer is not None:
        net.compile(optimizer=optimizer, loss=loss_name)
    return net, loss, optimizer


def run_doctor(model_path: str | Path, data_path: str | Path, loss: str | None = None,
               probe_steps: int = 0) -> dict[str, Any]:
    """Findings and numbers of one set-up (the JSON the CLI writes)."""
    from model.doctor import diagnose

    net, loss_obj, optimizer = load_model_and_loss(model_path, loss)
    x, y, kind = load_data(data_path)
    if x.ndim == 3:
        x = x[..., None]
    findings, stats = diagnose(net, x, y, loss_obj, optimizer, probe_steps)
    return {"model": str(model_path), "data": str(data_path), "data_kind": kind,
            "findings": [f.to_dict() for f in findings], "stats": stats}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()
    p = argparse.ArgumentParser(prog="python -m pipelines.doctor", description=plain_text(__doc__),
                                formatter_class=help_formatter())
    p.add_argument("model", help="saved Keras model (.keras)")
    p.add_argument("data", help=".npz with x and y, a cmrprep store, or a raw dataset folder")
    p.add_argument("--loss", default=None, help="loss name overriding the model's compile config")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the findings as JSON")
    p.add_argument("--probe-steps", type=int, default=0, metavar="N",
                   help="fit N batches as wired and report whether the loss leaves the prior")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_doctor(args.model, args.data, args.loss, args.probe_steps)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    for f in report["findings"]:
        print(f"{f['severity'].upper():7s} {f['code']}: {f['message']}\n        fix: {f['fix']}")
    if not report["findings"]:
        print("no problem found")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return EXIT_QUARANTINE if any(f["severity"] == "error" for f in report["findings"]) else EXIT_OK


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, "interrupted"))
