"""The activation codec: frontier tensors ↔ bytes, by quantizing and then compressing.

Sealing happens later (sealed bytes do not compress). This module owns the wire format; the
quantization math (calibrated ranges, scales, rounding, nibble packing) lives in `edgecut.quantize`,
and `Calibration` is re-exported here for callers that know it as `codec.Calibration`. A frame
carries everything needed to decode it, and the decoder checks it against the cut's expected
tensors (`TensorSpec`s): the batch axis 0 may be any N ≥ 1, every other dim and the dtype must
match.

Wire format, version 1 (all integers little-endian, no padding):

    frame  = fixed tensor{count} body
    fixed  = "ECF1" | u8 version | u8 scheme | u8 granularity | u8 flags | u32 dict_id | u16 count
    tensor = u8 name_len | name (UTF-8) | u8 dtype | u8 rank | u32 dim{rank}
             | f32 scale{P} | f32 offset{P} | u32 nbytes
    body   = the tensors' encoded bytes, in header order, each exactly `nbytes` long; when flags
             bit 0 is set, one zstd frame (content size recorded) of that concatenation.

    scheme       0 none, 1 fp16, 2 int8, 3 int4, 4 jpeg, 5 int6, 6 pca, 7 webp, 8 png
    granularity  0 tensor, 1 channel
    dtype        0 float32, 1 float16, 2 int64, 3 int32, 4 int8, 5 uint8, 6 bool
    dict_id      reserved, always 0 (zstd dictionaries cannot be shipped or negotiated, so a frame
                 with a nonzero id is refused rather than misread)

Float tensors use the frame's scheme, others always travel raw (`none`). For the affine schemes,
element x is sent as code q = round((x - offset) / scale), clipped to 0..L, and decoded as
offset + scale·q: int8 L = 255, int6 L = 63 (one byte a code), int4 L = 15 (two codes a byte, even
element in the low nibble, an odd count padded with a zero nibble). int6 exists for zstd: zstd
codes these bytes at their entropy, so fewer levels means fewer bytes without bit packing.
P = dim[1] per-channel (granularity channel, rank ≥ 3), else P = 1; P = 0 for none/fp16/pca and
the image schemes. `jpeg`, `webp` and `png` frames carry one image tensor, see `edgecut.imagecodec`.

`pca` (the bottleneck codec, `edgecut.bottleneck`) sends a float tensor (N, C, …) as k < C
principal-component planes of one uint8 code per value: after `offset` (P = 0) the tensor entry
carries `u8 bits | u16 k | u32 basis_id`, and nbytes = k · N · H · W (planes in component order,
then zstd, which codes the few-level bytes near their entropy). The basis, mean and per-component
ranges are not in the frame: both sides read them from the bundle (`calibration_for`), and
`basis_id` must match.

The header is validated in full before anything is allocated or decompressed: every length must add
up to the frame size, and what the frame decodes to must fit in `max_bytes`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from edgecut import bottleneck, imagecodec
from edgecut.bundle import Bundle, TensorSpec
from edgecut.errors import CodecError, FrameTooLargeError, IntegrityError, UsageError
from edgecut.quantize import (
    LEVELS,
    Calibration,
    affine_params,
    pack4,
    param_count,
    per_channel,
    quantize,
    unpack4,
)

MAGIC = b"ECF1"
VERSION = 1
SCHEMES = ("none", "fp16", "int8", "int4", "jpeg", "int6", "pca", "webp", "png")  # code = index
IMAGE_SCHEMES = ("jpeg", "webp", "png")
GRANULARITIES = ("tensor", "channel")
WIRE_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
DEFAULT_MAX_BYTES = 64 << 20
MAX_TENSORS = 1024
MAX_RANK = 8
_ZSTD = 1  # flags bit
_FIXED = struct.Struct("<4sBBBBIH")
_NAME_LEN = struct.Struct("<B")
_DTYPE_RANK = struct.Struct("<BB")
_U32 = struct.Struct("<I")
_PCA = struct.Struct("<BHI")  # bits, k, basis_id


@dataclass(frozen=True)
class CodecSpec:
    """How a cut's frontier is encoded. Text form: `int8-channel-z3`, `fp16`, `pca4`, `jpeg90`, `png`…"""

    scheme: str = "int8"  # "none" | "fp16" | "int8" | "int6" | "int4" | "pca" | "jpeg" | "webp" | "png"
    granularity: str = "channel"  # "tensor" | "channel": one affine range per tensor or per axis 1
    zstd_level: int = 3  # 1..22, 0 disables zstd; image frames are never zstd-compressed
    jpeg_quality: int = 90  # 1..95, schemes "jpeg" and "webp" only
    pca_bits: int = 4  # bit budget B of the strongest component, scheme "pca" only (BIT_BUDGETS)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UsageError(f"codec scheme {self.scheme!r}: expected one of {', '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"codec granularity {self.granularity!r}: expected tensor or channel")
        if not 0 <= self.zstd_level <= 22:
            raise UsageError(f"zstd level {self.zstd_level}: expected 0 (off) to 22")
        if not 1 <= self.jpeg_quality <= 95:
            raise UsageError(f"jpeg quality {self.jpeg_quality}: expected 1 to 95")
        if self.pca_bits not in bottleneck.BIT_BUDGETS:
            budgets = ", ".join(map(str, bottleneck.BIT_BUDGETS))
            raise UsageError(f"pca bit budget {self.pca_bits}: expected one of {budgets}")

    @property
    def is_image(self) -> bool:
        """An image file of the model input (needs the bundle's image normalisation)."""
        return self.scheme in IMAGE_SCHEMES

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Read `<scheme>[-tensor|-channel][-z<level>]`, `pca<bits>[-z<level>]` (also `pca-int4`),
        `jpeg<quality>`, `webp<quality>` or `png`."""
        head, *rest = text.strip().lower().split("-")
        if head == "pca" and rest and rest[0][:3] == "int" and rest[0][3:].isdigit():
            head, rest = f"pca{rest[0][3:]}", rest[1:]
        fields: dict[str, Any] = {"scheme": head}
        for image in ("jpeg", "webp"):
            if head.startswith(image) and head[4:].isdigit():
                fields.update(scheme=image, jpeg_quality=int(head[4:]))
        if head.startswith("pca") and head[3:].isdigit():
            fields.update(scheme="pca", pca_bits=int(head[3:]))
        try:
            for token in rest:
                key = "zstd_level" if token[:1] == "z" and token[1:].isdigit() else "granularity"
                if key in fields:
                    raise UsageError(f"{key} given twice")
                fields[key] = int(token[1:]) if key == "zstd_level" else token
            return cls(**fields)
        except UsageError as error:
            raise UsageError(
                f"codec {text!r}: {error}",
                hint="accepted: none, fp16, int8, int6, int4, each with optional -tensor/-channel and "
                "-z<level> (0 = no zstd), e.g. int8-channel-z3, int4-tensor, fp16-z0; "
                "the bottleneck codecs pca2, pca3, pca4, pca6, pca8; or jpeg90, webp80, png",
            ) from None

    def __str__(self) -> str:
        """The canonical text form, which `parse` reads back."""
        if self.scheme in ("jpeg", "webp"):
            return f"{self.scheme}{self.jpeg_quality}"
        if self.scheme == "png":
            return "png"
        if self.scheme == "pca":
            return f"pca{self.pca_bits}-z{self.zstd_level}"
        granularity = f"-{self.granularity}" if self.scheme in LEVELS else ""
        return f"{self.scheme}{granularity}-z{self.zstd_level}"


@dataclass(frozen=True, eq=False)
class TensorHeader:
    """One tensor as a frame's header describes it."""

    name: str
    dtype: str  # numpy dtype name, one of WIRE_DTYPES
    shape: tuple[int, ...]  # including the batch axis
    scale: np.ndarray  # float32 (P,), see the module docstring
    offset: np.ndarray  # float32 (P,)
    nbytes: int  # encoded length inside the (uncompressed) body
    pca: tuple[int, int, int] | None = None  # (bits, k, basis_id), scheme pca float tensors only


