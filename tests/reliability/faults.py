"""The edge agent through faults: the tail SIGKILLed and restarted, link resets and stalls, overload.

The agent (`edgecut.edge.startup.start_agent`, fallback `local`) talks to the tail service through
the link emulator (`edgecut.netem`), so the emulator can reset or stall the link and be re-pointed
at a restarted service. Faults fire from the input source at fixed positions, so they land in the
middle of the stream whatever the machine's speed. Every input must yield exactly one result,
computed in the cloud or locally, checked by input position.

The last `RECOVERY_INPUTS` inputs come after every fault has cleared (flood stopped, stall over,
restarted service up) and the agent's reconnect back-off ceiling has passed: they show the agent
back on the cloud. Asserting that earlier would race the back-off, which a slow machine stretches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from relkit import Service, infer_all, spawned_service
from support import EdgeClient

from edgecut.edge.agent import Input, Result, image_input
from edgecut.edge.session import SessionConfig
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths
from edgecut.netem import LinkConfig, ThreadedLinkEmulator, parse_address
from edgecut.v1 import edgecut_pb2_grpc

FAULTS = ("sigkill_restart", "link_reset", "link_stall", "overload")
STALL_RTT_MS = 5000.0  # a stalled link: answers take longer than the agent's deadline
RECOVERY_INPUTS = 3  # sent once every fault has cleared; at least one must be answered by the cloud


@dataclass
class FaultRun:
    inputs: int
    results: list[Result] = field(default_factory=list)
    injected: list[tuple[int, str]] = field(default_factory=list)  # (input position, fault)
    flood_sent: int = 0  # requests of the overload device
    flood_refused: int = 0  # of which RESOURCE_EXHAUSTED
    recovery_from: int = 0  # first input position sent after every fault had cleared

    @property
    def positions(self) -> list[int]:
        return [r.position for r in self.results]

    @property
    def lost(self) -> int:
        return self.inputs - len(set(self.positions) & set(range(self.inputs)))

    @property
    def duplicated(self) -> int:
        return len(self.positions) - len(set(self.positions))

    def where(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.where] = counts.get(r.where, 0) + 1
        return counts


class _Flood:
    """Bursts of valid requests for the agent's own lane (model, cut) from another device."""

    def __init__(self, edge: EdgeClient, feeds: dict[str, np.ndarray], cut: str, address: str) -> None:
        self.edge, self.feeds, self.cut, self.address = edge, feeds, cut, address
        self.sent = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        import grpc

        from edgecut import framing

        with grpc.insecure_channel(self.address, options=framing.grpc_options()) as channel:
            stub = edgecut_pb2_grpc.TailServiceStub(channel)
            while not self._stop.is_set():
                frames = [f for _ in range(64) for f in self.edge.request(self.feeds, self.cut).frames]
                answers, _ = infer_all(stub, frames, timeout_s=60)
                self.sent += len(frames)
                self.refused += sum(a.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for a in answers)


def run_with_faults(
    bundles: Path,
    keys: KeyPaths,
    workdir: Path,
    edge: EdgeClient,
    inputs: int,
    *,
    cut: str = "c06",
    rounds: int = 1,
) -> FaultRun:
    """Run `inputs` photos through the agent while `rounds` × every fault in FAULTS is injected."""
    run = FaultRun(inputs, recovery_from=max(0, inputs - RECOVERY_INPUTS))
    photos = sample_photos()
    flood_feeds = edge.frontier(photos[0][1], cut)
    config = {"max_queue": 8, "max_batch": 2}
    plan = {
        int(inputs * (k + 1) / (len(FAULTS) * rounds + 1)): FAULTS[k % len(FAULTS)]
        for k in range(len(FAULTS) * rounds)
    }
    with contextlib.ExitStack() as stack:
        service: list[Service] = [
            stack.enter_context(spawned_service(bundles, keys.service_key, workdir, **config))
        ]
        link = ThreadedLinkEmulator(parse_address(service[0].address), LinkConfig())
        host, port = stack.enter_context(link)
        restarting: list[threading.Thread] = []
        flood: list[_Flood] = []
        stalls: list[threading.Timer] = []

        def restart() -> None:
            new = stack.enter_context(spawned_service(bundles, keys.service_key, workdir, **config))
            service.append(new)
            link.emulator.target = parse_address(new.address)

        def inject(position: int, fault: str) -> None:
            for t in restarting:  # a fault on a service still starting up would test nothing
                t.join(300)
            if flood and fault != "overload":
                flood.pop().stop()
            run.injected.append((position, fault))
            if fault == "sigkill_restart":
                os.kill(service[-1].pid, signal.SIGKILL)
                service[-1].proc.wait()
                restarting.append(threading.Thread(target=restart, daemon=True))
                restarting[-1].start()
            elif fault == "link_reset":
                link.reset_all()
            elif fault == "link_stall":
                link.set_config(LinkConfig(rtt_ms=STALL_RTT_MS))
                stalls.append(threading.Timer(STALL_RTT_MS / 1e3, lambda: link.set_config(LinkConfig())))
                stalls[-1].start()
            else:
                flood.append(_Flood(edge, flood_feeds, cut, service[-1].address))
                flood[-1].start()

        def clear_faults() -> None:
            for f in flood:
                f.stop()
            for t in [*restarting, *stalls]:
                t.join(300)
            time.sleep(SessionConfig.backoff_max_ms / 1e3 + 0.5)  # the agent's next try connects

        def source() -> Iterator[Input]:
            for i in range(inputs):
                if i in plan:
                    inject(i, plan[i])
                if i == run.recovery_from:
                    clear_faults()
                name, image = photos[i % len(photos)]
                yield image_input(i, f"{name}#{i}", image)
                time.sleep(0.01)  # a camera, not a batch job: faults land between inputs

        edge_config = EdgeConfig(
            bundle=edge.bundle.root,
            server=f"{host}:{port}",
            server_key=keys.service_pub,
            cut=cut,
            threads=1,
            fallback="local",
            deadline_ms=2000,
        )
        try:
            with start_agent(edge_config) as agent:
                agent.run(source(), run.results.append)
        finally:
            for f in flood:
                f.stop()
                run.flood_sent, run.flood_refused = f.sent, f.refused
            for t in restarting:
                t.join(300)
    return run
