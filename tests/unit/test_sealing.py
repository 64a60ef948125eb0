"""Sealing: real HPKE keys from disk, real AEAD, tampering, bindings, replay window."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke

from edgecut import keys, sealing
from edgecut.answers import FULL, AnswerSpec
from edgecut.errors import CodecError, OverloadedError, ReplayError, SealError, UsageError
from edgecut.keys import ServicePrivateKey, ServicePublicKey
from edgecut.sealing import Binding, ReplayGuard

BINDING = Binding(model="effl0", version="3", cut="blocks.4", request_id="dev7-000042")
PAYLOAD = os.urandom(20 * 1024)
NOW_MS = 1_700_000_000_000
KeyPair = tuple[ServicePrivateKey, ServicePublicKey]


def _pair(directory: Path, suite: str) -> KeyPair:
    paths = keys.generate_keys(directory, suite=suite)
    return keys.load_service_private(paths.service_key), keys.load_service_public(paths.service_pub)


@pytest.fixture(scope="module", params=keys.SUITES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _pair(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def sealed(pair: KeyPair) -> tuple[bytes, bytes]:
    return sealing.seal_request(pair[1], BINDING, PAYLOAD, now_ms=NOW_MS)


def test_request_and_response_round_trip(pair: KeyPair) -> None:
    private, public = pair
    frame, response_key = sealing.seal_request(public, BINDING, PAYLOAD)
    payload, opened_key = sealing.open_request(private, BINDING, frame, guard=ReplayGuard())
    assert payload == PAYLOAD and opened_key == response_key and len(response_key) == 32
    answer = sealing.seal_response(opened_key, BINDING, b"logits")
    assert sealing.open_response(response_key, BINDING, answer) == b"logits"


def test_each_seal_uses_fresh_randomness(pair: KeyPair) -> None:
    first = sealing.seal_request(pair[1], BINDING, PAYLOAD, now_ms=NOW_MS)
    second = sealing.seal_request(pair[1], BINDING, PAYLOAD, now_ms=NOW_MS)
    assert first[0] != second[0] and first[1] != second[1]


def test_empty_payload_round_trips(pair: KeyPair) -> None:
    frame, key = sealing.seal_request(pair[1], BINDING, b"")
    assert sealing.open_request(pair[0], BINDING, frame) == (b"", key)
    assert sealing.open_response(key, BINDING, sealing.seal_response(key, BINDING, b"")) == b""


def test_binding_info_golden_bytes() -> None:
    info = Binding("m", "v1", "", "r", "anonymous", 7, 5).info()
    assert info == (
        b"edgecut/v1 request\x00\x00\x01m\x00\x02v1\x00\x00\x00\x01r\x00\x09anonymous"
        + (7).to_bytes(8, "big")
        + (5).to_bytes(8, "big")
    )
    assert Binding("m", "v1", "", "r").response_info().startswith(b"edgecut/v1 response\x00")


def test_binding_encoding_is_unambiguous() -> None:
    assert Binding("ab", "c", "x", "r").info() != Binding("a", "bc", "x", "r").info()
    assert Binding("a", "", "bc", "r").info() != Binding("a", "bc", "", "r").info()


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": ""},
        {"model": "m" * (sealing.MAX_FIELD_BYTES + 1)},
        {"request_id": "é" * (sealing.MAX_FIELD_BYTES // 2 + 1)},
    ],
)
def test_invalid_binding_is_a_codec_error(fields: dict[str, str]) -> None:
    with pytest.raises(CodecError, match=r"request id|bytes; at most"):
        replace(BINDING, **fields)


# The tail replica: a separate process that only has service.key on disk.
TAIL_SCRIPT = """
import sys
from pathlib import Path
from edgecut import keys, sealing
key_file, frame_file, answer_file, *fields = sys.argv[1:]
binding = sealing.Binding(*fields)
private = keys.load_service_private(Path(key_file))
frame = Path(frame_file).read_bytes()
payload, key = sealing.open_request(private, binding, frame, guard=sealing.ReplayGuard())
Path(answer_file).write_bytes(sealing.seal_response(key, binding, payload[::-1]))
"""


def test_other_process_holding_the_key_opens_the_frame(tmp_path: Path) -> None:
    paths = keys.generate_keys(tmp_path / "keys")
    public = keys.load_service_public(paths.service_pub)
    frame, response_key = sealing.seal_request(public, BINDING, PAYLOAD)
    (tmp_path / "frame").write_bytes(frame)
    fields = [BINDING.model, BINDING.version, BINDING.cut, BINDING.request_id]
    files = [str(paths.service_key), str(tmp_path / "frame"), str(tmp_path / "answer")]
    subprocess.run([sys.executable, "-c", TAIL_SCRIPT, *files, *fields], check=True, timeout=60)
    answer = sealing.open_response(response_key, BINDING, (tmp_path / "answer").read_bytes())
    assert answer == PAYLOAD[::-1]


@pytest.mark.parametrize("where", [0, 1, 31, 32, 33, 100, 1200, -100, -17, -1])
def test_flipped_byte_does_not_open(pair: KeyPair, sealed: tuple[bytes, bytes], where: int) -> None:
    frame = bytearray(sealed[0])
    frame[where] ^= 0x01
    with pytest.raises(SealError, match="'dev7-000042' did not open") as info:
        sealing.open_request(pair[0], BINDING, bytes(frame))
    assert keys.key_id(pair[0].public) in (info.value.hint or "")


def test_wrong_private_key_does_not_open(pair: KeyPair, sealed: tuple[bytes, bytes], tmp_path: Path) -> None:
    for suite in keys.SUITES:
        other, _ = _pair(tmp_path / suite, suite)
        with pytest.raises(SealError, match="wrong service key"):
            sealing.open_request(other, BINDING, sealed[0])


@pytest.mark.parametrize("field", ["model", "version", "cut", "request_id"])
def test_frame_does_not_open_under_another_binding(
    pair: KeyPair, sealed: tuple[bytes, bytes], field: str
) -> None:
    other = replace(BINDING, **{field: getattr(BINDING, field) + "x"})
    with pytest.raises(SealError, match="did not open"):
        sealing.open_request(pair[0], other, sealed[0])


@pytest.mark.parametrize("length", [0, 1, 32, 48, 88, -1])
def test_truncated_frame_is_refused(pair: KeyPair, sealed: tuple[bytes, bytes], length: int) -> None:
    with pytest.raises(SealError, match=r"too short|did not open"):
        sealing.open_request(pair[0], BINDING, sealed[0][:length])


def test_unknown_format_version_is_refused(pair: KeyPair) -> None:
    kem = hpke.KEM.X25519 if pair[1].suite == "x25519" else hpke.KEM.MLKEM768_X25519
    suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    plaintext = bytes([3]) + NOW_MS.to_bytes(8, "big") + bytes(32) + b"future"
    frame = suite.encrypt(plaintext, pair[1].key, info=BINDING.info())
    with pytest.raises(SealError, match="sealed-format version 3"):
        sealing.open_request(pair[0], BINDING, frame)


def test_replayed_frame_is_refused(pair: KeyPair, sealed: tuple[bytes, bytes]) -> None:
    guard = ReplayGuard()
    sealing.open_request(pair[0], BINDING, sealed[0], guard=guard, now_ms=NOW_MS + 5)
    with pytest.raises(ReplayError, match="already seen"):
        sealing.open_request(pair[0], BINDING, sealed[0], guard=guard, now_ms=NOW_MS + 6)


def test_fresh_seal_with_reused_request_id_is_refused(pair: KeyPair) -> None:
    guard = ReplayGuard()
    for attempt in range(2):
        frame, _ = sealing.seal_request(pair[1], BINDING, PAYLOAD, now_ms=NOW_MS + attempt)
        if attempt:
            with pytest.raises(ReplayError):
                sealing.open_request(pair[0], BINDING, frame, guard=guard, now_ms=NOW_MS)
        else:
            sealing.open_request(pair[0], BINDING, frame, guard=guard, now_ms=NOW_MS)


@pytest.mark.parametrize(("skew_ms", "words"), [(30_001, "ms old"), (-30_001, "in the future")])
def test_timestamp_outside_window_is_refused(
    pair: KeyPair, sealed: tuple[bytes, bytes], skew_ms: int, words: str
) -> None:
    guard = ReplayGuard(window_ms=30_000)
    with pytest.raises(ReplayError, match=words):
        sealing.open_request(pair[0], BINDING, sealed[0], guard=guard, now_ms=NOW_MS + skew_ms)
    assert len(guard) == 0


@pytest.mark.parametrize("skew_ms", [30_000, -30_000, 0])
def test_timestamp_at_window_edge_is_admitted(
    pair: KeyPair, sealed: tuple[bytes, bytes], skew_ms: int
) -> None:
    sealing.open_request(pair[0], BINDING, sealed[0], guard=ReplayGuard(), now_ms=NOW_MS + skew_ms)


def test_guard_full_of_live_ids_refuses_instead_of_forgetting() -> None:
    guard = ReplayGuard(window_ms=1_000, max_entries=3)
    for i in range(3):
        guard.check(f"r{i}", NOW_MS, NOW_MS)
    with pytest.raises(OverloadedError, match="replay guard full"):
        guard.check("r3", NOW_MS, NOW_MS + 1_000)
    assert len(guard) == 3
    with pytest.raises(ReplayError, match="already seen"):
        guard.check("r0", NOW_MS, NOW_MS + 1_000)


def test_guard_evicts_expired_ids_and_stays_bounded() -> None:
    guard = ReplayGuard(window_ms=1_000, max_entries=50)
    for i in range(5_000):
        now = NOW_MS + i * 25  # 40 ids per window: steady state fits under the bound
        guard.check(f"r{i}", now, now)
        assert len(guard) <= 41
    with pytest.raises(ReplayError, match="ms old"):
        guard.check("r0", NOW_MS, NOW_MS + 5_000 * 25)  # forgotten, still refused by window


def test_guard_is_thread_safe_one_winner_per_id() -> None:
    guard = ReplayGuard()
    admitted: list[int] = []

    def race(worker: int) -> None:
        for i in range(200):
            try:
                guard.check(f"r{i}", NOW_MS, NOW_MS)
                admitted.append(worker)
            except ReplayError:
                pass

    threads = [threading.Thread(target=race, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 200 and len(guard) == 200


@pytest.mark.parametrize(("window_ms", "max_entries"), [(0, 10), (10, 0)])
def test_guard_rejects_nonsense_config(window_ms: int, max_entries: int) -> None:
    with pytest.raises(UsageError):
        ReplayGuard(window_ms=window_ms, max_entries=max_entries)


@pytest.mark.parametrize("field", ["model", "version", "cut", "request_id"])
def test_response_does_not_open_under_another_binding(field: str) -> None:
    key = os.urandom(32)
    answer = sealing.seal_response(key, BINDING, b"logits")
    other = replace(BINDING, **{field: getattr(BINDING, field) + "x"})
    with pytest.raises(SealError, match="did not open"):
        sealing.open_response(key, other, answer)


def test_reused_response_key_cannot_swap_answers_between_requests() -> None:
    key = os.urandom(32)
    first, second = BINDING, replace(BINDING, request_id="dev7-000043")
    answer_1 = sealing.seal_response(key, first, b"cat")
    answer_2 = sealing.seal_response(key, second, b"dog")
    assert sealing.open_response(key, first, answer_1) == b"cat"
    assert sealing.open_response(key, second, answer_2) == b"dog"
    with pytest.raises(SealError):
        sealing.open_response(key, first, answer_2)


def test_request_frame_is_not_a_response(pair: KeyPair, sealed: tuple[bytes, bytes]) -> None:
    with pytest.raises(SealError):
        sealing.open_response(sealed[1], BINDING, sealed[0])


@pytest.mark.parametrize(
    "edit",
    ["wrong key", "flip nonce", "flip tag", "truncate", "empty"],
)
def test_bad_response_does_not_open_and_leaks_nothing(edit: str) -> None:
    key = os.urandom(32)
    answer = bytearray(sealing.seal_response(key, BINDING, b"secret-logits"))
    if edit == "wrong key":
        key = os.urandom(32)
    elif edit == "flip nonce":
        answer[0] ^= 1
    elif edit == "flip tag":
        answer[-1] ^= 1
    else:
        answer = answer[:27] if edit == "truncate" else bytearray()
    with pytest.raises(SealError, match="'dev7-000042'") as info:
        sealing.open_response(key, BINDING, bytes(answer))
    assert "secret" not in str(info.value) and key.hex() not in str(info.value)


def test_response_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(SealError, match="response key is 16 bytes"):
        sealing.seal_response(os.urandom(16), BINDING, b"x")


def test_device_guards_isolate_devices() -> None:
    """One device filling its replay cache must not lock out another device."""
    guards = sealing.DeviceGuards(window_ms=30_000, per_device=3, shared=5)
    now = 1_000_000
    flooder = guards.for_device("pi-7")
    for i in range(3):
        flooder.check(f"f{i}", now, now)
    with pytest.raises(OverloadedError):
        flooder.check("f3", now, now)
    guards.for_device("jetson-2").check("j0", now, now)  # another device is unaffected
    guards.for_device(None).check("anon", now, now)
    assert guards.for_device("pi-7") is flooder and guards.for_device(None) is not flooder
    with pytest.raises(ReplayError):
        guards.for_device("jetson-2").check("j0", now, now)  # still a replay for that device


# Issue 12: the sender's identity and the frame's times are bound; answer metadata is authenticated.


@pytest.mark.parametrize(
    "change",
    [{"identity": "token:other"}, {"deadline_ms": 2}, {"sent_at_ms": 2}],
    ids=lambda c: next(iter(c)),
)
def test_identity_and_times_are_bound_into_the_seal(pair: KeyPair, change: dict[str, object]) -> None:
    mine = replace(BINDING, identity="token:mine", deadline_ms=1, sent_at_ms=1)
    frame, _ = sealing.seal_request(pair[1], mine, PAYLOAD, now_ms=NOW_MS)
    assert sealing.open_request(pair[0], mine, frame)[0] == PAYLOAD
    with pytest.raises(SealError, match="did not open"):
        sealing.open_request(pair[0], replace(mine, **change), frame)  # type: ignore[arg-type]


def test_device_identity_names_the_credential_never_the_secret() -> None:
    token_id = sealing.device_identity("tok-secret-1")
    assert token_id.startswith("token:") and "secret" not in token_id
    assert token_id == sealing.device_identity("tok-secret-1") != sealing.device_identity("tok-secret-2")
    assert sealing.device_identity(None, None) == sealing.ANONYMOUS
    with pytest.raises(SealError, match="not a PEM certificate"):
        sealing.device_identity(None, b"not a cert")


@pytest.mark.parametrize(
    "change", [{"code": 14}, {"message": "x"}, {"queue_ms": 9.0}, {"batch_size": 3}, {"queue_delay_ms": 1.0}]
)
def test_answer_metadata_is_authenticated(change: dict[str, object]) -> None:
    key = os.urandom(sealing.RESPONSE_KEY_BYTES)
    meta = sealing.AnswerMeta(code=0, queue_ms=1.5, batch_size=2, sent_at_ms=7, queue_delay_ms=0.5)
    answer = sealing.seal_response(key, BINDING, b"out", meta)
    assert sealing.open_response(key, BINDING, answer, meta) == b"out"
    with pytest.raises(SealError, match="did not open"):
        sealing.open_response(key, BINDING, answer, replace(meta, **change))  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [AnswerSpec(), AnswerSpec("topk", 12), FULL])
def test_answer_request_travels_inside_the_seal(pair: KeyPair, answer: AnswerSpec) -> None:
    private, public = pair
    frame, key = sealing.seal_request(public, BINDING, PAYLOAD, answer=answer)
    opened = sealing.open_sealed(private, BINDING, frame, guard=ReplayGuard())
    assert (opened.payload, opened.response_key, opened.answer) == (PAYLOAD, key, answer)
    assert sealing.open_request(private, BINDING, frame) == (PAYLOAD, key)


def test_request_without_answer_request_is_answered_in_full(
    pair: KeyPair, sealed: tuple[bytes, bytes]
) -> None:
    opened = sealing.open_sealed(pair[0], BINDING, sealed[0])
    assert opened.answer == FULL and opened.payload == PAYLOAD and opened.timestamp_ms == NOW_MS


def test_malformed_answer_request_is_refused(pair: KeyPair) -> None:
    private, public = pair
    suite = hpke.Suite(sealing._KEMS[public.suite], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    header = struct.pack(">BQ32s", sealing.ANSWER_FORMAT_VERSION, NOW_MS, bytes(32))
    bad_kind = suite.encrypt(header + b"\x09\x00\x05" + PAYLOAD, public.key, info=BINDING.info())
    with pytest.raises(CodecError, match="answer kind"):
        sealing.open_sealed(private, BINDING, bad_kind)
    cut_short = suite.encrypt(header + b"\x01", public.key, info=BINDING.info())
    with pytest.raises(SealError, match="cut short"):
        sealing.open_sealed(private, BINDING, cut_short)
