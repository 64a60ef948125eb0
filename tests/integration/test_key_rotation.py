"""Service key rotation, with real servers and real HPKE: old → both → new, edges never stranded.

The service holds the new key (primary, advertised) and the old one; an edge agent that still
has the old `service.pub` keeps being answered by the cloud, as does one with the new; once the
old key is removed, a frame sealed to it is refused with an error naming its key id and the ones
the service holds. The middle phase runs `edgecut cloud serve --service-key new --service-key old`
as a child process, so the repeated flag is what is tested.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import EdgeClient, Stream, running_server, serve_config
from test_cloud_service import CODE, OK, infer_one

from edgecut.cloud.spawn import tail_service
from edgecut.edge.agent import Result, image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import SealError
from edgecut.framing import grpc_options
from edgecut.keys import KeyPaths, generate_keys, key_id, load_service_public
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

CUT = "c06"
N_INPUTS = 6


@pytest.fixture(scope="module")
def old_new(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPaths, KeyPaths]:
    root = tmp_path_factory.mktemp("rotation")
    return generate_keys(root / "old"), generate_keys(root / "new")


def _kid(keys: KeyPaths) -> str:
    return key_id(load_service_public(keys.service_pub))


def _agent_run(bundles: Path, address: str, pub: Path, photos: list[np.ndarray]) -> Counter[str]:
    """Where an edge agent's answers came from (cloud / local / failed), each input once."""
    config = EdgeConfig(bundles / "effl0", address, pub, cut=CUT, threads=1, deadline_ms=20_000)
    items = [image_input(i, f"photo{i}", photos[i % len(photos)]) for i in range(N_INPUTS)]
    results: list[Result] = []
    with start_agent(config) as agent:
        agent.run(items, results.append)
    assert sorted(r.position for r in results) == list(range(N_INPUTS))
    return Counter(r.where for r in results)


def test_rotation_keeps_old_and_new_edges_on_the_cloud(
    bundles_dir: Path, old_new: tuple[KeyPaths, KeyPaths], photos: list[np.ndarray]
) -> None:
    old, new = old_new
    extra = ("--service-key", str(old.service_key), "--threads", "1")
    with tail_service(bundles_dir, new.service_key, *extra) as address:
        with grpc.insecure_channel(address, options=grpc_options()) as ch:
            info = edgecut_pb2_grpc.TailServiceStub(ch).ServerInfo(pb.ServerInfoRequest())
        assert (info.key_id, list(info.key_ids)) == (_kid(new), [_kid(new), _kid(old)])
        on_old = _agent_run(bundles_dir, address, old.service_pub, photos)
        on_new = _agent_run(bundles_dir, address, new.service_pub, photos)
    assert on_old == Counter(cloud=N_INPUTS), on_old  # the not yet updated edge: no outage
    assert on_new == Counter(cloud=N_INPUTS), on_new


def test_a_removed_key_is_refused_naming_its_id(
    bundles_dir: Path,
    old_new: tuple[KeyPaths, KeyPaths],
    edge: EdgeClient,
    photos: list[np.ndarray],
) -> None:
    old, new = old_new
    feeds = edge.frontier(photos[0], CUT)
    to_old = load_service_public(old.service_pub)
    with running_server(serve_config(bundles_dir, new)) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        refused = infer_one(stream, edge, feeds, CUT, public=to_old)
        assert refused.code == CODE["UNAUTHENTICATED"], refused.message
        assert f"sealed to service key '{_kid(old)}'" in refused.message
        assert f"does not hold (it holds {_kid(new)})" in refused.message
        ok = infer_one(stream, edge, feeds, CUT, public=load_service_public(new.service_pub))
        assert ok.code == OK, ok.message
        stream.close()
        # An edge agent left on the removed key is stopped at connect (ServerInfo lists the keys
        # held), naming both sides' key ids, before it sends a frame.
        with pytest.raises(
            SealError, match=f"sealed to key {_kid(new)}, but --server-key is key {_kid(old)}"
        ):
            _agent_run(bundles_dir, f"127.0.0.1:{h.port}", old.service_pub, photos)


def test_frames_without_a_key_id_open_with_the_primary_key(
    bundles_dir: Path, old_new: tuple[KeyPaths, KeyPaths], edge: EdgeClient, photos: list[np.ndarray]
) -> None:
    """An edge from before rotation names no key: its frame is opened with the primary only."""
    old, new = old_new
    feeds = edge.frontier(photos[0], CUT)
    config = serve_config(bundles_dir, new, extra_keys=(old.service_key,))
    with running_server(config) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        answers: dict[str, Any] = {}
        for name, keys in (("primary", new), ("older", old)):
            pending = edge.request(feeds, CUT, public=load_service_public(keys.service_pub))
            pending.frames[0].ClearField("key_id")
            stream.send(pending)
            answers[name] = stream.recv(pending.binding.request_id)
            named = edge.request(feeds, CUT, public=load_service_public(keys.service_pub))
            stream.send(named)
            answers[f"{name}, named"] = stream.recv(named.binding.request_id)
        stream.close()
    codes = {name: answer.code for name, answer in answers.items()}
    assert codes == {
        "primary": OK,
        "primary, named": OK,
        "older": CODE["UNAUTHENTICATED"],
        "older, named": OK,
    }
    assert f"this service's key id is {_kid(new)}" in answers["older"].message
