"""Does a model trained on one site hold up on the next?  Site-A training, site-A and site-B Dice.

    python benchmarks/site_shift.py [--train-cases 40] [--test-cases 10] [--minutes 20] [--workdir DIR]
                                    [--run RUN_DIR] [--train-site B] [--each-change]
                                    [--flatten-contrast P] [--lr-schedule poly|constant]
                                    [--augment NAME=VALUE ...] [--batch-size N] [--filters F ...]

1. Synthesize ``--train-cases`` site-A patients (``pipelines.synthesize``), build the store.
2. Train the default model for ``--minutes`` (``pipelines.train`` defaults, i.e. with the
   default augmentation), unless ``--run`` gives an existing run.
3. Synthesize ``--test-cases`` held-out patients of site A and of site B (``--site B``:
   coarser and thicker slices, weaker blood-myocardium contrast, more noise, blur, a strong
   surface-coil fall-off, stored transposed), each with the 4D cine.
4. ``pipelines.predict`` on the raw images (labels are not read), ``pipelines.evaluate`` in the
   original geometry.

Prints, per site, the mean foreground Dice over frames, the worst frame's, the per-class
means, how many cases ``predict`` flagged and which dataset-shift warnings it named.  The
targets (issue #12): site B mean >= 0.90 and no frame below 0.5, site A >= 0.95.

``--train-site B`` trains on site-B patients instead (same test sets): the in-domain ceiling of
site B for the same training budget, which tells a shift apart from data that is simply harder.

``--flatten-contrast P`` trains with flattened tissue contrast in that share of the poor
acquisitions (``pipelines.train --flatten-contrast``; off by default).

``--augment NAME=VALUE`` (repeatable) sets one field of :class:`model.augment.AugmentConfig` for
the training, e.g. ``--augment p_partial_volume=0.5 --augment partial_volume=0.2,0.5`` (a
comma gives a tuple): an augmentation variant measured without editing the defaults.

``--each-change`` also scores site B's changes one at a time (``synthesize --site B
--site-changes C``, the same patients and draws as the site-B test set): which of them
costs the model how much, and whether they compound.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def frame_scores(rows: list[dict]) -> dict[str, float]:
    """Mean foreground Dice per frame (``"case_id/phase"``) from ``evaluate``'s rows."""
    by_frame: dict[str, list[float]] = {}
    for r in rows:
        if not math.isnan(r["dice"]):
            by_frame.setdefault(f"{r['case_id']}/{r['phase']}", []).append(r["dice"])
    return {k: sum(v) / len(v) for k, v in by_frame.items()}


def score_site(run: Path, work: Path, site: str, cases: int, seed: int, changes: str | None = None) -> dict:
    from pipelines.evaluate import evaluate
    from pipelines.predict import predict
    from pipelines.synthesize import synthesize

    name = site if changes is None else f"B_{changes.replace(',', '+')}"
    raw = work / f"test_{name}"
    if not raw.exists():
        synthesize(raw, cases, seed, layout="acdc", with_4d=True, site=site, site_changes=changes)
    pred = work / f"pred_{name}"
    shutil.rmtree(pred, ignore_errors=True)
    t0 = time.perf_counter()
    res = predict(run, raw, pred, progress=False)
    seconds = time.perf_counter() - t0
    ev = evaluate(pred, raw, pred / "evaluation")
    by_frame = frame_scores(ev["rows"])
    scores = list(by_frame.values())
    label = site if changes is None else f"B, only {changes}"
    return {"site": label, "frames": len(scores), "mean": sum(scores) / len(scores), "worst": min(scores),
            "by_frame": {k: round(v, 4) for k, v in sorted(by_frame.items(), key=lambda kv: kv[1])},
            "per_class": {k: round(v["dice"], 4) for k, v in ev["summary"].items()},
            "flagged_cases": sorted(res.flags), "shift": [w["message"] for w in res.shift],
            "predict_s": round(seconds, 1)}