@dataclass(frozen=True, eq=False)
class FrameHeader:
    """A parsed and validated frame header: cheap to get, for logging and metrics."""

    scheme: str
    granularity: str
    zstd: bool
    tensors: tuple[TensorHeader, ...]
    header_bytes: int  # where the body starts
    body_bytes: int  # on the wire (compressed if zstd)

    @property
    def decoded_bytes(self) -> int:
        return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in self.tensors)


def encode(
    tensors: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    codec: CodecSpec,
    calibration: Calibration | None = None,
    *,
    image_norm: imagecodec.ImageNorm | None = None,
) -> bytes:
    """Encode the frontier `tensors` (exactly those `specs` name) into one frame.

    The pca scheme needs the cut's `calibration` with its fitted bottlenecks; the affine schemes
    use its ranges when given (else each frame's own min/max)."""
    arrays = _match_specs(tensors, specs)
    if codec.is_image:
        return _encode_image(specs, arrays, codec, image_norm)
    heads, parts = [], []
    ranges = calibration.ranges if calibration else {}
    for spec, x in zip(specs, arrays, strict=True):
        scheme = _scheme_of(codec.scheme, spec.dtype)
        if scheme == "pca":
            head, data = _encode_pca(spec, x, codec.pca_bits, calibration)
        else:
            scale, offset = affine_params(x, ranges.get(spec.name), codec.granularity, LEVELS.get(scheme))
            data = _encode_tensor(x, scheme, scale, offset)
            head = TensorHeader(spec.name, spec.dtype, x.shape, scale, offset, data.nbytes)
        heads.append(head)
        parts.append(data.data)  # a buffer view, no copy
    body = b"".join(parts)
    if codec.zstd_level:
        body = _zstd_context("compress", codec.zstd_level).compress(body)
    return _pack_header(codec.scheme, codec.granularity, bool(codec.zstd_level), heads) + body


