"""Configuration of the tail service: one frozen dataclass, from a TOML file and/or CLI flags.

Values are validated here, where they cross from the operator into the program, so the rest of the
service can trust them. The device-token file is parsed here too: it is configuration, and a typo
in it must stop the server at start, not lock devices out at run time. Tokens are kept only as
sha256 digests (the file may hold `sha256:HEX` instead of the token), and a token file others can
read is refused, as private keys are.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecut.bundle import Manifest
from edgecut.errors import DependencyError, UsageError
from edgecut.framing import MAX_DECODED_BYTES, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES
from edgecut.runtime import PROVIDERS
from edgecut.sealing import token_digest

DEVICES = ("cpu", "cuda")
_PATH_FIELDS = ("bundles", "key", "tls_cert", "tls_key", "client_ca", "tokens", "signing_pub")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `edgecut cloud serve` needs; defaults work for a local CPU server."""

    bundles: Path  # directory whose subdirectories holding manifest.json are served bundles
    key: Path  # the service's HPKE private key (service.key), or a directory of them (edgecut.keyring)
    host: str = "127.0.0.1"  # interface to bind; "0.0.0.0" for all
    port: int = 50051  # TCP port for gRPC; 0 = any free port (the bound one is printed)
    device: str = "cpu"  # "cpu" or "cuda": where the tail segments run
    providers: tuple[str, ...] = ()  # ORT execution providers (keys of runtime.PROVIDERS); () = by device
    threads: int = 0  # ORT intra-op threads per session; 0 = ORT default (all cores)
    metrics_port: int | None = None  # Prometheus HTTP port; None = no metrics endpoint
    max_batch: int = 8  # most requests run together in one batch (Triton's max_batch_size)
    max_queue_delay_ms: float = 2.0  # longest a request waits for batch-mates, ms
    max_queue: int = 256  # queued requests per (model, version, cut) before RESOURCE_EXHAUSTED
    max_message_bytes: int = MAX_MESSAGE_BYTES  # gRPC send/receive limit per message, bytes
    max_request_bytes: int = MAX_REQUEST_BYTES  # largest sealed request (all chunks), bytes
    max_decoded_bytes: int = MAX_DECODED_BYTES  # largest decoded frontier a request may claim, bytes
    max_probe_bytes: int = 4 << 20  # largest reply a Probe may ask for, bytes
    tls_cert: Path | None = None  # PEM server certificate chain; with tls_key enables TLS
    tls_key: Path | None = None  # PEM server private key
    client_ca: Path | None = None  # PEM CA bundle; when set, clients must present a cert (mTLS)
    tokens: Path | None = None  # device token file; when set every RPC needs a bearer token
    signing_pub: Path | None = None  # Ed25519 key bundles must be signed with; None = hashes only
    replay_window_ms: int = 30_000  # accepted clock skew / replay window for frame timestamps, ms
    poll_interval_s: float = 2.0  # how often the bundles directory is rescanned, s; 0 = never
    session_cache: int = 128  # ORT sessions kept (one per segment file), least recently used out
    warmup_runs: int = 3  # timed runs per segment at load, after one untimed run
    grace_s: float = 10.0  # on SIGTERM, how long in-flight requests may take to finish, s
    compute_threads: int = 2  # threads running batches (different lanes run in parallel)
    max_rows_per_request: int = 1  # batch rows one frame may carry (counted in max_batch)
    max_decoded_total_bytes: int = 512 << 20  # decoded frontiers held by all requests together, bytes
    max_concurrent_rpcs: int = 1024  # calls (streams, probes, info) open at once, server-wide
    max_streams_per_device: int = 64  # Infer streams one device identity may hold open
    max_in_flight_per_device: int = 1024  # requests one device identity may have in progress
    probe_bytes_per_s: int = 8 << 20  # Probe bytes (up + down) per device / peer address, per s
    min_cut: Mapping[str, str | int] = field(default_factory=dict)  # model -> shallowest cut served
    extra_keys: tuple[Path, ...] = ()  # older (or not yet advertised) service keys still opened: rotation

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def key_paths(self) -> tuple[Path, ...]:
        """Every service key file or directory, the primary first (edgecut.keyring.KeyRing.load)."""
        return (self.key, *self.extra_keys)

    @property
    def resolved_providers(self) -> tuple[str, ...]:
        """Providers to try, in order: explicit ones, else the device's usual stack."""
        if self.providers:
            return self.providers
        return ("cuda", "cpu") if self.device == "cuda" else ("cpu",)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> ServeConfig:
        """Read `path` (top-level keys = field names), then apply non-None `overrides` (flags)."""
        import tomllib  # Python 3.11+; imported here so the rest of the config works on 3.10

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"config {path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config {path}: not valid TOML ({exc})") from None
        return cls.from_mapping(
            {**data, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path)
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "flags") -> ServeConfig:
        """Build from plain values (TOML or argparse), converting paths and lists."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(
                f"{source}: unknown setting(s) {', '.join(unknown)}",
                hint=f"known: {', '.join(sorted(known))}",
            )
        values: dict[str, Any] = {
            k: (Path(v) if k in _PATH_FIELDS and v is not None and not isinstance(v, list | tuple) else v)
            for k, v in data.items()
        }
        if "providers" in values:
            values["providers"] = tuple(values["providers"])
        values.update(_key_fields(values.get("key"), values.get("extra_keys") or ()))
        for required, flag in (("bundles", "--bundles"), ("key", "--service-key")):
            if values.get(required) is None:
                raise UsageError(f"{source}: '{required}' is required ({flag} on the command line)")
        try:
            return cls(**values)
        except TypeError as exc:
            raise UsageError(f"{source}: {exc}") from None


def _key_fields(key: Any, extra: Any) -> dict[str, Any]:
    """`key` may list several keys (`--service-key` repeated, or a TOML list): the first is the
    primary, the rest join `extra_keys`."""
    if isinstance(extra, str | os.PathLike):
        extra = [extra]
    if isinstance(key, list | tuple):
        key, extra = (key[0] if key else None), [*key[1:], *extra]
    out: dict[str, Any] = {"extra_keys": tuple(Path(p) for p in extra)}
    if key is not None:
        out["key"] = Path(key)
    return out


def require_cuda(c: ServeConfig) -> None:
    """`device = "cuda"` must run on the GPU: refused before serving, rather than quietly served on
    the CPU. Not part of validation: a config is also checked offline (deploy files), on machines
    without a GPU."""
    if c.device != "cuda" or c.providers:
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDERS["cuda"] not in available:
        raise DependencyError(
            f"--device cuda: this onnxruntime build has no CUDA support (it offers {', '.join(available)})",
            hint="install onnxruntime-gpu in place of onnxruntime, or serve with --device cpu",
        )


def _validate(c: ServeConfig) -> None:
    if c.device not in DEVICES:
        raise UsageError(f"device {c.device!r}: expected one of {', '.join(DEVICES)}")
    unknown = [p for p in c.providers if p not in PROVIDERS]
    if unknown:
        raise UsageError(f"unknown execution provider(s) {unknown}; use {', '.join(PROVIDERS)}")
    ranges = {
        "port": (c.port, 0, 65535),
        "threads": (c.threads, 0, 1024),
        "max_batch": (c.max_batch, 1, 4096),
        "max_queue": (c.max_queue, 1, 1 << 20),
        "session_cache": (c.session_cache, 1, 1 << 16),
        "warmup_runs": (c.warmup_runs, 0, 1000),
        "compute_threads": (c.compute_threads, 1, 256),
        "max_message_bytes": (c.max_message_bytes, 4096, 2**31 - 1),
        "replay_window_ms": (c.replay_window_ms, 1, 86_400_000),
        "max_rows_per_request": (c.max_rows_per_request, 1, c.max_batch),
        "max_decoded_total_bytes": (c.max_decoded_total_bytes, 1, 1 << 40),
        "max_concurrent_rpcs": (c.max_concurrent_rpcs, 1, 1 << 20),
        "max_streams_per_device": (c.max_streams_per_device, 1, 1 << 20),
        "max_in_flight_per_device": (c.max_in_flight_per_device, 1, 1 << 24),
        "probe_bytes_per_s": (c.probe_bytes_per_s, 1, 1 << 40),
    }
    if c.metrics_port is not None:
        ranges["metrics_port"] = (c.metrics_port, 0, 65535)
    for name, (value, lo, hi) in ranges.items():
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise UsageError(f"{name} = {value!r}: expected an integer in {lo}..{hi}")
    for name in ("max_queue_delay_ms", "poll_interval_s", "grace_s"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise UsageError(f"{name} = {value!r}: expected a non-negative number")
    if (c.tls_cert is None) != (c.tls_key is None):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if c.client_ca is not None and c.tls_cert is None:
        raise UsageError("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if not isinstance(c.min_cut, Mapping):
        raise UsageError(f"min_cut = {c.min_cut!r}: expected a table of model = cut id or depth")
    for model, cut in c.min_cut.items():
        if isinstance(cut, bool) or not isinstance(cut, int | str) or (isinstance(cut, int) and cut < 0):
            raise UsageError(f"min_cut.{model} = {cut!r}: expected a cut id or a depth (integer >= 0)")


def min_depth(config: ServeConfig, manifest: Manifest) -> int:
    """The shallowest cut depth the server computes for this model (0 = every cut).

    A cut id is looked up in the model's own manifest, so one setting serves every version.
    """
    return manifest.depth_of(config.min_cut.get(manifest.model, 0))


@dataclass(frozen=True)
class DeviceGrant:
    """What one device token allows."""

    device_id: str  # who holds the token, for logs and metrics
    models: frozenset[str] | None = field(default=None)  # allowed model names; None = all

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def load_tokens(path: Path) -> dict[str, DeviceGrant]:
    """Parse a token file: one `token device_id [model1,model2,...]` per line, `#` comments.

    `token` is the token itself or `sha256:` + the hex sha256 of it (`printf %s TOKEN | sha256sum`),
    so the file need not hold secrets. Either way only digests are kept, keyed by digest. Tokens must
    be unique; a bad line is an error naming the line (never the token, which is a secret). The file
    must not be readable by group or others (like a private key).
    """
    try:
        _check_private(path)
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"tokens file {path}: cannot read ({exc.strerror})") from None
    grants: dict[str, DeviceGrant] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise UsageError(
                f"tokens file {path} line {number}: expected 'token device_id [model1,model2,...]'"
            )
        token, device_id = fields[0], fields[1]
        hashed = _DIGEST.fullmatch(token)
        digest = hashed.group(1) if hashed else token_digest(token)
        if digest in grants:
            raise UsageError(f"tokens file {path} line {number}: duplicate token")
        models = frozenset(m for m in fields[2].split(",") if m) if len(fields) == 3 else None
        grants[digest] = DeviceGrant(device_id, models)
    if not grants:
        raise UsageError(f"tokens file {path} holds no tokens; every device would be refused")
    return grants


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UsageError(
            f"tokens file {path} is accessible to group or others (mode {mode:o}): "
            "its tokens may already have leaked",
            hint=f"chmod 600 {path}",
        )
