"""Train the bundled U-Net on a built store.

Usage::

    python -m pipelines.train SHARDS RUN_DIR [--epochs N] [--max-minutes M]
        [--batch-size B] [--loss dice_ce|ce|dice] [--lr LR] [--lr-schedule poly|constant] [--seed S]
        [--steps-per-epoch K] [--resume] [--no-augment] [--flatten-contrast P]

``SHARDS`` is the build output folder holding ``store.zarr`` (or the store
itself).  Exit codes: 0 success, 2 configuration or mis-wiring error (also
usage errors), 4 training collapsed (see ``RUN_DIR/diagnosis.txt``),
1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pipelines.exitcodes import EXIT_COLLAPSE, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, help_formatter, plain_text

log = logging.getLogger(__name__)



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=plain_text(__doc__.split("\n")[0]),
                                formatter_class=help_formatter())
    p.add_argument("shards", help="build output folder containing store.zarr (or the store)")
    p.add_argument("run_dir", help="output folder of the run")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per step (default 8 with --norm instance, 16 otherwise)")
    p.add_argument("--loss", choices=("dice_ce", "ce", "dice"), default="dice_ce")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default with --norm instance 2e-3 at batch 8, 3e-3 at larger "
                        "batches; 1e-3 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out")
    p.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--norm", choices=("instance", "batch", "none"), default="instance",
                   help="normalisation after each convolution: instance (default; each slice's own "
                        "statistics, as nnU-Net: holds up better on another scanner), batch, or none")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="the older switch: --batch-norm is --norm batch, --no-batch-norm --norm none")
    p.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop"), default="adam")
    p.add_argument("--lr-schedule", choices=("poly", "constant"), default="poly",
                   help="poly (default): the learning rate decays as (1 - progress)^0.9 toward the "
                        "end of --epochs or --max-minutes, whichever comes first; constant: --lr throughout")
    p.add_argument("--output", choices=("logits", "softmax"), default="logits")
    p.add_argument("--no-sampling", action="store_true", help="uniform shuffling, ignore weights")
    p.add_argument("--class-weights", choices=("default", "store", "none"), default="default",
                   help="cross-entropy class weights: default (none for cmrprep's instance-normalized "
                        "U-Net, the store's for --norm batch/none and for --model), store, or none")
    p.add_argument("--no-class-weights", action="store_true",
                   help="the older switch for --class-weights none")
    p.add_argument("--collapse-patience", type=int, default=5, help="0 disables the guard")
    p.add_argument("--collapse-min-dice", type=float, default=0.02,
                   help="validation foreground Dice below this counts as collapsed")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.keras")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--flatten-contrast", type=float, default=None, metavar="P",
                   help="share (0-1) of poor-acquisition samples whose blood-myocardium contrast is "
                        "flattened, as at a site with a weaker sequence (default: 1 for the "
                        "instance-normalized U-Net, 0 otherwise; see model.train.default_augment)")
    p.add_argument("--workers", type=int, default=1, help="loader threads")
    p.add_argument("--memory-budget-gib", type=float, default=2.0,
                   help="hold the store in memory when images + labels fit in this many GiB, "
                        "else stream it through a shard pool (default 2)")
    p.add_argument("--pool-shards", type=int, default=None,
                   help="shards per pool round when streaming (default: 4096 slices' worth; "
                        "memory: two pools)")
    p.add_argument("--model", metavar="FILE.keras", default=None,
                   help="train your own saved Keras model instead of cmrprep's U-Net (compiled here "
                        "with cmrprep's loss, class weights and optimizer)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _augment(args: argparse.Namespace):
    """``--no-augment`` / ``--flatten-contrast`` as ``train``'s ``augment``."""
    if args.no_augment:
        return False
    if args.flatten_contrast is not None:
        from model.augment import AugmentConfig

        return AugmentConfig(p_flatten=args.flatten_contrast)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, print a summary; return the exit code."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()  # PyTorch unless KERAS_BACKEND says otherwise
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cmrprep.plan import ConfigError
    from model.train import train
    try:
        result = train(
            args.shards, args.run_dir, epochs=args.epochs, max_minutes=args.max_minutes,
            batch_size=args.batch_size, loss=args.loss, lr=args.lr, lr_schedule=args.lr_schedule,
            seed=args.seed,
            val_fraction=args.val_fraction, steps_per_epoch=args.steps_per_epoch,
            filters=tuple(args.filters), batch_norm=args.batch_norm, norm=args.norm,
            augment=_augment(args),
            optimizer=args.optimizer, resume=args.resume, collapse_patience=args.collapse_patience,
            collapse_min_dice=args.collapse_min_dice,
            use_sampling=not args.no_sampling, output=args.output,
            class_weights=None if args.no_class_weights or args.class_weights == "none"
            else args.class_weights, workers=args.workers,
            memory_budget=int(args.memory_budget_gib * 1024**3), pool_shards=args.pool_shards,
            model=args.model)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except Exception:  # noqa: BLE001 - a CLI reports any failure with its traceback
        log.exception("training failed")
        return EXIT_FAILURE
    print(f"{result.stopped_reason}: {result.epochs_completed} epoch(s), best epoch "
          f"{result.best_epoch}, validation Dice {result.best_dice} -> {result.run_dir}")
    if result.collapsed:
        print(result.diagnosis, file=sys.stderr)
        return EXIT_COLLAPSE
    return EXIT_OK


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; RUN_DIR/last.keras holds the last finished epoch (continue with --resume)'))