def augment_config(flatten: float | None, fields: list[str], norm: str = "instance"):
    """``True`` (the trainer's defaults) or its defaults for ``norm`` with ``p_flatten`` and ``fields`` set."""
    from dataclasses import fields as dc_fields
    from dataclasses import replace

    from model.augment import AugmentConfig
    from model.train import default_augment

    if flatten is None and not fields:
        return True
    types = {f.name: f.default for f in dc_fields(AugmentConfig)}
    values: dict = {"p_flatten": flatten} if flatten is not None else {}
    for item in fields:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--augment {item!r}: expected NAME=VALUE with NAME one of {sorted(types)}")
        kind = type(types[name])
        try:
            values[name] = (tuple(float(v) for v in text.split(",")) if kind is tuple
                            else text if kind is str else float(text))
        except ValueError:
            raise SystemExit(f"--augment {item!r}: {text!r} is not a number (a comma-separated pair "
                             "for a range)") from None
    return replace(default_augment(norm), **values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--class-weights", choices=("default", "store", "none"), default="default",
                   help="cross-entropy class weights: the trainer's default, the store's scheme, or none")
    p.add_argument("--train-cases", type=int, default=40)
    p.add_argument("--test-cases", type=int, default=10)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/cmrprep-site-shift")
    p.add_argument("--run", help="score an existing run instead of training one")
    p.add_argument("--each-change", action="store_true",
                   help="also score each of site B's changes alone (same patients as site B)")
    p.add_argument("--train-site", choices=("A", "B"), default="A",
                   help="site of the training patients (B: site B's in-domain ceiling)")
    p.add_argument("--flatten-contrast", type=float, default=None, metavar="P",
                   help="train with this share of poor acquisitions flattened (train --flatten-contrast; "
                        "default: the trainer's)")
    p.add_argument("--lr", type=float, default=None, help="the trainer's initial learning rate (default: its own)")
    p.add_argument("--norm", choices=("instance", "batch", "none"), default="instance",
                   help="the U-Net's normalisation after each convolution (default instance, as the trainer)")
    p.add_argument("--lr-schedule", choices=("poly", "constant"), default="poly",
                   help="the trainer's learning-rate schedule (default poly, as pipelines.train)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per training step (default: train's, 8 for the instance-normalized U-Net)")
    p.add_argument("--filters", type=int, nargs="+", default=None,
                   help="the U-Net's filters per level (default: train's, 16 32 64 128 256)")
    p.add_argument("--augment", action="append", default=[], metavar="NAME=VALUE",
                   help="set one AugmentConfig field for the training (repeatable; a comma gives a tuple)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()
    from model.train import train
    from pipelines.build import BuildConfig, build
    from pipelines.synthesize import synthesize

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run = Path(a.run) if a.run else work / "run"
    if not a.run:
        raw = work / f"train_{a.train_site}"
        if not raw.exists():
            synthesize(raw, a.train_cases, a.seed, layout="acdc", site=a.train_site)
        build(BuildConfig(raw, work / "shards", workers=2, progress=False))
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        augment = augment_config(a.flatten_contrast, a.augment, a.norm)
        result = train(work / "shards", run, epochs=1000, max_minutes=a.minutes, seed=a.seed, verbose=0,
                       augment=augment, lr=a.lr, batch_size=a.batch_size,
                       lr_schedule=a.lr_schedule, norm=a.norm,
                       class_weights=None if a.class_weights == "none" else a.class_weights,
                       **({"filters": tuple(a.filters)} if a.filters else {}))
        print(f"trained {result.epochs_completed} epochs in {time.perf_counter() - t0:.0f} s; "
              f"validation Dice {result.best_dice}")
    out = [score_site(run, work, site, a.test_cases, a.seed + 5000 + i) for i, site in enumerate("AB")]
    if a.each_change:
        from cmrprep.synthetic import SITE_B_CHANGES

        out += [score_site(run, work, "B", a.test_cases, a.seed + 5001, c) for c in SITE_B_CHANGES]
    for r in out:
        print(f"site {r['site']}: {r['frames']} frames, mean foreground Dice {r['mean']:.3f}, worst frame "
              f"{r['worst']:.3f}; per class {r['per_class']}; flagged {len(r['flagged_cases'])} case(s); "
              f"shift warnings: {r['shift'] or 'none'}")
    a_ok = out[0]["mean"] >= 0.95
    b_ok = out[1]["mean"] >= 0.90 and out[1]["worst"] >= 0.5
    print(f"{'PASS' if a_ok else 'MISS'}  site A mean >= 0.95: {out[0]['mean']:.3f}")
    print(f"{'PASS' if b_ok else 'MISS'}  site B mean >= 0.90 and no frame < 0.5: "
          f"{out[1]['mean']:.3f} / {out[1]['worst']:.3f}")
    (work / "site_shift.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
