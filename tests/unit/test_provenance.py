"""The driver and its workers must run the same avgk: the code fingerprint and its check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from avgk.runtime.provenance import CodeMismatch, check_same_code, code_fingerprint, package_dirs
from tests.helpers.runs import ROOT


def _fingerprint_from(path) -> str:
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run([sys.executable, "-c", "from avgk.runtime.provenance import code_fingerprint as f; print(f())"],
                         cwd=path, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_another_checkout_has_another_fingerprint(tmp_path):
    """A copy of the code has the same fingerprint; one changed line in it, another."""
    for name in ("avgk", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert _fingerprint_from(tmp_path) == code_fingerprint()
    engine = tmp_path / "avgk" / "training" / "engine.py"
    engine.write_text(engine.read_text() + "\n# an older checkout\n")
    assert _fingerprint_from(tmp_path) != code_fingerprint()


def test_a_worker_with_other_code_fails_naming_both_fingerprints_and_its_code():
    check_same_code(code_fingerprint(), where="worker")  # same code: passes
    with pytest.raises(CodeMismatch, match=r"worker 3 runs other avgk code than the driver \(fingerprint [0-9a-f]{16}, "
                                           r"driver 0123456789abcdef; it imports avgk from /"):
        check_same_code("0123456789abcdef", where="worker 3")
    assert set(package_dirs()) == {"avgk", "pipelines"}
