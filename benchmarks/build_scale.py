"""The build at scale: full builds of growing size, a nightly run adding a few cases, a no-op.

    python benchmarks/build_scale.py [--sizes 100,400,1600] [--add 5] [--draws 3] [--workers 2]
                                     [--pool DIR] [--workdir /tmp/cmrprep-scale] [--copies K]

``--pool`` is an ACDC-layout folder with at least ``max(sizes) + add * draws`` cases
(synthesized there when missing: ~4 minutes per 1,000 cases).  ``draws`` sets of ``add``
cases, drawn with a fixed seed from the whole id range, are held out; every size builds the
first ``N`` of the others (a folder of symlinks) from an empty output folder with
``python -m pipelines.build --workers W``, as a user runs it.  The largest size is built
once more through ``--scheduler`` on a cluster already running in its own processes
(``dask scheduler`` and W ``dask worker`` processes on loopback, as in
``distributed_speedup.py``): there the client process holds only the build, not the local
cluster's scheduler and nannies, so its CPU share is what bounds a many-worker cluster
(the total then counts the cluster processes' CPU during the build).  Then, on the largest store,
once per draw: a copy of its output folder (hard links, as a nightly job finds it) gets that
draw's cases added (a nightly run); the cost of a nightly run depends on which groups the
new cases fall in, so the draws' mean is the figure checked.  The same draws are added once
more through ``--scheduler`` to a copy of the ``--scheduler`` store, on the cluster that
built it: a nightly job on a standing cluster, which starts no cluster and whose workers
have imported their libraries already (checked against the ``--scheduler`` full build; the
local figure stays the headline).  Last, the build is run once more with nothing changed.
With ``--copies K``, a store of K renamed, hard-linked copies of the largest size's cases is
built and gets the same draws and a no-op run: a nightly run's cost per stored case, measured
over a K times larger store (``--copies 4``: 6,400 cases, ~10 minutes more).

Printed per run: wall time, time per case, peak resident memory of the client process (its
own high-water mark, from ``build_report.json``) and of the largest worker process (sampled
every 50 ms), the client's CPU time (from
``build_report.json``) against the CPU time of the whole process tree, and bytes written
(files in the output folder that are new or changed, hard links to earlier files not
counted) against the full build's.  Targets (issue 16): adding 5 cases to 1,600 costs <= 5 %
of the full build's time and bytes; peak memory of client and worker flat from the smallest
to the largest size (ratio <= 1.25); client CPU <= 2 % of the total at the largest size,
checked for both the local cluster and ``--scheduler``; the speed-up bound uses the latter.
The projection to 100,000 subjects assumes the per-case time and the client share stay as
measured (they are flat here by construction; nothing grows faster than linearly).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _rss(proc: psutil.Process) -> tuple[int, int]:
    """(client RSS, largest RSS among its descendants)."""
    try:
        kids = proc.children(recursive=True)
        client = proc.memory_info().rss
    except psutil.NoSuchProcess:
        return 0, 0
    worst = 0
    for k in kids:
        try:
            worst = max(worst, k.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return client, worst


def _snapshot(out: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """``{(dev, inode): (size, mtime_ns)}`` of every regular file under ``out``."""
    files = {}
    if out.exists():
        for f in out.rglob("*"):
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                files[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns)
    return files


def _tree_cpu(procs: list[subprocess.Popen]) -> float:
    """CPU seconds (user + system) used so far by ``procs`` and all their descendants."""
    total = 0.0
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            for q in [root, *root.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_build(raw: Path, out: Path, workers: int, cluster: tuple[str, list] | None = None) -> dict:
    """One build as a user runs it; wall, memory, CPU and bytes written.

    The page cache is flushed first (``os.sync``): a nightly run starts hours after the
    last build, not while the kernel still writes back that build's gigabyte of shards
    (measured: the add-5 run took 5.3 s right after the 1,600-case build, 4.0-4.4 s
    after a sync).  With ``cluster`` (address, processes) the build runs through
    ``--scheduler`` on that already running cluster, and the total CPU time adds the
    cluster processes' CPU during the build to the client's.
    """
    os.sync()
    before = _snapshot(out)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cluster_cpu0 = _tree_cpu(cluster[1]) if cluster else 0.0
    where = ["--scheduler", cluster[0]] if cluster else ["--workers", str(workers)]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipelines.build", str(raw), str(out), *where,
                          "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(p.pid)
    client_peak = worker_peak = 0
    while p.poll() is None:
        c, w = _rss(ps)
        if cluster:  # the workers are the cluster's processes, not the build's children
            w = max([w] + [_rss(psutil.Process(q.pid))[1] for q in cluster[1][1:]])
        client_peak, worker_peak = max(client_peak, c), max(worker_peak, w)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = p.stderr.read()
    if p.returncode not in (0, 3):
        raise RuntimeError(f"build exited {p.returncode}:\n{err[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    total_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if cluster:
        total_cpu += _tree_cpu(cluster[1]) - cluster_cpu0
    after = _snapshot(out)
    written = sum(size for key, (size, mtime) in after.items() if before.get(key) != (size, mtime))
    report = json.loads((out / "build_report.json").read_text())
    # the client's exact peak (VmHWM, in build_report.json); sampling every 50 ms misses short
    # peaks such as the QC report's; the sampled value is the fallback
    client_mib = report.get("client_peak_rss_mib") or client_peak / 2**20
    return {"seconds": wall, "client_peak_mib": client_mib,
            "worker_peak_mib": worker_peak / 2**20, "client_cpu_s": report["client_cpu_s"],
            "client_main_cpu_s": report.get("client_main_thread_cpu_s", 0.0),
            "total_cpu_s": total_cpu, "bytes_written": written,
            "out_bytes": sum(size for size, _ in after.values()),
            "processed": len(report["processed"]), "cases": report["n_cases"]}


def _link_cases(dest: Path, cases: list[Path]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for d in cases:
        link = dest / d.name
        if not link.exists():
            link.symlink_to(d.resolve())


def _nightly(raw: Path, base: Path, night: Path, draws: list[list[Path]], workers: int,
             cluster: tuple[str, list] | None = None, keep_last: bool = False) -> list[dict]:
    """One nightly run per draw: ``base`` copied to ``night`` (hard links, as a nightly job finds
    it), the draw's cases linked into ``raw``, the build run; the draw's cases are taken out
    again afterwards (all but the last draw's with ``keep_last``, for the no-op re-run)."""
    out = []
    for d, new in enumerate(draws):
        shutil.rmtree(night, ignore_errors=True)
        shutil.copytree(base, night, symlinks=True, copy_function=os.link)
        _link_cases(raw, new)
        try:
            out.append(run_build(raw, night, workers, cluster))
        finally:
            if not (keep_last and d + 1 == len(draws)):
                for c in new:
                    (raw / c.name).unlink()
        where = " through --scheduler" if cluster else ""
        print(f"adding {len(new)} cases{where}, draw {d + 1}: {out[-1]['seconds']:.1f} s", flush=True)
    return out


def _copies(k: int, cases: list[Path], draws: list[list[Path]], work: Path, workers: int,
            rows: dict) -> tuple[int, float, float]:
    """A store of ``k`` renamed, hard-linked copies of ``cases`` (``patient{j}NNNN``, the files
    renamed with the folder): a full build, the same nightly draws and a no-op re-run.  Returns
    its size, its nightly runs' mean seconds and the seconds per stored case beyond the largest
    regular size."""
    n = len(cases)
    raw, out = work / f"raw{k * n}x", work / f"out{k * n}x"
    if not raw.is_dir() or len(list(raw.iterdir())) != k * n:
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        for j in range(1, k + 1):
            for case in cases:
                new = f"patient{j * 10000 + int(case.name[len('patient'):])}"
                (raw / new).mkdir()
                for f in case.resolve().iterdir():
                    os.link(f, raw / new / f.name.replace(case.name, new))
    shutil.rmtree(out, ignore_errors=True)
    big = k * n
    rows[f"full {big}"] = run_build(raw, out, workers)
    print(f"full build of {big} ({k} copies): {rows[f'full {big}']['seconds']:.1f} s", flush=True)
    night = _nightly(raw, out, work / f"out{big}x-nightly", draws, workers, keep_last=True)
    rows.update({f"add {len(draws[0])} to {big}, draw {d + 1}": r for d, r in enumerate(night)})
    rows[f"no-op {big}"] = run_build(raw, work / f"out{big}x-nightly", workers)
    for c in draws[-1]:
        (raw / c.name).unlink()
    mean = sum(r["seconds"] for r in night) / len(night)
    base = [r for name, r in rows.items() if name.startswith(f"add {len(draws[0])}, draw")]
    slope = (mean - sum(r["seconds"] for r in base) / len(base)) / (big - n)
    return big, mean, slope


def main(argv: list[str] | None = None) -> int:
    """Run the scale series and print the table (JSON beside the outputs)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,400,1600")
    p.add_argument("--add", type=int, default=5)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pool", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cmrprep-scale"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--copies", type=int, default=0, metavar="K",
                   help="also build K renamed, hard-linked copies of the largest size's cases "
                        "(K x N cases) and add the same draws to it: how a nightly run's cost grows "
                        "with the store (K=4 at 1,600: 6,400 cases, ~10 minutes more)")
    a = p.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    pool = a.pool or work / "pool"
    need = sizes[-1] + a.add * a.draws
    if len(list(pool.glob("patient*"))) < need:
        sys.path.insert(0, str(ROOT))
        from pipelines.synthesize import synthesize

        shutil.rmtree(pool, ignore_errors=True)
        synthesize(pool, need, a.seed, layout="acdc")
    import numpy as np

    cases = sorted(pool.glob("patient*"))[:need]
    held = np.random.default_rng(a.seed).choice(len(cases), a.add * a.draws, replace=False).tolist()
    draws = [[cases[i] for i in held[d * a.add:(d + 1) * a.add]] for d in range(a.draws)]
    held_set = set(held)
    base = [c for i, c in enumerate(cases) if i not in held_set]
    rows = {}
    for n in sizes:
        raw, out = work / f"raw{n}", work / f"out{n}"
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        _link_cases(raw, base[:n])
        rows[f"full {n}"] = run_build(raw, out, a.workers)
        print(f"full build of {n}: {rows[f'full {n}']['seconds']:.1f} s", flush=True)
    n = sizes[-1]
    raw, out = work / f"raw{n}", work / f"out{n}"
    # the same full build with the cluster in its own processes (--scheduler): the client
    # process is then only the build, which is what bounds a many-worker cluster
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from distributed_speedup import start_cluster, stop_cluster

    shutil.rmtree(work / f"out{n}-scheduler", ignore_errors=True)
    cluster = start_cluster(a.workers, work / "scratch")
    try:
        rows[f"full {n}, --scheduler"] = run_build(raw, work / f"out{n}-scheduler", a.workers, cluster)
        print(f"full build of {n} through --scheduler: {rows[f'full {n}, --scheduler']['seconds']:.1f} s",
              flush=True)
        # the same nightly draws through --scheduler: a scheduled job on a standing cluster, which
        # pays no cluster start and no worker imports
        remote_nightly = _nightly(raw, work / f"out{n}-scheduler", work / f"out{n}-scheduler-nightly",
                                  draws, a.workers, cluster)
        rows.update({f"add {a.add}, --scheduler, draw {d + 1}": r for d, r in enumerate(remote_nightly)})
    finally:
        stop_cluster(cluster[1])
    night = work / f"out{n}-nightly"
    nightly = _nightly(raw, out, night, draws, a.workers, keep_last=True)
    rows.update({f"add {a.add}, draw {d + 1}": r for d, r in enumerate(nightly)})
    rows["no-op re-run"] = run_build(raw, night, a.workers)
    for c in draws[-1]:
        (raw / c.name).unlink()
    large = _copies(a.copies, base[:n], draws, work, a.workers, rows) if a.copies > 1 else None
    print(f"\n{'run':16s} {'cases':>6s} {'proc':>5s} {'s':>7s} {'ms/case':>8s} {'client MiB':>11s} "
          f"{'worker MiB':>11s} {'client CPU %':>13s} {'MiB written':>12s}")
    for name, r in rows.items():
        share = 100 * r["client_cpu_s"] / max(r["total_cpu_s"], 1e-9)
        print(f"{name:16s} {r['cases']:6d} {r['processed']:5d} {r['seconds']:7.1f} "
              f"{1000 * r['seconds'] / max(r['cases'], 1):8.1f} {r['client_peak_mib']:11.0f} "
              f"{r['worker_peak_mib']:11.0f} {share:13.2f} {r['bytes_written'] / 2**20:12.1f}")
    full = rows[f"full {n}"]
    add = {k: float(np.mean([r[k] for r in nightly])) for k in ("seconds", "bytes_written")}
    small = rows[f"full {sizes[0]}"]
    share = full["client_cpu_s"] / full["total_cpu_s"]
    main_share = full["client_main_cpu_s"] / full["total_cpu_s"]
    remote = rows[f"full {n}, --scheduler"]
    remote_share = remote["client_cpu_s"] / remote["total_cpu_s"]
    checks = [
        (f"adding {a.add} to {n} (mean of {a.draws} draws): time / full build",
         add["seconds"] / full["seconds"], "<=", 0.05),
        (f"adding {a.add} to {n} (mean of {a.draws} draws): bytes written / full build",
         add["bytes_written"] / full["bytes_written"], "<=", 0.05),
        (f"client peak RSS {n} / {sizes[0]} cases", full["client_peak_mib"] / small["client_peak_mib"],
         "<=", 1.25),
        (f"worker peak RSS {n} / {sizes[0]} cases", full["worker_peak_mib"] / small["worker_peak_mib"],
         "<=", 1.25),
        (f"adding {a.add} to {n} through --scheduler on a standing cluster: time / full build "
         "through --scheduler", float(np.mean([r["seconds"] for r in remote_nightly])) / remote["seconds"],
         "<=", 0.05),
        (f"client CPU share at {n} cases, local cluster in the client process", share, "<=", 0.02),
        (f"client CPU share at {n} cases, cluster in its own processes (--scheduler)", remote_share,
         "<=", 0.02),
    ]
    print(f"\nthe client's CPU at {n} cases: {full['client_cpu_s']:.2f} s, of which the build's own thread "
          f"{full['client_main_cpu_s']:.2f} s ({100 * main_share:.2f} % of the total); the rest is the "
          "local cluster's scheduler and nannies hosted in the client process (with --scheduler they "
          "run elsewhere)")
    print()
    for name, value, op, target in checks:
        ok = value <= target
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value:.4f} (target {op} {target})")
    if large is not None:
        big, mean, slope = large
        fixed = add["seconds"] - slope * n
        print(f"\nat {big} cases: adding {a.add} takes {mean:.1f} s, {mean / rows[f'full {big}']['seconds']:.2%} "
              f"of the full build; a nightly run is ~{fixed:.1f} s plus {1000 * slope:.2f} ms per stored "
              f"case (~{fixed + slope * 1e5:.0f} s at 100,000 subjects)")
    per_case = full["seconds"] / n
    speedup_bound = 1 / remote_share if remote_share > 0 else float("inf")
    version = (work / f"out{n}" / "store.zarr").resolve()
    small = sum(f.stat().st_size for f in version.rglob("*") if f.is_file()
                and f.relative_to(version).parts[0] not in ("images", "labels", "records"))
    print(f"\nprojection to 100,000 subjects on {a.workers} worker processes: full build "
          f"~{per_case * 1e5 / 3600:.1f} h; a nightly run adding {a.add} cases rewrites their groups "
          f"(~{add['bytes_written'] / 2**20:.0f} MiB here) plus the dataset-wide arrays, "
          f"~{small / n * 1e5 / 2**20:.0f} MiB at 100,000 subjects ({small / 2**20:.1f} MiB at {n}); "
          f"the client's share bounds a cluster's speed-up at ~{speedup_bound:.0f}x")
    (work / "build_scale.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
