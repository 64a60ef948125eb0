"""What every front end of the tail service shares, built once: keys, tokens, bundles, batcher.

The native sealed stream (`edgecut.cloud.service`), the Open Inference Protocol
(`edgecut.cloud.oip`), Ray Serve replicas and in-process benchmarks all run on one `TailContext`,
so they share one registry, one executor's sessions, one batcher (an OIP request and an edge frame
for the same cut ride the same batch), one metrics registry and one set of admission limits.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from edgecut import sealing
from edgecut.cloud.admission import Limits
from edgecut.cloud.batcher import Batcher
from edgecut.cloud.config import ServeConfig
from edgecut.cloud.executor import Executor, OrtExecutor
from edgecut.cloud.metrics import ServerMetrics
from edgecut.cloud.registry import Entry, Registry
from edgecut.cloud.tokens import TokenStore
from edgecut.keyring import KeyRing
from edgecut.keys import load_signing_public
from edgecut.runtime import OrtOptions

log = logging.getLogger("edgecut.cloud.service")  # the service's records: one logger, as operators filter it


@dataclass(frozen=True)
class Credentials:
    """The service's sealing key and the device tokens: the one place both are loaded.

    Opening a request (`TailPipeline.open_request`) and authenticating a call (`grants`) read
    only this, so a change to how keys or tokens are held (several keys, reloads) stays here.
    """

    key: KeyRing  # the primary and any keys still accepted during a rotation
    grants: TokenStore | None  # re-read when the tokens file changes; None: tokens not configured


def load_credentials(config: ServeConfig) -> Credentials:
    grants = TokenStore(config.tokens) if config.tokens else None
    if grants is not None and config.tls_cert is None:
        log.warning(
            "INSECURE: device tokens are accepted over plaintext gRPC; anyone on the path can read "
            "and reuse them. Serve with --tls-cert/--tls-key."
        )
    return Credentials(KeyRing.load(config.key_paths), grants)


@dataclass(frozen=True)
class TailContext:
    """Everything a tail front end needs; transport-free."""

    config: ServeConfig
    credentials: Credentials
    guards: sealing.DeviceGuards
    registry: Registry
    batcher: Batcher
    executor: Executor
    metrics: ServerMetrics
    limits: Limits

    @property
    def key(self) -> KeyRing:
        return self.credentials.key

    @property
    def grants(self) -> TokenStore | None:
        return self.credentials.grants


async def build_context(
    config: ServeConfig, *, executor: Executor | None = None
) -> tuple[TailContext, ThreadPoolExecutor]:
    """Load keys, tokens and bundles (verified, warmed up); no port: servers, Ray replicas and
    benchmarks call it alike.

    Call on the event loop that will serve (the batcher binds to it); the pool runs the batches.
    `executor` replaces the ONNX Runtime one (tests use it to gate or count compute).
    """
    credentials = load_credentials(config)
    signing = load_signing_public(config.signing_pub) if config.signing_pub else None
    executor = executor or OrtExecutor(
        OrtOptions(config.resolved_providers, config.threads), config.session_cache
    )
    metrics = ServerMetrics()
    pool = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="edgecut-tail")
    batcher = Batcher(
        executor,
        pool,
        max_batch=config.max_batch,
        metrics=metrics,
        max_queue_delay_ms=config.max_queue_delay_ms,
        max_queue=config.max_queue,
    )

    def on_load(entry: Entry) -> None:
        entry.extra["timings"] = executor.warm_up(entry.bundle, config.warmup_runs)

    def on_retire(entry: Entry) -> None:
        executor.evict(entry.bundle)
        batcher.retire(entry.bundle)

    registry = Registry(config.bundles, public_key=signing, on_load=on_load, on_retire=on_retire)
    await asyncio.to_thread(registry.scan)
    guards = sealing.DeviceGuards(config.replay_window_ms)
    ctx = TailContext(config, credentials, guards, registry, batcher, executor, metrics, Limits.of(config))
    return ctx, pool
