"""Sealing frames between edge and tail: HPKE (RFC 9180) requests, AES-256-GCM responses.

Each request frame is sealed to the tail service's public key (single-shot HPKE base mode,
KDF HKDF-SHA256, AEAD AES-256-GCM, KEM X25519 or ML-KEM-768+X25519), so any replica holding
`service.key` opens any frame: no sticky sessions. The HPKE `info` is the frame's `Binding`
(model, version, cut, request id, the sender's device identity, and the frame's deadline and
sent-at times): a frame sealed for one binding does not open as another, so a frame captured from
one device does not open under another device's token, and its deadline cannot be stretched.

Request plaintext, big-endian:

    offset 0   u8       format version (1)
    offset 1   u64      timestamp_ms, the edge's wall clock (Unix epoch, ms) when sealed
    offset 9   32 bytes fresh response key, chosen by the edge for this request only
    offset 41  ...      payload (the encoded frontier tensors)

Format version 2 inserts, at offset 41, 3 bytes saying what answer the edge wants
(`edgecut.answers.AnswerSpec.to_wire`: u8 kind, u16 k); the payload follows at offset 44. Version 1
(no answer request) is still read and answered in full, so older edges keep working.

Sealed request = HPKE `enc || ciphertext` exactly as `hpke.Suite.encrypt` returns it.
Sealed response = 12-byte random nonce || AES-256-GCM(response key, payload,
aad=`Binding.response_info()` + `AnswerMeta.aad()`). The request and response labels differ, so
neither can be passed off as the other; the answer's status, timings and queue delay are
authenticated with it, so nobody on the path can inject an error or skew the edge's planner.

A `ReplayGuard` rejects frames whose timestamp is outside a window and request ids already seen
inside it. Sealing protects against the network, not against whoever runs the tail.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
import threading
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgecut.answers import FULL, WIRE_BYTES, AnswerSpec
from edgecut.errors import CodecError, OverloadedError, ReplayError, SealError, UsageError
from edgecut.keys import ServicePrivateKey, ServicePublicKey, key_id

FORMAT_VERSION = 1
ANSWER_FORMAT_VERSION = 2  # FORMAT_VERSION plus the sealed answer request
RESPONSE_KEY_BYTES = 32
MAX_FIELD_BYTES = 256  # per Binding field, UTF-8; bounds info() and the replay guard's memory

_REQUEST_LABEL = b"edgecut/v1 request\x00"
_RESPONSE_LABEL = b"edgecut/v1 response\x00"
_HEADER = struct.Struct(">BQ32s")  # version, timestamp_ms, response key
_U64 = struct.Struct(">Q")
_META = struct.Struct(">iddddIQd")  # code, 4 timings, batch size, sent_at_ms, queue delay
ANONYMOUS = "anonymous"  # the identity of a caller with neither token nor client certificate
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEMS = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}
_SUITES = {name: hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM) for name, kem in _KEMS.items()}


@dataclass(frozen=True)
class Binding:
    """What a sealed frame is for; sealing binds it so a frame cannot be replayed as another."""

    model: str
    version: str
    cut: str
    request_id: str  # chosen by the edge, unique per frame (retries too): the replay-guard key
    identity: str = ANONYMOUS  # the sender as the server authenticates it (`device_identity`)
    deadline_ms: int = 0  # Frame.deadline_ms as sent (edge clock, unix ms; 0 = none)
    sent_at_ms: int = 0  # Frame.sent_at_ms as sent (edge clock, unix ms)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise CodecError("frame has an empty request id")
        for name, value in vars(self).items():
            if isinstance(value, int):
                if not 0 <= value < 1 << 64:
                    raise CodecError(f"frame {name} = {value} is out of range")
                continue
            size = len(value.encode("utf-8", errors="surrogatepass"))
            if size > MAX_FIELD_BYTES:
                raise CodecError(f"frame {name} is {size} bytes; at most {MAX_FIELD_BYTES}")

    def info(self) -> bytes:
        """HPKE info for the request: label, then each field as u16 length + UTF-8."""
        return _REQUEST_LABEL + self._fields()

    def response_info(self) -> bytes:
        """AES-GCM associated data for the response: same fields, different label."""
        return _RESPONSE_LABEL + self._fields()

    def _fields(self) -> bytes:
        out = []
        for value in vars(self).values():
            if isinstance(value, int):
                out.append(_U64.pack(value))
            else:
                raw = value.encode("utf-8", errors="surrogatepass")
                out.append(struct.pack(">H", len(raw)) + raw)
        return b"".join(out)


@dataclass(frozen=True)
class AnswerMeta:
    """What an Answer says besides its payload; authenticated as the response's associated data."""

    code: int = 0  # grpc.StatusCode value; 0 = OK
    message: str = ""
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    compute_ms: float = 0.0
    encode_ms: float = 0.0
    batch_size: int = 0
    sent_at_ms: int = 0  # echo of the request's sent_at_ms
    queue_delay_ms: float = 0.0  # the server's live queue delay estimate

    def aad(self) -> bytes:
        head = _META.pack(
            self.code,
            self.queue_ms,
            self.decode_ms,
            self.compute_ms,
            self.encode_ms,
            self.batch_size,
            self.sent_at_ms,
            self.queue_delay_ms,
        )
        message = self.message.encode("utf-8", errors="surrogatepass")
        return head + struct.pack(">I", len(message)) + message


