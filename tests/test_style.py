"""The code keeps one style: pyproject.toml's ruff configuration (80
columns, 2-space indentation, no unused or undefined names) over the
package, tests, benchmarks, configs and notebooks."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  pytest.importorskip('ruff', reason='pip install -r requirements-dev.txt')
  proc = subprocess.run(
      [sys.executable, '-m', 'ruff', 'check', '--no-cache',
       '--output-format', 'concise', REPO],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
