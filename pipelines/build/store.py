"""The store: schema, dataset statistics and writing one complete version.

Schema (see README "Store format"): arrays ``images`` (N, H, W) float32|float16,
``labels`` (N, H, W) uint8, ``weights`` (N,) float64, ``case_index``,
``frame_index``, ``slice_index`` (N,) int32, ``phase`` (N,) int8 (0 ED, 1 ES,
2 other), ``class_counts`` (N, C) int64, optionally ``replicated_index``; the
per-case ``case_table`` and the per-group ``records/<group key>`` arrays.
Image/label chunks are 16 slices; shards hold ``plan.shard_slices`` slices.

Layout.  Cases are in sorted ``case_id`` order and form *groups* whose
boundaries depend only on the case ids (:func:`group_layout`), so the layout
is a function of the set of cases: an incremental build gives the same store
as a fresh one.  Each group starts at a shard boundary; the tail of its last
shard is padding (``case_index == -1``, weight 0, zero images and labels).  A
new version hard-links the shard files of every group whose cases are
unchanged from the previous version and writes only the other groups, and of
those only the shards from the first change on (the whole shards before it are
linked too, :func:`unchanged_prefix`), so the cost of a build follows what
changed, and versions share their data on disk.

Writes are shard-aligned by construction: each group's shards are written by
one :func:`write_group` call, through :func:`write_shards` (concurrent writes
into one shard silently corrupt data in zarr-python 3.x; different shards are
different files and safe in parallel).  Readers live in :mod:`model.reader`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

import cmrprep
from cmrprep import sampling as sampling_mod
from cmrprep import stats as stats_mod
from cmrprep import weights as weights_mod
from cmrprep.plan import Plan
from pipelines.build import incremental
from pipelines.build.outdir import fsync_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
#: Chunk keys of every array: ``images/c.7.0.0`` rather than zarr's default ``images/c/7/0/0``,
#: so a version is a few directories whatever its size (format 3; format 2 used ``/``).  With
#: one directory per shard, publishing a 1,600-case version spent 3 s flushing ~3,400
#: directories, and hard-linking a group created one directory per shard.
KEY_ENCODING = {"name": "default", "separator": "."}
#: Values of the per-slice arrays for padding slices (the tail of a case group's last shard).
PAD = -1
#: Slices per inner chunk of ``images``/``labels``.  Readers take whole shards; 16 slices
#: (256 KiB of float16 at 128x128) make writing 4x and whole-shard reads 8x faster than
#: one-slice chunks (zarr-python's per-chunk overhead dominates), while a random
#: single-slice read costs about the same (1.5 ms instead of 1.3 ms).
CHUNK_SLICES = 16


def _compressor() -> BloscCodec:
    """Blosc lz4 + bitshuffle: on z-scored float16 slices 3.9x faster to encode than zstd
    level 3 for a 5 % larger store (measured 0.08 vs 0.31 s, 80 vs 76 MB for 2 902 slices)."""
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle)


def chunk_slices(shard: int) -> int:
    """Slices per inner chunk: the largest divisor of ``shard`` up to :data:`CHUNK_SLICES`."""
    return max(d for d in range(1, min(CHUNK_SLICES, shard) + 1) if shard % d == 0)


def create_store(path: str | Path, *, n_slices: int, slice_shape: tuple[int, int],
                 image_dtype: str, shard_slices: int, num_classes: int = 4) -> zarr.Group:
    """Create an empty store with the full schema (arrays sized ``n_slices``).

    ``images`` and ``labels`` are sharded by ``shard_slices`` slices with inner
    chunks of :func:`chunk_slices` slices.
    """
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_image_arrays(root, n_slices=n_slices, slice_shape=slice_shape, image_dtype=image_dtype,
                        shard_slices=shard_slices)
    one_d = max(n_slices, 1)
    root.create_array("weights", shape=(n_slices,), dtype="float64", chunks=(one_d,),
                      fill_value=0.0, dimension_names=("slice",), chunk_key_encoding=KEY_ENCODING)
    for name, dtype in (("case_index", "int32"), ("frame_index", "int32"),
                        ("slice_index", "int32"), ("phase", "int8")):
        root.create_array(name, shape=(n_slices,), dtype=dtype, chunks=(one_d,),
                          fill_value=0, dimension_names=("slice",), chunk_key_encoding=KEY_ENCODING)
    root.create_array("class_counts", shape=(n_slices, num_classes), dtype="int64",
                      chunks=(one_d, num_classes), fill_value=0,
                      dimension_names=("slice", "class"), chunk_key_encoding=KEY_ENCODING)
    return root


def create_image_arrays(root: zarr.Group, *, n_slices: int, slice_shape: tuple[int, int],
                        image_dtype: str, shard_slices: int) -> None:
    """The sharded ``images`` and ``labels`` arrays of a store (or of a group fragment)."""
    h, w = slice_shape
    chunk, shard = chunk_slices(shard_slices), shard_slices
    for name, dtype in (("images", image_dtype), ("labels", "uint8")):
        root.create_array(name, shape=(n_slices, h, w), dtype=dtype, chunks=(chunk, h, w),
                          shards=(shard, h, w), compressors=_compressor(), fill_value=0,
                          dimension_names=("slice", "y", "x"), chunk_key_encoding=KEY_ENCODING)


class ShardWriter:
    """Writes whole shards of a store's ``images`` and ``labels`` (each array opened once).

    Each shard file is written by exactly one call, so writers of different
    shards may run concurrently in different processes (concurrent writes into
    the *same* shard corrupt it: zarr-python 3.x does not lock).  Arrays are
    opened with ``write_empty_chunks`` on: zarr then skips its all-fill-value
    scan of every shard (a third of the encoding time; an all-background label
    chunk costs a few bytes instead of none).  The runtime option belongs to
    the opened array (``with_config``); setting it in ``zarr.config`` after
    opening has no effect.  Each written shard file is flushed (``fsync``).
    """

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(store_path)
        self.arrays = {name: zarr.open_array(str(self.path / name), mode="r+").with_config(
            {"write_empty_chunks": True}) for name in ("images", "labels")}
        self.shard = self.arrays["images"].shards[0]
        self.sep = self.arrays["images"].metadata.chunk_key_encoding.separator

    def write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Write ``images``/``labels`` from slice ``start`` (a shard boundary) on: one or more
        consecutive whole shards, the last one possibly ending at the array's end."""
        if start % self.shard:
            raise ValueError(f"start {start} is not a shard boundary (shards of {self.shard} slices)")
        for name, data in (("images", images), ("labels", labels)):
            arr = self.arrays[name]
            arr[start:start + len(data)] = data.astype(arr.dtype, copy=False)
            for k in range(start // self.shard, -(-(start + len(data)) // self.shard)):
                shard_file = shard_path(self.path, name, k, self.sep)
                if shard_file.is_file():  # flushed here, in parallel; publishing syncs clean files
                    fsync_path(shard_file)


def write_shards(store_path: str | Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Write whole shards of a store: ``images``/``labels`` from slice ``start`` (see :class:`ShardWriter`)."""
    ShardWriter(store_path).write(start, images, labels)


def _boundary(case_id: str, mean_cases: int, size: int) -> bool:
    """Does a group of ``size`` cases end after ``case_id``?

    Content-defined chunking with FastCDC's normalisation: a case ends its group
    when its id hashes to 0 modulo ``mean_cases``; past ``1.5 * mean_cases`` cases
    also when an independent bit of the hash is 0 (so long groups end within a
    few cases, by content); only at ``4 * mean_cases`` by count.  A count rule
    alone (the old cap at ``2 * mean_cases``) cascades: a case inserted into a
    full group pushes its last case into the next group, and on into every full
    group after it.  Measured on 1,605 synthetic ids (``mean_cases`` 8), adding 5
    random cases rewrote 75 cases on average (90th percentile 106; 1,000 draws) with
    the cap and 60 (81) with this rule; groups 223 -> 239, padding 11.7 -> 12.6 %.
    """
    h = int.from_bytes(hashlib.blake2b(case_id.encode("utf-8", "surrogateescape"),
                                       digest_size=8).digest(), "little")
    if h % mean_cases == 0 or size >= 4 * mean_cases:
        return True
    return 2 * size >= 3 * mean_cases and (h >> 32) & 1 == 0


def group_layout(case_ids: Sequence[str], n_slices: Sequence[int], shard: int,
                 mean_cases: int = 8) -> list[dict[str, Any]]:
    """Content-defined case groups and their shard positions.

    Groups end at content-defined boundaries (:func:`_boundary`), so inserting
    or removing a case changes only the groups from the one it falls in up to
    the next case whose id hashes to 0 modulo ``mean_cases`` (usually one or
    two groups); every group starts at a shard boundary.

    Parameters
    ----------
    case_ids : sequence of str
        Case ids in store (sorted) order.
    n_slices : sequence of int
        Slices of each case.
    shard : int
        Slices per shard.
    mean_cases : int
        Mean number of cases per group.

    Returns
    -------
    list of dict
        Per group: ``cases`` (positions in ``case_ids``), ``first_shard``,
        ``n_shards``, ``first_slice`` and ``n_slices`` (without padding).

    Examples
    --------
    >>> g = group_layout(["a", "b", "c"], [30, 40, 10], shard=64, mean_cases=1)
    >>> [(x["cases"], x["first_shard"], x["n_shards"]) for x in g]
    [([0], 0, 1), ([1], 1, 1), ([2], 2, 1)]
    """
    out, first = [], 0
    for members in group_members(case_ids, mean_cases):
        total = int(sum(n_slices[i] for i in members))
        n_shards = max(1, -(-total // shard))
        out.append({"cases": members, "first_shard": first, "n_shards": n_shards,
                    "first_slice": first * shard, "n_slices": total})
        first += n_shards
    return out


def group_members(case_ids: Sequence[str], mean_cases: int = 8) -> list[list[int]]:
    """Positions in ``case_ids`` (store order) of each group's cases (see :func:`group_layout`).

    Membership depends on the ids alone, so the build knows the groups before
    any case is processed.

    Examples
    --------
    >>> group_members(["a", "b", "c"], mean_cases=1)
    [[0], [1], [2]]
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i, cid in enumerate(case_ids):
        current.append(i)
        if _boundary(cid, mean_cases, len(current)):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def group_key(case_keys: Sequence[str], shard: int) -> str:
    """Key of a group: its cases' keys (which include the plan) and the shard size."""
    blob = json.dumps({"keys": list(case_keys), "shard": shard})
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def dataset_statistics(cases: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Class counts, class weights (all schemes) and sampling weights of the real slices.

    ``cases`` are per-case summaries (:func:`pipelines.build.tasks.case_summary`),
    in store order; padding slices are not included (their weight is 0).
    """
    from pipelines.build.tasks import slice_column

    c = plan.num_classes
    rows = [slice_column(m, "class_counts").astype(np.int64) for m in cases]
    counts = np.concatenate(rows) if rows else np.zeros((0, c), dtype=np.int64)
    if counts.shape[0] == 0:
        raise ValueError("no usable slices to build a store from")
    raw = np.array([m["class_counts_raw"] for m in cases], dtype=np.int64).reshape(-1, c)
    weights_all = weights_mod.compute_all(counts, plan.weight_scheme, beta=plan.effective_number_beta)
    w = sampling_mod.sampling_weights(counts, foreground_share=plan.foreground_share,
                                      balance_classes=plan.balance_classes)
    return {
        "slice_counts": counts,
        "class_counts": counts.sum(axis=0).tolist(),
        "class_counts_raw": raw.sum(axis=0).tolist(),
        "summary_after_crop": stats_mod.summarize(counts),
        "class_weights_all": weights_all["weights"],
        "class_weights": weights_all["weights"][plan.weight_scheme],
        "sampling_weights": w,
        "expected": sampling_mod.expected_class_share(counts, w),
        "natural": sampling_mod.expected_class_share(counts, np.full(len(w), 1.0 / max(len(w), 1))),
    }


def slice_arrays(cases: list[dict[str, Any]], layout: list[dict[str, Any]], n_total: int,
                 weights: np.ndarray) -> dict[str, np.ndarray]:
    """The per-slice arrays of a version (padding rows: -1, zero counts and weight)."""
    from pipelines.build.tasks import slice_column

    arrays = {name: np.full(n_total, PAD, dtype=dtype) for name, dtype in
              (("case_index", np.int32), ("frame_index", np.int32), ("slice_index", np.int32),
               ("phase", np.int8))}
    c = slice_column(cases[0], "class_counts").shape[1] if cases else 4
    arrays["class_counts"] = np.zeros((n_total, c), dtype=np.int64)
    arrays["weights"] = np.zeros(n_total, dtype=np.float64)
    frame_offset, w_pos = 0, 0
    for group in layout:
        pos = group["first_slice"]
        for case_no in group["cases"]:
            m = cases[case_no]
            n = m["n_slices"]
            sl = slice(pos, pos + n)
            arrays["case_index"][sl] = case_no
            arrays["frame_index"][sl] = slice_column(m, "frame_local") + frame_offset
            arrays["slice_index"][sl] = slice_column(m, "slice_index")
            arrays["phase"][sl] = slice_column(m, "phase")
            arrays["class_counts"][sl] = slice_column(m, "class_counts")
            arrays["weights"][sl] = weights[w_pos:w_pos + n]
            frame_offset += m["n_frames"]
            pos += n
            w_pos += n
    return arrays


def write_version(path: Path, previous: Path | None, staging: Path, cases: list[dict[str, Any]],
                  plan: Plan, stats: dict[str, Any], build_id: str,
                  run_tasks: Callable[[Callable[..., dict], list[tuple], list[float]], list[dict]],
                  old_groups: dict[str, int] | None = None) -> dict[str, int]:
    """Write a complete store version at ``path`` (a fresh directory).

    Parameters
    ----------
    path : Path
        The new version's directory.
    previous : Path or None
        The published version whose unchanged groups are reused.
    staging : Path
        Folder of the cases staged by this or an interrupted build.
    cases : list of dict
        Per case, in store order: ``case_id``, ``key``, ``source`` (``"staged"``,
        ``"fragment"`` or ``"store"``), ``hashes`` (input digests, for a staged
        case: its record is written here), ``old_first_slice`` for
        cases in ``previous``, and the summary of
        :func:`pipelines.build.tasks.case_summary` plus ``warnings``.
    old_groups : dict, optional
        ``{group key: [key, first shard, shards, first case, cases, shard file sizes]}`` of
        ``previous`` (its ``case_table`` groups).
    run_tasks : callable
        ``run_tasks(func, items, cost) -> results``: the build's cluster (or
        serial); ``cost`` estimates each item's work (a linked group 1, a
        written one 1 + its slices).

    Returns
    -------
    dict
        ``groups``, ``groups_linked`` (from ``previous``), ``groups_written`` (here or,
        as a fragment, by the case tasks) and ``shards_kept``: shards of written groups
        linked from ``previous`` because the group changed only after them
        (:func:`unchanged_prefix`).

    This process writes the small arrays and the attributes; the groups'
    shards and records are written (or hard-linked) by
    :func:`pipelines.build.tasks.group_task` on the workers.
    """
    from pipelines.build.tasks import group_task

    shard = plan.shard_slices
    layout = group_layout([c["case_id"] for c in cases], [c["n_slices"] for c in cases], shard,
                          plan.group_cases)
    n_total = layout[-1]["first_slice"] + layout[-1]["n_slices"]
    root = create_store(path, n_slices=n_total, slice_shape=tuple(plan.crop_shape),
                        image_dtype=plan.store_dtype, shard_slices=shard,
                        num_classes=plan.num_classes)
    for name, values in slice_arrays(cases, layout, n_total, stats["sampling_weights"]).items():
        root[name][:] = values
    if plan.replicate:
        real = np.flatnonzero(root["case_index"][...] >= 0)
        idx = real[sampling_mod.replicate_indices(stats["sampling_weights"], seed=plan.seed)]
        root.create_array("replicated_index", data=np.asarray(idx, dtype=np.int64),
                          chunks=(max(len(idx), 1),), chunk_key_encoding=KEY_ENCODING)
    root.require_group("records")
    previous_sep = key_separator(previous) if previous is not None else KEY_ENCODING["separator"]
    n_cols = 4 + plan.num_classes
    items, cost, table, groups_meta = [], [], np.zeros((len(cases), n_cols), dtype=np.int64), []
    for g_no, group in enumerate(layout):
        members = [cases[i] for i in group["cases"]]
        gkey = group_key([m["key"] for m in members], shard)
        groups_meta.append([gkey, group["first_shard"], group["n_shards"], group["cases"][0],
                            len(group["cases"])])
        pos = group["first_slice"]
        for i, m in zip(group["cases"], members):
            table[i] = [pos, m["n_slices"], g_no, m["n_frames"], *m["class_counts_raw"]]
            pos += m["n_slices"]
        reuse = (old_groups or {}).get(gkey)
        task = {"key": gkey, "first_shard": group["first_shard"], "n_shards": group["n_shards"],
                "shard": shard, "first_slice": group["first_slice"], "n_total": n_total,
                "reuse_first_shard": reuse[1] if reuse else None,
                "reuse_sizes": reuse[5] if reuse and len(reuse) > 5 else None,
                "sep": KEY_ENCODING["separator"], "reuse_sep": previous_sep, "link_from": None,
                "cases": [{k: m.get(k) for k in ("case_id", "key", "source", "n_slices", "hashes",
                                                 "old_first_slice", "old_group", "fragment")}
                          for m in members]}
        fragment = _whole_fragment(members, gkey)
        if reuse is None and fragment is not None:  # written by the case task: link it into place
            reuse = fragment
            task.update(reuse_first_shard=0, reuse_sizes=fragment["sizes"],
                        reuse_sep=fragment["sep"], link_from=fragment["path"])
        items.append((str(path), str(previous) if previous else None, str(staging), task))
        cost.append(1.0 if reuse else 1.0 + group["n_slices"])
    results = run_tasks(group_task, items, cost)
    failed = [(it[3]["key"], r) for it, r in zip(items, results) if not r.get("ok")]
    if failed:
        key, res = failed[0]
        raise RuntimeError(f"writing the store group {key} failed: {res.get('exception')} "
                           f"({len(failed)} of {len(items)} groups failed)")
    for meta, res in zip(groups_meta, results):
        meta.append(res["sizes"])  # bytes of each shard file (0: absent, all fill value)
    warnings = {c["case_id"]: c["warnings"] for c in cases if c.get("warnings")}
    root.create_array("case_table", data=table, chunks=(max(len(cases), 1), n_cols),
                      chunk_key_encoding=KEY_ENCODING,
                      dimension_names=("case", "field"),
                      attributes={"columns": ["first_slice", "n_slices", "group", "n_frames",
                                              *(f"raw_{name}" for name in plan.classes)],
                                  "case_ids": [c["case_id"] for c in cases],
                                  "patients": [c.get("patient") or c["case_id"] for c in cases],
                                  "keys": [c["key"] for c in cases],
                                  "groups": groups_meta, "warnings": warnings})
    root.update_attributes(_attributes(plan, stats, len(cases),
                                       int(table[:, 3].sum()), build_id))  # one write
    # a group linked from a fragment was written by its case task: it counts as written
    linked = sum(1 for it, r in zip(items, results) if r.get("linked") and not it[3]["link_from"])
    kept = sum(r.get("shards_kept", 0) for r in results)
    return {"groups": len(items), "groups_linked": linked, "groups_written": len(items) - linked,
            "shards_kept": kept}


def write_group(version: Path, previous: Path | None, staging: Path,
                group: dict[str, Any]) -> dict[str, Any]:
    """Put one case group into a new version: hard-link it from ``previous`` or a fragment, or write it.

    A group whose key the previous version holds keeps its shard files and
    records (hard links: no data is copied or rewritten); so does a group
    written whole by its case task (``group["link_from"]``, a fragment, see
    :func:`write_fragment`).  Any other group keeps the whole shards before its
    first change (:func:`unchanged_prefix`, hard links too); the rest is
    assembled from its staged cases, fragments and the previous version's
    slices of its reused cases, then written shard by shard.
    """
    source = Path(group["link_from"]) if group.get("link_from") else previous
    if group["reuse_first_shard"] is not None and source is not None:
        try:
            _link_group(version, source, group)
            return {"ok": True, "linked": True, "key": group["key"], "sizes": group["reuse_sizes"]}
        except FileNotFoundError:  # damaged previous version: rebuild the group from sources
            _unlink_group(version, group)
            log.warning("group %s: shard files missing from %s; rewriting it", group["key"], source)
    kept = _write_group(version, previous, staging, group)
    sizes = [f.stat().st_size if f.is_file() else 0
             for f in shard_files(version, group["first_shard"], group["n_shards"], group["sep"])]
    return {"ok": True, "linked": False, "key": group["key"], "sizes": sizes, "shards_kept": kept}


def shard_path(version: Path, name: str, k: int, sep: str = ".") -> Path:
    """File of shard ``k`` of the (S, H, W) array ``name``, for the key separator ``sep``.

    Examples
    --------
    >>> shard_path(Path("v.zarr"), "images", 7).as_posix()
    'v.zarr/images/c.7.0.0'
    >>> shard_path(Path("v.zarr"), "labels", 7, "/").as_posix()
    'v.zarr/labels/c/7/0/0'
    """
    return version / name / sep.join(("c", str(k), "0", "0"))


def key_separator(version: Path) -> str:
    """The chunk key separator of a version's ``images`` (``/`` before format 3)."""
    try:
        meta = json.loads((version / "images" / "zarr.json").read_text())
        return meta["chunk_key_encoding"]["configuration"]["separator"]
    except (OSError, ValueError, KeyError, TypeError):
        return "/"


def shard_files(version: Path, first: int, n: int, sep: str = ".") -> list[Path]:
    """Shard files of ``n`` shards from ``first``: all ``images`` shards, then all ``labels`` shards
    (the order of the sizes recorded in ``case_table`` groups)."""
    return [shard_path(version, name, k, sep) for name in ("images", "labels")
            for k in range(first, first + n)]


def _link_shards(old: list[Path], new: list[Path], sizes: Sequence[int | None] | None, what: str) -> None:
    """Hard-link shard files ``old`` to ``new``, each checked against its recorded size first.

    A size of 0 is a shard whose every chunk was the fill value (zarr stores no
    file).  Raises ``FileNotFoundError`` (the previous version is damaged)
    before linking anything when a size is unknown or a file is missing or of
    another size.  A file already at ``new`` (an attempt of the same task cut
    short) is replaced.
    """
    if sizes is None or len(sizes) != len(old):
        raise FileNotFoundError(f"no recorded shard sizes for {what}")
    pairs = []
    for src, dst, size in zip(old, new, sizes):
        if size == 0:
            continue
        try:
            actual = src.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"store shard {src} is missing") from None
        if size is None or actual != size:  # cheap check against the record
            raise FileNotFoundError(f"store shard {src} has another size than written")
        pairs.append((src, dst))
    for src, dst in pairs:
        dst.unlink(missing_ok=True)
        os.link(src, dst)