def decode(
    payload: bytes,
    specs: Sequence[TensorSpec],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    image_norm: imagecodec.ImageNorm | None = None,
    calibration: Calibration | None = None,
) -> dict[str, np.ndarray]:
    """Decode a frame into fresh, writable arrays of the specs' dtypes, after checking it fully.

    A pca frame needs the cut's `calibration` (the same bottlenecks the edge encoded with)."""
    header = header_of(payload, max_bytes=max_bytes)
    _check_header(header, specs)
    body = _body(memoryview(payload)[header.header_bytes :], header)
    if header.scheme in IMAGE_SCHEMES:
        (t,) = header.tensors
        x = imagecodec.decode_images(body, t.shape, image_norm, header.scheme)
        return {t.name: x.astype(t.dtype, copy=False)}
    out, pos = {}, 0
    for t in header.tensors:
        data = body[pos : pos + t.nbytes]
        if t.pca is not None:
            out[t.name] = _decode_pca(data, t, t.pca, calibration)
        else:
            out[t.name] = _decode_tensor(data, t, _scheme_of(header.scheme, t.dtype))
        pos += t.nbytes
    return out


def header_of(payload: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> FrameHeader:
    """Parse and validate a frame's header without touching the body's contents."""
    if len(payload) > max_bytes:
        raise FrameTooLargeError(f"frame of {len(payload)} bytes exceeds the {max_bytes} limit")
    reader = _Reader(memoryview(payload))
    magic, version, scheme_code, granularity_code, flags, dict_id, count = reader.unpack(_FIXED)
    if magic != MAGIC:
        raise CodecError(f"not an edgecut frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION or flags & ~_ZSTD:
        raise CodecError(f"unsupported frame version {version} / flags {flags:#x}")
    if dict_id:
        raise CodecError(
            f"frame names zstd dictionary {dict_id}; dictionaries are not supported (dict_id must be 0)"
        )
    scheme = _lookup(SCHEMES, scheme_code, "scheme")
    granularity = _lookup(GRANULARITIES, granularity_code, "granularity")
    if count > MAX_TENSORS or (scheme in IMAGE_SCHEMES and count != 1):
        raise CodecError(f"frame claims {count} tensors for scheme {scheme}")
    tensors = tuple(_read_tensor(reader, scheme, granularity) for _ in range(count))
    header = FrameHeader(
        scheme,
        granularity,
        bool(flags & _ZSTD),
        tensors,
        reader.pos,
        len(payload) - reader.pos,
    )
    _check_sizes(header, memoryview(payload)[reader.pos :], max_bytes)
    return header


_loaded: dict[tuple[str, str, str], Calibration | None] = {}
_loaded_lock = threading.Lock()


def calibration_for(bundle: Bundle, cut_id: str) -> Calibration | None:
    """The cut's codec calibration: ranges from the manifest, bottlenecks from the `.npz` file the
    manifest names for it (its hash checked again as it is read). Cached per bundle build and cut,
    since the tail service asks on every request."""
    key = (str(bundle.root), bundle.manifest_sha256, cut_id)
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
    m = bundle.manifest
    raw, file = m.calibration.get(cut_id), m.bottlenecks.get(cut_id)
    calibration = None
    if raw or file:
        fitted = _read_bottlenecks(bundle, file) if file else {}
        calibration = Calibration(Calibration.from_json(raw or {}).ranges, fitted)
    with _loaded_lock:
        if len(_loaded) >= 256:
            _loaded.clear()
        _loaded[key] = calibration
    return calibration


def _read_bottlenecks(bundle: Bundle, file: str) -> dict[str, bottleneck.Bottleneck]:
    data = bundle.path(file).read_bytes()
    if file not in bundle.manifest.files or hashlib.sha256(data).hexdigest() != bundle.manifest.files[file]:
        raise IntegrityError(f"bundle '{bundle.name}' {file}: sha256 mismatch or not listed in the manifest")
    return bottleneck.from_npz(data, f"bundle '{bundle.name}' {file}")


# --- encoding ------------------------------------------------------------------------------------


def _match_specs(tensors: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """The given tensors in spec order, after checking names, dtypes and shapes."""
    unexpected = set(tensors) - {s.name for s in specs}
    if unexpected:
        raise CodecError(f"tensor {sorted(unexpected)[0]!r} is not in the cut's frontier")
    arrays = []
    for spec in specs:
        if spec.name not in tensors:
            raise CodecError(f"tensor {spec.name!r}: missing")
        x = np.asarray(tensors[spec.name])
        if x.dtype != np.dtype(spec.dtype):
            raise CodecError(f"tensor {spec.name!r}: expected dtype {spec.dtype}, got {x.dtype}")
        _check_shape(spec, x.shape)
        arrays.append(np.ascontiguousarray(x))
    return arrays


def _encode_tensor(x: np.ndarray, scheme: str, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    if scheme == "none":
        return x.astype(x.dtype.newbyteorder("<"), copy=False)
    if scheme == "fp16":
        return x.astype("<f2")
    codes = quantize(x, per_channel(scale, x.ndim), per_channel(offset, x.ndim), LEVELS[scheme])
    return pack4(codes) if scheme == "int4" else codes


def _encode_pca(
    spec: TensorSpec, x: np.ndarray, bits: int, calibration: Calibration | None
) -> tuple[TensorHeader, np.ndarray]:
    b = _bottleneck_of(spec.name, x.shape, calibration)
    codes = bottleneck.encode_codes(x, b, bits)
    empty = np.empty(0, np.float32)
    pca = (bits, codes.shape[0], b.basis_id)
    return TensorHeader(spec.name, spec.dtype, x.shape, empty, empty, codes.nbytes, pca), codes.reshape(-1)


def _encode_image(
    specs: Sequence[TensorSpec],
    arrays: list[np.ndarray],
    codec: CodecSpec,
    norm: imagecodec.ImageNorm | None,
) -> bytes:
    if len(arrays) != 1 or arrays[0].dtype.kind != "f":
        raise CodecError(f"the {codec.scheme} scheme needs a frontier of exactly one float image tensor")
    x = arrays[0]
    body = imagecodec.encode_images(x, norm, codec.jpeg_quality, codec.scheme)
    empty = np.empty(0, np.float32)
    head = TensorHeader(specs[0].name, specs[0].dtype, x.shape, empty, empty, len(body))
    return _pack_header(codec.scheme, codec.granularity, False, [head]) + body


def _pack_header(scheme: str, granularity: str, zstd: bool, tensors: Sequence[TensorHeader]) -> bytes:
    codes = (SCHEMES.index(scheme), GRANULARITIES.index(granularity), _ZSTD if zstd else 0)
    parts = [_FIXED.pack(MAGIC, VERSION, *codes, 0, len(tensors))]  # dict_id reserved: 0
    for t in tensors:
        name = t.name.encode()
        if len(name) > 255 or len(t.shape) > MAX_RANK:
            raise CodecError(f"tensor {t.name!r}: name over 255 bytes or rank over {MAX_RANK}")
        parts += [
            _NAME_LEN.pack(len(name)),
            name,
            _DTYPE_RANK.pack(WIRE_DTYPES.index(t.dtype), len(t.shape)),
        ]
        parts += [struct.pack(f"<{len(t.shape)}I", *t.shape), t.scale.astype("<f4").tobytes()]
        parts.append(t.offset.astype("<f4").tobytes())
        parts += [_PCA.pack(*t.pca)] if t.pca is not None else []
        parts.append(_U32.pack(t.nbytes))
    return b"".join(parts)


# --- decoding ------------------------------------------------------------------------------------


class _Reader:
    """A cursor over the header that turns running off the end into a CodecError."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CodecError(f"frame truncated: header needs {self.pos + n} bytes, got {len(self.data)}")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))


def _read_tensor(reader: _Reader, scheme: str, granularity: str) -> TensorHeader:
    (name_len,) = reader.unpack(_NAME_LEN)
    try:
        name = str(reader.take(name_len), "utf-8")
    except UnicodeDecodeError:
        raise CodecError("tensor name is not UTF-8") from None
    dtype_code, rank = reader.unpack(_DTYPE_RANK)
    dtype = _lookup(WIRE_DTYPES, dtype_code, "dtype")
    if rank > MAX_RANK:
        raise CodecError(f"tensor {name!r}: rank {rank} over {MAX_RANK}")
    shape = reader.unpack(struct.Struct(f"<{rank}I"))
    quantized = _scheme_of(scheme, dtype) in LEVELS
    params = param_count(granularity, shape) if quantized else 0
    scale = np.frombuffer(reader.take(4 * params), "<f4")
    offset = np.frombuffer(reader.take(4 * params), "<f4")
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
        raise CodecError(f"tensor {name!r}: non-finite quantization parameters")
    pca = reader.unpack(_PCA) if _scheme_of(scheme, dtype) == "pca" else None
    if pca is not None and not (pca[0] in bottleneck.BIT_BUDGETS and rank >= 3 and 0 < pca[1] <= shape[1]):
        raise CodecError(f"tensor {name!r}: pca bits {pca[0]}, k {pca[1]}, rank {rank} are not valid")
    (nbytes,) = reader.unpack(_U32)
    return TensorHeader(name, dtype, shape, scale, offset, nbytes, pca)


def _check_sizes(header: FrameHeader, body: memoryview, max_bytes: int) -> None:
    """Every length adds up, and nothing the frame promises exceeds `max_bytes`."""
    if header.decoded_bytes > max_bytes:
        raise FrameTooLargeError(f"frame decodes to {header.decoded_bytes} bytes, over {max_bytes}")
    for t in header.tensors:
        scheme = _scheme_of(header.scheme, t.dtype)
        if header.scheme in IMAGE_SCHEMES and scheme != header.scheme:
            raise CodecError(f"tensor {t.name!r}: {scheme} needs a float tensor, not {t.dtype}")
        if t.pca is not None:
            if t.nbytes != t.pca[1] * math.prod(t.shape) // t.shape[1]:
                raise CodecError(f"tensor {t.name!r}: {t.nbytes} payload bytes do not fit k={t.pca[1]}")
        elif scheme not in IMAGE_SCHEMES and t.nbytes != _encoded_size(scheme, t.dtype, math.prod(t.shape)):
            raise CodecError(f"tensor {t.name!r}: {t.nbytes} payload bytes do not fit its shape")
    expected = sum(t.nbytes for t in header.tensors)
    if expected > max_bytes:
        raise FrameTooLargeError(f"frame body claims {expected} bytes, over {max_bytes}")
    actual = _content_size(body) if header.zstd else len(body)
    if expected != actual:
        raise CodecError(f"frame body holds {actual} bytes, the header promises {expected}")


def _content_size(body: memoryview) -> int:
    try:
        return int(zstandard.frame_content_size(body))  # -1 (unknown) never matches
    except zstandard.ZstdError:
        raise CodecError("frame body is not a zstd frame") from None


def _check_header(header: FrameHeader, specs: Sequence[TensorSpec]) -> None:
    by_name = {t.name: t for t in header.tensors}
    if len(by_name) != len(header.tensors) or set(by_name) != {s.name for s in specs}:
        names = [t.name for t in header.tensors]
        raise CodecError(f"frame carries tensors {names}, the cut expects {[s.name for s in specs]}")
    for spec in specs:
        tensor = by_name[spec.name]
        if tensor.dtype != spec.dtype:
            raise CodecError(f"tensor {spec.name!r}: expected dtype {spec.dtype}, got {tensor.dtype}")
        _check_shape(spec, tensor.shape)


def _body(data: memoryview, header: FrameHeader) -> memoryview:
    if not header.zstd:
        return data
    try:
        context = _zstd_context("decompress", 0)
        return memoryview(context.decompress(data, allow_extra_data=False))
    except zstandard.ZstdError as error:
        raise CodecError(f"frame body does not decompress: {error}") from None


def _decode_pca(
    data: memoryview, t: TensorHeader, pca: tuple[int, int, int], calibration: Calibration | None
) -> np.ndarray:
    bits, k, basis_id = pca
    b = _bottleneck_of(t.name, t.shape, calibration)
    if basis_id != b.basis_id or b.variant(bits).k != k:
        raise CodecError(
            f"tensor {t.name!r}: frame encoded with bottleneck {basis_id:08x} k={k}, this side has "
            f"{b.basis_id:08x} k={b.variant(bits).k} (edge and tail need the same bundle)"
        )
    codes = np.frombuffer(data, np.uint8).reshape(k, -1)
    return bottleneck.decode_codes(codes, b, bits, t.shape).astype(t.dtype, copy=False)


def _bottleneck_of(
    name: str, shape: tuple[int, ...], calibration: Calibration | None
) -> bottleneck.Bottleneck:
    b = calibration.bottlenecks.get(name) if calibration is not None else None
    if b is None:
        raise CodecError(
            f"tensor {name!r}: no pca bottleneck fitted at this cut",
            hint="calibrate the bundle with a pca codec (edgecut partition --calibrate …)",
        )
    if len(shape) < 3 or shape[1] != b.channels:
        raise CodecError(f"tensor {name!r}: bottleneck has {b.channels} channels, tensor shape {shape}")
    return b


def _decode_tensor(data: memoryview, t: TensorHeader, scheme: str) -> np.ndarray:
    numel = math.prod(t.shape)
    if scheme == "none" and t.dtype == "bool":
        return (np.frombuffer(data, np.uint8) != 0).reshape(t.shape)  # any byte, never a bad bool
    if scheme in ("none", "fp16"):
        wire = np.dtype(t.dtype if scheme == "none" else "float16").newbyteorder("<")
        return np.frombuffer(data, wire).astype(t.dtype).reshape(t.shape)  # astype copies
    codes = np.frombuffer(data, np.uint8)
    if scheme == "int4":
        codes = unpack4(codes, numel)
    x = np.multiply(codes.reshape(t.shape), per_channel(t.scale, len(t.shape)), dtype=np.float32)
    x += per_channel(t.offset, len(t.shape))
    return x.astype(t.dtype, copy=False)


# --- shared --------------------------------------------------------------------------------------


def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    """Same rank and dims as the spec, except any batch size N ≥ 1 on axis 0."""
    if len(shape) != len(spec.shape) or shape[1:] != spec.shape[1:] or (shape and shape[0] < 1):
        pattern = ("N", *spec.shape[1:]) if spec.shape else ()
        expected = f"({', '.join(map(str, pattern))})"
        raise CodecError(f"tensor {spec.name!r}: expected shape {expected}, got {tuple(shape)}")


def _scheme_of(frame_scheme: str, dtype: str) -> str:
    """Quantizers only apply to floats; integer and bool tensors always travel raw."""
    return frame_scheme if np.dtype(dtype).kind == "f" else "none"


def _encoded_size(scheme: str, dtype: str, numel: int) -> int:
    itemsize = {"none": np.dtype(dtype).itemsize, "fp16": 2, "int8": 1, "int6": 1}.get(scheme)
    return numel * itemsize if itemsize else (numel + 1) // 2


def _lookup(names: tuple[str, ...], code: int, what: str) -> str:
    if code >= len(names):
        raise CodecError(f"unknown {what} code {code} in frame")
    return names[code]


_contexts = threading.local()


def _zstd_context(kind: str, level: int) -> Any:
    """A reusable zstd (de)compressor: per thread, since zstd contexts are not thread-safe.

    Reuse saves allocating a context on every frame.
    """
    cache: dict[tuple[str, int], Any] = _contexts.__dict__.setdefault("cache", {})
    key = (kind, level)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        if kind == "compress":
            cache[key] = zstandard.ZstdCompressor(level=level)
        else:
            cache[key] = zstandard.ZstdDecompressor()
    return cache[key]
