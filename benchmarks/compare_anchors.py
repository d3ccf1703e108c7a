"""cmrprep's build against the read floor, nnU-Net v2 and MONAI on one synthetic dataset.

    python benchmarks/compare_anchors.py [--cases 100] [--processes 2] [--workdir DIR]
    python -m pip install -e ".[bench]"     # optional: nnU-Net v2 and MONAI rows

One synthetic ACDC-layout set (``--cases`` patients, ED + ES frames each), and in one run,
each with the same number of processes (``--processes``):

* **floor** -- read and decompress every input image and label (nibabel, scaling applied);
  nothing else.  A warm-up pass runs first so every row reads from the page cache.  A second
  floor row reads with cmrprep's own reader (whole file, one ISA-L call: 2-2.5x faster than
  nibabel's zlib stream); the target is checked against nibabel's floor, the ratio to the
  faster one is printed too.
* **cmrprep** -- ``python -m pipelines.build RAW OUT --workers P`` from an empty ``OUT``
  (Dask start-up, validation, preprocessing, statistics, store, QC report: the whole job).
* **nnU-Net v2** -- ``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment`` +
  ``nnUNetv2_preprocess -c 2d`` with ``-np P`` on the *same files* (symlinked into an
  nnU-Net raw folder; each frame is a training case, as nnU-Net does for ACDC).
* **MONAI** -- a dictionary transform chain doing the equivalent steps (load, RAS
  orientation, in-plane resampling to cmrprep's spacing, percentile clip, z-score, crop to
  the heart, pad/crop to cmrprep's crop size, class counts, write ``.npy``) on a process pool.

The nnU-Net and MONAI rows appear when those packages are installed (the ``bench`` extra;
never a core dependency).  Each row runs as a child process; peak memory is the largest
sum of resident memory over that process tree (sampled every 50 ms).  Sizes are bytes on
disk of what each tool writes (cmrprep: the whole output folder).  cmrprep is also built on the first
``--small`` patients so peak memory at two dataset sizes can be compared.

Targets (issues 7 and 16): cmrprep >= 8x faster than nnU-Net fingerprint + 2d preprocess;
within 3x of the floor; the whole output folder <= 1/6 of nnU-Net's nnUNetPlans_2d folder;
peak memory flat in the number of cases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 917
DATASET_NAME = f"Dataset{DATASET_ID}_CmrprepBench"


# --------------------------------------------------------------------------- measuring

def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak resident bytes of its process tree)."""
    # stderr goes to a file: a pipe read only at the end fills up and stalls a chatty child.
    with tempfile.TemporaryFile() as errfile:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                             stderr=errfile, cwd=ROOT)
        ps = psutil.Process(p.pid)
        peak = 0
        while p.poll() is None:
            peak = max(peak, _tree_rss(ps))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    if p.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{err[-3000:]}")
    return wall, peak


def dir_bytes(path: Path) -> int:
    """Bytes of all regular files under ``path`` (symlinks followed once at the top; a file
    hard-linked several times, as cmrprep's store versions share unchanged shards, counts once)."""
    path = Path(path).resolve()
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --------------------------------------------------------------------------- inputs

def input_files(raw: Path) -> list[Path]:
    """The image and label files a 2-frame (ED/ES) build reads."""
    return sorted(p for p in raw.glob("patient*/patient*_frame*.nii.gz"))


def make_subset(raw: Path, dest: Path, n: int) -> Path:
    """``dest`` with symlinks to the first ``n`` patient folders of ``raw``."""
    if dest.exists():
        return dest
    dest.mkdir(parents=True)
    for d in sorted(raw.glob("patient*"))[:n]:
        (dest / d.name).symlink_to(d.resolve())
    return dest


def make_nnunet_raw(raw: Path, nnunet_raw: Path) -> Path:
    """An nnU-Net v2 raw dataset whose files are symlinks to the ACDC-layout files."""
    ds = nnunet_raw / DATASET_NAME
    if ds.exists():
        return ds
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    n = 0
    for img in input_files(raw):
        if img.name.endswith("_gt.nii.gz"):
            continue
        stem = img.name[: -len(".nii.gz")]
        gt = img.with_name(stem + "_gt.nii.gz")
        (ds / "imagesTr" / f"{stem}_0000.nii.gz").symlink_to(img.resolve())
        (ds / "labelsTr" / f"{stem}.nii.gz").symlink_to(gt.resolve())
        n += 1
    meta = {"channel_names": {"0": "cineMRI"}, "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
            "numTraining": n, "file_ending": ".nii.gz"}
    (ds / "dataset.json").write_text(json.dumps(meta, indent=2))
    return ds


# --------------------------------------------------------------------------- child modes

def _read_one(path: str) -> int:
    import nibabel as nib
    import numpy as np

    return int(np.asanyarray(nib.load(path).dataobj).nbytes)


