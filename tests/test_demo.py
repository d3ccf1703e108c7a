"""The README's first command, without its training part (that is what the benchmarks measure)."""

import json

from pipelines.demo import main, run_demo


def test_demo_builds_a_store_and_report(tmp_path):
    out = tmp_path / "demo"
    assert run_demo(out, cases=4, test_cases=1, workers=0, train=False) == 0
    assert (out / "shards" / "store.zarr" / "zarr.json").exists()
    assert (out / "shards" / "report" / "index.html").exists()
    assert sorted(p.name for p in (out / "raw_test").glob("patient*/*_4d.nii.gz")) == ["patient001_4d.nii.gz"]
    report = json.loads((out / "shards" / "build_report.json").read_text())
    assert report["n_cases"] == 4 and report["exit_code"] == 0
    # re-running is safe and incremental
    assert main([str(out), "--cases", "4", "--workers", "0", "--no-train"]) == 0
    report = json.loads((out / "shards" / "build_report.json").read_text())
    assert report["processed"] == [] and len(report["reused"]) == 4


def test_demo_warns_when_training_ran_far_fewer_steps_than_planned(tmp_path):
    """#12: a slow or busy machine is named instead of a quietly poor Dice."""
    import types

    from pipelines.demo import _few_steps

    (tmp_path / "train_config.json").write_text(json.dumps(
        {"steps_per_epoch": None, "batch_size": 16, "split": {"train_slices": 320}}))
    warning = _few_steps(tmp_path, types.SimpleNamespace(epochs_completed=2), 4.0)
    assert warning and "40 steps in 4 minutes" in warning and "busy machine" in warning
    assert _few_steps(tmp_path, types.SimpleNamespace(epochs_completed=12), 4.0) is None
