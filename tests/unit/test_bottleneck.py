"""The pca bottleneck codec: the transform's math, its frames, its file, and its refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecut import bottleneck
from edgecut.bundle import TensorSpec
from edgecut.codec import Calibration, CodecSpec, decode, encode, header_of
from edgecut.errors import CodecError, UsageError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def correlated(n: int, channels: int, rank: int, side: int = 6, seed: int = 0) -> np.ndarray:
    """(n, channels, side, side) activations that live near a `rank`-dimensional channel subspace."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank, channels))
    latent = rng.normal(size=(n, side, side, rank)) * np.linspace(3, 1, rank)
    x = latent @ mix + 0.01 * rng.normal(size=(n, side, side, channels)) + 0.5
    return np.ascontiguousarray(np.moveaxis(x, -1, 1), np.float32)


def fitted(x: np.ndarray, budgets: tuple[int, ...] = (4,), k: int | None = None) -> bottleneck.Bottleneck:
    mean, basis, variance = bottleneck.fit_basis(x)
    plain = bottleneck.Bottleneck(mean, basis, variance, {})
    coefficients = bottleneck.project(x, plain, basis.shape[1])
    k = k or basis.shape[1]
    variants = {b: bottleneck.fit_variant(coefficients, variance, b, k) for b in budgets}
    return bottleneck.Bottleneck(mean, basis, variance, variants)


def test_basis_is_orthonormal_and_sorted_by_variance() -> None:
    mean, basis, variance = bottleneck.fit_basis(correlated(8, 12, 3))
    assert np.allclose(basis.T @ basis, np.eye(12), atol=1e-4)
    assert np.all(np.diff(variance) <= 1e-6) and mean.shape == (12,)


@FUZZ
@given(st.integers(2, 16), st.integers(1, 4), st.integers(0, 10_000))
def test_full_rank_projection_round_trips(channels: int, n: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(n, channels, 3, 2)).astype(np.float32)
    b = bottleneck.Bottleneck(*bottleneck.fit_basis(x), {})
    back = bottleneck.reconstruct(bottleneck.project(x, b, channels), b, x.shape)
    assert back.shape == x.shape and np.allclose(back, x, atol=1e-4 * (1 + np.abs(x).max()))


@pytest.mark.parametrize("budget", [2, 3, 4, 8])
def test_allocation_gives_the_strongest_component_its_budget_and_weaker_ones_fewer_bits(budget: int) -> None:
    """B-bit codes span ±4σ of the strongest component; weaker ones get the fewest bits whose
    levels still cover their extent at the same step (2 at least, 8 at most)."""
    variance = np.array([16.0, 4.0, 1.0, 0.05, 1e-9], np.float32)
    step = bottleneck.step_for(variance, budget)
    assert step == pytest.approx(8 * 4.0 / (2**budget - 2))
    extent = 4 * np.sqrt(variance)
    bits = bottleneck.allocate(extent, step).astype(int)
    assert bits[0] == budget and np.all(np.diff(bits) <= 0) and bits[-1] == 2
    assert np.all((2.0**bits - 2) / 2 * step >= extent * (1 - 1e-6))  # each band is covered ...
    fewer = bits > 2
    assert np.all((2.0 ** (bits[fewer] - 1) - 2) / 2 * step < extent[fewer])  # ... by the fewest bits
    assert bottleneck.allocate(np.array([1e9]), step)[0] == 8


@FUZZ
@given(st.integers(2, 8), st.floats(0.01, 100), st.integers(0, 10_000))
def test_quantizer_error_is_at_most_half_a_step_inside_the_band(budget: int, scale: float, seed: int) -> None:
    """Every component shares the step Δ; inside its band a value comes back within Δ/2, and zero
    (the mean) is exact, so a component that carries nothing costs nothing in error."""
    rng = np.random.default_rng(seed)
    variance = np.array([scale**2, (scale / 3) ** 2, (scale / 50) ** 2])
    coefficients = rng.normal(size=(500, 3)) * np.sqrt(variance)
    v = bottleneck.fit_variant(coefficients, variance, budget, 3)
    step = bottleneck.step_for(variance, budget)
    assert np.allclose((v.hi - v.lo) / v.levels, step, rtol=1e-5)
    inside = np.all((coefficients >= v.lo) & (coefficients <= v.hi), axis=1)
    codes = bottleneck.quantize_planes(coefficients, v)
    back = bottleneck.dequantize_planes(codes, v)
    assert np.all(np.abs(back - coefficients)[inside] <= step / 2 * (1 + 1e-4) + 1e-6)
    assert np.all(bottleneck.dequantize_planes(bottleneck.quantize_planes(np.zeros((1, 3)), v), v) == 0)
    assert codes.max() <= 2 ** int(v.bits.max()) - 2


def test_low_rank_data_survives_a_few_components_within_the_quantizer_step() -> None:
    x = correlated(16, 24, 3)
    b = fitted(x, (8,), k=3)
    y = bottleneck.decode_codes(bottleneck.encode_codes(x, b, 8), b, 8, x.shape)
    spread = float(x.max() - x.min())
    assert np.abs(y - x).mean() < 0.01 * spread