def _read_one_isal(path: str) -> int:
    from pipelines.ingest.readers import read_volume

    data, _ = read_volume(path, case_id="floor")
    return int(data.nbytes)


def floor_main(raw: Path, processes: int, reader: str = "nibabel") -> None:
    """Read and decompress every input file on a pool of ``processes``.

    ``reader="nibabel"``: nibabel's standard streaming read (zlib) -- what the
    anchors use; ``"isal"``: cmrprep's own reader (whole file, one ISA-L call).
    """
    from multiprocessing import get_context

    files = [str(p) for p in input_files(raw)]
    func = _read_one_isal if reader == "isal" else _read_one
    with get_context("spawn").Pool(processes) as pool:
        nbytes = sum(pool.map(func, files, chunksize=1))
    print(json.dumps({"files": len(files), "decoded_bytes": nbytes}))


def _monai_one(args: tuple[str, str, str, float, list[int]]) -> list[int]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # MONAI deprecation notices, once per call
    from monai.transforms import (ClipIntensityPercentilesd, Compose, CropForegroundd,
                                  EnsureChannelFirstd, LoadImaged, NormalizeIntensityd,
                                  Orientationd, ResizeWithPadOrCropd, Spacingd)

    img, gt, out, spacing, crop = args
    chain = Compose([
        LoadImaged(keys=["image", "label"], image_only=False),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(spacing, spacing, -1), mode=("bilinear", "nearest")),
        ClipIntensityPercentilesd(keys="image", lower=0.5, upper=99.5),
        NormalizeIntensityd(keys="image"),
        CropForegroundd(keys=["image", "label"], source_key="label", allow_smaller=True),
        ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=(crop[0], crop[1], -1)),
    ])
    d = chain({"image": img, "label": gt})
    image = d["image"].numpy()[0].astype(np.float32)
    label = d["label"].numpy()[0].astype(np.uint8)
    np.save(out + "_img.npy", image)
    np.save(out + "_seg.npy", label)
    return np.bincount(label.ravel(), minlength=4).tolist()


def monai_main(raw: Path, out: Path, processes: int, spacing: float, crop: list[int]) -> None:
    """The MONAI transform chain over every frame on a pool of ``processes``."""
    from multiprocessing import get_context

    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for img in input_files(raw):
        if img.name.endswith("_gt.nii.gz"):
            continue
        stem = img.name[: -len(".nii.gz")]
        jobs.append((str(img), str(img.with_name(stem + "_gt.nii.gz")), str(out / stem), spacing, crop))
    with get_context("spawn").Pool(processes) as pool:
        counts = pool.map(_monai_one, jobs, chunksize=1)
    print(json.dumps({"frames": len(counts), "class_counts": [sum(c[i] for c in counts) for i in range(4)]}))


# --------------------------------------------------------------------------- rows

