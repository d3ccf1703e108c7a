"""Command line of the build: ``python -m pipelines.build RAW OUT [options]``.

Builds (or incrementally updates) the sharded Zarr store in OUT from the cases in RAW.
Exit codes: 0 success, 3 success with quarantined cases, 2 configuration error
(nothing done), 1 failure (previous store intact), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cmrprep.plan import ConfigError
from pipelines.build import BuildConfig, BuildResult, build, outdir
from pipelines.build.cluster import quiet_dask_logs
from pipelines.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, help_formatter, plain_text
from pipelines.ingest.options import DiscoveryOptions, add_discovery_arguments

log = logging.getLogger("pipelines.build")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.build", description=plain_text(__doc__),
                                formatter_class=help_formatter())
    p.add_argument("raw", help="folder with cases (ACDC, M&Ms, nnU-Net raw or generic layout)")
    p.add_argument("out", help="output folder (store.zarr, plan.json, report/, ...)")
    add_discovery_arguments(p, ("acdc", "mnms", "nnunet", "generic", "dicom"))
    p.add_argument("--plan", dest="plan_file", help="use this plan JSON (edit a previous plan.json)")
    p.add_argument("--spacing", type=float, help="in-plane target spacing in mm (default: median)")
    p.add_argument("--crop-mm", type=float, help="crop size in mm (default: 128 px at the spacing)")
    p.add_argument("--weight-scheme", help="inverse_frequency|median_frequency|enet|effective_number")
    p.add_argument("--foreground-share", type=float, help="min share of foreground slices (0.33)")
    p.add_argument("--seed", type=int)
    p.add_argument("--store-dtype", choices=["float32", "float16"])
    p.add_argument("--replicate", action="store_true", default=None,
                   help="also store replicated_index (materialized oversampling)")
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes (0: no Dask)")
    p.add_argument("--memory-limit", default="auto", help="per-worker memory limit, e.g. 4GiB")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler")
    p.add_argument("--scheduler-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for --scheduler to answer and have a worker")
    p.add_argument("--retries", type=int, default=2, help="retries for transient task errors")
    p.add_argument("--dry-run", action="store_true", help="list what would change, do nothing")
    p.add_argument("--wait", action="store_true", help="wait for a running build instead of failing")
    p.add_argument("--no-report", action="store_true", help="skip the QC report")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The :class:`BuildConfig` the parsed arguments describe."""
    return BuildConfig(raw=args.raw, out=args.out, discovery=DiscoveryOptions.from_args(args),
                       plan_file=args.plan_file,
                       spacing=args.spacing, crop_mm=args.crop_mm, weight_scheme=args.weight_scheme,
                       foreground_share=args.foreground_share, seed=args.seed,
                       store_dtype=args.store_dtype, replicate=args.replicate, workers=args.workers,
                       memory_limit=args.memory_limit, scheduler=args.scheduler,
                       scheduler_timeout=args.scheduler_timeout,
                       retries=args.retries, dry_run=args.dry_run, wait=args.wait,
                       report=not args.no_report, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dask_logs()
    try:
        res = build(config_from_args(args))
    except (ConfigError, PermissionError, outdir.BuildLocked) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("interrupted; the previous store version is intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        log.error("build failed with an I/O error: %s (disk full, permissions or a vanished "
                  "input?); the previous store version is intact", exc)
        return EXIT_FAILURE
    except Exception:  # noqa: BLE001 - top-level failure, logged with traceback
        log.exception("build failed; the previous store version is intact")
        return EXIT_FAILURE
    print_summary(res, dry_run=args.dry_run)
    return res.exit_code


def print_summary(res: BuildResult, dry_run: bool = False) -> None:
    """What the build did, for a person (stdout)."""
    if dry_run:
        print(f"dry run: {res.n_cases} cases; would process {len(res.processed)}, reuse "
              f"{len(res.reused)}, remove {len(res.removed)}"
              + ("; the plan changed: full rebuild" if res.full_rebuild else ""))
        for label, ids in (("process", res.processed), ("remove", res.removed)):
            for cid in ids:
                print(f"  {label} {cid}")
        return
    if res.full_rebuild:
        print("the plan changed since the last build: every case was reprocessed")
    print(f"{res.n_cases} cases: processed {len(res.processed)}, reused {len(res.reused)}, "
          f"removed {len(res.removed)}, quarantined {len(res.quarantined)}; "
          f"{res.n_slices} slices in {res.out / 'store.zarr'} ({res.seconds:.1f} s)")
    if res.repaired:
        print(f"repaired: {len(res.repaired)} cases whose store data was damaged were rebuilt from "
              f"the inputs ({', '.join(res.repaired[:10])}{', ...' if len(res.repaired) > 10 else ''})")
    for q in res.quarantined:
        print(f"  QUARANTINED {q['case_id']}: {q.get('check')}: {q.get('message')} [{q.get('file')}]")


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; the previous store version is intact'))
