"""What a build is asked to do (:class:`BuildConfig`) and what it did (:class:`BuildResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmrprep.plan import ConfigError, Plan
from pipelines.exitcodes import EXIT_OK, EXIT_QUARANTINE
from pipelines.ingest.options import DiscoveryOptions

__all__ = ["BuildConfig", "BuildResult"]


@dataclass(frozen=True)
class BuildConfig:
    """Every option of a build; ``python -m pipelines.build`` fills one from its arguments.

    Parameters
    ----------
    raw, out : path
        Input folder with the cases; output folder (store, plan, report, logs).
    discovery : DiscoveryOptions
        How to read RAW: layout, file patterns, label map, patient pattern
        (the same options as ``ingest``, ``predict`` and ``evaluate``).
    plan_file : path, optional
        Plan JSON to follow (e.g. an edited ``OUT/plan.json``).
    spacing, crop_mm, weight_scheme, foreground_share, seed, store_dtype, replicate
        Plan overrides (``None``: the plan's value); see :class:`cmrprep.plan.Plan`.
    workers : int
        Local Dask worker processes; 0 runs every case in this process.
    memory_limit : str
        Per-worker memory limit of the local cluster.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``).
    scheduler_timeout : float
        Seconds to wait for ``scheduler`` to answer and have a worker (then a
        :class:`~cmrprep.plan.ConfigError`, exit 2).
    retries : int
        Retries of a task that failed with a transient error.
    dry_run, wait, report, progress : bool
        List changes only; wait for a running build; write the QC report;
        show progress bars.

    Examples
    --------
    >>> BuildConfig("raw", "out", seed=3).plan_overrides()["seed"]
    3
    """

    raw: str | Path
    out: str | Path
    discovery: DiscoveryOptions = field(default_factory=DiscoveryOptions)
    plan_file: str | Path | None = None
    spacing: float | None = None
    crop_mm: float | None = None
    weight_scheme: str | None = None
    foreground_share: float | None = None
    seed: int | None = None
    store_dtype: str | None = None
    replicate: bool | None = None
    workers: int = 2
    memory_limit: str = "auto"
    scheduler: str | None = None
    scheduler_timeout: float = 60.0
    retries: int = 2
    dry_run: bool = False
    wait: bool = False
    report: bool = True
    progress: bool = True

    def plan_overrides(self) -> dict[str, Any]:
        """The plan fields this configuration sets (``None`` keeps the plan's value)."""
        return dict(target_spacing=self.spacing, weight_scheme=self.weight_scheme, seed=self.seed,
                    foreground_share=self.foreground_share, store_dtype=self.store_dtype,
                    replicate=self.replicate)

    def validate(self) -> "BuildConfig":
        """Raise :class:`ConfigError` for options that cannot work (before any work)."""
        Plan().updated(**self.plan_overrides())
        self.discovery.validate()
        if not Path(self.raw).exists():
            raise ConfigError(f"input {self.raw} does not exist; pass the folder with your cases")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {self.retries}")
        if not self.scheduler_timeout > 0:
            raise ConfigError(f"--scheduler-timeout must be > 0 seconds, got {self.scheduler_timeout}")
        return self


@dataclass
class BuildResult:
    """What a build did; ``exit_code`` follows :mod:`pipelines.exitcodes`."""

    out: Path
    n_cases: int = 0
    n_slices: int = 0
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: Cases processed again because the published version's data for them was damaged.
    repaired: list[str] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    #: Verdict of the label-convention check (:class:`cmrprep.anatomy.ConventionCheck`).
    label_convention: dict[str, Any] = field(default_factory=dict)
    full_rebuild: bool = False
    published: bool = False
    seconds: float = 0.0
    #: CPU time of the build's process: its own work plus, with a local cluster, the Dask
    #: scheduler and nannies it hosts (their event loop runs in this process).
    client_cpu_s: float = 0.0
    #: The part of :attr:`client_cpu_s` spent by the thread that called :func:`build`: the
    #: build's own serial work (discovery, plan, statistics, publishing, report).
    client_main_thread_cpu_s: float = 0.0
    client_peak_rss_mib: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINE if self.quarantined else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "out"}
        return {"out": str(self.out), **d, "exit_code": self.exit_code}
