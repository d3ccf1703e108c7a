"""The README's "any dataset" examples run as written (fewer cases, a few training steps).

The block after "Try each path on synthetic data" is split into commands (continuation
lines and the multi-line ``FLAT=(...)`` array joined) and run by bash in one shell, with
``--cases N`` set to 3 and ``--max-minutes M`` replaced by a two-step training; every
command must exit 0 except the build that the README says is refused (exit 2) and
``predict``, which may flag the toy model's implausible segmentations (exit 3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_TRAIN = "--epochs 1 --steps-per-epoch 2 --batch-size 4 --filters 4 8 16 --collapse-patience 0"


def _block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("Try each path on synthetic data")
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    return body[: body.index("```")]


def _commands(block: str) -> list[str]:
    commands, current = [], ""
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").rstrip() + " "
        if line.endswith("\\") or current.count("(") > current.count(")"):
            continue
        commands.append(re.sub(r"\s+# .*$", "", current.strip()))  # a trailing comment
        current = ""
    return commands


def test_readme_dataset_examples_run(tmp_path):
    commands = _commands(_block())
    assert sum(c.startswith("python -m pipelines.") for c in commands) >= 12
    script = []
    for i, c in enumerate(commands):
        c = re.sub(r"--cases \d+", "--cases 3", c)
        c = re.sub(r"--max-minutes \d+", QUICK_TRAIN, c)
        c = c.replace("python -m", f"{sys.executable} -m", 1)
        script.append(f"{c} >> log.txt 2>&1; echo \"rc=$? :: {i}\"")
    env = {**os.environ, "PYTHONPATH": str(README.parent), "CI": "true"}
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    codes = [(int(m.group(1)), commands[int(m.group(2))])
             for m in re.finditer(r"rc=(\d+) :: (\d+)", out.stdout)]
    log = (tmp_path / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:] if (tmp_path / "log.txt").exists() else out.stderr
    assert len(codes) == len(commands), out.stdout + log
    refused = [cmd for code, cmd in codes if code == 2]
    assert len(refused) == 1 and "swapped" in refused[0], out.stdout + log
    for code, cmd in codes:  # a few training steps: predict may flag implausible cases (exit 3)
        if cmd not in refused:
            assert code in ((0, 3) if "pipelines.predict" in cmd else (0,)), out.stdout + log
    for folder in ("flat_pred", "dcm_pred"):
        assert (tmp_path / folder / "evaluation" / "summary.md").is_file()
    clinical = (tmp_path / "flat_pred" / "evaluation" / "clinical.csv").read_text(encoding="utf-8")
    assert clinical.count("\n") >= 4  # a header and LV/RV rows per patient
