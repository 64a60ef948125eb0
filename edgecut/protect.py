"""Model files encrypted at rest for one device: AES-256-GCM under a content key wrapped with HPKE.

Threat model: someone copies the SD card or the bundle directory of a device. They get ciphertext
and a content key sealed to `device.pub`; without `device.key` they get no weights. It does not
protect against root on the running device (which can read `device.key` and the process memory
where the decrypted model lives) — that needs a TPM/TEE, which this format leaves to the platform.

`protect_bundle` writes a *device copy* of a bundle: every model file (`.onnx` segments, their int8
variants, `.tflite` conversions, external weight files) is replaced by `<file>.enc`; the tail
service keeps serving the plaintext original, whose build identity is the same (the manifest records
each file's plaintext sha256, from which `plaintext_manifest` rebuilds the original manifest).

Manifest section `encryption`, covered by the signature like everything else:

    scheme        "aes-256-gcm+hpke-x25519-v1"
    suite         HPKE KEM of the device key ("x25519")
    key_id        edgecut.keys.key_id of device.pub, so a wrong key is named before any decryption
    wrapped_key   hex: HPKE enc || ciphertext of the 32-byte content key, info = label + model + version
    files         logical path -> {stored, nonce, tag, plain_sha256, plain_bytes}

Each stored file is the AES-256-GCM ciphertext without its tag (the 16-byte tag is in the manifest;
the ciphertext's sha256 is in `files` as for any file), AAD = label + model + version + logical
path, so a ciphertext cannot be moved to another file or model. The agent decrypts into memory and
hands bytes to ONNX Runtime / LiteRT: no plaintext model file is ever written on the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgecut.bundle import Bundle, Manifest, load_bundle, write_manifest
from edgecut.errors import IntegrityError, UsageError
from edgecut.keys import ServicePrivateKey, ServicePublicKey, key_id

SCHEME = "aes-256-gcm+hpke-x25519-v1"
MODEL_SUFFIXES = (".onnx", ".tflite", ".data")  # files holding weights; labels etc. stay readable
_KEY_LABEL = b"edgecut/v1 content key\x00"
_FILE_LABEL = b"edgecut/v1 model file\x00"
_TAG_BYTES = 16
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _fields(*values: str) -> bytes:
    parts = (v.encode() for v in values)
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def is_encrypted(manifest: Manifest) -> bool:
    return bool(manifest.encryption)


def protect_bundle(
    source: Bundle, device: ServicePublicKey, out: Path, *, signing_key: Any = None, force: bool = False
) -> Bundle:
    """Write an encrypted device copy of `source` to `out` (all or nothing on disk)."""
    if device.suite != "x25519":
        raise UsageError(f"device keys must be x25519 (this one is {device.suite})")
    if is_encrypted(source.manifest):
        raise UsageError(f"bundle '{source.root}' is already encrypted")
    if out.exists() and not force:
        raise UsageError(f"output directory '{out}' exists (use --force to replace it)")
    m = source.manifest
    content_key = AESGCM.generate_key(bit_length=256)
    wrapped = _SUITE.encrypt(content_key, device.key, info=_KEY_LABEL + _fields(m.model, m.version))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files, entries = dict(m.files), {}
        for rel in sorted(m.files):
            if Path(rel).suffix not in MODEL_SUFFIXES:
                _copy(source.path(rel), tmp / rel)
                continue
            stored, entry, digest = _encrypt_file(source.path(rel), tmp, rel, content_key, m)
            del files[rel]
            files[stored] = digest
            entries[rel] = entry
        encryption = {
            "scheme": SCHEME,
            "suite": device.suite,
            "key_id": key_id(device),
            "wrapped_key": wrapped.hex(),
            "files": entries,
        }
        write_manifest(tmp, dataclasses.replace(m, files=files, encryption=encryption), signing_key)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _encrypt_file(
    src: Path, root: Path, rel: str, content_key: bytes, m: Manifest
) -> tuple[str, dict[str, Any], str]:
    plain = src.read_bytes()
    nonce = os.urandom(12)
    sealed = AESGCM(content_key).encrypt(nonce, plain, _FILE_LABEL + _fields(m.model, m.version, rel))
    body, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
    stored = rel + ".enc"
    (root / stored).parent.mkdir(parents=True, exist_ok=True)
    (root / stored).write_bytes(body)
    entry = {
        "stored": stored,
        "nonce": nonce.hex(),
        "tag": tag.hex(),
        "plain_sha256": hashlib.sha256(plain).hexdigest(),
        "plain_bytes": len(plain),
    }
    return stored, entry, hashlib.sha256(body).hexdigest()


def plaintext_manifest(m: Manifest) -> Manifest:
    """The manifest of the plaintext bundle this device copy was made from (same build identity)."""
    entries = m.encryption.get("files", {})
    stored = {str(e["stored"]) for e in entries.values()}
    files = {k: v for k, v in m.files.items() if k not in stored}
    files |= {rel: str(e["plain_sha256"]) for rel, e in entries.items()}
    return dataclasses.replace(m, files=files, encryption={})


class ModelFiles:
    """Reads a bundle's model files as bytes, decrypting in memory where the bundle is encrypted.

    The one way the edge gets model bytes: read once, check the sha256 the manifest lists, open the
    AEAD, check the plaintext sha256, hand the bytes to the runtime. Nothing is written to disk.
    """

    def __init__(self, bundle: Bundle, device_key: ServicePrivateKey | None = None) -> None:
        self.bundle = bundle
        self._key = _unwrap(bundle, device_key) if is_encrypted(bundle.manifest) else None

    def read(self, rel: str) -> bytes:
        """The plaintext bytes of logical file `rel` (e.g. "segments/seg_003.onnx")."""
        m = self.bundle.manifest
        entry = m.encryption.get("files", {}).get(rel)
        stored = str(entry["stored"]) if entry else rel
        if stored not in m.files:
            raise IntegrityError(f"bundle '{self.bundle.name}': file '{rel}' is not listed in the manifest")
        data = _read_checked(self.bundle, stored, m.files[stored])
        if entry is None or self._key is None:
            return data
        aad = _FILE_LABEL + _fields(m.model, m.version, rel)
        try:
            plain = AESGCM(self._key).decrypt(
                bytes.fromhex(entry["nonce"]), data + bytes.fromhex(entry["tag"]), aad
            )
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"bundle '{self.bundle.name}' {stored}: decryption failed — ciphertext or manifest tampered"
            ) from None
        if hashlib.sha256(plain).hexdigest() != entry["plain_sha256"]:
            raise IntegrityError(f"bundle '{self.bundle.name}' {stored}: plaintext sha256 mismatch")
        return plain


def _read_checked(bundle: Bundle, rel: str, digest: str) -> bytes:
    path = bundle.path(rel)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IntegrityError(f"bundle '{bundle.name}': cannot read {rel}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"bundle '{bundle.name}' {rel}: sha256 mismatch — file changed after signing")
    return data


def _unwrap(bundle: Bundle, device_key: ServicePrivateKey | None) -> bytes:
    enc: Mapping[str, Any] = bundle.manifest.encryption
    wanted = str(enc.get("key_id", "?"))
    if enc.get("scheme") != SCHEME:
        raise IntegrityError(f"bundle '{bundle.name}': unknown encryption scheme {enc.get('scheme')!r}")
    if device_key is None:
        raise UsageError(
            f"bundle '{bundle.name}' is encrypted for device key {wanted}; no device key given",
            hint="pass --device-key device.key (edgecut keys gen --device)",
        )
    held = key_id(device_key.public)
    if held != wanted:
        raise IntegrityError(
            f"bundle '{bundle.name}' is encrypted for device key {wanted}, not this key ({held})",
            hint="protect the bundle for this device's device.pub, or use that device's key",
        )
    m = bundle.manifest
    try:
        return _SUITE.decrypt(
            bytes.fromhex(str(enc["wrapped_key"])),
            device_key.key,
            info=_KEY_LABEL + _fields(m.model, m.version),
        )
    except (InvalidTag, ValueError, KeyError):
        raise IntegrityError(
            f"bundle '{bundle.name}': the wrapped content key does not open with device key {held}"
        ) from None