def device_identity(token: str | None = None, cert_pem: bytes | None = None) -> str:
    """The identity bound into a frame's seal: its bearer token, else its client certificate.

    Both sides compute it from what the server authenticates: `token:` + sha256 of the token (the
    token itself never enters a log or the seal), `cert:` + sha256 of the leaf certificate's DER,
    or "anonymous". The edge computes it from its own token / certificate, the server from the
    call's metadata / TLS peer, so a frame captured from one device fails to open when replayed
    under another device's credentials.
    """
    if token:
        return "token:" + token_digest(token)[:32]
    if cert_pem:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
        except ValueError as exc:
            raise SealError(f"client certificate is not a PEM certificate ({exc})") from None
        return "cert:" + hashlib.sha256(der).hexdigest()[:32]
    return ANONYMOUS


def token_digest(token: str) -> str:
    """sha256 hex of a device token: what a token file may store instead of the token."""
    return hashlib.sha256(token.encode("utf-8", errors="surrogatepass")).hexdigest()


class ReplayGuard:
    """Timestamp window + bounded seen-request-id cache (thread-safe).

    An id is remembered until its frame's timestamp leaves the window, after which the window
    check alone rejects a replay, so forgetting it is safe. When `max_entries` unexpired ids are
    held, new frames are refused with OverloadedError (back off / run locally) rather than
    admitted: dropping a live id would let its frame be replayed. Memory is about 220 bytes per
    entry with 32-character ids (~22 MB at the default 100 000; measured with tracemalloc).
    """

    def __init__(self, window_ms: int = 30_000, max_entries: int = 100_000) -> None:
        if window_ms <= 0 or max_entries <= 0:
            raise UsageError("replay guard window_ms and max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._expiry_ms: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []  # (expiry_ms, request_id), one per held id

    def __len__(self) -> int:
        return len(self._expiry_ms)

    def check(self, request_id: str, timestamp_ms: int, now_ms: int) -> None:
        """Admit one frame and remember its id, or raise ReplayError / OverloadedError."""
        self._check_window(request_id, timestamp_ms, now_ms)
        with self._lock:
            self._evict(now_ms)
            if request_id in self._expiry_ms:
                raise ReplayError(
                    f"request {request_id!r} was already seen: replayed frame",
                    hint="the edge must use a fresh request id for every frame",
                )
            if len(self._expiry_ms) >= self.max_entries:
                raise OverloadedError(
                    f"replay guard full: {self.max_entries} request ids within the last "
                    f"{self.window_ms} ms; refusing request {request_id!r} rather than "
                    "forgetting ids",
                    hint="raise max_entries or lower the request rate",
                )
            expiry_ms = timestamp_ms + self.window_ms
            self._expiry_ms[request_id] = expiry_ms
            heapq.heappush(self._heap, (expiry_ms, request_id))

    def _check_window(self, request_id: str, timestamp_ms: int, now_ms: int) -> None:
        age_ms = now_ms - timestamp_ms
        if abs(age_ms) <= self.window_ms:
            return
        when = f"{age_ms} ms old" if age_ms > 0 else f"{-age_ms} ms in the future"
        raise ReplayError(
            f"request {request_id!r}: timestamp is {when}, outside the {self.window_ms} ms window",
            hint="a replayed frame, or the edge clock is off (check NTP)",
        )

    def _evict(self, now_ms: int) -> None:
        """Forget ids whose timestamp left the window; the window check now rejects them."""
        while self._heap and self._heap[0][0] < now_ms:
            _, request_id = heapq.heappop(self._heap)
            del self._expiry_ms[request_id]


def request_overhead_bytes(suite: str) -> int:
    """Bytes sealing adds to a request payload under `suite`: KEM encapsulation (32 B for X25519,
    1120 B for the ML-KEM-768 hybrid), AEAD tag and the plaintext header."""
    return _KEMS[suite].enc_length() + _TAG_BYTES + _HEADER.size


@dataclass(frozen=True)
class OpenedRequest:
    """What a sealed request holds."""

    payload: bytes  # the encoded frontier
    response_key: bytes  # seals the answer
    timestamp_ms: int  # the edge's wall clock when sealed
    answer: AnswerSpec  # what to answer with (full for a version-1 request)


def seal_request(
    public: ServicePublicKey,
    binding: Binding,
    payload: bytes,
    *,
    now_ms: int | None = None,
    answer: AnswerSpec | None = None,
) -> tuple[bytes, bytes]:
    """Seal `payload` to the service key; return (sealed, response key for the answer).

    With `answer`, the request says which answer format it wants (format version 2); without,
    it is a version-1 request and the service answers with the full output.
    """
    response_key = os.urandom(RESPONSE_KEY_BYTES)
    timestamp_ms = _now_ms() if now_ms is None else now_ms
    if answer is None:
        plaintext = _HEADER.pack(FORMAT_VERSION, timestamp_ms, response_key) + payload
    else:
        header = _HEADER.pack(ANSWER_FORMAT_VERSION, timestamp_ms, response_key)
        plaintext = header + answer.to_wire() + payload
    sealed = _SUITES[public.suite].encrypt(plaintext, public.key, info=binding.info())
    return sealed, response_key


def open_request(
    private: ServicePrivateKey,
    binding: Binding,
    sealed: bytes,
    *,
    guard: ReplayGuard | None = None,
    now_ms: int | None = None,
) -> tuple[bytes, bytes]:
    """Open a sealed request; return (payload, response key). See `open_sealed` for the rest."""
    opened = open_sealed(private, binding, sealed, guard=guard, now_ms=now_ms)
    return opened.payload, opened.response_key


def open_sealed(
    private: ServicePrivateKey,
    binding: Binding,
    sealed: bytes,
    *,
    guard: ReplayGuard | None = None,
    now_ms: int | None = None,
) -> OpenedRequest:
    """Open a sealed request of either format version.

    Raises SealError (wrong key, tampered bytes, wrong binding, malformed), and with a `guard`
    ReplayError (seen id or stale/future timestamp) or OverloadedError (guard full). Without a
    guard there is no freshness check at all.
    """
    minimum = _KEMS[private.suite].enc_length() + _TAG_BYTES + _HEADER.size
    if len(sealed) < minimum:
        raise SealError(
            f"frame for request {binding.request_id!r} is {len(sealed)} bytes, "
            f"too short to be sealed (at least {minimum})"
        )
    try:
        plaintext = _SUITES[private.suite].decrypt(sealed, private.key, info=binding.info())
    except InvalidTag:
        raise SealError(
            f"frame for request {binding.request_id!r} did not open: wrong service key, "
            "tampered bytes, or sealed for another model/version/cut/request id",
            hint=f"this service's key id is {key_id(private.public)}",
        ) from None
    version, timestamp_ms, response_key = _HEADER.unpack_from(plaintext)
    if version not in (FORMAT_VERSION, ANSWER_FORMAT_VERSION):
        raise SealError(
            f"frame for request {binding.request_id!r} has sealed-format version {version}; "
            f"this service reads {FORMAT_VERSION} and {ANSWER_FORMAT_VERSION}"
        )
    start, answer = _HEADER.size, FULL
    if version == ANSWER_FORMAT_VERSION:
        start += WIRE_BYTES
        if len(plaintext) < start:
            raise SealError(f"frame for request {binding.request_id!r} is cut short in its header")
        answer = AnswerSpec.from_wire(plaintext[_HEADER.size : start])
    if guard is not None:
        guard.check(binding.request_id, timestamp_ms, _now_ms() if now_ms is None else now_ms)
    return OpenedRequest(plaintext[start:], response_key, timestamp_ms, answer)


def seal_response(
    response_key: bytes, binding: Binding, payload: bytes, meta: AnswerMeta | None = None
) -> bytes:
    """Seal the answer with the request's response key (random nonce prefixed), `meta` as AAD."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _aead(response_key).encrypt(nonce, payload, _response_aad(binding, meta))


def open_response(
    response_key: bytes, binding: Binding, sealed: bytes, meta: AnswerMeta | None = None
) -> bytes:
    """Open an answer sealed by `seal_response` with the same `meta`; SealError if it does not
    authenticate (payload, binding or any metadata changed on the way)."""
    if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
        raise SealError(
            f"response for request {binding.request_id!r} is {len(sealed)} bytes, too short to be sealed"
        )
    body = memoryview(sealed)
    aad = _response_aad(binding, meta)
    try:
        return _aead(response_key).decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError(
            f"response for request {binding.request_id!r} did not open: wrong "
            "response key, tampered bytes or status/timings, or sealed for another request"
        ) from None


def _response_aad(binding: Binding, meta: AnswerMeta | None) -> bytes:
    return binding.response_info() + (meta.aad() if meta is not None else b"")


def _aead(response_key: bytes) -> AESGCM:
    if len(response_key) != RESPONSE_KEY_BYTES:
        raise SealError(f"response key is {len(response_key)} bytes; expected {RESPONSE_KEY_BYTES}")
    return AESGCM(response_key)


def _now_ms() -> int:
    """Wall clock, not monotonic: the timestamp is compared across machines."""
    return time.time_ns() // 1_000_000


class DeviceGuards:
    """A replay guard per authenticated device, plus one shared by unauthenticated callers.

    With a single pool, one device (or anyone holding `service.pub`) that fills the cache with
    fresh ids would get every other device refused. Device ids come from the operator's tokens
    file, so the number of guards is bounded by it.
    """

    def __init__(self, window_ms: int = 30_000, per_device: int = 20_000, shared: int = 100_000) -> None:
        self.window_ms, self.per_device = window_ms, per_device
        self._shared = ReplayGuard(window_ms, shared)
        self._by_device: dict[str, ReplayGuard] = {}
        self._lock = threading.Lock()

    def for_device(self, device_id: str | None) -> ReplayGuard:
        if device_id is None:
            return self._shared
        with self._lock:
            guard = self._by_device.get(device_id)
            if guard is None:
                guard = self._by_device[device_id] = ReplayGuard(self.window_ms, self.per_device)
            return guard
