"""The activation codec: round trips within the quantizer's error, a pinned wire format, and typed
errors (never a numpy/zstd/struct exception, never a big allocation) for every malformed frame."""

from __future__ import annotations

import contextlib
import json
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgecut.bundle import TensorSpec
from edgecut.codec import (
    Calibration,
    CodecSpec,
    decode,
    encode,
    header_of,
)
from edgecut.errors import CodecError, FrameTooLargeError, UsageError

SPEC = [TensorSpec("x", (1, 3), "float32")]
X = {"x": np.array([[0.0, 0.5, 1.0]], np.float32)}
SPEC3 = [TensorSpec("x", (1, 3, 1), "float32")]  # rank 3: ranges per channel apply
X3 = {"x": X["x"].reshape(1, 3, 1)}
NORM = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def relu6(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Activation-like data: about half zeros, clipped at 6."""
    return np.clip(np.random.default_rng(seed).normal(0, 2, shape), 0, 6).astype(np.float32)


@st.composite
def frontiers(draw: st.DrawFn) -> tuple[list[TensorSpec], dict[str, np.ndarray]]:
    """1-3 tensors of rank 1-4 and mixed dtypes, sharing a batch size of 1-3."""
    batch = draw(st.integers(1, 3))
    specs, tensors = [], {}
    for i in range(draw(st.integers(1, 3))):
        dims = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(["float32", "float16", "int64", "bool"]))
        if dtype.startswith("float"):
            width = 16 if dtype == "float16" else 32
            elements = st.floats(-1000, 1000, width=width, allow_subnormal=False)
        else:
            elements = None
        specs.append(TensorSpec(f"t{i}", (1, *dims), dtype))
        tensors[f"t{i}"] = draw(hnp.arrays(dtype, (batch, *dims), elements=elements))
    return specs, tensors


def tolerance(x: np.ndarray, scheme: str, scale: np.ndarray) -> np.ndarray:
    """Per-element error bound: half a quantization step, plus float rounding."""
    if x.dtype.kind != "f" or scheme == "none":
        return np.zeros(x.shape)
    fp16 = np.abs(x.astype(np.float64)) * 2.0**-10 + 1e-7  # fp16 wire or a float16 tensor
    if scheme == "fp16":
        return fp16
    step = scale.reshape(1, -1, *[1] * (x.ndim - 2)) if scale.size > 1 else scale
    return step / 2 * (1 + 1e-3) + 1e-5 + (fp16 if x.dtype == np.float16 else 0)


# --- round trips -------------------------------------------------------------------------------


@given(
    frontiers(),
    st.sampled_from(["none", "fp16", "int8", "int6", "int4"]),
    st.sampled_from(["tensor", "channel"]),
    st.sampled_from([0, 3]),
)
@FUZZ
def test_round_trip_stays_within_half_a_step(frontier, scheme, granularity, level) -> None:
    specs, tensors = frontier
    payload = encode(tensors, specs, CodecSpec(scheme, granularity, level))
    decoded = decode(payload, specs)
    for t in header_of(payload).tensors:
        x, y = tensors[t.name], decoded[t.name]
        assert y.dtype == x.dtype and y.shape == x.shape and y.flags.writeable
        error = np.abs(y.astype(np.float64) - x.astype(np.float64))
        assert np.all(error <= tolerance(x, scheme, t.scale))


@given(
    hnp.arrays(np.float32, (2, 3, 4), elements=st.floats(-50, 50, width=32)),
    st.lists(st.floats(-10, 10, width=32), min_size=3, max_size=3),
    st.lists(st.floats(0, 20, width=32), min_size=3, max_size=3),
    st.sampled_from(["int8", "int6", "int4"]),
)
@FUZZ
def test_calibrated_range_clips_outliers(x, lows, widths, scheme) -> None:
    lo = np.array(lows, np.float32)
    hi = lo + np.array(widths, np.float32)
    spec = [TensorSpec("a", (1, 3, 4), "float32")]
    payload = encode({"a": x}, spec, CodecSpec(scheme), Calibration({"a": (lo, hi)}))
    y = decode(payload, spec)["a"]
    clipped = np.clip(x, lo[None, :, None], hi[None, :, None])
    scale = header_of(payload).tensors[0].scale
    assert np.all(np.abs(y - clipped) <= tolerance(x, scheme, scale))


def test_calibrated_zero_stays_exactly_zero() -> None:
    x = relu6((1, 8, 5, 5))
    calibration = Calibration.from_samples([{"a": x}])
    spec = [TensorSpec("a", x.shape, "float32")]
    y = decode(encode({"a": x}, spec, CodecSpec("int4"), calibration), spec)["a"]
    assert np.all(y[x == 0] == 0)


def test_batch_of_any_size_passes_both_ways() -> None:
    x = {"x": np.zeros((4, 3), np.float32)}
    assert decode(encode(x, SPEC, CodecSpec()), SPEC)["x"].shape == (4, 3)


def test_nan_needs_a_calibrated_range() -> None:
    x = {"x": np.array([[0.0, np.nan, 1.0]], np.float32)}
    with pytest.raises(CodecError, match="inf/nan"):
        encode(x, SPEC, CodecSpec())
    calibration = Calibration({"x": (np.float32(0), np.float32(1))})
    assert decode(encode(x, SPEC, CodecSpec(), calibration), SPEC)["x"][0, 1] == 0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_jpeg_round_trip_of_a_smooth_image(layout: str) -> None:
    rows, cols = np.meshgrid(*[np.linspace(-0.9, 0.9, 32)] * 2, indexing="ij")
    image = np.stack([rows, cols, -rows])
    x = np.stack([image, image[::-1]]).astype(np.float32)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    spec = [TensorSpec("input", (1, *x.shape[1:]), "float32")]
    payload = encode({"input": x}, spec, CodecSpec.parse("jpeg90"), image_norm=NORM)
    y = decode(payload, spec, image_norm=NORM)["input"]
    assert y.shape == x.shape and np.abs(y - x).mean() * 128 < 2 and np.abs(y - x).max() * 128 < 16


def test_jpeg_needs_image_norm_and_one_image() -> None:
    x = {"input": np.zeros((1, 3, 8, 8), np.float32)}
    spec = [TensorSpec("input", (1, 3, 8, 8), "float32")]
    with pytest.raises(CodecError, match="image_norm"):
        encode(x, spec, CodecSpec("jpeg"))
    payload = encode(x, spec, CodecSpec("jpeg"), image_norm=NORM)
    with pytest.raises(CodecError, match="image_norm"):
        decode(payload, spec)
    with pytest.raises(CodecError, match="image"):
        encode(X, SPEC, CodecSpec("jpeg"), image_norm=NORM)


# --- the wire format ---------------------------------------------------------------------------


def test_golden_bytes_int8_per_tensor() -> None:
    payload = encode(X, SPEC, CodecSpec.parse("int8-tensor-z0"))
    assert payload.hex() == (
        "4543463101020000"
        "00000000"
        "0100"  # magic, v1, int8, tensor, no zstd, dict 0, 1 tensor
        "0178"
        "0002"
        "01000000"
        "03000000"  # "x", float32, rank 2, (1, 3)
        "8180803b"
        "00000000"
        "03000000"  # scale 1/255, offset 0, 3 payload bytes
        "007fff"  # codes
    )


def test_golden_bytes_int4_per_channel_with_an_int64_passenger() -> None:
    specs = [*SPEC3, TensorSpec("i", (1,), "int64")]
    payload = encode({**X3, "i": np.array([7])}, specs, CodecSpec.parse("int4-channel-z0"))
    assert payload.hex() == (
        "4543463101030100"
        "00000000"
        "0200"  # magic, v1, int4, channel, no zstd, dict 0, 2 tensors
        "0178"
        "0003"
        "01000000"
        "03000000"
        "01000000"  # "x", float32, (1, 3, 1)
        "000000000000000000000000"
        "000000000000003f0000803f"
        "02000000"  # scales, offsets, 2 bytes
        "0169"
        "0201"
        "01000000"
        "08000000"  # "i", int64, (1,), 8 bytes: raw
        "0000"
        "0700000000000000"  # two nibble-packed zeros, then the int64
    )


def test_header_of_describes_the_frame() -> None:
    payload = encode(X3, SPEC3, CodecSpec.parse("int8-channel-z3"))
    header = header_of(payload)
    assert (header.scheme, header.granularity, header.zstd) == ("int8", "channel", True)
    assert header.tensors[0].scale.shape == (3,) and header.decoded_bytes == 12
    vector = header_of(encode(X, SPEC, CodecSpec.parse("int8-channel-z3")))
    assert vector.tensors[0].scale.shape == (1,)  # (N, C): one range, not one per value
    assert header.header_bytes + header.body_bytes == len(payload)


# --- bad frames --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8-z0", "int4-z3", "none-z0", "fp16-z3"])
def test_every_truncation_is_a_codec_error(codec: str) -> None:
    payload = encode(X, SPEC, CodecSpec.parse(codec))
    for end in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:end], SPEC)


@pytest.mark.parametrize("codec", ["int8-z0", "int8-z3"])
def test_trailing_bytes_are_refused(codec: str) -> None:
    with pytest.raises(CodecError):
        decode(encode(X, SPEC, CodecSpec.parse(codec)) + b"\0", SPEC)


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [(0, ord("X"), "magic"), (4, 2, "version"), (5, 9, "scheme"), (6, 7, "granularity"),
     (7, 2, "flags"), (16, 12, "dtype"), (17, 9, "rank")],
)  # fmt: skip
def test_bad_header_fields_are_named(offset: int, value: int, match: str) -> None:
    payload = bytearray(encode(X, SPEC, CodecSpec.parse("int8-z0")))
    payload[offset] = value
    with pytest.raises(CodecError, match=match):
        decode(bytes(payload), SPEC)


def test_frame_must_match_the_cut_spec() -> None:
    payload = encode(X, SPEC, CodecSpec())
    for specs, match in [
        ([TensorSpec("x", (1, 3), "float16")], "dtype float16, got float32"),
        ([TensorSpec("x", (1, 4), "float32")], r"shape \(N, 4\), got \(1, 3\)"),
        ([TensorSpec("y", (1, 3), "float32")], "expects"),
        ([*SPEC, TensorSpec("z", (1,), "int64")], "expects"),
    ]:
        with pytest.raises(CodecError, match=match):
            decode(payload, specs)


def test_encode_checks_tensors_against_the_spec() -> None:
    cases = [
        ({"x": np.zeros((1, 3), np.float64)}, "dtype float32, got float64"),
        ({"x": np.zeros((1, 4), np.float32)}, r"expected shape \(N, 3\)"),
        ({"x": np.zeros((0, 3), np.float32)}, "expected shape"),
        ({"x": np.zeros(3, np.float32)}, "expected shape"),
        ({}, "missing"),
        ({**X, "extra": np.zeros(1)}, "not in the cut's frontier"),
    ]
    for tensors, match in cases:
        with pytest.raises(CodecError, match=match):
            encode(tensors, SPEC, CodecSpec())


def test_huge_claimed_dims_fail_before_allocating() -> None:
    payload = bytearray(encode(X, SPEC, CodecSpec.parse("none-z0")))
    payload[18:26] = struct.pack("<II", 1 << 31, 1 << 31)
    tracemalloc.start()
    with pytest.raises(FrameTooLargeError):
        decode(bytes(payload), [TensorSpec("x", (1, 1 << 31), "float32")])
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_max_bytes_bounds_the_decoded_size() -> None:
    payload = encode(X, SPEC, CodecSpec())
    with pytest.raises(FrameTooLargeError):
        decode(payload, SPEC, max_bytes=11)
    assert decode(payload, SPEC, max_bytes=len(payload))


def _zeros_frame(*, content_size: bool) -> bytes:
    """A zstd frame of 100 MB of zeros (a few KB), built without holding 100 MB."""
    chunk, chunks = bytes(1 << 20), 100
    size = len(chunk) * chunks if content_size else -1
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=content_size)
    frame = compressor.compressobj(size=size)
    return b"".join([*(frame.compress(chunk) for _ in range(chunks)), frame.flush()])


@pytest.mark.parametrize("content_size", [True, False])
def test_decompression_bomb_fails_without_allocating(content_size: bool) -> None:
    spec = [TensorSpec("a", (1, 1000), "float32")]
    valid = encode({"a": np.zeros((1, 1000), np.float32)}, spec, CodecSpec.parse("int8-z3"))
    header = header_of(valid)
    bomb = valid[: header.header_bytes] + _zeros_frame(content_size=content_size)
    assert len(bomb) < 64 << 10
    tracemalloc.start()
    with pytest.raises(CodecError, match="promises 1000"):
        decode(bomb, spec)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_zstd_frame_lying_about_its_size_is_refused() -> None:
    spec = [TensorSpec("a", (1, 1000), "float32")]
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(2000))
    descriptor = frame[4]
    assert descriptor >> 6 == 1 and descriptor & 0x20  # 2-byte content size, no window byte
    forged = frame[:5] + struct.pack("<H", 1000 - 256) + frame[7:]
    valid = encode({"a": np.zeros((1, 1000), np.float32)}, spec, CodecSpec.parse("int8-z3"))
    with pytest.raises(CodecError, match="decompress"):
        decode(valid[: header_of(valid).header_bytes] + forged, spec)


def test_nonzero_dict_id_is_refused() -> None:
    """zstd dictionaries cannot be shipped or negotiated, so dict_id is reserved and must be 0."""
    valid = encode(X3, SPEC3, CodecSpec.parse("int8-channel-z3"))
    assert struct.unpack_from("<I", valid, 8) == (0,)  # every frame this side writes leaves it 0
    forged = valid[:8] + struct.pack("<I", 7) + valid[12:]
    with pytest.raises(CodecError, match=r"dictionary 7; dictionaries are not supported"):
        header_of(forged)
    with pytest.raises(CodecError, match="dict_id must be 0"):
        decode(forged, SPEC3)


@given(st.binary(max_size=200))
@FUZZ
def test_random_bytes_only_raise_codec_errors(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data, SPEC)


@given(st.sampled_from(["int8-z0", "int4-channel-z3", "none-z0", "fp16-z0"]), st.data())
@FUZZ
def test_corrupted_frames_decode_or_raise_codec_errors(codec: str, data: st.DataObject) -> None:
    specs = [*SPEC, TensorSpec("i", (1, 2), "int64")]
    payload = bytearray(encode({**X, "i": np.array([[1, 2]])}, specs, CodecSpec.parse(codec)))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CodecError):
        decode(bytes(payload), specs)


# --- codec spec and calibration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("int8", CodecSpec()), ("int8-tensor", CodecSpec(granularity="tensor")),
     ("int4-channel", CodecSpec("int4")), ("int6-tensor", CodecSpec("int6", "tensor")),
     ("fp16", CodecSpec("fp16")),
     ("none", CodecSpec("none")), ("jpeg90", CodecSpec("jpeg")),
     ("jpeg75", CodecSpec("jpeg", jpeg_quality=75)), ("int8-channel-z9", CodecSpec(zstd_level=9)),
     ("INT4-z0-tensor", CodecSpec("int4", "tensor", 0))],
)  # fmt: skip
def test_codec_spec_parses(text: str, expected: CodecSpec) -> None:
    assert CodecSpec.parse(text) == expected
    assert CodecSpec.parse(str(expected)) == CodecSpec.parse(text)


@pytest.mark.parametrize("text", ["int3", "int8-row", "int8-z23", "jpeg100", "int8-z1-z2", ""])
def test_codec_spec_refuses_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        CodecSpec.parse(text)
    assert caught.value.hint and "int8-channel-z3" in caught.value.hint


def test_calibration_from_samples_and_json() -> None:
    samples = [{"a": relu6((2, 5, 4, 4), seed), "b": np.arange(4.0), "n": np.arange(3)} for seed in range(3)]
    calibration = Calibration.from_samples(samples, percentile=100)
    lo, hi = calibration.ranges["a"]
    assert lo.shape == hi.shape == (5,) and calibration.ranges["b"][0].shape == ()
    assert "n" not in calibration.ranges  # integer tensors are never quantized
    stacked = np.concatenate([s["a"] for s in samples])
    assert np.array_equal(hi, stacked.max(axis=(0, 2, 3)))
    again = Calibration.from_json(json.loads(json.dumps(calibration.to_json())))
    assert again.to_json() == calibration.to_json()
    assert np.array_equal(again.ranges["a"][1], hi)


def test_calibration_percentile_clips_outliers() -> None:
    x = np.zeros((1, 1, 100, 100), np.float32)
    x[0, 0, 0, 0] = 1000
    assert Calibration.from_samples([{"a": x}], percentile=99.9).ranges["a"][1] == 0


@pytest.mark.parametrize("entry", [{"lo": 1.0, "hi": 0.0}, {"lo": [0.0]}, [1, 2], {"lo": "a", "hi": 1}])
def test_malformed_calibration_json_is_a_codec_error(entry: object) -> None:
    with pytest.raises(CodecError):
        Calibration.from_json({"a": entry})
