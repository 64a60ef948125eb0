"""Short profile of the hostile-frame campaign: every frame gets a precise status, the service stays
SERVING, a well-behaved client keeps its latency, memory stays bounded (issue 12).

The long profile (≥ 10 000 frames) is `benchmarks/reliability.py`; both use `frames.generate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from frames import CATEGORIES, FrameFactory, generate
from relkit import (
    FORBIDDEN,
    Service,
    VitalsSampler,
    WellBehaved,
    percentile,
    run_campaign,
    serving,
    status_name,
    vitals,
)
from support import EdgeClient

from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

PER_CATEGORY = 50  # short profile; the benchmark sends ≥ 10 000 in all
LATENCY_FACTOR = 10.0  # the well-behaved client's median may grow this much under attack (2 shared cores)
RSS_HEADROOM_KB = 64 << 10  # growth allowed over the pre-campaign RSS (measured: under 10 MiB)
UNDECODABLE_HOLE = (
    "issue 12, still open after the harden merge: bytes that do not parse as a Frame/ProbeRequest "
    "get UNKNOWN (Probe) or an empty OK stream (Infer) instead of INVALID_ARGUMENT"
)
PROBE_FLOOR_BYTES = 64 << 10  # any sane cap: a 100-byte request may get at most this + 16x its size


def test_hostile_frames_get_precise_statuses_and_spare_others(
    service: Service, factory: FrameFactory, rel_edge: EdgeClient, calm_feeds: dict[str, np.ndarray]
) -> None:
    categories = tuple(c for c in CATEGORIES if c != "row_bomb")  # row bombs: own test
    client = WellBehaved(rel_edge, calm_feeds, service.address)
    baseline_ms = client.baseline()
    rss_before_kb = vitals(service.pid).rss_kb
    n = PER_CATEGORY * len(categories)
    with VitalsSampler(service.pid) as sampler, client:
        tally = run_campaign(service.address, generate(factory, n, categories), settle=factory.settle)
    assert tally.bad == [], "\n".join(tally.bad[:40])
    assert tally.frames == n
    seen = {status for counts in tally.by_category.values() for status in counts}
    assert not seen & FORBIDDEN
    with service.channel() as channel:
        assert serving(channel)
    assert client.failures == []
    assert len(client.latencies_ms) >= 5
    during, before = percentile(client.latencies_ms, 50), percentile(baseline_ms, 50)
    assert during <= LATENCY_FACTOR * before, f"median {during:.1f} ms under attack vs {before:.1f} ms"
    grown_kb = sampler.peak_rss_kb() - rss_before_kb
    assert grown_kb <= RSS_HEADROOM_KB, f"server RSS grew {grown_kb / 1024:.0f} MiB"
    assert service.proc.poll() is None


def test_row_bombs_are_refused(service: Service, factory: FrameFactory) -> None:
    tally = run_campaign(service.address, generate(factory, 8, ("row_bomb",)))
    assert tally.bad == [], "\n".join(tally.bad)


@pytest.mark.xfail(strict=True, reason=UNDECODABLE_HOLE)
def test_undecodable_messages_get_invalid_argument(service: Service) -> None:
    """Bytes that are not a message at all: a status naming the client's fault, never silence."""
    seen: list[str] = []
    with service.channel() as channel:
        infer = channel.stream_stream(
            "/edgecut.v1.TailService/Infer",
            request_serializer=bytes,
            response_deserializer=pb.Answer.FromString,
        )
        probe = channel.unary_unary(
            "/edgecut.v1.TailService/Probe",
            request_serializer=bytes,
            response_deserializer=pb.ProbeReply.FromString,
        )
        for garbage in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", os.urandom(512)):
            seen.append(
                _outcome(lambda g=garbage: [status_name(a.code) for a in infer(iter([g]), timeout=20)])
            )
            seen.append(_outcome(lambda g=garbage: [len(probe(g, timeout=20).payload)]))
        assert serving(channel)
    assert set(seen) == {"INVALID_ARGUMENT"}, seen


def _outcome(call: Callable[[], list[Any]]) -> str:
    """The one status a call ended with: an RPC error, or the single per-request answer code."""
    try:
        got = call()
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return got[0] if len(got) == 1 and isinstance(got[0], str) else f"OK with {got}"


def test_probe_does_not_amplify(service: Service) -> None:
    """A small request may not ask for a large reply (reflection / amplification)."""
    with service.channel() as channel:
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        request = pb.ProbeRequest(payload=bytes(100), reply_bytes=4 << 20)
        reply = stub.Probe(request, timeout=20)
    assert len(reply.payload) <= PROBE_FLOOR_BYTES + 16 * len(request.payload), len(reply.payload)
