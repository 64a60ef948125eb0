"""The key ring a service holds during a rotation: which keys, in which order, from which flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgecut.cli import build_parser
from edgecut.cloud.cli import config_from_args
from edgecut.cloud.config import ServeConfig
from edgecut.errors import KeyFileError, SealError, UnknownKeyError
from edgecut.keyring import KeyRing
from edgecut.keys import KeyPaths, generate_keys, key_id, load_service_public
from edgecut.sealing import Binding, open_sealed, seal_request


@pytest.fixture(scope="module")
def old_new(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPaths, KeyPaths]:
    root = tmp_path_factory.mktemp("ring")
    return generate_keys(root / "old"), generate_keys(root / "new", suite="mlkem768-x25519")


def _kid(keys: KeyPaths) -> str:
    return key_id(load_service_public(keys.service_pub))


def test_files_in_order_the_first_is_primary(old_new: tuple[KeyPaths, KeyPaths]) -> None:
    old, new = old_new
    ring = KeyRing.load([new.service_key, old.service_key, new.service_key])  # a repeat counts once
    assert ring.ids == (_kid(new), _kid(old))
    assert ring.find("") is ring.primary and ring.primary.suite == "mlkem768-x25519"
    binding = Binding("m", "1", "c", "rid")
    sealed, key = seal_request(load_service_public(old.service_pub), binding, b"payload")
    assert ring.open(_kid(old), binding, sealed).response_key == key
    with pytest.raises(SealError):  # not named: the primary is tried, and only it
        ring.open("", binding, sealed)


def test_a_key_not_held_is_named_with_the_keys_held(old_new: tuple[KeyPaths, KeyPaths]) -> None:
    old, new = old_new
    with pytest.raises(UnknownKeyError) as info:
        KeyRing.load(new.service_key).find(_kid(old), "rid-1")
    assert info.value.grpc_status == "UNAUTHENTICATED"
    assert f"'rid-1' is sealed to service key '{_kid(old)}'" in info.value.message
    assert f"(it holds {_kid(new)})" in info.value.message


def test_a_key_directory_puts_service_key_first(old_new: tuple[KeyPaths, KeyPaths], tmp_path: Path) -> None:
    old, new = old_new
    (tmp_path / "a-old.key").write_bytes(old.service_key.read_bytes())
    (tmp_path / "a-old.key").chmod(0o600)
    shutil.copy(new.service_key, tmp_path / "service.key")
    (tmp_path / "service.pub").write_bytes(new.service_pub.read_bytes())  # not a *.key: ignored
    assert KeyRing.load(tmp_path).ids == (_kid(new), _kid(old))
    (tmp_path / "a-old.key").chmod(0o644)  # every key file keeps the 0600 rule
    with pytest.raises(KeyFileError, match="mode 644"):
        KeyRing.load(tmp_path)


def test_an_empty_key_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"holds no \*\.key file"):
        KeyRing.load(tmp_path)


def test_repeated_flag_and_toml_list_give_primary_then_extra(tmp_path: Path) -> None:
    argv = ["cloud", "serve", "--bundles", "b", "--service-key", "new.key", "--service-key", "old.key"]
    config = config_from_args(build_parser(argv).parse_args(argv))
    assert config.key_paths == (Path("new.key"), Path("old.key"))
    toml = tmp_path / "serve.toml"
    toml.write_text('bundles = "b"\nkey = ["new.key", "old.key"]\nextra_keys = ["older.key"]\n')
    assert ServeConfig.from_toml(toml).key_paths == (Path("new.key"), Path("old.key"), Path("older.key"))
    single = ["cloud", "serve", "--bundles", "b", "--service-key", "k.key"]
    assert config_from_args(build_parser(single).parse_args(single)).key_paths == (Path("k.key"),)


def test_open_sealed_still_opens_with_one_key(old_new: tuple[KeyPaths, KeyPaths]) -> None:
    """The single-key path (`sealing.open_sealed`) is unchanged for callers holding one key."""
    old, _ = old_new
    binding = Binding("m", "1", "c", "rid")
    sealed, _ = seal_request(load_service_public(old.service_pub), binding, b"x")
    assert open_sealed(KeyRing.load(old.service_key).primary, binding, sealed).payload == b"x"
