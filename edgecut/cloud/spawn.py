"""Run `edgecut cloud serve` as a child process and wait for its readiness line.

Apps (demo, sweep) and benchmarks start a real tail service this way: a separate process, as in a
deployment, that reports its bound port on stdout (`listening HOST:PORT`) instead of being slept
for. Importing this module loads none of the server code.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from edgecut.errors import UsageError

READY_TIMEOUT_S = 120.0  # the service loads and warms up every bundle before `listening`


@contextlib.contextmanager
def tail_service(bundles: Path, key: Path, *extra: str) -> Iterator[str]:
    """Run `edgecut cloud serve` as a subprocess; yield its HOST:PORT once it says `listening`."""
    with tail_process(bundles, key, *extra) as (_, address):
        yield address


@contextlib.contextmanager
def tail_process(bundles: Path, key: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`tail_service`, also yielding the process (to kill one replica of several, say)."""
    cmd = [
        sys.executable,
        "-m",
        "edgecut.cli",
        "cloud",
        "serve",
        "--bundles",
        str(bundles),
        "--service-key",
        str(key),
        "--port",
        "0",
        "--poll-interval-s",
        "0",
        "--grace-s",
        "1",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, _wait_listening(proc)
    finally:
        stop_process(proc)


def _wait_listening(proc: subprocess.Popen[str]) -> str:
    """Read stdout lines in a thread until `listening HOST:PORT` or the process dies."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            err = proc.stderr.read() if proc.stderr else ""
            tail = err.strip().splitlines()[-1:] or ["no output"]
            raise UsageError(f"tail service exited before listening: {tail[0]}")
        if line.startswith("listening "):
            return line.split()[1]
    raise UsageError(f"tail service did not report `listening` within {READY_TIMEOUT_S:.0f} s")


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    for line in proc.stdout or ():
        lines.put(line.strip())
    lines.put(None)


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> None:
    """SIGTERM (the service drains), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
