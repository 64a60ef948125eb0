"""Affine quantization: calibrated ranges and the float ↔ code math behind the codec's schemes.

Split out of `edgecut.codec` so the numbers (ranges, scales, rounding, nibble packing) can be read
and tested apart from the wire format; the codec decides what goes in a frame, this module only
computes it. Ranges are calibrated per cut at partition time (`Calibration`) and stored in the
bundle manifest; values outside them are clipped, which is the point: a few outliers must not
stretch the scale for everything else.

Element x becomes code q = round((x - offset) / scale), clipped to 0..L (`LEVELS`), and decodes as
offset + scale·q. Parameters are float32 arrays of shape (P,): one range per tensor (P = 1) or per
channel, axis 1 (P = C, rank ≥ 3 only). This module must not import `edgecut.codec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecut.bottleneck import Bottleneck
from edgecut.errors import CodecError, UsageError

LEVELS = {"int8": 255, "int6": 63, "int4": 15}  # highest code of each affine quantizer


@dataclass(frozen=True, eq=False)
class Calibration:
    """Quantization ranges per tensor, computed offline and stored in the bundle manifest.

    `ranges[name] = (lo, hi)`: float32 arrays of shape (), or (C,) for a range per channel (axis 1).
    `bottlenecks[name]`: the pca codec's fitted transform, stored in a file of its own (the
    manifest keeps the ranges only), see `edgecut.codec.calibration_for`.
    """

    ranges: Mapping[str, tuple[np.ndarray, np.ndarray]]
    bottlenecks: Mapping[str, Bottleneck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = {}
        for name, (lo, hi) in self.ranges.items():
            lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
            if lo.shape != hi.shape or lo.ndim > 1 or not np.all(np.isfinite(lo) & (lo <= hi)):
                raise CodecError(f"calibration of {name!r}: need finite lo <= hi of shape () or (C,)")
            checked[name] = (lo, hi)
        object.__setattr__(self, "ranges", checked)

    def to_json(self) -> dict[str, Any]:
        return {name: {"lo": lo.tolist(), "hi": hi.tolist()} for name, (lo, hi) in self.ranges.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        try:
            return cls({name: (entry["lo"], entry["hi"]) for name, entry in data.items()})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CodecError(f"calibration: malformed entry ({error!r})") from None

    @classmethod
    def from_samples(
        cls, samples: Sequence[Mapping[str, np.ndarray]], percentile: float = 99.99
    ) -> Calibration:
        """Ranges from sample activations: per channel (axis 1) for rank ≥ 2, else per tensor.

        The range is the [100 - percentile, percentile] percentile band, so rare outliers are
        clipped rather than coarsening every other value; percentile=100 gives plain min/max.
        """
        if not samples or not 50 < percentile <= 100:
            raise UsageError("calibration needs at least one sample and 50 < percentile <= 100")
        ranges = {}
        for name, first in samples[0].items():
            if np.asarray(first).dtype.kind != "f":
                continue
            try:
                x = np.concatenate([np.asarray(s[name], np.float32) for s in samples])
            except (KeyError, ValueError) as error:
                raise CodecError(f"calibration samples of {name!r} disagree: {error}") from None
            rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if x.ndim >= 2 else x.reshape(-1)
            lo, hi = np.percentile(rows, [100 - percentile, percentile], axis=-1)
            ranges[name] = (lo, hi)
        return cls(ranges)


def affine_params(
    x: np.ndarray,
    calibrated: tuple[np.ndarray, np.ndarray] | None,
    granularity: str,
    levels: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) as float32 (P,) arrays; empty when the tensor is not quantized."""
    if levels is None:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    channels = param_count(granularity, x.shape)
    if calibrated is None:
        lo, hi = _value_range(x, channels)
    else:
        lo, hi = calibrated
        if channels == 1 or lo.ndim == 0:
            lo, hi = np.full(channels, lo.min()), np.full(channels, hi.max())
        elif lo.shape != (channels,):
            raise CodecError(f"calibration has {lo.size} channel ranges, tensor has {channels}")
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    return (hi - lo) / np.float32(levels), lo


def _value_range(x: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray]:
    if x.size == 0:
        return np.zeros(channels, np.float32), np.zeros(channels, np.float32)
    rows = x.reshape(x.shape[0], channels, -1) if channels > 1 else x.reshape(1, 1, -1)
    lo, hi = rows.min(axis=(0, 2)), rows.max(axis=(0, 2))
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise CodecError("a tensor with inf/nan values needs a calibrated range or fp16/none")
    return lo, hi


def quantize(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, levels: int) -> np.ndarray:
    """uint8 codes; out-of-range values clip to 0 or `levels`, NaN (via fmax) to 0.

    Overflow to inf (a far outlier over a tiny scale) is expected here and clipped like any other.
    A subnormal scale counts as zero, so its inverse stays finite.
    """
    tiny = np.finfo(np.float32).tiny
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale >= tiny)
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.subtract(x, offset, dtype=np.float32)
        t *= inverse
    np.fmax(t, 0, out=t)
    np.fmin(t, levels, out=t)
    return np.rint(t, out=t).astype(np.uint8)


def pack4(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes a byte, even element in the low nibble; an odd count gets a zero nibble."""
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` codes of `pack4`'s output."""
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed & 15
    codes[1::2] = packed >> 4
    return codes[:count]


def param_count(granularity: str, shape: tuple[int, ...]) -> int:
    """P, the number of (scale, offset) pairs a tensor of `shape` carries."""
    # A range per channel pays 8 header bytes per channel; only worth it when each channel has
    # spatial extent (rank ≥ 3). A (N, C) vector would carry one range per value.
    return shape[1] if granularity == "channel" and len(shape) >= 3 else 1


def per_channel(params: np.ndarray, rank: int) -> np.ndarray:
    """Shape (P,) params so they broadcast over axis 1 (or everything, when P = 1)."""
    return params.reshape(1, -1, *[1] * (rank - 2)) if params.size > 1 else params.reshape(())
