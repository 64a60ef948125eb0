"""What a results file records about how it was made: the code revision and the package versions.

A figure nobody can tie to the code and libraries that produced it cannot be compared with the
next one, so every committed result (the sweep, every script in `benchmarks/`) records both, and
all of them take them from here: one way to ask git, one way to read versions.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout edgecut runs from (an editable install)


def code_revision() -> str:
    """`git describe --always --dirty` of the edgecut checkout (whatever the current directory),
    or why there is none. Take it when a run starts: that is the code that runs, whatever is edited
    while it runs."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc.__class__.__name__})"
    return out.stdout.strip() or f"unknown (git: {out.stderr.strip()[:80]})"


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Python's version, then each named package's ("not installed" where it is missing)."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
