"""A retraining-free bottleneck for one frontier tensor: channel PCA, then few-bit codes per component.

Neighbouring channels of a CNN activation are strongly correlated, so most of a (N, C, H, W)
tensor's energy lives in a few directions of channel space (Cohen, Choi & Bajić 2021). Fitted on
calibration activations: the channel mean, an orthonormal basis sorted by variance, and for each
bit budget B a `Variant`: k components kept, each quantized with the SAME step Δ (reverse
water-filling: equal distortion Δ²/12 in every kept component; the entropy coder, zstd, then spends
few bits where a component's coefficients mostly round to zero, so the rate follows the variance
by itself). Δ = 8σ₀ / (2^B - 2): B-bit codes span ±4σ of the strongest component (the textbook
loading of a uniform quantizer). Each component's range is its calibration percentile band rounded out to
whole steps and centred on zero, and its bit width b_i the fewest that cover that band (2..8). The
edge projects (C → k), the tail reconstructs (k → C); both read the same `Bottleneck`, which the
bundle stores in a `codecs/<cut>.npz` file listed and hashed in its manifest, and the frame names
it by `basis_id`.

This module is pure numpy math; the wire format stays in `edgecut.codec`, the fitting loop (which
needs the model) in `edgecut.partition.calibrate`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgecut.errors import CodecError

BIT_BUDGETS = (2, 3, 4, 6, 8)  # B of the codecs pca2 … pca8
LOADING_SIGMAS = 4.0  # Δ = 2·LOADING_SIGMAS·σ₀ / (2^B - 2): B-bit codes span ±4σ of the strongest component
# Per-component band the quantizer covers, [100 - p, p] percentiles of its calibration coefficients;
# values outside clip. With a common step, a wide band costs few bits (outer codes are rare).
CLIP_PERCENTILE = 99.99
CODE_FORMAT = b"zigzag-v2"  # enters basis_id: frames of the older offset-code format are refused
MIN_SPATIAL = 4  # PCA needs many samples per channel: only rank ≥ 3 tensors with H·W ≥ this


@dataclass(frozen=True, eq=False)
class Variant:
    """One bit budget: component i < k gets `bits[i]` bits over [lo[i], hi[i]]."""

    bits: np.ndarray  # uint8 (k,), each 2..8
    lo: np.ndarray  # float32 (k,)
    hi: np.ndarray  # float32 (k,), > lo

    @property
    def k(self) -> int:
        return int(self.bits.size)

    @property
    def levels(self) -> np.ndarray:
        """Highest code per component, float32 (k,): 2^b - 2, an odd number of levels, so the
        middle of the range (about zero for centred coefficients) is exactly representable."""
        return (np.left_shift(1, self.bits.astype(np.int32)) - 2).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Bottleneck:
    """The fitted transform of one tensor (channels on axis 1)."""

    mean: np.ndarray  # float32 (C,)
    basis: np.ndarray  # float32 (C, K): orthonormal columns, variance descending
    variance: np.ndarray  # float32 (K,): calibration variance along each column
    variants: Mapping[int, Variant]  # bit budget B -> its k, bits and ranges

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    @property
    def basis_id(self) -> int:
        """u32 naming these exact numbers and the code format, so a frame encoded against another
        fit, or by an edge that maps codes differently, is refused instead of misread."""
        h = hashlib.sha256(CODE_FORMAT + self.mean.tobytes() + self.basis.tobytes())
        return int.from_bytes(h.digest()[:4], "little")

    def variant(self, bits: int) -> Variant:
        if bits not in self.variants:
            raise CodecError(f"bottleneck has no {bits}-bit variant (fitted: {sorted(self.variants)})")
        return self.variants[bits]


def fits(shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape gets a bottleneck: channels on axis 1 with spatial extent."""
    return len(shape) >= 3 and shape[1] >= 2 and int(np.prod(shape[2:])) >= MIN_SPATIAL


