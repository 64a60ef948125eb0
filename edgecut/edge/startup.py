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
from edgecut.credentials import read_pem
from edgecut.edge.agent import Agent, AgentOptions
from edgecut.edge.cutchoice import AutoCut, CutChoice, FixedCut
from edgecut.edge.runner import OrtRunner, make_runner
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.errors import UnavailableError, UsageError
from edgecut.keys import load_device_private, load_service_public, load_signing_public
from edgecut.planner import DEFAULT_MAX_ACCURACY_DROP
from edgecut.protect import ModelFiles
from edgecut.runtime import OrtOptions
from edgecut.variants import FLOAT, check_precision, head_variants

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `edgecut edge run` needs; flags map one to one."""

    bundle: Path  # bundle directory
    server: str | None = None  # HOST:PORT of the tail service, or several (replicas, comma-separated),
    # or a gRPC target (ipv4:…, dns:///…); None = edge-only (cut "output")
    server_key: Path | None = None  # the tail service's service.pub
    cut: str = "auto"  # cut id, or "auto" for the planner
    codec: str = "int8"  # codec text, e.g. int8, int4-tensor, fp16, jpeg90 (input cut only); auto: a list
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP  # auto: top-1 disagreement budget; None = off
    runtime: str = "ort"  # head runtime: "ort" or "litert"
    providers: tuple[str, ...] = ("cpu",)  # ORT execution providers, in order of preference
    threads: int = 0  # intra-op threads; 0 = runtime default
    in_flight: int = 4  # most requests outstanding on the stream
    fallback: str = "local"  # "local" or "fail" when the cloud cannot answer
    deadline_ms: int = 2000  # per request, ms
    min_cut: int | str = 0  # cut id or depth: shallower cuts are never used, fixed or auto (privacy)
    edge_profile: Path | None = None  # auto: edge timings from a profile instead of measuring
    signing_pub: Path | None = None  # require the bundle to be signed with this key
    token: str | None = field(default=None, repr=False)  # per-device token
    tls_ca: Path | None = None  # PEM roots for a TLS channel
    tls_cert: Path | None = None  # client certificate (mTLS)
    tls_key: Path | None = None  # client key (mTLS)
    device_key: Path | None = None  # device.key: opens a bundle encrypted for this device
    precision: str = FLOAT  # edge head: "float", "int8" (needs an int8 head), or "auto" (planner)
    provider_options: tuple[tuple[str, str, str], ...] = ()  # (provider, option, value), e.g. TensorRT's
    answer: str = ""  # what the tail sends back: "top5", "top<k>", "full"; "" = top-5 for classifiers

    def __post_init__(self) -> None:
        if self.answer:
            AnswerSpec.parse(self.answer)  # a bad --answer fails before any input is read


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
            tls_ca=read_pem(config.tls_ca),
            tls_cert=read_pem(config.tls_cert),
            tls_key=read_pem(config.tls_key),
        )
    )


def _connect(session: TailSession, fallback: str) -> None:
    try:
        session.connect()
    except UnavailableError as exc:
        if fallback != "local":
            raise
        log.warning("%s; computing locally until it is reachable", exc)


def _min_depth(config: EdgeConfig, bundle: Bundle) -> int:
    """`--min-cut` as a depth (a cut id or a number); a fixed cut shallower than it is refused."""
    m = bundle.manifest
    depth = m.depth_of(config.min_cut)
    if config.cut != "auto" and m.cut(config.cut).depth < depth:
        raise UsageError(
            f"--cut {config.cut} (depth {m.cut(config.cut).depth}) is shallower than --min-cut "
            f"{config.min_cut} (depth {depth}): it would send more of the input than allowed",
            hint="choose a deeper cut, or --cut auto",
        )
    return depth


def _precisions(precision: str, variants: tuple[str, ...]) -> tuple[str, ...]:
    """What the planner may choose from: "auto" = float and every variant the bundle has."""
    return (FLOAT, *variants) if precision == "auto" else (precision,)


def _fixed_precision(bundle: Bundle, config: EdgeConfig) -> str:
    """A fixed cut with "auto": the variant where it is offered at that cut, else float."""
    if config.precision != "auto":
        return config.precision
    offered = [p for p, v in head_variants(bundle.manifest).items() if v.offered(config.cut)]
    return offered[0] if offered else FLOAT


@contextlib.contextmanager
def start_agent(config: EdgeConfig) -> Iterator[Agent]:
    """Load and verify the bundle, start runtimes, connect, and close the session afterwards."""
    signing = load_signing_public(config.signing_pub) if config.signing_pub else None
    bundle = load_bundle(config.bundle, public_key=signing, require_signature=signing is not None)
    m = bundle.manifest
    options = OrtOptions(config.providers, config.threads, config.provider_options)
    check_precision(m, config.precision, None if config.cut == "auto" else config.cut)
    files = ModelFiles(bundle, load_device_private(config.device_key) if config.device_key else None)
    variants = () if config.precision == FLOAT else tuple(head_variants(m))
    tail = OrtRunner(bundle, options, files, variants if config.runtime == "ort" else ())
    head = tail if config.runtime == "ort" else make_runner(bundle, config.runtime, options, files)
    # One untimed pass: the first run of a session allocates, and would skew timings and plans.
    tail.run({s.name: np.zeros(s.shape, s.dtype) for s in m.inputs}, 0, len(m.segments) - 1)
    min_depth = _min_depth(config, bundle)
    answer = AnswerSpec.parse(config.answer) if config.answer else None
    session = _session(config, bundle)
    if session is not None:
        if config.token and config.tls_ca is None:
            log.warning("INSECURE: sending the device token over plaintext; use --tls-ca")
        _connect(session, config.fallback)
    choice: CutChoice = (
        AutoCut(
            bundle,
            head,
            session,
            config.codec,
            min_depth=min_depth,
            edge_profile=config.edge_profile,
            precisions=_precisions(config.precision, variants),
            max_accuracy_drop=config.max_accuracy_drop,
            answer=answer,
        )
        if config.cut == "auto"
        else FixedCut(
            bundle, config.cut, config.codec, _fixed_precision(bundle, config), config.max_accuracy_drop
        )
    )
    try:
        agent_options = AgentOptions(config.in_flight, config.fallback, answer=answer)
        yield Agent(bundle, head, tail, session, choice, agent_options)
    finally:
        choice.close()
        if session is not None:
            session.close()
