"""Key files: the tail service's HPKE key pair and the Ed25519 key pair that signs bundles.

`edgecut keys gen --out DIR` writes four files:

- `service.key` / `service.pub`: the tail service's HPKE key pair. Edges seal every frame to
  `service.pub`; every replica of the tail holds `service.key`, so any replica opens any frame.
  While a key is rotated a service holds the old and the new one (`edgecut.keyring`).
- `signing.key` / `signing.pub`: Ed25519; the partitioner signs bundle manifests with
  `signing.key`, edge and cloud verify them with `signing.pub`.

File formats, all standard PEM that `openssl pkey` reads (ML-KEM blocks need OpenSSL >= 3.5):

- suite `x25519`: one PKCS#8 `PRIVATE KEY` block / one SubjectPublicKeyInfo `PUBLIC KEY` block.
- suite `mlkem768-x25519` (hybrid, post-quantum): cryptography cannot serialize the composite
  HPKE key, only its parts, so the file holds two standard blocks, ML-KEM-768 first, then X25519
  (`PRIVATE KEY` in `service.key`, `PUBLIC KEY` in `service.pub`). The suite is recognised from
  the kinds of key in the file; no edgecut-specific armour is needed.
- `signing.*`: one PKCS#8 / SubjectPublicKeyInfo Ed25519 block.

`edgecut keys gen --device --out DIR` writes `device.key` / `device.pub` instead: an X25519 HPKE
key pair for one device, to which `edgecut bundle protect` wraps the content key of an encrypted
bundle (edgecut.protect). Same PEM format as an x25519 `service.*` pair; it stays on the device.

Private files are created with mode 0600 before a byte is written (never world-readable, not
even briefly) and the loaders refuse a private file that group or others can read. Key material
never appears in messages or reprs: errors name the file and, at most, a public `key_id`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from edgecut.errors import DependencyError, IntegrityError, KeyFileError, UsageError

SUITES = ("x25519", "mlkem768-x25519")  # HPKE KEMs a service key may use; sealing maps them
MAX_KEY_FILE_BYTES = 64 * 1024  # a hybrid public file is ~1.8 KB; anything far bigger is not a key

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KINDS: tuple[tuple[type, str], ...] = (
    (x25519.X25519PrivateKey, "X25519 private"),
    (x25519.X25519PublicKey, "X25519 public"),
    (mlkem.MLKEM768PrivateKey, "ML-KEM-768 private"),
    (mlkem.MLKEM768PublicKey, "ML-KEM-768 public"),
    (ed25519.Ed25519PrivateKey, "Ed25519 private"),
    (ed25519.Ed25519PublicKey, "Ed25519 public"),
)
_HYBRID_PRIVATE = ("ML-KEM-768 private", "X25519 private")
_HYBRID_PUBLIC = ("ML-KEM-768 public", "X25519 public")

HpkePublic = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivate = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


@dataclass(frozen=True)
class ServicePublicKey:
    """The key edges seal frames to; `suite` tells sealing which HPKE KEM to run."""

    suite: str  # one of SUITES
    key: HpkePublic = field(repr=False)
    raw: bytes = field(repr=False)  # public bytes for key_id (the hybrid object exposes none)


@dataclass(frozen=True)
class ServicePrivateKey:
    """The key every tail replica opens frames with; carries its public half for `key_id`."""

    suite: str  # one of SUITES
    key: HpkePrivate = field(repr=False)
    public: ServicePublicKey


@dataclass(frozen=True)
class KeyPaths:
    """Where `generate_keys` wrote the four key files."""

    service_key: Path
    service_pub: Path
    signing_key: Path
    signing_pub: Path


def key_id(public: ServicePublicKey | ed25519.Ed25519PublicKey) -> str:
    """Short stable id of a public key, so an edge can tell it holds the wrong service key."""
    raw = public.raw if isinstance(public, ServicePublicKey) else public.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(out_dir: Path, *, suite: str = "x25519", force: bool = False) -> KeyPaths:
    """Write a fresh service key pair and signing key pair into `out_dir`.

    Refuses to replace existing files unless `force`: a new service key strands every edge that
    holds the old `service.pub`, and a new signing key invalidates every signed bundle.
    """
    if suite not in SUITES:
        raise UsageError(f"unknown key suite {suite!r}; choose one of: {', '.join(SUITES)}")
    paths = KeyPaths(*(out_dir / n for n in ("service.key", "service.pub", "signing.key", "signing.pub")))
    existing = [str(p) for p in vars(paths).values() if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"refusing to overwrite existing key files: {', '.join(existing)}",
            hint="pass --force to replace them (holders of the old keys will stop working)",
        )
    service_private, service_public = _new_service_pems(suite)
    signing = ed25519.Ed25519PrivateKey.generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths.service_key, service_private, 0o600)
    _write_atomic(paths.service_pub, service_public, 0o644)
    _write_atomic(paths.signing_key, _private_pem(signing), 0o600)
    _write_atomic(paths.signing_pub, _public_pem(signing.public_key()), 0o644)
    return paths


def generate_device_keys(out_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a fresh device key pair (`device.key`, `device.pub`, X25519) into `out_dir`.

    Refuses to replace existing files unless `force`: bundles encrypted for the old
    `device.pub` no longer open on that device.
    """
    private, public = out_dir / "device.key", out_dir / "device.pub"
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"refusing to overwrite existing key files: {', '.join(existing)}",
            hint="pass --force to replace them (bundles encrypted for the old key stop opening)",
        )
    private_pem, public_pem = _new_service_pems("x25519")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(private, private_pem, 0o600)
    _write_atomic(public, public_pem, 0o644)
    return private, public