def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cmrprep_row(raw: Path, out: Path, processes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, peak = run_measured([sys.executable, "-m", "pipelines.build", str(raw), str(out),
                               "--workers", str(processes), "--quiet"])
    return {"seconds": wall, "peak_rss": peak, "bytes": dir_bytes(out),
            "store_bytes": dir_bytes(out / "store.zarr")}


def _nnunet_row(raw: Path, work: Path, processes: int) -> dict:
    base = work / "nnunet"
    shutil.rmtree(base / "preprocessed", ignore_errors=True)
    make_nnunet_raw(raw, base / "raw")
    env = {"nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "preprocessed"),
           "nnUNet_results": str(base / "results"), "OMP_NUM_THREADS": "1"}
    bindir = Path(sys.executable).parent
    steps = {}
    peak = 0
    for name, cmd in (("fingerprint", ["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID),
                                       "-np", str(processes)]),
                      ("plan", ["nnUNetv2_plan_experiment", "-d", str(DATASET_ID)]),
                      ("preprocess_2d", ["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", "2d",
                                         "-np", str(processes)])):
        exe = shutil.which(cmd[0]) or str(bindir / cmd[0])
        steps[name], p = run_measured([exe, *cmd[1:]], env)
        peak = max(peak, p)
    pre = base / "preprocessed" / DATASET_NAME
    return {"seconds": sum(steps.values()), "steps": steps, "peak_rss": peak,
            "bytes": dir_bytes(pre), "bytes_2d": dir_bytes(pre / "nnUNetPlans_2d")}


def _plan_of(out: Path) -> tuple[float, list[int]]:
    plan = json.loads((out / "plan.json").read_text())
    plan = plan.get("plan", plan)
    return float(plan["target_spacing"]), list(plan["crop_shape"])


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table (and write it as JSON next to the data)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--small", type=int, default=25, help="second dataset size for peak memory")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/cmrprep-anchors")
    p.add_argument("--skip", default="", help="comma list of rows to skip: nnunet,monai,small")
    p.add_argument("--_floor", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_monai", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._floor:
        sys.path.insert(0, str(ROOT))
        floor_main(Path(a._floor[0]), int(a._floor[1]), a._floor[2])
        return 0
    if a._monai:
        monai_main(Path(a._monai[0]), Path(a._monai[1]), int(a._monai[2]), float(a._monai[3]),
                   json.loads(a._monai[4]))
        return 0

    sys.path.insert(0, str(ROOT))
    from pipelines.synthesize import synthesize

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    raw = work / f"raw{a.cases}_s{a.seed}"
    if not raw.exists():
        t0 = time.perf_counter()
        synthesize(raw, a.cases, a.seed, layout="acdc")
        print(f"synthesized {a.cases} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    files = input_files(raw)
    in_bytes = sum(f.stat().st_size for f in files)
    me = [sys.executable, str(Path(__file__).resolve())]
    run_measured([*me, "--_floor", str(raw), str(a.processes), "nibabel"])  # warm the page cache
    rows: dict[str, dict] = {}
    wall, peak = run_measured([*me, "--_floor", str(raw), str(a.processes), "nibabel"])
    rows["floor (read)"] = {"seconds": wall, "peak_rss": peak, "bytes": in_bytes}
    print(f"floor: {wall:.1f} s", flush=True)
    wall, peak = run_measured([*me, "--_floor", str(raw), str(a.processes), "isal"])
    rows["floor, ISA-L read"] = {"seconds": wall, "peak_rss": peak, "bytes": in_bytes}
    rows["cmrprep"] = _cmrprep_row(raw, work / "cmrprep_out", a.processes)
    print(f"cmrprep: {rows['cmrprep']['seconds']:.1f} s", flush=True)
    if "small" not in skip:
        small = make_subset(raw, work / f"raw{a.small}_of_{a.cases}", a.small)
        rows[f"cmrprep {a.small} cases"] = _cmrprep_row(small, work / "cmrprep_small", a.processes)
    if "nnunet" not in skip and _have("nnunetv2"):
        rows["nnU-Net v2 2d"] = _nnunet_row(raw, work, a.processes)
        print(f"nnU-Net: {rows['nnU-Net v2 2d']['seconds']:.1f} s", flush=True)
    if "monai" not in skip and _have("monai"):
        spacing, crop = _plan_of(work / "cmrprep_out")
        mout = work / "monai_out"
        shutil.rmtree(mout, ignore_errors=True)
        wall, peak = run_measured([*me, "--_monai", str(raw), str(mout), str(a.processes), str(spacing),
                                   json.dumps(crop)])
        rows["MONAI chain"] = {"seconds": wall, "peak_rss": peak, "bytes": dir_bytes(mout)}

    floor = rows["floor (read)"]["seconds"]
    cm = rows["cmrprep"]
    frames = sum(1 for f in files if not f.name.endswith("_gt.nii.gz"))
    print(f"\n{a.cases} cases, {frames} frames, {len(files)} files, {in_bytes / 2**20:.0f} MiB on disk, "
          f"{a.processes} processes\n")
    print(f"{'row':22s} {'seconds':>8s} {'frames/s':>9s} {'x floor':>8s} {'peak RSS MiB':>13s} {'MiB out':>8s}")
    for name, r in rows.items():
        n = a.small * 2 if name.startswith(f"cmrprep {a.small}") else frames
        print(f"{name:22s} {r['seconds']:8.1f} {n / r['seconds']:9.1f} {r['seconds'] / floor:8.2f} "
              f"{r['peak_rss'] / 2**20:13.0f} {r['bytes'] / 2**20:8.1f}")
    print()
    checks = [("cmrprep within 3x of the read floor", cm["seconds"] / floor, "<=", 3.0)]
    print(f"(cmrprep / floor with its own ISA-L reader: "
          f"{cm['seconds'] / rows['floor, ISA-L read']['seconds']:.2f}x)")
    if "nnU-Net v2 2d" in rows:
        nn = rows["nnU-Net v2 2d"]
        print("nnU-Net steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in nn["steps"].items()))
        checks.append(("nnU-Net time / cmrprep time", nn["seconds"] / cm["seconds"], ">=", 8.0))
        checks.append(("cmrprep OUT (store, versions, state, report) / nnU-Net preprocessed folder",
                       cm["bytes"] / nn["bytes"], "<=", 1 / 6))
        checks.append(("cmrprep OUT / nnU-Net nnUNetPlans_2d only", cm["bytes"] / nn["bytes_2d"], "<=", 1 / 6))
    small_key = f"cmrprep {a.small} cases"
    if small_key in rows:
        checks.append((f"peak RSS {a.cases} / {a.small} cases", cm["peak_rss"] / rows[small_key]["peak_rss"],
                       "<=", 1.25))
    for name, value, op, target in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value:.3f} (target {op} {target:.3g})")
    (work / "compare_anchors.json").write_text(json.dumps({"rows": rows, "processes": a.processes,
                                                           "cases": a.cases}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
