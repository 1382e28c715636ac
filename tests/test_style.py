"""The code base stays `ruff` clean (rules E, F, I, UP, B; configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    root = Path(__file__).parents[1]
    proc = subprocess.run([ruff, "check", "--output-format", "concise", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
