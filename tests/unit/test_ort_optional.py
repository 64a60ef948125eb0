"""ONNX Runtime is an extra (`ort`), so a Jetson can use NVIDIA's onnxruntime-gpu instead of the CPU
wheel; without either, the edge says so in one line instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with `onnxruntime` made unimportable, as on a bare core install.
BLOCK = """
import sys
class NoOrt:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoOrt())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_core_dependencies_leave_out_onnxruntime_and_the_extras_bring_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert extras["ort"] == ["onnxruntime>=1.18"]
    for extra in ("edge", "cloud", "partition"):
        assert "edgecut[ort]" in extras[extra], extra


def test_missing_onnxruntime_is_an_import_error_naming_both_wheels() -> None:
    done = _run(
        "try:\n    import edgecut.runtime\nexcept ImportError as e:\n    print(type(e).__name__, e)\n"
        "import edgecut.keys, edgecut.sealing, edgecut.protect, edgecut.planner  # the core still imports\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "OnnxRuntimeMissing ONNX Runtime is not installed (neither onnxruntime nor onnxruntime-gpu)"
    )


def test_edge_cli_without_onnxruntime_is_one_error_line(tmp_path: Path) -> None:
    done = _run(
        "from edgecut.cli import main\n"
        f"raise SystemExit(main(['edge', 'run', '--bundle', {str(tmp_path)!r}, '--cut', 'output']))\n"
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: ONNX Runtime is not installed") and "onnxruntime-gpu" in lines[1]
