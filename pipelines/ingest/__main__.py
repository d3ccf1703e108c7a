"""``python -m pipelines.ingest RAW [--layout L] [--report FILE.json] ...``.

Exit codes: 0 all cases valid, 3 some quarantined, 2 configuration error, no
usable case, or labels that contradict the label map (what build refuses), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cmrprep.plan import ConfigError
from pipelines.exitcodes import EXIT_CONFIG, EXIT_FAILURE, help_formatter, plain_text
from pipelines.ingest.options import DiscoveryOptions, add_discovery_arguments
from pipelines.ingest.report import ingest

log = logging.getLogger("pipelines.ingest")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.ingest",
                                description="Find and validate every case of a raw CMR dataset.",
                                formatter_class=help_formatter())
    p.add_argument("root", help="dataset folder, or one volume file / DICOM directory")
    add_discovery_arguments(p)
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--workers", type=int, default=1, help="cases validated concurrently")
    p.add_argument("--reference", metavar="RUN_OR_OUT",
                   help="compare the acquisition with a training run (or build output) folder: "
                        "spacing, thickness, FOV, intensity shape, contrast, orientation outside "
                        "the training ranges are named warnings")
    p.add_argument("-v", "--verbose", action="store_true", help="log each problem")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse usage errors -> 2, --help -> 0
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = ingest(args.root, DiscoveryOptions.from_args(args), workers=max(1, args.workers),
                        report=args.report, reference=args.reference)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except Exception:  # noqa: BLE001 - last resort: report and exit 1
        log.exception("ingest failed unexpectedly")
        return EXIT_FAILURE
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; no report written'))
