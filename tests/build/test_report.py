"""Tests of pipelines.build.report: files exist, PNGs decode, Markdown names quarantined cases."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np

from cmrprep import sampling, stats
from pipelines.build.report import write_report


def _data(n=40, size=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.uint8)
    fg = rng.random(n) < 0.4
    labels[fg, 8:20, 8:20] = 2
    labels[fg, 11:17, 11:17] = 3
    labels[fg & (rng.random(n) < 0.5), 2:8, 4:14] = 1
    images = rng.normal(size=(n, size, size)).astype(np.float32)
    return images, labels


def _write(tmp_path, n=40, size=32, images=None, **kw):
    data, labels = _data(n, size)
    images = data if images is None else images
    counts = stats.slice_class_counts(labels)
    w = sampling.sampling_weights(counts)
    q = [{"case_id": "patient099", "file": "p099.nii.gz", "check": "geometry",
          "message": "spacing 0 mm | fix the header"}]
    warn = [{"case_id": "patient003", "file": None, "check": "labels", "message": "no RV"}]
    return write_report(tmp_path / "report", images=images, labels=labels,
                        slice_counts_raw=[counts.sum(0) * 2], slice_counts=counts, weights=w,
                        summary={"n_frames": 4, "sampling_weights": w}, quarantined=q,
                        warnings=warn, seed=3, **kw)


def test_report_files(tmp_path):
    paths = _write(tmp_path)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    for key in ("montage", "class_frequencies"):
        img = mpimg.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 50
    md = paths["summary_md"].read_text()
    assert "patient099" in md and "patient003" in md and "median_frequency" in md
    doc = json.loads(paths["summary_json"].read_text())
    assert doc["quarantined"][0]["case_id"] == "patient099"
    assert set(doc["class_weights"]["weights"]) >= {"enet", "effective_number"}
    assert len(doc["montage_slices"]) == 24
    html = paths["index_html"].read_text()
    assert "montage.png" in html and "class_frequencies.png" in html and "patient099" in html


def test_report_montage_is_seeded(tmp_path):
    a = json.loads(_write(tmp_path / "a")["summary_json"].read_text())["montage_slices"]
    b = json.loads(_write(tmp_path / "b")["summary_json"].read_text())["montage_slices"]
    assert a == b


def test_report_small_dataset(tmp_path):
    paths = _write(tmp_path, n=5)
    assert len(json.loads(paths["summary_json"].read_text())["montage_slices"]) == 5


def test_report_for_3000_slices_reads_only_the_montage_slices(tmp_path):
    """Speed lives in benchmarks; here: a large store is not read beyond the 24 montage slices."""
    class Counting(np.ndarray):
        reads: list = []

        def __getitem__(self, item):
            Counting.reads.append(item)
            return np.ndarray.__getitem__(self, item)

    images = np.zeros((3000, 48, 48), np.float32).view(Counting)
    paths = _write(tmp_path, n=3000, size=48, images=images)
    assert len(Counting.reads) == 24
    assert len(json.loads(paths["summary_json"].read_text())["montage_slices"]) == 24
