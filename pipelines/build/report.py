"""QC report of a build: label-overlay montage, class-frequency plot, summary files.

:func:`write_report` writes into ``out_dir``:

* ``montage.png``: seeded random slices after cropping, image windowed to its
  1-99th percentiles, labels overlaid (RV red, MYO green, LV blue, other classes
  from a fixed palette, alpha 0.4),
  tiles at native resolution with their store index;
* ``class_frequencies.png``: class voxel shares on a log axis, in three groups:
  raw (after resampling, before crop), after crop, and expected under the
  sampling weights;
* ``summary.json`` (machine-readable) and ``summary.md`` (dataset counts, class
  fractions, class weights of every scheme, sampling expectations,
  quarantined cases with reasons, warnings);
* ``index.html``: both PNGs and the summary tables on one page.

Both images are drawn with Pillow (matplotlib's dependency): the montage is composed
with NumPy, the bar chart is a few rectangles and labels; matplotlib cost ~0.85 s of
CPU per build for the chart alone.  Only the montage slices are read from ``images`` /
``labels``, so Zarr arrays can be passed without loading them.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep import sampling, stats
from cmrprep import weights as weights_mod
from cmrprep.cases import CLASSES

__all__ = ["write_report", "montage_indices", "CLASS_COLOURS", "class_colours"]

log = logging.getLogger(__name__)

#: RGB overlay colour per foreground class (index 1 RV, 2 MYO, 3 LV); background is not drawn.
CLASS_COLOURS: dict[int, tuple[float, float, float]] = {1: (0.9, 0.15, 0.15), 2: (0.15, 0.8, 0.2),
                                                        3: (0.2, 0.45, 1.0)}
_NAMED_COLOURS = {"RV": CLASS_COLOURS[1], "MYO": CLASS_COLOURS[2], "LV": CLASS_COLOURS[3]}
_PALETTE = ((1.0, 0.6, 0.0), (0.7, 0.2, 0.9), (0.0, 0.8, 0.8), (0.9, 0.9, 0.1), (1.0, 0.4, 0.7),
            (0.5, 0.3, 0.1), (0.5, 0.8, 0.4), (0.4, 0.4, 0.7))


def class_colours(classes: Sequence[str] = CLASSES) -> dict[int, tuple[float, float, float]]:
    """Overlay colour per foreground class index: RV red, MYO green, LV blue, others a palette.

    >>> class_colours(("background", "LV"))
    {1: (0.2, 0.45, 1.0)}
    >>> sorted(class_colours(("background", "RV", "MYO", "LV", "scar")))
    [1, 2, 3, 4]
    """
    out, spare = {}, iter(_PALETTE * (1 + len(classes) // len(_PALETTE)))
    for i, name in enumerate(classes):
        if i:
            out[i] = _NAMED_COLOURS.get(name) or next(spare)
    return out


def _bar_colours(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    colours = class_colours(classes)
    return [(140, 140, 140)] + [tuple(int(round(255 * v)) for v in colours[i]) for i in range(1, len(classes))]

OVERLAY_ALPHA = 0.4
_MAX_ARRAY_IN_JSON = 1000
Table = tuple[list[str], list[list[str]]]


def write_report(out_dir: str | Path, *, images: Any, labels: Any,
                 slice_counts_raw: Sequence[Sequence[int]] | np.ndarray, slice_counts: np.ndarray,
                 weights: np.ndarray, summary: dict[str, Any], quarantined: list[dict[str, Any]],
                 warnings: list[dict[str, Any]], seed: int, n_montage: int = 24,
                 classes: Sequence[str] = CLASSES) -> dict[str, Path]:
    """Write the QC report files into ``out_dir`` (created if needed).

    Parameters
    ----------
    out_dir : path
        Report folder, e.g. ``OUT/report``.
    images, labels : array-like of shape (N, H, W)
        Stored slices after cropping (NumPy or Zarr); only montage slices are read.
    slice_counts_raw : array-like of shape (M, C) or (C,)
        Class counts before cropping (per case, per slice or dataset totals).
    slice_counts : ndarray of shape (N, C)
        Per-slice class counts after cropping.
    weights : ndarray of shape (N,)
        Sampling weights of the slices.
    summary : dict
        Build information to include (e.g. plan, counts); copied into
        ``summary.json`` under ``"build"``.  NumPy arrays longer than 1000
        elements are replaced by their shape and dtype.  Optional keys used:
        ``class_weights_all`` ({scheme: weights}) and ``class_weight_scheme``.
    quarantined, warnings : list of dict
        ``Problem.to_dict()`` records (``case_id``, ``file``, ``check``, ``message``).
    seed : int
        Seed of the montage slice choice.
    n_montage : int
        Number of montage slices (fewer if the dataset is smaller).
    classes : sequence of str
        Class names, background first (the store's ``classes`` attribute).

    Returns
    -------
    dict of str to Path
        ``montage``, ``class_frequencies``, ``summary_json``, ``summary_md``, ``index_html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = tuple(classes)
    counts = np.asarray(slice_counts, dtype=np.int64).reshape(-1, len(classes))
    doc = _summary_document(counts, slice_counts_raw, weights, summary, quarantined, warnings, seed)
    doc["classes"] = list(classes)
    paths = {"montage": out / "montage.png", "class_frequencies": out / "class_frequencies.png",
             "summary_json": out / "summary.json", "summary_md": out / "summary.md",
             "index_html": out / "index.html"}
    picked = montage_indices(counts.shape[0], n_montage, seed)
    _save_montage(paths["montage"], images, labels, picked, classes)
    fractions = {name: doc[key]["class_fractions"] for name, key in
                 (("raw (resampled)", "raw"), ("after crop", "after_crop"))}
    fractions["under sampling weights"] = doc["sampling"]["weighted"]["voxel_share"]
    _save_frequency_plot(paths["class_frequencies"], fractions, classes)
    doc["montage_slices"] = [int(i) for i in picked]
    paths["summary_json"].write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")
    sections = _sections(doc)
    # file names that are not UTF-8 (surrogate-escaped by Python) are shown as \udcxx escapes
    paths["summary_md"].write_text(_markdown(sections), encoding="utf-8", errors="backslashreplace")
    paths["index_html"].write_text(_html(sections, paths), encoding="utf-8", errors="backslashreplace")
    log.info("QC report written to %s (%d slices, %d quarantined)", out, counts.shape[0], len(quarantined))
    return paths


# -- summary document ------------------------------------------------------------
def _summary_document(counts: np.ndarray, raw: Any, weights: np.ndarray, summary: dict[str, Any],
                      quarantined: list[dict[str, Any]], warnings: list[dict[str, Any]],
                      seed: int) -> dict[str, Any]:
    raw_table = np.asarray(raw, dtype=np.int64).reshape(-1, counts.shape[1])
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (counts.shape[0],):
        raise ValueError(f"weights has shape {w.shape}, expected ({counts.shape[0]},) like slice_counts")
    scheme = summary.get("class_weight_scheme") or summary.get("weight_scheme") or "median_frequency"
    class_weights = summary.get("class_weights_all")
    if class_weights is None:
        class_weights = weights_mod.compute_all(counts, scheme)["weights"] if counts.size else {}
    natural = np.full(counts.shape[0], 1.0 / max(counts.shape[0], 1))
    has_slices = counts.shape[0] > 0 and w.sum() > 0
    return {
        "seed": int(seed),
        "raw": stats.summarize(raw_table),
        "after_crop": stats.summarize(counts),
        "class_weights": {"default": scheme, "weights": _jsonable(class_weights)},
        "sampling": {
            "natural": sampling.expected_class_share(counts, natural) if has_slices else None,
            "weighted": (sampling.expected_class_share(counts, w) if has_slices
                         else {"voxel_share": [0.0] * counts.shape[1], "slice_presence": [0.0] * counts.shape[1],
                               "foreground_slices": 0.0}),
        },
        "quarantined": [_jsonable(q) for q in quarantined],
        "warnings": [_jsonable(x) for x in warnings],
        "build": _jsonable(summary),
    }


def _jsonable(obj: Any) -> Any:
    """Recursively turn NumPy values into JSON types; large arrays become a descriptor."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.size > _MAX_ARRAY_IN_JSON:
            return {"array_shape": list(obj.shape), "dtype": str(obj.dtype)}
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json_default(obj: Any) -> Any:
    return str(obj)


# -- plots -----------------------------------------------------------------------
def montage_indices(n_slices: int, n_montage: int, seed: int) -> np.ndarray:
    """Sorted indices of the montage slices: ``n_montage`` of ``n_slices`` drawn with ``seed``."""
    n = min(max(int(n_montage), 0), n_slices)
    return np.sort(np.random.default_rng(seed).choice(n_slices, size=n, replace=False))


def _overlay_tile(image: np.ndarray, label: np.ndarray,
                  colours: dict[int, tuple[float, float, float]] = CLASS_COLOURS) -> np.ndarray:
    """Windowed grey image (1-99th percentile) with class colours blended at ``OVERLAY_ALPHA``."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1.0, 99.0]) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lab = np.asarray(label)
    for cls, colour in colours.items():
        mask = lab == cls
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.asarray(colour)
    return rgb


def _save_montage(path: Path, images: Any, labels: Any, picked: np.ndarray,
                  classes: Sequence[str] = CLASSES) -> None:
    """One mosaic PNG at native resolution (tiles 1:1, slice index in yellow, legend below).

    Composed with NumPy and written by Pillow (matplotlib's dependency): a
    figure adds nothing to a grid of images and costs ~0.3 s to render.
    """
    from PIL import Image, ImageDraw

    colours = class_colours(classes)
    # tiles as 8-bit RGB straight away: float mosaics of 24 tiles held ~40 MiB at the peak
    tiles = [np.round(_overlay_tile(np.asarray(images[int(i)]), np.asarray(labels[int(i)]), colours)
                      * 255).astype(np.uint8) for i in picked]
    h, w = tiles[0].shape[:2] if tiles else (128, 128)
    cols = max(min(len(tiles), 6 if len(tiles) <= 36 else 10), 1)
    rows = max(-(-len(tiles) // cols), 1)
    legend_h = 20
    mosaic = np.full((rows * h + legend_h, max(cols * w, 240), 3), 255, dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        mosaic[r * h:r * h + tile.shape[0], c * w:c * w + tile.shape[1]] = tile[:h, :w]
    img = Image.fromarray(mosaic)
    draw = ImageDraw.Draw(img)
    for n, idx in enumerate(picked):
        r, c = divmod(n, cols)
        draw.text((c * w + 3, r * h + 2), str(int(idx)), fill=(255, 255, 0))
    if not tiles:
        draw.text((8, 8), "no slices", fill=(0, 0, 0))
    x = 8
    for cls in sorted(colours):
        colour = tuple(int(round(255 * v)) for v in colours[cls])
        draw.rectangle((x, rows * h + 5, x + 10, rows * h + 15), fill=colour)
        draw.text((x + 14, rows * h + 5), classes[cls], fill=(0, 0, 0))
        x += 80
    img.save(path, format="PNG", compress_level=3)  # 3x faster than the default 6, and smaller here


def _font(size: int):
    """Pillow's bundled scalable font (Pillow >= 10.1), else its bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def _text(draw, xy: tuple[float, float], text: str, font, anchor: str = "lt",
          fill: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Draw ``text`` aligned at ``xy`` (anchor: horizontal l/m/r + vertical t/m/b), any font."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    dx = {"l": 0.0, "m": w / 2, "r": w}[anchor[0]]
    dy = {"t": 0.0, "m": h / 2, "b": h}[anchor[1]]
    draw.text((xy[0] - dx - left, xy[1] - dy - top), text, font=font, fill=fill)


def _save_frequency_plot(path: Path, fractions: dict[str, list[float]],
                         classes: Sequence[str] = CLASSES) -> None:
    """Grouped bars (one group per stage, one bar per class) on a log axis, drawn with Pillow.

    The chart is a handful of rectangles and labels; matplotlib cost ~0.85 s of CPU per
    build for it (import, font loading, layout), about 7 % of a 100-case build.
    """
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 700, 400, 64, 16, 56, 44
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(10)
    groups = list(fractions)
    n_cls = len(classes)
    bar_colours = _bar_colours(classes)
    positive = [v for vals in fractions.values() for v in vals if v > 0]
    lo = int(np.floor(np.log10(min(positive) / 3))) if positive else -6
    hi = 0.35  # log10 of the axis top: room above 100 % for the value labels

    def y_of(v: float) -> float:
        frac = (np.log10(max(v, 10.0 ** lo)) - lo) / (hi - lo)
        return top + (1.0 - frac) * (height - top - bottom)

    for e in range(lo, 1):  # decades: grid line and label
        y = y_of(10.0 ** e)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        _text(draw, (left - 4, y), _pct(10.0 ** e), small, "rm")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=(0, 0, 0))
    group_w = (width - left - right) / max(len(groups), 1)
    bar_w = 0.8 * group_w / n_cls
    for g, name in enumerate(groups):
        centre = left + (g + 0.5) * group_w
        for c in range(n_cls):
            v = fractions[name][c] if c < len(fractions[name]) else 0.0
            x0 = centre + (c - n_cls / 2) * bar_w
            y = y_of(v) if v > 0 else height - bottom
            if v > 0:
                draw.rectangle([x0 + 1, y, x0 + bar_w - 1, height - bottom - 1], fill=bar_colours[c])
            _text(draw, (x0 + bar_w / 2, y - 2), _pct(v), small, "mb")
        _text(draw, (centre, height - bottom + 6), name, font, "mt")
    _text(draw, (width / 2, 8), "Class frequencies (voxel share, log scale)", _font(14), "mt")
    x = left + 4
    for c in range(n_cls):  # legend
        draw.rectangle([x, 32, x + 10, 42], fill=bar_colours[c])
        _text(draw, (x + 14, 37), classes[c], small, "lm")
        x += min(100, (width - left - right) // n_cls)
    img.save(path, format="PNG", compress_level=3)  # 3x faster than the default 6, and smaller here


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%"


# -- text outputs ----------------------------------------------------------------
def _sections(doc: dict[str, Any]) -> list[tuple[str, str | Table]]:
    """(title, paragraph or table) pairs shared by the Markdown and HTML outputs."""
    crop, raw = doc["after_crop"], doc["raw"]
    weighted, natural = doc["sampling"]["weighted"], doc["sampling"]["natural"]
    n_frames = doc["build"].get("n_frames", crop.get("n_frames"))
    lines = [f"slices: {crop['n_slices']}", f"voxels after crop: {crop['n_voxels']}",
             f"voxels before crop: {raw['n_voxels']}", f"quarantined cases: {len(doc['quarantined'])}",
             f"warnings: {len(doc['warnings'])}", f"montage seed: {doc['seed']}"]
    if n_frames is not None:
        lines.insert(1, f"frames: {n_frames}")
    for key in ("cases", "processed", "reused"):
        if isinstance(doc["build"].get(key), int):
            lines.insert(0 if key == "cases" else len(lines), f"{key}: {doc['build'][key]}")
    fractions = (["class", "raw (resampled)", "after crop", "under sampling weights",
                  "slices containing (after crop)", "slices containing (sampled)"],
                 [[name, _pct(raw["class_fractions"][c]), _pct(crop["class_fractions"][c]),
                   _pct(weighted["voxel_share"][c]), _pct(crop["slice_presence"][c]),
                   _pct(weighted["slice_presence"][c])] for c, name in enumerate(doc["classes"])])
    default = doc["class_weights"]["default"]
    weights_rows = [[f"{name} (default)" if name == default else name] + [f"{v:.4g}" for v in vals]
                    for name, vals in doc["class_weights"]["weights"].items()]
    nat_fg = natural["foreground_slices"] if natural else 0.0
    sampling_text = (f"Slices with foreground: {_pct(nat_fg)} of the dataset, {_pct(weighted['foreground_slices'])} "
                     f"of drawn slices. Background-only slices: {_pct(crop['empty_slice_share'])} of the dataset.")
    return [("Dataset", "; ".join(lines) + "."),
            ("Class fractions", fractions),
            ("Class weights (mean over classes = 1)", (["scheme"] + doc["classes"], weights_rows)),
            ("Sampling expectations", sampling_text),
            ("Quarantined cases", _problem_table(doc["quarantined"], "No case was quarantined.")),
            ("Warnings", _problem_table(doc["warnings"], "No warnings."))]


def _problem_table(records: list[dict[str, Any]], empty: str) -> str | Table:
    if not records:
        return empty
    keys = ["case_id", "check", "file", "message"]
    return keys, [[str(r.get(k) or "") for k in keys] for r in records]


def _markdown(sections: list[tuple[str, str | Table]]) -> str:
    out = ["# cmrprep QC report", ""]
    for title, body in sections:
        out += [f"## {title}", ""]
        if isinstance(body, str):
            out += [body, ""]
            continue
        header, rows = body
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        out.append("| " + " | ".join(cell(h) for h in header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _html(sections: list[tuple[str, str | Table]], paths: dict[str, Path]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>cmrprep QC report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             "</head><body>", "<h1>cmrprep QC report</h1>"]
    parts += [f"<h2>{t}</h2><img src='{esc(paths[k].name)}' alt='{t}' style='max-width:100%'>"
              for t, k in (("Montage (labels overlaid)", "montage"), ("Class frequencies", "class_frequencies"))]
    for title, body in sections:
        parts.append(f"<h2>{esc(title)}</h2>")
        if isinstance(body, str):
            parts.append(f"<p>{esc(body)}</p>")
            continue
        header, rows = body
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(f"<p><a href='{esc(paths['summary_json'].name)}'>summary.json</a></p></body></html>")
    return "\n".join(parts) + "\n"


# -- the build's report ------------------------------------------------------------
N_MONTAGE = 24


def render_build_report(out: Path, result: Any, plan: Any) -> Path:
    """Render ``OUT/report`` from the published store ``OUT/store.zarr``.

    The report reads the store it describes (montage slices, per-slice class
    counts, sampling weights, attributes), so it shows what a trainer will
    read.  It is written beside ``OUT/report`` and swapped in by a rename, so
    a failed rendering leaves the previous report whole.  ``result`` is the
    :class:`~pipelines.build.config.BuildResult` (counts, quarantined cases,
    warnings); ``plan`` the :class:`~cmrprep.plan.Plan`.
    """
    import zarr

    root = zarr.open_group(str(out / "store.zarr"), mode="r")
    attrs = dict(root.attrs)
    classes = tuple(attrs.get("classes") or plan.classes)
    real = np.flatnonzero(np.asarray(root["case_index"][...]) >= 0)  # padding slices left out
    summary = {
        "plan": plan.to_dict(), "class_weight_scheme": plan.weight_scheme,
        "class_weights_all": attrs.get("class_weights_all"),
        "class_counts_raw": attrs.get("class_counts_raw"), "class_counts": attrs.get("class_counts"),
        "expected_class_share": attrs.get("sampling", {}).get("expected_class_share"),
        "cases": result.n_cases, "slices": result.n_slices,
        "processed": len(result.processed), "reused": len(result.reused),
    }
    tmp = out / f".report-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_report(tmp, images=_Rows(root["images"], real), labels=_Rows(root["labels"], real),
                     slice_counts_raw=np.asarray(attrs.get("class_counts_raw", [0] * len(classes))),
                     slice_counts=np.asarray(root["class_counts"][...])[real],
                     weights=np.asarray(root["weights"][...])[real], summary=summary,
                     quarantined=list(result.quarantined), warnings=list(result.warnings),
                     seed=int(plan.seed), n_montage=N_MONTAGE, classes=classes)
        final, old = out / "report", out / f".report-old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "report"


class _Rows:
    """Row ``i`` of ``array`` is ``array[rows[i]]`` (the store's real slices, read one at a time:
    one selection of all montage slices decodes their chunks at once, ~15 MiB more peak memory)."""

    def __init__(self, array: Any, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[int(self.rows[int(i)])])


def remove_stale(out: Path) -> None:
    """Delete report folders left half-written by a killed build."""
    for p in list(out.glob(".report-tmp-*")) + list(out.glob(".report-old-*")):
        shutil.rmtree(p, ignore_errors=True)
