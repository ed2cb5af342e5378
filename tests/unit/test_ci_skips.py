"""Under CI (CI=true) a skip fails the run (a failure in the call, an error in setup) unless tests/conftest.py
accepts its reason; elsewhere it stays a skip. Runs pytest on a few throwaway tests with this project's
conftest as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = '''
import pytest

def test_skipped_in_the_body():
    pytest.skip("systemd-analyze not installed")

@pytest.mark.skipif(True, reason="cannot mount a tmpfs here")
def test_skipped_by_a_mark():
    pass

@pytest.mark.skipif(True, reason="systemd runs here: the live commands would act on this machine")
def test_accepted():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

def test_passes():
    pass
'''


@pytest.mark.parametrize(("ci", "expected"), [("true", "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error"),
                                              ("", "1 passed, 3 skipped, 1 xfailed")])
def test_skips_fail_under_ci_unless_accepted(tmp_path: Path, ci: str, expected: str) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "CI": ci}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert expected in result.stdout, result.stdout + result.stderr
    if ci:
        assert "skipped under CI" in result.stdout and "systemd-analyze not installed" in result.stdout
