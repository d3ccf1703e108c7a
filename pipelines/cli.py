"""``cmrprep COMMAND ...``: one console script over the ``python -m pipelines.*`` entry points.

Installed through ``[project.scripts]``; unlike ``python -m``, a console script
does not put the working directory on ``sys.path``, so a user's own
``model.py`` or ``pipelines.py`` next to their data cannot shadow cmrprep's
packages.  Each command takes exactly the arguments of its module
(``cmrprep build --help`` = ``python -m pipelines.build --help``).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: command -> (module with ``main(argv) -> int``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("pipelines.build.__main__", "prepare a raw dataset into the sharded Zarr store"),
    "train": ("pipelines.train", "train the U-Net from a store"),
    "predict": ("pipelines.predict", "segment raw images with a trained run"),
    "evaluate": ("pipelines.evaluate", "Dice, HD95, volumes and EF of predictions against labels"),
    "ingest": ("pipelines.ingest.__main__", "find and validate every case of a dataset (no output)"),
    "doctor": ("pipelines.doctor", "diagnose your own Keras model + data set-up (exit 3 on errors)"),
    "synthesize": ("pipelines.synthesize", "write a synthetic cine-CMR dataset"),
    "demo": ("pipelines.demo", "synthesize, build, train, predict and evaluate end to end"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cmrprep COMMAND [ARGS...]   (cmrprep COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main``; return the exit code.

    Examples
    --------
    >>> main(["--help"])  # doctest: +ELLIPSIS
    usage: cmrprep COMMAND [ARGS...]   (cmrprep COMMAND --help for its options)
    ...
    0
    """
    from pipelines.exitcodes import EXIT_CONFIG, run_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else EXIT_CONFIG
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"cmrprep: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_CONFIG
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(lambda: module.main(rest), f"interrupted ({name})")


if __name__ == "__main__":
    sys.exit(main())
