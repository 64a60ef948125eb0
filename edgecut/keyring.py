"""The service keys a tail holds: one primary, plus the keys it still accepts while rotating.

Rotating `service.key` must not strand the edges that still hold the old `service.pub`, so a
service may hold several keys at once: `edgecut cloud serve --key new.key --key old.key` (the
first is the primary), or `--key DIR` (every `*.key` in DIR; `DIR/service.key` is the primary, a
Kubernetes Secret mounted as a directory works as is). Every frame names the key it is sealed to
(`Frame.key_id`, the public `edgecut.keys.key_id`), so the service opens it with that key only:
one HPKE decapsulation per frame whatever the number of keys held, and a frame sealed to a key
the service does not hold is refused with an error naming that key and the ones held. A frame
without a key id (an edge from before rotation existed) is opened with the primary key.

The rotation, with every replica holding both keys in between (see README "Key rotation"):
serve `--key new.key --key old.key` → give edges the new `service.pub` → once none seals to the
old key, serve `--key new.key`. Key files are read at start: change the set by restarting
replicas one at a time (the edge's failover covers each restart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgecut.errors import KeyFileError, UnknownKeyError
from edgecut.keys import ServicePrivateKey, key_id, load_service_private
from edgecut.sealing import Binding, OpenedRequest, ReplayGuard, open_sealed

PRIMARY_NAME = "service.key"  # the primary key of a key directory
MAX_KEYS = 8  # keys one service holds; a rotation needs two


@dataclass(frozen=True)
class KeyRing:
    """The service's private keys by key id, the primary (the one advertised) first."""

    keys: tuple[ServicePrivateKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyFileError("no service key given", hint="pass --service-key service.key")
        if len(self.keys) > MAX_KEYS:
            raise KeyFileError(f"{len(self.keys)} service keys given; a service holds at most {MAX_KEYS}")

    @classmethod
    def load(cls, paths: Path | Sequence[Path]) -> KeyRing:
        """Load key files in order (the first is the primary); a directory adds its `*.key` files."""
        files: list[Path] = []
        for path in [paths] if isinstance(paths, Path) else paths:
            files.extend(key_files(path) if path.is_dir() else [path])
        keys: dict[str, ServicePrivateKey] = {}
        for file in files:
            key = load_service_private(file)
            keys.setdefault(key_id(key.public), key)  # the same key twice (file and dir) counts once
        return cls(tuple(keys.values()))

    @property
    def primary(self) -> ServicePrivateKey:
        return self.keys[0]

    @property
    def ids(self) -> tuple[str, ...]:
        """Every key id held, the primary's first (ServerInfo.key_ids)."""
        return tuple(key_id(k.public) for k in self.keys)

    def find(self, wanted: str, request_id: str = "") -> ServicePrivateKey:
        """The key a frame names (`Frame.key_id`); "" = the primary. UnknownKeyError if not held."""
        if not wanted:
            return self.primary
        for key in self.keys:
            if key_id(key.public) == wanted:
                return key
        held = ", ".join(self.ids)
        rid = f" for request {request_id[:64]!r}" if request_id else ""
        raise UnknownKeyError(
            f"frame{rid} is sealed to service key {wanted[:64]!r}, which this service does not "
            f"hold (it holds {held})",
            hint="the edge's service.pub is from a rotated-out or another service; copy this "
            "server's current service.pub to the device",
        )

    def open(
        self,
        wanted: str,
        binding: Binding,
        sealed: bytes,
        *,
        guard: ReplayGuard | None = None,
        now_ms: int | None = None,
    ) -> OpenedRequest:
        """Open a request with the key it names (`sealing.open_sealed` does the rest)."""
        key = self.find(wanted, binding.request_id)
        return open_sealed(key, binding, sealed, guard=guard, now_ms=now_ms)


def key_files(directory: Path) -> list[Path]:
    """The `*.key` files of a key directory, `service.key` first, then by name."""
    try:
        found = sorted(p for p in directory.iterdir() if p.suffix == ".key" and not p.name.startswith("."))
    except OSError as exc:
        raise KeyFileError(f"cannot read key directory {directory}: {exc.strerror}") from None
    if not found:
        raise KeyFileError(
            f"key directory {directory} holds no *.key file",
            hint="put service.key (the primary) and any older keys still accepted there",
        )
    return sorted(found, key=lambda p: (p.name != PRIMARY_NAME, p.name))
