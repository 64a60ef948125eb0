"""Several tail replicas behind one `--server`: balancing, and a replica killed mid-run.

Three real `edgecut cloud serve` processes on loopback (as in a deployment); the agent is given all
three addresses and balances over them with gRPC round robin. One replica that is carrying streams
is SIGKILLed mid-run: every input must still be answered exactly once, and by the cloud (the other
replicas) rather than by the local fallback.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import urllib.request
from collections import Counter
from pathlib import Path

from edgecut.cloud.spawn import tail_process
from edgecut.edge.agent import Result, image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths

N_INPUTS = 48
KILL_AT = 10  # results emitted before one replica is killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bytes_in(metrics_port: int) -> float:
    """Request bytes a replica has received, from its Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("edgecut_bytes_in_total")
    )


def test_replica_killed_mid_run_others_answer_every_input_once(bundles_dir: Path, keys: KeyPaths) -> None:
    photos = [image for _, image in sample_photos()]
    items = [image_input(i, f"photo{i}", photos[i % len(photos)]) for i in range(N_INPUTS)]
    results: list[Result] = []
    served_before_kill: list[float] = []
    with contextlib.ExitStack() as stack:
        metrics = [_free_port() for _ in range(3)]
        replicas = [
            stack.enter_context(
                tail_process(bundles_dir, keys.service_key, "--threads", "1", "--metrics-port", str(port))
            )
            for port in metrics
        ]
        config = EdgeConfig(
            bundles_dir / "effl0",
            ",".join(address for _, address in replicas),
            keys.service_pub,
            cut="c06",
            threads=1,
            in_flight=4,
            deadline_ms=10_000,
        )
        with start_agent(config) as agent:

            def emit(result: Result) -> None:
                results.append(result)
                if len(results) == KILL_AT:  # kill the busiest replica: it has a stream right now
                    served_before_kill.extend(_bytes_in(port) for port in metrics)
                    busiest = served_before_kill.index(max(served_before_kill))
                    replicas[busiest][0].send_signal(signal.SIGKILL)

            agent.run(items, emit)
    assert sum(1 for b in served_before_kill if b > 0) >= 2, served_before_kill  # balanced
    assert sorted(r.position for r in results) == list(range(N_INPUTS)), "each input answered once"
    where = Counter(r.where for r in results)
    assert not where["failed"], [r.error for r in results if r.error]
    assert where["cloud"] >= 0.8 * N_INPUTS, where
