"""Key files: generation, modes, reloading, refusal of wrong or unsafe files, signatures."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from edgecut import keys
from edgecut.errors import IntegrityError, KeyFileError, UsageError

LOADERS = {
    "service.key": keys.load_service_private,
    "service.pub": keys.load_service_public,
    "signing.key": keys.load_signing_private,
    "signing.pub": keys.load_signing_public,
}


@pytest.fixture(params=keys.SUITES)
def key_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    keys.generate_keys(tmp_path / "keys", suite=request.param)
    return tmp_path / "keys"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_gen_writes_four_files_private_ones_0600(key_dir: Path) -> None:
    assert sorted(os.listdir(key_dir)) == sorted(LOADERS)
    assert _mode(key_dir / "service.key") == 0o600
    assert _mode(key_dir / "signing.key") == 0o600
    assert _mode(key_dir / "service.pub") == 0o644


def test_private_files_are_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = keys.generate_keys(tmp_path)
    finally:
        os.umask(old)
    assert _mode(paths.service_key) == 0o600
    assert _mode(paths.signing_key) == 0o600


def test_files_are_pem(key_dir: Path) -> None:
    assert (key_dir / "service.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (key_dir / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_reload_gives_matching_suite_and_key_id(key_dir: Path) -> None:
    private = keys.load_service_private(key_dir / "service.key")
    public = keys.load_service_public(key_dir / "service.pub")
    assert private.suite == public.suite
    assert keys.key_id(private.public) == keys.key_id(public)
    assert keys.load_signing_private(key_dir / "signing.key")
    assert keys.load_signing_public(key_dir / "signing.pub")


def test_unknown_suite_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown key suite"):
        keys.generate_keys(tmp_path, suite="rsa")


def test_refuses_to_overwrite_and_names_the_file(key_dir: Path) -> None:
    before = (key_dir / "service.key").read_bytes()
    with pytest.raises(KeyFileError, match=r"service\.key") as info:
        keys.generate_keys(key_dir)
    assert "--force" in (info.value.hint or "")
    assert (key_dir / "service.key").read_bytes() == before


def test_refuses_when_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_text("mine")
    with pytest.raises(KeyFileError, match=r"signing\.pub"):
        keys.generate_keys(tmp_path)
    assert not (tmp_path / "service.key").exists()


def test_force_overwrites_with_new_keys(key_dir: Path) -> None:
    old_id = keys.key_id(keys.load_service_public(key_dir / "service.pub"))
    keys.generate_keys(key_dir, force=True)
    assert keys.key_id(keys.load_service_public(key_dir / "service.pub")) != old_id
    assert _mode(key_dir / "service.key") == 0o600
    assert not [p for p in os.listdir(key_dir) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    ("loader", "given", "kind"),
    [
        ("service.key", "signing.key", "Ed25519 private"),
        ("service.key", "service.pub", "public"),
        ("service.pub", "service.key", "private"),
        ("service.pub", "signing.pub", "Ed25519 public"),
        ("signing.key", "service.key", "private"),
        ("signing.pub", "signing.key", "Ed25519 private"),
    ],
)
def test_wrong_kind_is_refused_with_what_it_holds(key_dir: Path, loader: str, given: str, kind: str) -> None:
    with pytest.raises(KeyFileError, match=f"{given}.*holds .*{kind}.*expected .*{loader}"):
        LOADERS[loader](key_dir / given)


@pytest.mark.parametrize("name", list(LOADERS))
def test_garbage_file_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00not a key\xff" * 10)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"{name} holds no PEM key"):
        LOADERS[name](path)


def test_corrupt_pem_block_is_refused(key_dir: Path) -> None:
    path = key_dir / "service.key"
    text = path.read_bytes().replace(b"M", b"A", 3)  # damages the DER inside the armour
    path.write_bytes(text)
    with pytest.raises(KeyFileError, match="unreadable or unsupported 'PRIVATE KEY' block"):
        keys.load_service_private(path)


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "service.pub"
    path.write_bytes(b"x" * (keys.MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(KeyFileError, match="not a key file"):
        keys.load_service_public(path)


@pytest.mark.parametrize("name", list(LOADERS))
def test_missing_file_names_it_and_hints_gen(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match=f"{name} not found") as info:
        LOADERS[name](tmp_path / name)
    assert "edgecut keys gen" in (info.value.hint or "")


@pytest.mark.parametrize("name", ["service.key", "signing.key"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_permissive_private_file_is_refused_with_chmod_hint(key_dir: Path, name: str, mode: int) -> None:
    path = key_dir / name
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="accessible to group or others") as info:
        LOADERS[name](path)
    assert info.value.hint == f"chmod 600 {path}"


def test_errors_and_reprs_never_show_key_material(key_dir: Path) -> None:
    private = keys.load_service_private(key_dir / "service.key")
    secret_pem = (key_dir / "service.key").read_text().splitlines()[1]
    assert "suite=" in repr(private)
    assert secret_pem[:16] not in repr(private)
    (key_dir / "service.key").chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        keys.load_service_private(key_dir / "service.key")
    assert secret_pem[:16] not in str(info.value)


def test_key_id_is_stable_short_hex_and_differs_between_keys(tmp_path: Path) -> None:
    a = keys.generate_keys(tmp_path / "a")
    b = keys.generate_keys(tmp_path / "b")
    id_a = keys.key_id(keys.load_service_public(a.service_pub))
    assert id_a == keys.key_id(keys.load_service_public(a.service_pub))
    assert len(id_a) == 16 and int(id_a, 16) >= 0
    assert id_a != keys.key_id(keys.load_service_public(b.service_pub))
    assert keys.key_id(keys.load_signing_public(a.signing_pub)) != keys.key_id(
        keys.load_signing_public(b.signing_pub)
    )


def test_sign_then_verify(key_dir: Path) -> None:
    private = keys.load_signing_private(key_dir / "signing.key")
    public = keys.load_signing_public(key_dir / "signing.pub")
    signature = keys.sign_bytes(private, b'{"model": "effl0"}')
    keys.verify_bytes(public, b'{"model": "effl0"}', signature)


@pytest.mark.parametrize(
    ("data", "signature_edit"),
    [
        (b'{"model": "effl1"}', lambda s: s),
        (b'{"model": "effl0"}', lambda s: bytes([s[0] ^ 1]) + s[1:]),
        (b'{"model": "effl0"}', lambda s: s[:-1]),
        (b'{"model": "effl0"}', lambda s: b""),
    ],
)
def test_tampered_data_or_signature_raises_integrity_error(
    key_dir: Path, data: bytes, signature_edit: Callable[[bytes], bytes]
) -> None:
    private = keys.load_signing_private(key_dir / "signing.key")
    public = keys.load_signing_public(key_dir / "signing.pub")
    signature = keys.sign_bytes(private, b'{"model": "effl0"}')
    with pytest.raises(IntegrityError, match="does not verify"):
        keys.verify_bytes(public, data, signature_edit(signature))


def test_signature_from_another_key_does_not_verify(tmp_path: Path) -> None:
    a = keys.generate_keys(tmp_path / "a")
    b = keys.generate_keys(tmp_path / "b")
    signature = keys.sign_bytes(keys.load_signing_private(a.signing_key), b"manifest")
    with pytest.raises(IntegrityError):
        keys.verify_bytes(keys.load_signing_public(b.signing_pub), b"manifest", signature)
