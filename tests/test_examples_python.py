"""Every Python example runs (Triton's interpreter on CPU) and its numbers agree with attnc.reference: each
example exits non-zero when its max error is over its tolerance."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.shared_cache

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "python").glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"decorator.py", "flex.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path):
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    error = re.search(r"max abs error vs attnc\.reference = (\S+)", result.stdout)
    assert error and float(error.group(1)) < 1e-3, result.stdout
