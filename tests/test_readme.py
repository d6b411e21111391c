"""The README's examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
FRAMEWORK = {"torch": "sam_edu.torch", "jax": "sam_edu.jax", "tf": "sam_edu.tf"}


def test_there_is_one_example_per_framework():
    for module in FRAMEWORK.values():
        assert sum(f"from {module} import" in b for b in BLOCKS) == 1, module


@pytest.mark.parametrize("name", FRAMEWORK)
def test_example_runs(name):
    pytest.importorskip(FRAMEWORK[name])
    block = next(b for b in BLOCKS if f"from {FRAMEWORK[name]} import" in b)
    assert len(block.strip().splitlines()) <= 20
    run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         env={"TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
                              "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
