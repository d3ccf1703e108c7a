"""Exit codes shared by every ``python -m pipelines.*`` command.

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      success
1      failure (an unexpected error; the previous output is intact)
2      configuration or usage error (nothing done), or inputs that cannot be read
3      success, but some cases were quarantined (build, ingest) or flagged
4      training stopped by the collapse guard (``RUN_DIR/diagnosis.txt``)
130    interrupted (Ctrl-C)
=====  ==========================================================================
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_QUARANTINE = 3
EXIT_COLLAPSE = 4
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_CONFIG", "EXIT_QUARANTINE", "EXIT_COLLAPSE",
           "EXIT_INTERRUPTED"]


def run_main(main, message: str = "interrupted") -> int:
    """Call a CLI's ``main()``; Ctrl-C becomes one line on stderr and exit code 130.

    Every ``python -m pipelines.*`` module ends with ``sys.exit(run_main(main))``,
    so an interrupt anywhere (reading, training, writing) never prints a
    traceback.  What a command leaves behind on interrupt is its own
    guarantee (the build keeps the previous store version; training keeps
    ``last.keras`` of the last finished epoch).
    """
    import signal
    import sys

    try:
        return main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while shutting down stays quiet
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ += ["run_main"]


def plain_text(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reST roles and literals unwrapped.

    >>> plain_text("Use :func:`build` with ``--workers 2``; see :mod:`pipelines.build`.")
    'Use build with --workers 2; see pipelines.build.'
    """
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc or "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"`([^`]+)`_?", r"\1", text)


def help_formatter():
    """argparse formatter for every CLI: the description as written, each option's default shown."""
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):  # no "(default: None)" after a help saying it
            if action.default is None or "default" in (action.help or ""):
                return action.help
            return super()._get_help_string(action)

    return Formatter


__all__ += ["plain_text", "help_formatter"]
