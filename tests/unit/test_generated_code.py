"""edgecut/v1 is generated from proto/ and committed; fail when someone edits one without the other."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pinned = re.search(r'"grpcio-tools==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml: the dev extra pins grpcio-tools==X (the generator of edgecut/v1)"
    installed = importlib.metadata.version("grpcio-tools")
    if installed != pinned.group(1):  # another generator writes other version guards, not a bug
        pytest.skip(
            f"grpcio-tools {installed} installed; edgecut/v1 is made by {pinned.group(1)} (edgecut[dev])"
        )
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    generated = sorted(tmp_path.rglob("*.py*"))
    assert generated
    for new in generated:
        committed = ROOT / new.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: regenerate (see README)"
        assert committed.read_text() == new.read_text(), (
            f"{committed.relative_to(ROOT)} is stale: regenerate with the command in README.md"
        )