def fit_basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, basis, variance) of the channel vectors of calibration activations x (N, C, …)."""
    rows = _rows(x).astype(np.float64)
    mean = rows.mean(axis=0)
    centered = rows - mean
    variance, vectors = np.linalg.eigh(centered.T @ centered / max(1, len(rows) - 1))
    order = np.argsort(variance)[::-1]
    return (
        mean.astype(np.float32),
        np.ascontiguousarray(vectors[:, order], np.float32),
        np.maximum(variance[order], 0).astype(np.float32),
    )


def step_for(variance: np.ndarray, budget: int) -> float:
    """The common quantizer step Δ of bit budget B: B-bit codes (2^B - 2 steps, zero in the middle)
    span exactly ±LOADING_SIGMAS·σ₀ of the strongest component (σ₀² = variance[0])."""
    sigma = float(np.sqrt(max(float(variance[0]), 1e-30)))
    return 2 * LOADING_SIGMAS * sigma / float((1 << budget) - 2)


def allocate(extent: np.ndarray, step: float) -> np.ndarray:
    """Bits per component to cover ±extent[i] at `step` with the zero code in the middle: the
    fewest b with 2^b - 2 ≥ 2·⌈extent/step⌉, at least 2 (three levels: -Δ, 0, +Δ), at most 8.
    Components with more spread get more bits, each bit doubling the extent covered: reverse
    water-filling's half a bit per halving of variance, as code widths."""
    half = np.ceil(np.maximum(np.asarray(extent, np.float64), 0.0) / step)
    return np.clip(np.ceil(np.log2(2 * half + 2)), 2, 8).astype(np.uint8)


def fit_variant(coefficients: np.ndarray, variance: np.ndarray, budget: int, k: int) -> Variant:
    """The first k components at budget B from calibration coefficients (M, ≥k): common step Δ,
    ranges [-Δ·L_i/2, +Δ·L_i/2] (L_i = 2^b_i - 2 levels) covering each percentile band."""
    step = step_for(variance, budget)
    lo, hi = np.percentile(coefficients[:, :k], [100 - CLIP_PERCENTILE, CLIP_PERCENTILE], axis=0)
    bits = allocate(np.maximum(-lo, hi), step)
    half = (np.left_shift(1, bits.astype(np.int32)) - 2) / 2 * step
    return Variant(bits, (-half).astype(np.float32), half.astype(np.float32))


def project(x: np.ndarray, b: Bottleneck, k: int) -> np.ndarray:
    """Coefficients (M, k) of x's channel vectors (M = N·H·W rows) on the first k components."""
    return (_rows(x) - b.mean) @ b.basis[:, :k]


def reconstruct(coefficients: np.ndarray, b: Bottleneck, shape: tuple[int, ...]) -> np.ndarray:
    """Channel vectors back from (M, k) coefficients, as a float32 tensor of `shape` (C on axis 1)."""
    k = coefficients.shape[1]
    rows = coefficients.astype(np.float32, copy=False) @ b.basis[:, :k].T + b.mean
    moved = rows.reshape(shape[0], *shape[2:], shape[1])
    return np.ascontiguousarray(np.moveaxis(moved, -1, 1))


def quantize_planes(coefficients: np.ndarray, v: Variant) -> np.ndarray:
    """uint8 codes (k, M): one plane per component, so each plane's codes sit together for zstd.

    A code is the signed step count q (|q| ≤ L/2) zigzagged (0, -1, +1, -2, … → 0, 1, 2, 3, …):
    every component's zero is code 0 and small magnitudes are small codes whatever its bit width,
    so zstd's one literal table fits all planes (measured at Lite0 c05 pca4: 2 % fewer bytes than
    offset codes; zero-runs of weak components compress to almost nothing)."""
    half = v.levels / 2
    step = (v.hi - v.lo) / v.levels
    q = np.rint((coefficients - (v.lo + v.hi) / 2) / step)
    np.clip(q, -half, half, out=q)
    zigzag = np.where(q >= 0, 2 * q, -2 * q - 1)
    return np.ascontiguousarray(zigzag.astype(np.uint8).T)