def _link_group(version: Path, previous: Path, group: dict[str, Any]) -> None:
    old = shard_files(previous, group["reuse_first_shard"], group["n_shards"],
                      group["reuse_sep"])
    new = shard_files(version, group["first_shard"], group["n_shards"], group["sep"])
    _link_shards(old, new, group["reuse_sizes"], f"group {group['key']}")
    rec_src = previous / "records" / group["key"]
    rec_dst = version / "records" / group["key"]
    rec_dst.mkdir(parents=True, exist_ok=True)
    for f in rec_src.rglob("*"):
        if f.is_file():
            target = rec_dst / f.relative_to(rec_src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)


def _unlink_group(version: Path, group: dict[str, Any]) -> None:
    import shutil

    for f in shard_files(version, group["first_shard"], group["n_shards"], group["sep"]):
        f.unlink(missing_ok=True)
    shutil.rmtree(version / "records" / group["key"], ignore_errors=True)


def _write_group(version: Path, previous: Path | None, staging: Path, group: dict[str, Any]) -> int:
    """Assemble and write a group; returns how many of its shards were linked unchanged."""
    target = zarr.open_array(str(version / "images"), mode="r")
    h, w = target.shape[1:]
    shard, n = group["shard"], group["n_shards"] * group["shard"]
    old = _OldVersion(previous) if previous is not None else None
    skip = _link_prefix(version, old, group) if old is not None else 0
    images = np.zeros((n - skip, h, w), dtype=target.dtype)
    labels = np.zeros((n - skip, h, w), dtype=np.uint8)

    def place(pos: int, k: int, read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> None:
        """Slices ``pos..pos+k`` of the group from ``read(a, b)`` (the item's slices a..b);
        only those past the linked prefix are read."""
        a = max(skip - pos, 0)
        if a < k:
            images[pos + a - skip:pos + k - skip], labels[pos + a - skip:pos + k - skip] = read(a, k)

    records, pos = [], 0
    fragments: dict[str, _Fragment] = {}
    runs = _old_runs(group["cases"])
    for j, case in enumerate(group["cases"]):
        k = case["n_slices"]
        if j in runs:  # consecutive cases of the previous version: one read (chunks decoded once)
            lo = case["old_first_slice"]
            place(pos, runs[j], lambda a, b, lo=lo: old.slices(lo + a, lo + b))
        if case["source"] == "fragment":  # processed in a group that the layout split up
            where = case["fragment"]["path"]
            frag = fragments.get(where) or fragments.setdefault(where, _Fragment(Path(where)))
            lo = case["fragment"]["first"]
            place(pos, k, lambda a, b, frag=frag, lo=lo: frag.slices(lo + a, lo + b))
            records.append(frag.record(case["fragment"]["key"], case["case_id"]))
        elif case["source"] == "staged":
            arrays = incremental.read_staged_arrays(staging, case["key"], ("images", "labels"))
            meta = incremental.read_staged_meta(staging, case["key"])
            if meta is None:
                raise FileNotFoundError(f"staged case {case['case_id']} ({case['key']}) vanished")
            place(pos, k, lambda a, b, arrays=arrays: (arrays["images"][a:b], arrays["labels"][a:b]))
            records.append(case_record(meta, case["hashes"]))
        else:  # read with its run
            records.append(old.record(case["old_group"], case["case_id"]))
        pos += k
    end = min(group["first_slice"] + n, group["n_total"])  # the store's last shard may be partial
    k = end - group["first_slice"]
    if k > skip:
        write_shards(version, group["first_slice"] + skip, images[:k - skip], labels[:k - skip])
    _write_records(version, group["key"], records)
    return skip // shard


def unchanged_prefix(cases: list[dict[str, Any]], shard: int) -> tuple[int, int | None]:
    """Leading slices of a rewritten group that are whole shards of the previous version.

    A new case, or a removed one, changes a group from where it falls in; the
    cases before it, when they started a shard-aligned run in the previous
    version, still fill the same whole shards (a new case appended to a group
    leaves all but its last shard or two as they were).  Returns the number of
    such slices (a multiple of ``shard``) and the previous version's shard
    they start at (``None`` when there are none).

    Examples
    --------
    >>> store = lambda lo, n: {"source": "store", "old_first_slice": lo, "n_slices": n}
    >>> new = {"source": "staged", "n_slices": 8}
    >>> unchanged_prefix([store(128, 40), store(168, 30), new, store(198, 20)], 64)
    (64, 2)
    >>> unchanged_prefix([store(128, 40), store(168, 30), store(198, 70)], 64)  # run of 138
    (128, 2)
    >>> unchanged_prefix([new, store(128, 40)], 64), unchanged_prefix([store(130, 99)], 64)
    ((0, None), (0, None))
    """
    if not cases or cases[0]["source"] != "store" or cases[0]["old_first_slice"] % shard:
        return 0, None
    base, pos = cases[0]["old_first_slice"], 0
    for case in cases:
        if case["source"] != "store" or case["old_first_slice"] != base + pos:
            break
        pos += case["n_slices"]
    slices = pos // shard * shard
    return slices, (base // shard if slices else None)


def _link_prefix(version: Path, old: _OldVersion, group: dict[str, Any]) -> int:
    """Hard-link the group's :func:`unchanged_prefix` shards from ``old``; their slices.

    0 when a shard file is missing or has another size than recorded (the
    previous version is damaged): the whole group is then written.
    """
    slices, old_first = unchanged_prefix(group["cases"], group["shard"])
    if not slices:
        return 0
    n = slices // group["shard"]
    new_files = shard_files(version, group["first_shard"], n, group["sep"])
    sizes = [old.shard_size(name, old_first + s) for name in ("images", "labels") for s in range(n)]
    try:
        _link_shards(shard_files(old.path, old_first, n, old.sep), new_files, sizes,
                     f"group {group['key']}")
    except FileNotFoundError:
        for f in new_files:  # links of an earlier attempt: writing into them would change `old`
            f.unlink(missing_ok=True)
        return 0
    return slices


def _old_runs(cases: list[dict[str, Any]]) -> dict[int, int]:
    """``{position of a run's first case: slices}`` for runs of cases taken from the previous
    version whose slices lie back to back there (and so here).

    Examples
    --------
    >>> store = lambda lo, n: {"source": "store", "old_first_slice": lo, "n_slices": n}
    >>> _old_runs([store(0, 10), store(10, 5), {"source": "staged", "n_slices": 8}, store(40, 3)])
    {0: 15, 3: 3}
    """
    runs: dict[int, int] = {}
    start, end = None, None
    for j, case in enumerate(cases):
        if case["source"] != "store":
            start = None
            continue
        lo = case["old_first_slice"]
        if start is not None and lo == end:
            runs[start] += case["n_slices"]
        else:
            start = j
            runs[j] = case["n_slices"]
        end = lo + case["n_slices"]
    return runs


def _write_records(root: Path, gkey: str, records: list[dict[str, Any]]) -> Path:
    """``records/<group key>``: an empty array whose attributes hold the group's case records."""
    path = root / "records" / gkey
    zarr.create_array(str(path), shape=(len(records),), dtype="int32",
                      chunks=(max(len(records), 1),), fill_value=0, zarr_format=3,
                      chunk_key_encoding=KEY_ENCODING, attributes={"cases": records})
    return path


def write_fragment(staging: Path, plan: Plan, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one whole case group, as processed by one task, into ``staging/<group key>.group``.

    A *fragment* holds the group's ``images`` and ``labels`` shards (full
    shards, zero padding), exactly as a store version holds them from its
    first shard, its ``records/<group key>``, and ``summary.json`` (written
    last: a fragment without it is incomplete and removed by the next build).
    Publishing hard-links the shard files into the new version when the
    group's membership is unchanged (no case of it or near it quarantined);
    otherwise the cases are read back from it.  A killed build's complete
    fragments are taken by the next build like staged cases
    (:func:`pipelines.build.incremental.read_fragments`).

    Parameters
    ----------
    staging : Path
        The build's staging folder.
    plan : Plan
        Uses ``shard_slices``, ``crop_shape``, ``store_dtype``.
    cases : list of dict
        Per case in store order: ``arrays`` (the staged arrays), ``record`` (its
        store record, :func:`case_record`) and ``summary`` (what the client keeps).

    Returns
    -------
    dict
        ``{"key", "path", "sizes", "sep"}`` (``sizes`` of :func:`shard_files`, whose key
        separator is ``sep``) and, per case, its ``first`` slice in the fragment.
    """
    import shutil

    shard = plan.shard_slices
    gkey = group_key([c["record"]["key"] for c in cases], shard)
    path = staging / f"{gkey}{incremental.FRAGMENT_SUFFIX}"
    shutil.rmtree(path, ignore_errors=True)  # an older attempt at the same group
    total = sum(int(c["arrays"]["images"].shape[0]) for c in cases)
    n_shards = max(1, -(-total // shard))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_image_arrays(root, n_slices=n_shards * shard, slice_shape=tuple(plan.crop_shape),
                        image_dtype=plan.store_dtype, shard_slices=shard)
    bounds = np.cumsum([0] + [int(c["arrays"]["images"].shape[0]) for c in cases])
    _write_fragment_shards(ShardWriter(path), cases, bounds, n_shards, tuple(plan.crop_shape),
                           plan.store_dtype)
    firsts = [int(f) for f in bounds[:-1]]
    fsync_path(_write_records(path, gkey, [c["record"] for c in cases]) / "zarr.json")
    sep = root["images"].metadata.chunk_key_encoding.separator
    files = shard_files(path, 0, n_shards, sep)
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    info = {"key": gkey, "path": str(path), "sizes": sizes, "sep": sep}
    summary = {**info, "files": [f.relative_to(path).as_posix() for f in files],
               "cases": [{**c["summary"], "slices": np.asarray(c["summary"]["slices"]).tolist(),
                          "first": first} for c, first in zip(cases, firsts)]}
    incremental.atomic_write_text(path / "summary.json", json.dumps(summary))
    return {**info, "first": firsts}


def _write_fragment_shards(writer: ShardWriter, cases: list[dict[str, Any]], firsts: np.ndarray,
                           n_shards: int, shape: tuple[int, int], dtype: str) -> None:
    """Shard by shard, through one shard-sized buffer: assembling the whole group first held a
    second copy of it (a worker's peak memory grew by ~60 MiB for a 16-case group)."""
    shard = writer.shard
    images = np.empty((shard, *shape), dtype=dtype)
    labels = np.empty((shard, *shape), dtype=np.uint8)
    for j in range(n_shards):
        lo, hi = j * shard, (j + 1) * shard
        images[:] = 0
        labels[:] = 0
        for c, first, last in zip(cases, firsts[:-1], firsts[1:]):
            a, b = max(lo, int(first)), min(hi, int(last))
            if a < b:
                images[a - lo:b - lo] = c["arrays"]["images"][a - first:b - first]
                labels[a - lo:b - lo] = c["arrays"]["labels"][a - first:b - first]
        writer.write(lo, images, labels)


def _whole_fragment(members: list[dict[str, Any]], gkey: str) -> dict[str, Any] | None:
    """The fragment holding exactly this group (every member from it, same key), if any."""
    frags = [m.get("fragment") for m in members]
    if all(m.get("source") == "fragment" for m in members) and all(
            f is not None and f["key"] == gkey for f in frags):
        return frags[0]
    return None


class _Fragment:
    """Slices and records of one group fragment (:func:`write_fragment`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images = zarr.open_array(str(path / "images"), mode="r")
        self.labels = zarr.open_array(str(path / "labels"), mode="r")
        self._records: dict[str, dict[str, Any]] | None = None

    def slices(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.images[lo:hi]), np.asarray(self.labels[lo:hi])

    def record(self, gkey: str, case_id: str) -> dict[str, Any]:
        if self._records is None:  # read once per fragment
            attrs = json.loads((self.path / "records" / gkey / "zarr.json").read_text())["attributes"]
            self._records = {r["case_id"]: r for r in attrs["cases"]}
        return self._records[case_id]


class _OldVersion:
    """Lazy access to the previous version's slices and records (one open per task)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        root = zarr.open_group(str(path), mode="r")
        self.images, self.labels = root["images"], root["labels"]
        self.sep = self.images.metadata.chunk_key_encoding.separator
        self._groups = {g[0]: g for g in root["case_table"].attrs["groups"]}
        self._sizes: dict[tuple[str, int], int] = {}  # (array, shard) -> bytes written
        for g in self._groups.values():
            if len(g) > 5:
                first, n = g[1], g[2]
                for j, size in enumerate(g[5]):
                    name = "images" if j < n else "labels"
                    self._sizes[(name, first + j % n)] = size
        self._records: dict[str, dict[str, Any]] = {}

    def slices(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        shard = self.images.shards[0]
        for name in ("images", "labels"):  # zarr would read a missing shard as zeros
            for k in range(lo // shard, (hi - 1) // shard + 1):
                f = shard_path(self.path, name, k, self.sep)
                size = self._sizes.get((name, k))
                if size != 0 and (not f.is_file() or (size is not None and f.stat().st_size != size)):
                    raise FileNotFoundError(f"store shard {f} is missing: the previous version is "
                                            "damaged; delete OUT/versions and OUT/store.zarr to rebuild")
        return np.asarray(self.images[lo:hi]), np.asarray(self.labels[lo:hi])

    def shard_size(self, name: str, k: int) -> int | None:
        """Bytes of shard ``k`` of ``name`` as recorded when it was written (``None``: unknown)."""
        return self._sizes.get((name, k))

    def record(self, gkey: str, case_id: str) -> dict[str, Any]:
        if gkey not in self._records:
            attrs = json.loads((self.path / "records" / gkey / "zarr.json").read_text())["attributes"]
            self._records[gkey] = {r["case_id"]: r for r in attrs["cases"]}
        return self._records[gkey][case_id]


def case_record(meta: dict[str, Any], hashes: dict[str, str]) -> dict[str, Any]:
    """The store's record of one case (everything needed to put a prediction back)."""
    case = meta["case"]
    return {"case_id": meta["case_id"], "key": meta["key"], "layout": case["layout"],
            "source_files": incremental.case_files(case), "input_hashes": hashes,
            "patient": case.get("patient") or meta["case_id"],
            "cine": case.get("cine"), "frames": meta["frames"], "fingerprint": meta["fingerprint"],
            "warnings": meta["warnings"], "n_slices": meta["n_slices"]}


def read_records(store_path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(cases, frames)`` of a store version: per case its record, and the frames in store order.

    Each case record has ``frames``: the indices of its frames in the returned
    ``frames`` list (the values of the ``frame_index`` array).
    """
    cases, frames = [], []
    for rec in iter_records(store_path):
        first = len(frames)
        frames.extend(rec["frames"])
        cases.append({**{k: v for k, v in rec.items() if k != "frames"},
                      "frames": list(range(first, len(frames)))})
    return cases, frames


def iter_records(store_path: str | Path) -> Iterator[dict[str, Any]]:
    """The case records of a store version in store order, one group's file read at a time
    (what the caller keeps of each is all that stays in memory)."""
    path = Path(store_path).resolve()
    meta = json.loads((path / "case_table" / "zarr.json").read_text())["attributes"]
    for gkey, *_ in meta["groups"]:
        yield from json.loads((path / "records" / gkey / "zarr.json").read_text())["attributes"]["cases"]


def provenance(plan: Plan, build_id: str) -> dict[str, Any]:
    """Plan, package versions and time of a build (input hashes are in the case records)."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    versions = {"cmrprep": cmrprep.__version__, "numpy": np.__version__}
    versions.update({d: _version(d) for d in ("zarr", "dask", "nibabel", "SimpleITK")})
    return {"build_id": build_id, "plan": plan.to_dict(),
            "versions": {**versions, "python": platform.python_version()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _attributes(plan: Plan, stats: dict[str, Any], n_cases: int, n_frames: int,
                build_id: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "build_key": build_id,
        "classes": list(plan.classes),
        "spacing": [plan.target_spacing, plan.target_spacing],
        "n_cases": n_cases,
        "n_frames": n_frames,
        "class_counts": stats["class_counts"],
        "class_counts_raw": stats["class_counts_raw"],
        "class_weights": stats["class_weights"],
        "class_weights_all": stats["class_weights_all"],
        "class_weight_scheme": plan.weight_scheme,
        "class_statistics": stats["summary_after_crop"],
        "sampling": {"foreground_share": plan.foreground_share,
                     "balance_classes": plan.balance_classes,
                     "expected_class_share": stats["expected"],
                     "natural_class_share": stats["natural"]},
        "plan": plan.to_dict(),
        "provenance": provenance(plan, build_id),
    }
