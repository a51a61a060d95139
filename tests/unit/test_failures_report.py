"""scripts/failures.py: a failed test's traceback and captured log, printed again at the end
of CI's output, from pytest's own JUnit report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.failures import TAIL_LINES, report

ROOT = Path(__file__).resolve().parents[2]


def test_a_real_pytest_failure_is_reported_with_its_log_and_a_pass_is_not(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import logging\n"
        "def test_passes():\n"
        "    print('quiet pass')\n"
        "def test_fails():\n"
        "    logging.getLogger('x').warning('the daemon said why')\n"
        "    for i in range(200):\n"
        "        print('line', i)\n"
        "    assert 1 + 1 == 3, 'arithmetic broke'\n"
    )
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_logging=all",
            "-o",
            "junit_log_passing_tests=false",
            f"--junitxml={junit}",
            str(tmp_path / "test_sample.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = report(junit)
    assert "FAILED test_sample::test_fails" in text
    assert "arithmetic broke" in text and "the daemon said why" in text
    assert "line 199" in text and "line 0\n" not in text  # the tail, not all of it
    assert "[… " in text
    assert "test_passes" not in text and "quiet pass" not in text
    assert max(len(part.splitlines()) for part in text.split("-----")) <= 3 * (TAIL_LINES + 2)


def test_no_failures_and_no_report_print_nothing(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="a" name="b"/></testsuite></testsuites>')
    assert report(junit) == ""
    script = ROOT / "scripts" / "failures.py"
    for arg in (junit, tmp_path / "missing.xml"):
        proc = subprocess.run(
            [sys.executable, str(script), str(arg)], capture_output=True, text=True, timeout=60
        )
        assert (proc.returncode, proc.stderr) == (0, "")