def load_device_private(path: Path) -> ServicePrivateKey:
    """Load `device.key`: the HPKE key that unwraps an encrypted bundle's content key."""
    return _hpke_private(path, "a device private key (device.key)")


def load_device_public(path: Path) -> ServicePublicKey:
    """Load `device.pub`: what `edgecut bundle protect` wraps the content key to."""
    return _hpke_public(path, "a device public key (device.pub)")


def load_service_private(path: Path) -> ServicePrivateKey:
    """Load `service.key` (either suite); KeyFileError if it is anything else or too open."""
    return _hpke_private(path, "a service private key (service.key)")


def _hpke_private(path: Path, wanted: str) -> ServicePrivateKey:
    keys, kinds = _load(path, wanted)
    if kinds == ("X25519 private",):
        key: HpkePrivate = keys[0]
        public = _service_public("x25519", keys[0].public_key(), [keys[0].public_key()])
    elif kinds == _HYBRID_PRIVATE:
        ml, xk = keys  # sorted by kind name: ML-KEM-768 first
        key = hpke.MLKEM768X25519PrivateKey(ml, xk)
        public = _service_public("mlkem768-x25519", key.public_key(), [ml.public_key(), xk.public_key()])
    else:
        raise _wrong_kind(path, kinds, wanted)
    _check_private_mode(path)
    return ServicePrivateKey(public.suite, key, public)


def load_service_public(path: Path) -> ServicePublicKey:
    """Load `service.pub` (either suite); KeyFileError if it is anything else."""
    return _hpke_public(path, "a service public key (service.pub)")


def _hpke_public(path: Path, wanted: str) -> ServicePublicKey:
    keys, kinds = _load(path, wanted)
    if kinds == ("X25519 public",):
        return _service_public("x25519", keys[0], keys)
    if kinds == _HYBRID_PUBLIC:
        ml, xk = keys  # sorted by kind name: ML-KEM-768 first
        return _service_public("mlkem768-x25519", hpke.MLKEM768X25519PublicKey(ml, xk), [ml, xk])
    raise _wrong_kind(path, kinds, wanted)