def dequantize_planes(codes: np.ndarray, v: Variant) -> np.ndarray:
    """(M, k) float32 coefficients from `quantize_planes`' (k, M) codes."""
    if np.any(codes.max(axis=1, initial=0) > v.levels):
        raise CodecError("bottleneck code above its component's level count")
    step = (v.hi - v.lo) / v.levels
    c = codes.T.astype(np.float32)
    q = np.where(c % 2 == 0, c / 2, -(c + 1) / 2)
    return (q * step + (v.lo + v.hi) / 2).astype(np.float32)


def encode_codes(x: np.ndarray, b: Bottleneck, bits: int) -> np.ndarray:
    """x (N, C, …) → uint8 codes (k, N·H·W): the edge's whole share of the codec."""
    v = b.variant(bits)
    return quantize_planes(project(x, b, v.k), v)


def decode_codes(codes: np.ndarray, b: Bottleneck, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """The tail's share: codes (k, N·H·W) → float32 tensor of `shape`."""
    return reconstruct(dequantize_planes(codes, b.variant(bits)), b, shape)


def _rows(x: np.ndarray) -> np.ndarray:
    """(N, C, …) → (N·H·W, C) channel vectors, float32."""
    return np.moveaxis(np.asarray(x, np.float32), 1, -1).reshape(-1, x.shape[1])


# --- storage -------------------------------------------------------------------------------------


def to_npz(bottlenecks: Mapping[str, Bottleneck]) -> bytes:
    """One cut's bottlenecks as .npz bytes: plain numeric arrays only, readable without pickle."""
    arrays: dict[str, np.ndarray] = {}
    for i, (name, b) in enumerate(bottlenecks.items()):
        arrays[f"t{i}.name"] = np.frombuffer(name.encode(), np.uint8)
        arrays[f"t{i}.mean"], arrays[f"t{i}.basis"], arrays[f"t{i}.variance"] = b.mean, b.basis, b.variance
        for budget, v in b.variants.items():
            arrays[f"t{i}.pca{budget}.bits"], arrays[f"t{i}.pca{budget}.lo"] = v.bits, v.lo
            arrays[f"t{i}.pca{budget}.hi"] = v.hi
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
    return buffer.getvalue()


def from_npz(data: bytes, label: str) -> dict[str, Bottleneck]:
    """Inverse of `to_npz`, checking every array's shape and values; `label` names the file."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        out = {}
        for i in range(sum(1 for key in arrays if key.endswith(".name"))):
            name = bytes(arrays[f"t{i}.name"].astype(np.uint8)).decode()
            out[name] = _checked(arrays, f"t{i}")
        return out
    except (KeyError, ValueError, OSError, UnicodeDecodeError, TypeError, zipfile.BadZipFile) as error:
        raise CodecError(f"{label}: not a valid bottleneck file ({error})") from None


def _checked(arrays: Mapping[str, np.ndarray], key: str) -> Bottleneck:
    mean, basis = arrays[f"{key}.mean"].astype(np.float32), arrays[f"{key}.basis"].astype(np.float32)
    variance = arrays[f"{key}.variance"].astype(np.float32)
    if basis.ndim != 2 or mean.shape != (basis.shape[0],) or variance.shape != (basis.shape[1],):
        raise ValueError(f"{key}: mean {mean.shape}, basis {basis.shape}, variance {variance.shape}")
    variants = {}
    prefix = f"{key}.pca"
    for budget in sorted({int(k[len(prefix) :].split(".")[0]) for k in arrays if k.startswith(prefix)}):
        p = f"{prefix}{budget}"
        bits = arrays[f"{p}.bits"].astype(np.uint8)
        lo, hi = arrays[f"{p}.lo"].astype(np.float32), arrays[f"{p}.hi"].astype(np.float32)
        if not (0 < bits.size <= basis.shape[1] and lo.shape == hi.shape == bits.shape):
            raise ValueError(f"{p}: {bits.size} components of {basis.shape[1]}")
        if np.any((bits < 2) | (bits > 8)) or not np.all(np.isfinite(lo) & np.isfinite(hi) & (lo < hi)):
            raise ValueError(f"{p}: bits outside 2..8 or ranges not finite and increasing")
        variants[budget] = Variant(bits, lo, hi)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(basis))):
        raise ValueError(f"{key}: non-finite mean or basis")
    return Bottleneck(mean, basis, variance, variants)
