"""edgecut/v1 is generated from proto/ and committed; fail when someone edits one without the other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
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
