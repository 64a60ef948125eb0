"""Every results file records the code and the libraries it was made with, from one place."""

from __future__ import annotations

import os
import platform
import subprocess

from edgecut.provenance import ROOT, code_revision, package_versions


def test_revision_is_the_checkouts_whatever_the_current_directory(tmp_path: os.PathLike[str]) -> None:
    here = os.getcwd()
    os.chdir(tmp_path)  # not a git repository
    try:
        rev = code_revision()
    finally:
        os.chdir(here)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert head and head[:7] in rev, (rev, head)


def test_versions_name_python_and_say_what_is_missing() -> None:
    found = package_versions(["numpy", "no-such-package-edgecut-test"])
    assert found["python"] == platform.python_version()
    assert found["numpy"][0].isdigit()
    assert found["no-such-package-edgecut-test"] == "not installed"