def load_signing_private(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load `signing.key`; KeyFileError if it is anything else or too open."""
    keys, kinds = _load(path, "an Ed25519 signing private key (signing.key)")
    if kinds != ("Ed25519 private",):
        raise _wrong_kind(path, kinds, "an Ed25519 signing private key (signing.key)")
    _check_private_mode(path)
    return keys[0]


def load_signing_public(path: Path) -> ed25519.Ed25519PublicKey:
    """Load `signing.pub`; KeyFileError if it is anything else."""
    keys, kinds = _load(path, "an Ed25519 signing public key (signing.pub)")
    if kinds != ("Ed25519 public",):
        raise _wrong_kind(path, kinds, "an Ed25519 signing public key (signing.pub)")
    return keys[0]


def sign_bytes(private: ed25519.Ed25519PrivateKey, data: bytes) -> bytes:
    """Detached Ed25519 signature (64 bytes) over `data`, e.g. a bundle manifest."""
    return private.sign(data)


def verify_bytes(public: ed25519.Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Return if `signature` is `public`'s over `data`; IntegrityError otherwise."""
    try:
        public.verify(signature, data)
    except (InvalidSignature, ValueError):
        raise IntegrityError(
            f"signature does not verify against signing key {key_id(public)}",
            hint="the data changed after signing, or it was signed with another signing.key",
        ) from None


def _new_service_pems(suite: str) -> tuple[bytes, bytes]:
    """PEM (private, public) of a fresh service key pair: one block, or two for the hybrid."""
    xk = x25519.X25519PrivateKey.generate()
    if suite == "x25519":
        return _private_pem(xk), _public_pem(xk.public_key())
    try:
        ml = mlkem.MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        raise DependencyError(
            "this cryptography/OpenSSL build has no ML-KEM-768",
            hint="use --suite x25519, or upgrade cryptography",
        ) from None
    return (
        _private_pem(ml) + _private_pem(xk),
        _public_pem(ml.public_key()) + _public_pem(xk.public_key()),
    )


def _private_pem(
    key: x25519.X25519PrivateKey | mlkem.MLKEM768PrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(
    key: x25519.X25519PublicKey | mlkem.MLKEM768PublicKey | ed25519.Ed25519PublicKey,
) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with `mode` (O_EXCL), then rename over `path`.

    The mode is set at creation, so a private key is never readable by others, and the rename
    means a crash leaves either the old file or the complete new one.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # exact mode whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write key file {path}: {e.strerror}") from None


def _load(path: Path, wanted: str) -> tuple[list, tuple[str, ...]]:
    """Parse every PEM block in `path`; return the keys and their sorted kind names."""
    data = _read(path)
    blocks = _PEM_BLOCK.finditer(data)
    keys = [_parse_block(path, m.group(0), m.group(1), wanted) for m in blocks]
    if not keys:
        raise KeyFileError(f"key file {path} holds no PEM key; expected {wanted}")
    pairs = sorted(((_kind(k), k) for k in keys), key=lambda pair: pair[0])
    return [k for _, k in pairs], tuple(kind for kind, _ in pairs)


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"key file {path} is {size} bytes; not a key file")
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} not found", hint="create keys with `edgecut keys gen --out DIR`"
        ) from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None


def _parse_block(path: Path, block: bytes, label: bytes, wanted: str) -> object:
    try:
        if label.endswith(b"PRIVATE KEY"):
            return serialization.load_pem_private_key(block, password=None)
        if label.endswith(b"PUBLIC KEY"):
            return serialization.load_pem_public_key(block)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass  # unreadable or passphrase-protected: reported below without the cause's bytes
    raise KeyFileError(
        f"key file {path} holds an unreadable or unsupported '{label.decode()}' block; expected {wanted}"
    )


def _kind(key: object) -> str:
    return next((name for cls, name in _KINDS if isinstance(key, cls)), type(key).__name__)


def _service_public(suite: str, key: HpkePublic, parts: list) -> ServicePublicKey:
    return ServicePublicKey(suite, key, b"".join(p.public_bytes_raw() for p in parts))


def _wrong_kind(path: Path, kinds: tuple[str, ...], wanted: str) -> KeyFileError:
    held = " + ".join(kinds) + (" key" if len(kinds) == 1 else " keys")
    return KeyFileError(f"key file {path} holds {held}; expected {wanted}")


def _check_private_mode(path: Path) -> None:
    """Refuse a private key file others can read: it may already have leaked; say how to fix."""
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"private key file {path} is accessible to group or others (mode {mode:o})",
            hint=f"chmod 600 {path}",
        )
