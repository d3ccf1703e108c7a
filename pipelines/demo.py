"""End-to-end demo on embedded synthetic data: ``python -m pipelines.demo [OUT]``.

Generates a synthetic ACDC-layout dataset, builds the sharded store with the
QC report, trains the U-Net for a few minutes, segments held-out
raw images and evaluates them in their original geometry.  So short a
training uses batch normalization (:data:`DEMO_NORM`): it learns faster in its
first few hundred steps than the trainer's default, instance normalization,
which holds up better on another scanner's images once trained for longer
(validation Dice after 4 minutes on 2 cores, Dec 7: 0.74 with batch normalization at
1e-3, 0.63 with instance normalization at 3e-3 and batch 16).  Everything lands
in ``OUT`` (default ``demo_out/``); the command is safe to re-run (the build is
incremental and the training run directory is replaced).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from pipelines.exitcodes import help_formatter, plain_text

log = logging.getLogger("pipelines.demo")

#: The demo's normalization (see the module docstring); ``python -m pipelines.train`` uses instance.
DEMO_NORM = "batch"


def run_demo(out: str | Path = "demo_out", *, cases: int = 24, test_cases: int = 4, seed: int = 0,
             train_minutes: float = 4.0, workers: int = 2, train: bool = True) -> int:
    """Run the whole chain; returns an exit code (0 ok)."""
    from pipelines.build import BuildConfig, build
    from pipelines.synthesize import synthesize

    out = Path(out)
    raw, test_raw, shards = out / "raw", out / "raw_test", out / "shards"
    if not raw.exists():
        synthesize(raw, cases, seed, layout="acdc")
    if not test_raw.exists():
        synthesize(test_raw, test_cases, seed + 1000, layout="acdc", with_4d=True)
    res = build(BuildConfig(raw, shards, workers=workers, seed=seed))
    log.info("store: %s (%d slices, %d quarantined); report: %s", shards / "store.zarr",
             res.n_slices, len(res.quarantined), shards / "report" / "index.html")
    if not train:
        return 0
    return _train_predict_evaluate(out, shards, test_raw, seed, train_minutes)


def _train_predict_evaluate(out: Path, shards: Path, test_raw: Path, seed: int,
                            minutes: float) -> int:
    try:
        from model.train import train
    except ImportError as exc:  # the training extra is optional
        log.warning("training skipped (%s); install with: pip install -e '.[train]'", exc)
        return 0
    run = out / "runs" / "demo"
    if run.exists():
        shutil.rmtree(run)
    result = train(shards, run, epochs=200, max_minutes=minutes, seed=seed, norm=DEMO_NORM)
    slow = _few_steps(run, result, minutes)
    try:
        from pipelines.evaluate import evaluate
        from pipelines.predict import predict
    except ImportError:
        return 0
    pred = out / "pred_test"
    predict(run, test_raw, pred)
    summary = evaluate(pred, test_raw, out / "eval_test")["summary"]
    mean = summary.get("mean_foreground", {}).get("dice", float("nan"))
    log.info("held-out mean foreground Dice %.3f after %.0f minutes of training (%s); the default "
             "reaches ~0.95 in 20 minutes on 2 cores: python -m pipelines.train %s RUN --max-minutes 20",
             mean, minutes, out / "eval_test" / "summary.md", shards)
    if slow:
        log.warning("%s; the Dice above is that of an under-trained model, not of cmrprep's default", slow)
    return 0


#: Training steps per second the demo expects on 2 idle cores (batch 16, 128x128, PyTorch CPU;
#: measured ~0.75-0.8 steps/s on the development machines).
EXPECTED_STEPS_PER_S = 0.75
#: Below this share of the planned steps the demo warns.  A slower machine (Dec 6: 105 steps in
#: 4 minutes, 58 % of the plan) gave a held-out Dice of 0.65 instead of 0.89-0.96.
MIN_STEP_SHARE = 0.8


def _few_steps(run: Path, result, minutes: float) -> str | None:
    """A warning when training ran far fewer steps than planned (a slow or busy machine), else None."""
    import json
    import math

    try:
        config = json.loads((run / "train_config.json").read_text())
    except (OSError, ValueError):
        return None
    per_epoch = config.get("steps_per_epoch") or math.ceil(
        config["split"]["train_slices"] / max(int(config.get("batch_size", 16)), 1))
    done = int(result.epochs_completed) * int(per_epoch)
    planned = EXPECTED_STEPS_PER_S * 60.0 * minutes
    if done >= MIN_STEP_SHARE * planned:
        return None
    return (f"training ran {done} steps in {minutes:g} minutes, {100 * done / planned:.0f} % of the "
            f"~{planned:.0f} planned on 2 idle cores (a slow or busy machine?); rerun with more "
            "--train-minutes or on an idle machine")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()  # PyTorch unless KERAS_BACKEND says otherwise
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=plain_text(__doc__),
                                formatter_class=help_formatter())
    p.add_argument("out", nargs="?", default="demo_out")
    p.add_argument("--cases", type=int, default=24, help="synthetic training cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="stop after the build")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.build.cluster import quiet_dask_logs

    quiet_dask_logs()
    return run_demo(a.out, cases=a.cases, seed=a.seed, train_minutes=a.train_minutes,
                    workers=a.workers, train=not a.no_train)


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; rerun the demo to start again'))
