"""The ``cmrprep`` console script (#13): dispatch, exit codes, not shadowed by a user's model.py."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.cli import COMMANDS, main


def test_dispatch_and_usage_errors(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["ingest", "/nonexistent/raw"]) == 2
    for name, (module, _) in COMMANDS.items():
        assert callable(getattr(__import__(module, fromlist=["main"]), "main")), name


def test_installed_script_is_not_shadowed_by_a_users_model_py(tmp_path):
    exe = shutil.which("cmrprep")
    if exe is None:
        pytest.fail("the cmrprep console script is not installed: run `pip install -e .`")
    for name in ("model.py", "pipelines.py", "cmrprep.py"):
        (tmp_path / name).write_text("raise SystemExit('the user\\'s own module was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([exe, "synthesize", "raw", "--cases", "1", "--seed", "2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in Path(tmp_path, "raw").iterdir() if p.is_dir()) == ["patient001"]
    out = subprocess.run([exe, "train", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "--max-minutes" in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_plain_text_with_defaults(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    text = capsys.readouterr().out
    assert "usage:" in text and "(default:" in text
    for markup in ("``", ":func:", ":mod:", ":class:", ":data:"):
        assert markup not in text, f"{name} --help shows reST markup {markup!r}"
