"""Device tokens change without a restart: the tokens file is re-read when it changes.

A real server with a tokens file; the file is then replaced (rename over it, as an operator or a
Kubernetes Secret update does) and edited in place. A removed token is refused on its next request
even on a stream it opened before; a new token is accepted; a changed file that is unusable (too
open) is not loaded and the tokens in force stay.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import EdgeClient, Stream
from test_cloud_service import CODE, OK, infer_one

from edgecut.sealing import device_identity, token_digest
from edgecut.v1 import edgecut_pb2 as pb

CUT = "c06"


def _replace(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a new file beside `path` and rename it over: what editors and secret mounts do."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tokens_file_changes_apply_without_a_restart(
    tail_server: Any,
    edge: EdgeClient,
    photos: list[np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = tmp_path / "tokens.txt"
    _replace(tokens, "tok-a cam-1\n")
    feeds = edge.frontier(photos[0], CUT)
    with tail_server(tokens=tokens) as h, h.channel() as ch:
        stub = h.stub(ch)
        a = Stream(stub, metadata=_bearer("tok-a"))
        assert infer_one(a, edge, feeds, CUT, identity=device_identity("tok-a")).code == OK

        _replace(tokens, f"sha256:{token_digest('tok-b')} cam-2  # tok-a revoked, tok-b added\n")
        revoked = infer_one(a, edge, feeds, CUT, identity=device_identity("tok-a"))
        assert revoked.code == CODE["UNAUTHENTICATED"] and "revoked" in revoked.message  # same stream
        a.close()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerInfo(pb.ServerInfoRequest(), metadata=_bearer("tok-a"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        b = Stream(stub, metadata=_bearer("tok-b"))
        assert infer_one(b, edge, feeds, CUT, identity=device_identity("tok-b")).code == OK

        with caplog.at_level(logging.ERROR, logger="edgecut.cloud.tokens"):
            _replace(tokens, "tok-c cam-3\n", mode=0o644)  # readable by others: not loaded
            assert infer_one(b, edge, feeds, CUT, identity=device_identity("tok-b")).code == OK
        assert any("mode 644" in r.getMessage() for r in caplog.records), caplog.records
        b.close()
        with pytest.raises(grpc.RpcError) as not_loaded:
            stub.ServerInfo(pb.ServerInfoRequest(), metadata=_bearer("tok-c"))
        assert not_loaded.value.code() == grpc.StatusCode.UNAUTHENTICATED

        tokens.chmod(0o600)  # fixed in place: now it loads
        assert stub.ServerInfo(pb.ServerInfoRequest(), metadata=_bearer("tok-c")).identity == device_identity(
            "tok-c"
        )
        with tokens.open("a") as f:  # an edit in place (same inode) is seen too
            f.write("tok-d cam-4\n")
        assert stub.ServerInfo(pb.ServerInfoRequest(), metadata=_bearer("tok-d")).identity
        held = h.server.ctx.grants.current()  # only digests are held, never the tokens
        assert set(held) == {token_digest("tok-c"), token_digest("tok-d")}
