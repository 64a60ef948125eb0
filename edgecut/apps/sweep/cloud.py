"""The tail service a sweep talks to: spawned on loopback for the run, or one given by address.

A spawned service is a separate process (as in production, and so the edge and the tail do not
share one interpreter lock) serving only the swept bundle, with throwaway keys and no batching
wait: the sweep sends one request at a time, and a lone request would otherwise sit out
`max_queue_delay_ms` for batch-mates that never come. Its tail profile (measured at warm-up) and
queue delay come from `ServerInfo`, asked directly — control traffic, not through the emulated
link.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgecut import serverinfo
from edgecut.bundle import Bundle
from edgecut.credentials import ClientCredentials
from edgecut.errors import ProfileError, UsageError
from edgecut.netem import parse_address
from edgecut.serverinfo import TailInfo

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Endpoint:
    """A reachable tail service and the public key frames must be sealed to."""

    address: str  # HOST:PORT
    server_pub: Path  # its service.pub
    spawned: bool  # started by this sweep
    threads: int  # ORT threads of a spawned service (0 = all cores); -1 when not known


@contextlib.contextmanager
def endpoint(
    bundle: Bundle, address: str | None, server_pub: Path | None, threads: int = 0
) -> Iterator[Endpoint]:
    """Yield the service to use: the one at `address`, or a fresh one serving only `bundle`."""
    if address is not None:
        parse_address(address)
        if server_pub is None:
            raise UsageError(
                "--server needs --server-key (the service's service.pub: frames are sealed to it)"
            )
        yield Endpoint(address, server_pub, False, -1)
        return
    from edgecut.cloud.spawn import tail_service
    from edgecut.keys import generate_keys

    with tempfile.TemporaryDirectory(prefix="edgecut-sweep-") as tmp:
        served = Path(tmp) / "bundles"
        served.mkdir()
        (served / bundle.root.name).symlink_to(bundle.root.resolve(), target_is_directory=True)
        keys = generate_keys(Path(tmp) / "keys")
        with tail_service(
            served, keys.service_key, "--max-queue-delay-ms", "0", "--threads", str(threads)
        ) as spawned:
            log.info("tail service spawned on %s (threads=%s)", spawned, threads or "all")
            yield Endpoint(spawned, keys.service_pub, True, threads)


def tail_info(
    address: str, model: str, version: str, credentials: ClientCredentials | None = None
) -> TailInfo:
    """Ask `ServerInfo`; one clear error when unreachable, not serving the model, or unprofiled."""
    info = serverinfo.ask(address, model, version, timeout_s=INFO_TIMEOUT_S, credentials=credentials)
    if info.unprofiled:
        raise ProfileError(
            f"tail service {address} reports no timing for segment(s) "
            f"{', '.join(info.unprofiled)}: the planner cannot predict its side",
            hint="start it with warm-up runs (warmup_runs > 0)",
        )
    return info
