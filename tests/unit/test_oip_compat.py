"""edgecut[cloud] installs beside the current tritonclient[grpc] and ray[serve].

tritonclient pins protobuf<7, so edgecut's generated code must load on a protobuf 6 runtime: its
gencode version is the floor pyproject declares, and it runs the runtime's own version guard at
that floor. The slow test asks pip to resolve all three together, as a user's install would.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import runtime_version
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
GENCODE = sorted((ROOT / "edgecut/v1").glob("*_pb2.py"))
GUARD = re.compile(
    r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"
)


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cloud"]]
    return {r.name: r for r in reqs}


def floor(req: Requirement) -> Version:
    return min(Version(s.version) for s in req.specifier if s.operator == ">=")


def gencode_version(path: Path) -> Version:
    found = GUARD.search(path.read_text())
    assert found, f"{path.name}: no runtime version guard"
    return Version(".".join(found.groups()))


def test_gencode_loads_on_the_declared_protobuf_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    low = floor(declared()["protobuf"])
    assert GENCODE
    for path in GENCODE:
        made = gencode_version(path)
        # protobuf <= 6 runtimes refuse gencode of another major; every runtime refuses newer gencode
        assert made.major == low.major and made <= low, (path.name, str(made), str(low))
        monkeypatch.setattr(runtime_version, "MAJOR", low.major)
        monkeypatch.setattr(runtime_version, "MINOR", low.minor)
        monkeypatch.setattr(runtime_version, "PATCH", low.micro)
        runtime_version.ValidateProtobufRuntimeVersion(
            runtime_version.Domain.PUBLIC, made.major, made.minor, made.micro, "", path.name
        )


def test_grpc_floor_is_the_generator_version() -> None:
    low = floor(declared()["grpcio"])
    for path in sorted((ROOT / "edgecut/v1").glob("*_pb2_grpc.py")):
        found = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
        assert found and Version(found.group(1)) <= low, path.name


def test_protobuf_range_meets_installed_tritonclient() -> None:
    try:
        requires = importlib.metadata.requires("tritonclient") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tritonclient is not installed (edgecut[dev] installs it)")
    theirs = [Requirement(r) for r in requires if r.startswith("protobuf") and "grpc" in r]
    assert theirs, requires
    ours = declared()["protobuf"].specifier
    assert floor(declared()["protobuf"]) in theirs[0].specifier, (str(ours), str(theirs[0].specifier))


@pytest.mark.slow
def test_pip_resolves_cloud_with_current_tritonclient_and_ray_serve(tmp_path: Path) -> None:
    """A real resolution against the package index (no install): nothing falls back to an old
    tritonclient, and protobuf lands on a 6.x that every generated file accepts."""
    pip = [sys.executable, "-m", "pip"]
    newest = subprocess.run([*pip, "index", "versions", "tritonclient"], capture_output=True, text=True)
    latest = re.search(r"tritonclient \(([^)]+)\)", newest.stdout)
    assert latest, newest.stdout + newest.stderr
    report = tmp_path / "report.json"
    wanted = [f"{ROOT}[cloud]", "tritonclient[grpc]", "ray[serve]"]
    run = subprocess.run(
        [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *wanted],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = {
        i["metadata"]["name"].lower(): Version(i["metadata"]["version"])
        for i in json.loads(report.read_text())["install"]
    }
    assert got["tritonclient"] == Version(latest.group(1))
    assert got["protobuf"] >= max(gencode_version(p) for p in GENCODE)
    assert {"ray", "grpcio-health-checking", "grpcio-reflection"} <= set(got)
