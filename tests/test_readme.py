"""The README's Python snippets run as written, in a fresh interpreter, on the demo checkpoint they name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from metastone_hf.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_a_quickstart_within_its_first_60_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Quickstart")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    quickstart = "\n".join(lines[start:end])
    assert "num_candidates=" in quickstart and 'search="beam"' in quickstart and "score_trajectories" in quickstart
    first_best_of_n = next(i for i, line in enumerate(lines) if "num_candidates=" in line)
    assert first_best_of_n < 60, first_best_of_n
    assert len(quickstart.strip().splitlines()) <= 30  # the whole section, heading to its last line
    assert len(SNIPPETS[0].splitlines()) <= 30


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(tmp_path, index):
    # What the README's install step leaves behind: the demo's checkpoint under ./metastone-demo (the quick demo here).
    assert (
        main(["demo", "--quick", "--output-dir", str(tmp_path / "metastone-demo"), "--no-progress", "--threads", "1"])
        == 0
    )
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for unwanted in ("not valid and may be ignored", "contains custom code which must be executed", "Traceback"):
        assert unwanted not in proc.stderr + proc.stdout, (unwanted, proc.stderr[-3000:])
    assert "trajectory scores:" in proc.stdout and "step scores of candidate 0:" in proc.stdout
