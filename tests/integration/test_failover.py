"""Several tail replicas behind one `--server`: balancing, and a replica killed mid-run.

Three real `edgecut cloud serve` processes on loopback (as in a deployment); the agent is given all
three addresses and balances over them with gRPC round robin. One replica that is carrying streams
is SIGKILLed mid-run: every input must still be answered exactly once, and by the cloud (the other
replicas) rather than by the local fallback.
"""

from __future__ import annotations

import contextlib
import signal
from collections import Counter
from pathlib import Path

from edgecut.cloud.spawn import tail_process
from edgecut.edge.agent import Result, image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths

N_INPUTS = 48
KILL_AT = 10  # results emitted before one replica is killed


def test_replica_killed_mid_run_others_answer_every_input_once(bundles_dir: Path, keys: KeyPaths) -> None:
    photos = [image for _, image in sample_photos()]
    items = [image_input(i, f"photo{i}", photos[i % len(photos)]) for i in range(N_INPUTS)]
    results: list[Result] = []
    killed: list[str] = []
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(tail_process(bundles_dir, keys.service_key, "--threads", "1"))
            for _ in range(3)
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
            session = agent.session
            assert session is not None

            def emit(result: Result) -> None:
                results.append(result)
                if len(results) == KILL_AT:
                    busy = session.peers()[0]  # a replica that is carrying a stream right now
                    proc, address = next(r for r in replicas if busy.endswith(":" + r[1].split(":")[-1]))
                    proc.send_signal(signal.SIGKILL)
                    killed.append(address)

            agent.run(items, emit)
            streams_at_end = len(session.peers())
    assert killed, "no replica was killed"
    assert sorted(r.position for r in results) == list(range(N_INPUTS)), "each input answered once"
    where = Counter(r.where for r in results)
    assert not where["failed"], [r.error for r in results if r.error]
    assert where["cloud"] >= 0.8 * N_INPUTS, where
    assert streams_at_end >= 1
