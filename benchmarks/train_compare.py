"""Seed-style setup vs cmrprep's default, same synthetic data and the same wall-time budget.

    python benchmarks/train_compare.py --cases 40 --minutes 20 [--setups default,seed]

(a) *seed*: the setup from the project's origin story — the whole field of view (a 256x256 px
region at the median spacing, no heart crop), no rebalancing (uniform slice sampling,
unweighted cross-entropy), softmax output with ``from_logits=False``, plain SGD at lr 1e-4.
(b) *default*: ``python -m pipelines.build`` + ``python -m pipelines.train`` defaults
(128x128 heart crop, sampling weights, Dice + weighted CE on logits, Adam 1e-3).

Both train on the same patients and are validated on the same held-out patients (split by
patient with the same seed). Prints per-class validation Dice (best epoch) for both.
Collapse detection is disabled for (a) so that it uses its whole budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

SETUPS = {
    "default": dict(build={}, train={}),
    "seed": dict(build={"crop_mm_px": 256, "foreground_share": 0.0},
                 train={"use_sampling": False, "class_weights": None, "loss": "ce",
                        "output": "softmax", "from_logits": False, "optimizer": "sgd",
                        "lr": 1e-4, "lr_schedule": "constant", "augment": False, "batch_norm": False,
                        "collapse_patience": 10_000}),
}


def _build(raw: Path, out: Path, spec: dict, workers: int) -> None:
    from pipelines.build import BuildConfig, build

    if (out / "store.zarr").exists():
        return
    kw = {}
    if "crop_mm_px" in spec:
        from cmrprep.plan import Plan
        from pipelines.build import resolve_plan  # noqa: F401 - documents the plan rule

        probe = out.parent / (out.name + "_probe")
        build(BuildConfig(raw, probe, workers=workers, report=False, progress=False))
        spacing = Plan.from_json((probe / "plan.json").read_text()).target_spacing
        kw["crop_mm"] = spec["crop_mm_px"] * spacing
        kw["spacing"] = spacing
    build(BuildConfig(raw, out, workers=workers, foreground_share=spec.get("foreground_share"),
          progress=False, **kw))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setups", default="default,seed")
    p.add_argument("--workdir", default="/tmp/cmrprep-train-bench")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from model.train import train
    from pipelines.synthesize import synthesize

    work = Path(a.workdir)
    raw = work / f"raw{a.cases}_s{a.seed}"
    if not raw.exists():
        synthesize(raw, a.cases, a.seed, layout="acdc")
    rows = {}
    for name in a.setups.split(","):
        spec = SETUPS[name]
        shards = work / f"shards_{name}_{a.cases}_s{a.seed}"
        _build(raw, shards, spec["build"], a.workers)
        t0 = time.perf_counter()
        res = train(shards, work / f"run_{name}_{a.cases}_{int(a.minutes)}min", epochs=10_000,
                    max_minutes=a.minutes, seed=a.seed, verbose=0, **spec["train"])
        rows[name] = {"dice": res.best_dice, "epochs": res.epochs_completed,
                      "stopped": res.stopped_reason, "minutes": (time.perf_counter() - t0) / 60}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"\n{'setup':8s} {'RV':>6s} {'MYO':>6s} {'LV':>6s} {'mean':>6s} {'epochs':>6s} {'min':>5s}")
    for name, r in rows.items():
        d = r["dice"]
        print(f"{name:8s} {d.get('rv', 0):6.3f} {d.get('myo', 0):6.3f} {d.get('lv', 0):6.3f} "
              f"{d.get('mean', 0):6.3f} {r['epochs']:6d} {r['minutes']:5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
