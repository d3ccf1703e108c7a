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
