"""How a client reaches a tail service that wants TLS, a client certificate or a device token.

`edgecut plan --server` and `edgecut bench sweep --server` take the flags `edgecut edge run` takes
(`--tls-ca`, `--tls-cert`, `--tls-key`, `--token` / `$EDGECUT_TOKEN`) and open their channel here,
so every client of a production service authenticates the same way. No `--tls-ca`: plaintext.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from edgecut.errors import UsageError

TOKEN_ENV = "EDGECUT_TOKEN"


@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents and trusts; empty = plaintext, no token."""

    token: str | None = field(default=None, repr=False)  # device token, sent as `authorization: Bearer`
    tls_ca: bytes | None = field(default=None, repr=False)  # PEM roots; None = plaintext channel
    tls_cert: bytes | None = field(default=None, repr=False)  # client certificate chain (mTLS)
    tls_key: bytes | None = field(default=None, repr=False)  # its private key

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("a client certificate needs both --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise UsageError("--tls-cert (mTLS) needs --tls-ca: the roots the server is checked against")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(
        self, target: str, options: Sequence[tuple[str, Any]] = (), server_name: str | None = None
    ) -> grpc.Channel:
        """A sync channel to `target`; `server_name` is the name the certificate must carry when
        `target` is a relay (the sweep's link emulator) rather than the service itself."""
        if self.tls_ca is None:
            return grpc.insecure_channel(target, options=list(options))
        creds = grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)
        extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return grpc.secure_channel(target, creds, options=[*options, *extra])


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The four client flags, as `edgecut edge run` spells them."""
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"device token (default: ${TOKEN_ENV})"
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM roots: use TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client key for mTLS")


def from_args(args: argparse.Namespace) -> ClientCredentials:
    return from_files(args.token, args.tls_ca, args.tls_cert, args.tls_key)


def from_files(
    token: str | None, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> ClientCredentials:
    return ClientCredentials(token or None, read_pem(tls_ca), read_pem(tls_cert), read_pem(tls_key))


def read_pem(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