def frame_setup(channels: int = 16) -> tuple[list[TensorSpec], np.ndarray, Calibration]:
    x = correlated(12, channels, 4)
    specs = [TensorSpec("f", (1, channels, 6, 6), "float32"), TensorSpec("ids", (1, 2), "int64")]
    return specs, x, Calibration({}, {"f": fitted(x, (2, 4), k=6)})


@pytest.mark.parametrize("text", ["pca4", "pca2-z0", "pca-int4"])
def test_pca_frames_round_trip_and_carry_integers_raw(text: str) -> None:
    specs, x, calibration = frame_setup()
    tensors = {"f": x[:2], "ids": np.array([[1, 2], [3, 4]], np.int64)}
    spec = CodecSpec.parse(text)
    payload = encode(tensors, specs, spec, calibration)
    header = header_of(payload)
    (pca,) = [t.pca for t in header.tensors if t.pca is not None]
    assert header.scheme == "pca" and pca[:2] == (spec.pca_bits, 6)
    out = decode(payload, specs, calibration=calibration)
    assert np.array_equal(out["ids"], tensors["ids"])
    reference = bottleneck.decode_codes(
        bottleneck.encode_codes(x[:2], calibration.bottlenecks["f"], spec.pca_bits),
        calibration.bottlenecks["f"],
        spec.pca_bits,
        x[:2].shape,
    )
    assert out["f"].dtype == np.float32 and np.array_equal(out["f"], reference)
    assert len(payload) < x[:2].nbytes // 8


def test_pca_refuses_a_missing_or_different_bottleneck() -> None:
    specs, x, calibration = frame_setup()
    tensors = {"f": x[:1], "ids": np.zeros((1, 2), np.int64)}
    with pytest.raises(CodecError, match="no pca bottleneck"):
        encode(tensors, specs, CodecSpec.parse("pca4"), None)
    payload = encode(tensors, specs, CodecSpec.parse("pca4"), calibration)
    with pytest.raises(CodecError, match="no pca bottleneck"):
        decode(payload, specs)
    other = Calibration({}, {"f": fitted(correlated(12, 16, 4, seed=9), (4,), k=6)})
    with pytest.raises(CodecError, match="same bundle"):
        decode(payload, specs, calibration=other)


def test_pca_frame_with_a_wrong_length_is_refused_before_decoding() -> None:
    specs, x, calibration = frame_setup()
    payload = encode(
        {"f": x[:1], "ids": np.zeros((1, 2), np.int64)}, specs, CodecSpec.parse("pca4-z0"), calibration
    )
    with pytest.raises(CodecError):
        decode(payload[:-3], specs, calibration=calibration)


def test_npz_round_trip_and_refusals() -> None:
    _, _, calibration = frame_setup()
    data = bottleneck.to_npz(calibration.bottlenecks)
    ((name, back),) = bottleneck.from_npz(data, "test").items()
    original = calibration.bottlenecks["f"]
    assert name == "f" and back.basis_id == original.basis_id and sorted(back.variants) == [2, 4]
    assert np.array_equal(back.variant(4).bits, original.variant(4).bits)
    with pytest.raises(CodecError, match="not a valid bottleneck file"):
        bottleneck.from_npz(b"PK\x03\x04 not really", "codecs/c05.npz")
    broken = dict(np.load(io.BytesIO(data)))
    broken["t0.pca4.bits"] = np.full_like(broken["t0.pca4.bits"], 9)
    buffer = io.BytesIO()
    np.savez(buffer, **broken)
    with pytest.raises(CodecError, match="bits outside"):
        bottleneck.from_npz(buffer.getvalue(), "codecs/c05.npz")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("pca4", "pca4-z3"),
        ("pca-int3", "pca3-z3"),
        ("pca2-z9", "pca2-z9"),
        ("webp75", "webp75"),
        ("png", "png"),
    ],
)
def test_new_codec_names_parse(text: str, canonical: str) -> None:
    assert str(CodecSpec.parse(text)) == canonical
    assert CodecSpec.parse(canonical) == CodecSpec.parse(text)


@pytest.mark.parametrize("text", ["pca5", "pca1", "pca-int9", "webp100"])
def test_bad_new_codec_names_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        CodecSpec.parse(text)


@pytest.mark.parametrize("text", ["png", "webp90", "jpeg50"])
def test_image_codecs_round_trip_a_smooth_image(text: str) -> None:
    norm = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
    rows, cols = np.meshgrid(*[np.linspace(-0.9, 0.9, 32)] * 2, indexing="ij")
    x = np.stack([rows, cols, -rows])[None].astype(np.float32)
    spec = [TensorSpec("input", (1, 3, 32, 32), "float32")]
    payload = encode({"input": x}, spec, CodecSpec.parse(text), image_norm=norm)
    assert header_of(payload).scheme == CodecSpec.parse(text).scheme
    y = decode(payload, spec, image_norm=norm)["input"]
    pixels = np.abs(y - x) * 128
    assert pixels.max() <= 0.51 if text == "png" else pixels.mean() < 4
