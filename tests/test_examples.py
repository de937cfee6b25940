"""The examples run end to end (memory backend, and a single Raft member)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("mode", ["memory", "raft"])
def test_coordination_node_example(mode: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "coordination_node.py", "--mode", mode, "--data-dir", str(tmp_path)],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "cluster is green: 6 active copies" in result.stdout
    assert "reindexing under lock with fencing token" in result.stdout


def test_readme_quickstart_runs() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "green"
    assert "index_created logs" in result.stdout
