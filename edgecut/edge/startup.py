"""Agent setup: from an `EdgeConfig` to a running `Agent` (bundle, runtimes, session, cut choice).

This is the library entry point for embedding the agent (`edgecut edge run`, `edgecut demo`, the
benchmarks and the tests all start agents here); the command line's own business (sources, output
format, flags) stays in `edgecut.edge.cli`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecut.answers import AnswerSpec
from edgecut.bundle import Bundle, load_bundle
from edgecut.edge.agent import Agent, AgentOptions
from edgecut.edge.cutchoice import AutoCut, CutChoice, FixedCut
from edgecut.edge.runner import OrtRunner, make_runner
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.errors import UnavailableError, UsageError
from edgecut.keys import load_service_public, load_signing_public
from edgecut.runtime import OrtOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `edgecut edge run` needs; flags map one to one."""

    bundle: Path  # bundle directory
    server: str | None = None  # HOST:PORT of the tail service; None = edge-only (cut "output")
    server_key: Path | None = None  # the tail service's service.pub
    cut: str = "auto"  # cut id, or "auto" for the planner
    codec: str = "int8"  # codec text, e.g. int8, int4-tensor, fp16, jpeg90 (input cut only)
    runtime: str = "ort"  # head runtime: "ort" or "litert"
    providers: tuple[str, ...] = ("cpu",)  # ORT execution providers, in order of preference
    threads: int = 0  # intra-op threads; 0 = runtime default
    in_flight: int = 4  # most requests outstanding on the stream
    fallback: str = "local"  # "local" or "fail" when the cloud cannot answer
    deadline_ms: int = 2000  # per request, ms
    min_cut: int = 0  # auto: cuts shallower than this depth are never used (privacy)
    edge_profile: Path | None = None  # auto: edge timings from a profile instead of measuring
    signing_pub: Path | None = None  # require the bundle to be signed with this key
    token: str | None = field(default=None, repr=False)  # per-device token
    tls_ca: Path | None = None  # PEM roots for a TLS channel
    tls_cert: Path | None = None  # client certificate (mTLS)
    tls_key: Path | None = None  # client key (mTLS)
    answer: str = ""  # what the tail sends back: "top5", "top<k>", "full"; "" = top-5 for classifiers

    def __post_init__(self) -> None:
        if self.answer:
            AnswerSpec.parse(self.answer)  # a bad --answer fails before any input is read


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _session(config: EdgeConfig, bundle: Bundle) -> TailSession | None:
    if config.server is None:
        if config.cut != "output":
            raise UsageError("--server is required unless --cut output (edge-only)")
        return None
    if config.server_key is None:
        raise UsageError("--server-key is required with --server (frames are sealed to it)")
    m = bundle.manifest
    return TailSession(
        SessionConfig(
            config.server,
            load_service_public(config.server_key),
            m.model,
            m.version,
            build=bundle.build_sha256,
            deadline_ms=config.deadline_ms,
            token=config.token,
            tls_ca=_read(config.tls_ca),
            tls_cert=_read(config.tls_cert),
            tls_key=_read(config.tls_key),
        )
    )


def _connect(session: TailSession, fallback: str) -> None:
    try:
        session.connect()
    except UnavailableError as exc:
        if fallback != "local":
            raise
        log.warning("%s; computing locally until it is reachable", exc)


@contextlib.contextmanager
def start_agent(config: EdgeConfig) -> Iterator[Agent]:
    """Load and verify the bundle, start runtimes, connect, and close the session afterwards."""
    signing = load_signing_public(config.signing_pub) if config.signing_pub else None
    bundle = load_bundle(config.bundle, public_key=signing, require_signature=signing is not None)
    m = bundle.manifest
    options = OrtOptions(config.providers, config.threads)
    tail = OrtRunner(bundle, options)
    head = tail if config.runtime == "ort" else make_runner(bundle, config.runtime, options)
    # One untimed pass: the first run of a session allocates, and would skew timings and plans.
    tail.run({s.name: np.zeros(s.shape, s.dtype) for s in m.inputs}, 0, len(m.segments) - 1)
    answer = AnswerSpec.parse(config.answer) if config.answer else None
    session = _session(config, bundle)
    if session is not None:
        _connect(session, config.fallback)
    choice: CutChoice = (
        AutoCut(
            bundle,
            head,
            session,
            config.codec,
            min_depth=config.min_cut,
            edge_profile=config.edge_profile,
            answer=answer,
        )
        if config.cut == "auto"
        else FixedCut(bundle, config.cut, config.codec)
    )
    try:
        agent_options = AgentOptions(config.in_flight, config.fallback, answer)
        yield Agent(bundle, head, tail, session, choice, agent_options)
    finally:
        if session is not None:
            session.close()
