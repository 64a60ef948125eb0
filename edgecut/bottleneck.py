"""A retraining-free bottleneck for one frontier tensor: channel PCA, then few-bit codes per component.

Neighbouring channels of a CNN activation are strongly correlated, so most of a (N, C, H, W)
tensor's energy lives in a few directions of channel space (Cohen, Choi & Bajić 2021). Fitted on
calibration activations: the channel mean, an orthonormal basis sorted by variance, and for each
bit budget B a `Variant`: k components kept, b_i bits for component i (reverse water-filling:
half a bit less per halving of variance, at most B, at least 2) and a clipping range [lo_i, hi_i]
from percentiles of that component's calibration coefficients. The edge projects (C → k), the tail
reconstructs (k → C); both read the same `Bottleneck`, which the bundle stores in a
`codecs/<cut>.npz` file listed and hashed in its manifest, and the frame names it by `basis_id`.

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
# Clipping band per component, [100 - p, p] percentiles of its calibration coefficients, by bit
# budget: few levels are better spent on the bulk than stretched over the tails (measured at
# EfficientNet-Lite0 c05: pca2 k=48 agrees on 94 % of confident held-out views at p = 98, 82 % at 99.5).
PERCENTILE = {2: 98.0, 3: 98.0}
DEFAULT_PERCENTILE = 99.9
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
        """u32 naming these exact numbers, so a frame encoded against another fit is refused."""
        h = hashlib.sha256(self.mean.tobytes() + self.basis.tobytes())
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


def allocate(variance: np.ndarray, budget: int, k: int) -> np.ndarray:
    """Bits for the first k components: `budget` for the strongest, half a bit less per halving of
    variance (equal distortion per component, as reverse water-filling prescribes), at least 2
    (one bit would be a two-level quantizer with no zero: worse than dropping the component)."""
    top = max(float(variance[0]), 1e-30)
    ratio = np.maximum(variance[:k].astype(np.float64), 1e-30) / top
    return np.clip(np.rint(budget + 0.5 * np.log2(ratio)), 2, budget).astype(np.uint8)


def fit_variant(coefficients: np.ndarray, bits: np.ndarray, budget: int) -> Variant:
    """Clipping ranges of the first `bits.size` components from calibration coefficients (M, ≥k)."""
    k, percentile = bits.size, PERCENTILE.get(budget, DEFAULT_PERCENTILE)
    lo, hi = np.percentile(coefficients[:, :k], [100 - percentile, percentile], axis=0)
    hi = np.maximum(hi, lo + 1e-6)
    return Variant(bits.astype(np.uint8), lo.astype(np.float32), hi.astype(np.float32))


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
    """uint8 codes (k, M): one plane per component, so each plane's codes sit together for zstd."""
    step = (v.hi - v.lo) / v.levels
    t = (coefficients - v.lo) / step
    np.clip(t, 0, v.levels, out=t)
    return np.ascontiguousarray(np.rint(t).astype(np.uint8).T)


def dequantize_planes(codes: np.ndarray, v: Variant) -> np.ndarray:
    """(M, k) float32 coefficients from `quantize_planes`' (k, M) codes."""
    if np.any(codes.max(axis=1, initial=0) > v.levels):
        raise CodecError("bottleneck code above its component's level count")
    step = (v.hi - v.lo) / v.levels
    return codes.T.astype(np.float32) * step + v.lo


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
