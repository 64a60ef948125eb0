"""Chunking requests under the gRPC message limit, and refusing chunk streams that lie."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecut import keys, sealing
from edgecut.errors import CodecError, FrameTooLargeError
from edgecut.framing import Reassembler, RequestHead, build_request, split

HEAD = RequestHead("r1", "effl0", "1", "c05", 0, 123)


@given(size=st.integers(0, 5000), chunk=st.integers(1, 700))
def test_split_then_reassemble_round_trips(size: int, chunk: int) -> None:
    data = os.urandom(size)
    frames = split(HEAD, data, chunk)
    assert all(len(f.sealed) <= chunk for f in frames)
    r = Reassembler()
    results = [r.add(f) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == (HEAD, data)


def test_interleaved_requests() -> None:
    a = split(HEAD, b"a" * 10, 3)
    b = split(RequestHead("r2", "effl0", "1", "c05", 0, 0), b"b" * 7, 3)
    r = Reassembler()
    out = [r.add(f) for f in [a[0], b[0], a[1], b[1], a[2], b[2], a[3]]]
    whole = [o for o in out if o is not None]
    assert [h.request_id for h, _ in whole] == ["r2", "r1"]


def _frames(n: int = 3) -> list:  # type: ignore[type-arg]
    return split(HEAD, b"x" * 30, 10)[:n]


@pytest.mark.parametrize(
    "mutate, error, needle",
    [
        (lambda fs: [fs[1]], CodecError, "without chunk 0"),
        (lambda fs: [fs[0], fs[2]], CodecError, "expected 1"),
        (lambda fs: [fs[0], fs[0]], CodecError, "started twice"),
        (lambda fs: [_set(fs[0], total_bytes=1 << 40)], FrameTooLargeError, "at most"),
        (lambda fs: [_set(fs[0], chunk_count=0)], CodecError, "chunk_count"),
        (lambda fs: [_set(fs[0], total_bytes=12), fs[1]], CodecError, "exceed"),
        (lambda fs: [_set(fs[0], total_bytes=40), fs[1], fs[2]], CodecError, "announced"),
        (lambda fs: [_set(fs[0], request_id="")], CodecError, "no request_id"),
    ],
)
def test_lying_chunks_fail_that_request_only(mutate, error, needle) -> None:  # type: ignore[no-untyped-def]
    r = Reassembler()
    with pytest.raises(error, match=needle):
        for f in mutate(_frames()):
            r.add(f)
    good = split(RequestHead("ok", "m", "1", "c", 0, 0), b"fine", 2)
    assert [r.add(f) for f in good][-1] is not None  # the stream goes on


def test_pending_requests_are_bounded() -> None:
    r = Reassembler(max_pending=2)
    for i in range(2):
        r.add(split(RequestHead(f"p{i}", "m", "1", "c", 0, 0), b"x" * 10, 3)[0])
    with pytest.raises(FrameTooLargeError, match="pending"):
        r.add(split(RequestHead("p9", "m", "1", "c", 0, 0), b"x" * 10, 3)[0])
    assert r.drop() == 2


def _set(frame, **kw):  # type: ignore[no-untyped-def]
    from edgecut.v1 import edgecut_pb2 as pb

    f = pb.Frame()
    f.CopyFrom(frame)
    for k, v in kw.items():
        setattr(f, k, v)
    return f


# Issue 12: string fields capped before anything is buffered; cancel; one way to build a request.


@pytest.mark.parametrize("field", ["model", "version", "cut"])
def test_long_fields_are_refused_at_chunk_0(field: str) -> None:
    frame = _set(split(HEAD, b"x" * 30, 10)[0], **{field: "m" * 300})
    r = Reassembler()
    with pytest.raises(CodecError, match=f"{field} is 300 bytes; at most 256"):
        r.add(frame)
    assert r.drop() == 0


def test_a_long_request_id_is_refused_on_any_chunk_and_never_echoed_whole() -> None:
    frame = _set(split(HEAD, b"x" * 30, 10)[1], request_id="r" * 5000)
    with pytest.raises(CodecError, match="longer than 256 bytes") as info:
        Reassembler().add(frame)
    assert len(str(info.value)) < 200


def test_cancel_forgets_a_partial_request() -> None:
    r = Reassembler()
    frames = split(HEAD, b"x" * 30, 10)
    assert r.add(frames[0]) is None
    assert r.cancel(HEAD.request_id) and not r.cancel(HEAD.request_id)
    with pytest.raises(CodecError, match="without chunk 0"):
        r.add(frames[1])


def test_build_request_binds_what_the_frames_say(tmp_path: Path) -> None:
    paths = keys.generate_keys(tmp_path)
    public, private = (
        keys.load_service_public(paths.service_pub),
        keys.load_service_private(paths.service_key),
    )
    request = build_request(
        public,
        payload=b"p" * 100,
        model="m",
        version="1",
        cut="c",
        identity="token:x",
        deadline_ms=5000,
        now_ms=4000,
        chunk_bytes=64,
    )
    assert len(request.frames) > 1 and Reassembler().add(request.frames[0]) is None
    whole = Reassembler()
    out = [whole.add(f) for f in request.frames][-1]
    assert out is not None
    head, sealed = out
    assert head.binding("token:x") == request.binding
    assert sealing.open_request(private, head.binding("token:x"), sealed)[0] == b"p" * 100
