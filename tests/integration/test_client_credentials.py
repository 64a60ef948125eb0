"""`plan --server` and `bench sweep --server` reach a tail service that wants mTLS and a device token,
with the edge's flags; without them they fail with one clear line. Real server, real certificates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_tls

from edgecut import credentials
from edgecut.apps.bench import config_from_args
from edgecut.cli import build_parser, main
from edgecut.errors import UsageError

TOKEN = "plan-device-token"
pki = test_tls.pki  # the throwaway CA and its server and device certificates


@pytest.fixture(scope="module")
def edge_profile(effl0_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("creds") / "edge.json"
    assert main(["profile", str(effl0_bundle), "--out", str(out), "--runs", "1", "--threads", "1"]) == 0
    return out


@pytest.fixture
def secured(tail_server: Any, pki: Path, tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} planner\n")
    tokens.chmod(0o600)
    with tail_server(
        tls_cert=pki / "server.crt", tls_key=pki / "server.key", client_ca=pki / "ca.crt", tokens=tokens
    ) as server:
        yield server


def plan_argv(bundle: Path, profile: Path, port: int, *extra: str) -> list[str]:
    return [
        "plan",
        str(bundle),
        "--edge-profile",
        str(profile),
        "--server",
        f"localhost:{port}",
        "--bandwidth",
        "8mbit",
        "--codec",
        "int8",
        "--json",
        *extra,
    ]


def test_plan_reaches_an_mtls_and_token_service(
    effl0_bundle: Path, edge_profile: Path, secured: Any, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = [
        "--tls-ca",
        str(pki / "ca.crt"),
        "--tls-cert",
        str(pki / "device.crt"),
        "--tls-key",
        str(pki / "device.key"),
    ]
    argv = plan_argv(effl0_bundle, edge_profile, secured.port, *tls)
    capsys.readouterr()
    assert main([*argv, "--token", TOKEN]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["chosen"]["cut"] in {r["cut"] for r in plan["rows"]}

    assert main([*argv, "--token", "wrong"]) == 1
    assert "error: tail service localhost:" in capsys.readouterr().err
    assert main(plan_argv(effl0_bundle, edge_profile, secured.port, "--token", TOKEN)) == 1
    assert "unreachable" in capsys.readouterr().err  # plaintext to a TLS port


def test_client_flags_are_checked_before_any_connection(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs --tls-ca"):
        credentials.from_files(None, None, pki / "device.crt", pki / "device.key")
    with pytest.raises(UsageError, match="both --tls-cert and --tls-key"):
        credentials.from_files(None, pki / "ca.crt", pki / "device.crt", None)
    with pytest.raises(UsageError, match="cannot read"):
        credentials.from_files(None, tmp_path / "missing.pem", None, None)


def test_sweep_takes_the_same_flags_and_never_records_the_token(
    effl0_bundle: Path, pki: Path, tmp_path: Path
) -> None:
    argv = ["bench", "sweep", str(effl0_bundle), "--out", str(tmp_path)]
    args = build_parser(argv).parse_args(
        [
            *argv,
            "--server",
            "localhost:1",
            "--server-key",
            "s.pub",
            "--tls-ca",
            str(pki / "ca.crt"),
            "--token",
            TOKEN,
        ]
    )
    config = config_from_args(args)
    assert config.credentials().token == TOKEN and config.credentials().tls_ca
    assert "--tls-ca" in config.command() and TOKEN not in config.command() and TOKEN not in repr(config)
    spawned = build_parser(argv).parse_args([*argv, "--token", TOKEN])
    with pytest.raises(UsageError, match="need --server"):
        config_from_args(spawned)
