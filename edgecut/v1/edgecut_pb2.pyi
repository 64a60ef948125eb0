from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("request_id", "model", "version", "cut", "chunk_index", "chunk_count", "total_bytes", "sealed", "deadline_ms", "sent_at_ms", "cancel", "key_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: str
    cut: str
    chunk_index: int
    chunk_count: int
    total_bytes: int
    sealed: bytes
    deadline_ms: int
    sent_at_ms: int
    cancel: bool
    key_id: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., cut: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sealed: _Optional[bytes] = ..., deadline_ms: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., cancel: bool = ..., key_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "decode_ms", "compute_ms", "encode_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    decode_ms: float
    compute_ms: float
    encode_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("request_id", "code", "message", "sealed", "timings", "sent_at_ms", "server_queue_delay_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    sealed: bytes
    timings: Timings
    sent_at_ms: int
    server_queue_delay_ms: float
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., sealed: _Optional[bytes] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., sent_at_ms: _Optional[int] = ..., server_queue_delay_ms: _Optional[float] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("payload", "server_time_ms")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    server_time_ms: int
    def __init__(self, payload: _Optional[bytes] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SegmentProfile(_message.Message):
    __slots__ = ("segment", "latency_ms")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    latency_ms: float
    def __init__(self, segment: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class CutInfo(_message.Message):
    __slots__ = ("id", "depth", "tail", "decode_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    depth: int
    tail: _containers.RepeatedCompositeFieldContainer[SegmentProfile]
    decode_ms: float
    def __init__(self, id: _Optional[str] = ..., depth: _Optional[int] = ..., tail: _Optional[_Iterable[_Union[SegmentProfile, _Mapping]]] = ..., decode_ms: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "cuts", "manifest_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    manifest_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ..., manifest_sha256: _Optional[str] = ...) -> None: ...

class ServerInfoReply(_message.Message):
    __slots__ = ("models", "key_id", "key_suite", "queue_delay_ms", "device", "max_message_bytes", "server_version", "identity", "max_rows_per_request", "answer_formats", "key_ids")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_SUITE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FORMATS_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    key_id: str
    key_suite: str
    queue_delay_ms: float
    device: str
    max_message_bytes: int
    server_version: str
    identity: str
    max_rows_per_request: int
    answer_formats: _containers.RepeatedScalarFieldContainer[str]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., key_id: _Optional[str] = ..., key_suite: _Optional[str] = ..., queue_delay_ms: _Optional[float] = ..., device: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., server_version: _Optional[str] = ..., identity: _Optional[str] = ..., max_rows_per_request: _Optional[int] = ..., answer_formats: _Optional[_Iterable[str]] = ..., key_ids: _Optional[_Iterable[str]] = ...) -> None: ...
