"""`edgecut cloud serve`: flags (and an optional TOML file) → ServeConfig → the tail service.

The one line on stdout, `listening HOST:PORT`, is the readiness signal: printed after bundles are
loaded and warmed up and the port is bound, so scripts and tests wait for it instead of sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from edgecut.cloud.config import ServeConfig
from edgecut.errors import UsageError
from edgecut.flags import add_renamed

# flag dest -> ServeConfig field, for flags whose value passes straight through
_FIELDS = (
    "bundles",
    "key",
    "host",
    "port",
    "device",
    "threads",
    "metrics_port",
    "max_batch",
    "max_queue_delay_ms",
    "max_queue",
    "tls_cert",
    "tls_key",
    "client_ca",
    "tokens",
    "signing_pub",
    "poll_interval_s",
    "grace_s",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cloud_command", metavar="COMMAND", required=True)
    p = sub.add_parser("serve", help="serve tail segments of the bundles in a directory")
    p.add_argument("--config", type=Path, help="TOML file of ServeConfig fields; flags override it")
    p.add_argument("--bundles", type=Path, help="directory of bundles (one per subdirectory)")
    add_renamed(
        p,
        "--service-key",
        "--key",
        dest="key",
        type=Path,
        append=True,
        help="service HPKE private key (keys/service.key) or a directory of *.key files; repeat to "
        "hold old and new keys during a rotation (the first is the primary)",
    )
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where tail segments run (default cpu)")
    p.add_argument("--providers", help="ORT providers in order, comma-separated, e.g. tensorrt,cuda,cpu")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: off)")
    p.add_argument("--max-batch", type=int, help="requests per batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, help="wait for batch-mates, ms (default 2)")
    p.add_argument("--max-queue", type=int, help="queued requests per model/cut (default 256)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: enables TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--client-ca", type=Path, help="PEM CA: require client certificates (mTLS)")
    p.add_argument("--tokens", type=Path, help="device tokens: 'token device_id [models]' per line")
    p.add_argument("--signing-pub", type=Path, help="require bundles signed by this Ed25519 key")
    p.add_argument("--poll-interval-s", type=float, help="bundle directory rescan period, s")
    p.add_argument("--grace-s", type=float, help="drain period on SIGTERM, s (default 10)")
    r = p.add_argument_group("Ray Serve (needs edgecut[ray]; joins RAY_ADDRESS or starts a local cluster)")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve's gRPC proxy on --port")
    r.add_argument("--ray-replicas", default="1:4", help="MIN:MAX replicas for the autoscaler (default 1:4)")
    r.add_argument(
        "--ray-target-streams", type=float, default=2.0, help="open streams per replica to aim for"
    )
    r.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    r.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per replica, fractions share one")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values: dict[str, Any] = {name: getattr(args, name) for name in _FIELDS}
    if args.providers:
        values["providers"] = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    if args.config is not None:
        return ServeConfig.from_toml(args.config, **values)
    return ServeConfig.from_mapping({k: v for k, v in values.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    def ready(host: str, port: int) -> None:
        print(f"listening {host}:{port}", flush=True)

    if args.ray:
        from edgecut.cloud import ray_serve

        return ray_serve.run(config_from_args(args), _ray_scaling(args, ray_serve.RayScaling), on_ready=ready)
    from edgecut.cloud.config import require_cuda
    from edgecut.cloud.service import serve  # grpc and ORT load only when serving

    config = config_from_args(args)
    require_cuda(config)
    return asyncio.run(serve(config, on_ready=ready))


def _ray_scaling(args: argparse.Namespace, scaling: Any) -> Any:
    low, sep, high = args.ray_replicas.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise UsageError(f"--ray-replicas {args.ray_replicas!r}: expected MIN:MAX, e.g. 1:4")
    return scaling(
        min_replicas=int(low),
        max_replicas=int(high),
        target_ongoing_requests=args.ray_target_streams,
        num_cpus=args.ray_cpus,
        num_gpus=args.ray_gpus,
    )
