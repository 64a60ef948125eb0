"""The profile format: measured per-segment and per-codec timings for one device and runtime.

A profile is what the planner knows about a machine. It is recorded once on the device
(`edgecut profile`), committed or shipped inside a bundle (`profiles/*.json`), and reported by the
tail service for its own side. It names the bundle it was measured on (`manifest_sha256`), because
timings of another model version are meaningless. Figures that were not measured on the named
device are marked `mode="scaled"` with the factor and its source, so no table passes a guess off
as a measurement. This module is the format's only reader and writer; it imports nothing heavy,
because the edge reads profiles too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgecut.errors import ProfileError

FORMAT_VERSION = 1
MODES = ("measured", "scaled")


@dataclass(frozen=True)
class SegmentTiming:
    """Latency of one segment, measured after warm-up."""

    segment: str  # segment name as in the manifest, e.g. "seg_003"
    latency_ms: float  # median over `runs`
    p90_ms: float  # 90th percentile over `runs`
    runs: int  # timed runs, warm-up excluded
    peak_mem_bytes: int | None = None  # peak resident memory while running it, if measured

    @classmethod
    def measured(cls, segment: str, samples_ms: Iterable[float]) -> SegmentTiming:
        """Median and p90 of timed runs (warm-up already excluded), as every profiler reports them."""
        samples = list(samples_ms)
        if not samples:
            return cls(segment, 0.0, 0.0, 0)
        return cls(segment, percentile(samples, 50), percentile(samples, 90), len(samples))


@dataclass(frozen=True)
class CodecTiming:
    """Cost of one codec at one cut, per request (all frontier tensors together)."""

    cut: str  # cut id, e.g. "c03"
    codec: str  # codec name, e.g. "int8+zstd"
    encode_ms: float  # quantize + compress + seal, on this device (the edge's figure counts)
    decode_ms: float  # open + decompress + dequantize, on this device (the tail's figure counts)
    bytes_: int  # encoded frame size in bytes


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Timings of one bundle on one device, runtime and thread count."""

    format_version: int = FORMAT_VERSION
    model: str  # model id from the manifest
    model_version: str  # model version from the manifest
    manifest_sha256: str  # sha256 of the manifest the timings were measured on
    device: str  # e.g. "raspberry-pi-4", "this-machine-1t", "cuda:0 NVIDIA H100"
    runtime: str  # e.g. "ort", "litert", "ort-cuda", "torch-cuda"
    threads: int  # intra-op threads the runtime used
    mode: str  # "measured" or "scaled" (derived from another profile)
    scale: float = 1.0  # factor applied to measured timings when mode is "scaled"
    source: str = ""  # where the figures come from; for scaled profiles the reference and factor
    segments: tuple[SegmentTiming, ...]
    codecs: tuple[CodecTiming, ...] = ()
    created_at: str  # ISO 8601 time of measurement (or of derivation, when scaled)

    def segment_ms(self, name: str) -> float:
        """Median latency of segment `name`; a missing segment is an error, never a zero."""
        for timing in self.segments:
            if timing.segment == name:
                return timing.latency_ms
        raise ProfileError(
            f"profile for {self.model} on {self.device!r} has no timing for segment {name!r}",
            hint="re-run `edgecut profile` on this bundle",
        )

    def scaled(self, factor: float, device: str, source: str) -> Profile:
        """This profile with every time multiplied by `factor`, labelled as derived.

        Codec times scale too: encoding and decoding run on the same CPU as the segments.
        Scaling a scaled profile compounds the factor, so `scale` always relates to a measurement.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ProfileError(f"scale factor must be a positive number, got {factor}")
        segments = tuple(
            replace(t, latency_ms=t.latency_ms * factor, p90_ms=t.p90_ms * factor) for t in self.segments
        )
        codecs = tuple(
            replace(t, encode_ms=t.encode_ms * factor, decode_ms=t.decode_ms * factor) for t in self.codecs
        )
        return replace(
            self,
            device=device,
            mode="scaled",
            scale=self.scale * factor,
            source=source,
            segments=segments,
            codecs=codecs,
            created_at=_now(),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (field names are the format)."""
        return {
            "format_version": self.format_version,
            "model": self.model,
            "model_version": self.model_version,
            "manifest_sha256": self.manifest_sha256,
            "device": self.device,
            "runtime": self.runtime,
            "threads": self.threads,
            "mode": self.mode,
            "scale": self.scale,
            "source": self.source,
            "created_at": self.created_at,
            "segments": [vars(t) for t in self.segments],
            "codecs": [vars(t) for t in self.codecs],
        }

    @classmethod
    def from_json(cls, d: object) -> Profile:
        """Validate and parse a profile object; raises ProfileError naming the first problem."""
        obj = _as_mapping(d, "profile")
        version = _field(obj, "format_version", int, "profile")
        if version != FORMAT_VERSION:
            raise ProfileError(
                f"unsupported profile format_version {version} (this edgecut reads {FORMAT_VERSION})",
                hint="re-run `edgecut profile` or upgrade edgecut",
            )
        mode = _field(obj, "mode", str, "profile")
        if mode not in MODES:
            raise ProfileError(f"profile mode must be one of {MODES}, got {mode!r}")
        profile = cls(
            format_version=version,
            mode=mode,
            **{k: _field(obj, k, str, "profile") for k in _STR_FIELDS},
            threads=_count(obj.get("threads"), "profile.threads"),
            scale=_number(obj.get("scale", 1.0), "profile.scale"),
            source=_field(obj, "source", str, "profile") if "source" in obj else "",
            segments=tuple(_parse_list(obj, "segments", _segment_timing)),
            codecs=tuple(_parse_list(obj, "codecs", _codec_timing, required=False)),
        )
        _check_unique(profile)
        return profile


_STR_FIELDS = ("model", "model_version", "manifest_sha256", "device", "runtime", "created_at")


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write `profile` as JSON, atomically, so a crash never leaves a half-written profile."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(profile.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        raise ProfileError(f"cannot write profile {target}: {exc.strerror or exc}") from exc


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file; every failure is one ProfileError line naming the file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {source}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {source}: cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"profile {source}: not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    try:
        return Profile.from_json(data)
    except ProfileError as exc:
        raise ProfileError(f"profile {source}: {exc.message}", hint=exc.hint) from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def percentile(values: Iterable[float], q: float) -> float:
    """The one percentile definition in edgecut (p50, p90, p99 of timings): numpy's linear
    interpolation between closest ranks, so the edge profiler and the tail service report
    comparable figures. `q` is in 0..100."""
    return float(np.percentile(np.fromiter(values, float), q))


def _segment_timing(d: Mapping[str, Any], where: str) -> SegmentTiming:
    mem = d.get("peak_mem_bytes")
    return SegmentTiming(
        segment=_field(d, "segment", str, where),
        latency_ms=_number(d.get("latency_ms"), f"{where}.latency_ms"),
        p90_ms=_number(d.get("p90_ms"), f"{where}.p90_ms"),
        runs=_count(d.get("runs"), f"{where}.runs"),
        peak_mem_bytes=None if mem is None else _count(mem, f"{where}.peak_mem_bytes"),
    )


def _codec_timing(d: Mapping[str, Any], where: str) -> CodecTiming:
    return CodecTiming(
        cut=_field(d, "cut", str, where),
        codec=_field(d, "codec", str, where),
        encode_ms=_number(d.get("encode_ms"), f"{where}.encode_ms"),
        decode_ms=_number(d.get("decode_ms"), f"{where}.decode_ms"),
        bytes_=_count(d.get("bytes_"), f"{where}.bytes_"),
    )


def _check_unique(profile: Profile) -> None:
    names = [t.segment for t in profile.segments]
    keys = [(t.cut, t.codec) for t in profile.codecs]
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        raise ProfileError("profile lists the same segment or (cut, codec) twice")


def _parse_list(obj: Mapping[str, Any], key: str, parse: Any, required: bool = True) -> list[Any]:
    items = obj.get(key, None if required else [])
    if not isinstance(items, list):
        raise ProfileError(f"profile.{key} must be a list")
    return [parse(_as_mapping(x, f"{key}[{i}]"), f"{key}[{i}]") for i, x in enumerate(items)]


def _as_mapping(d: object, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ProfileError(f"{where} must be a JSON object")
    return d


def _field(d: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = d.get(key)
    # bool is an int subclass; a `true` thread count is a garbled file, not 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProfileError(f"{where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ProfileError(f"{where} must be a non-negative number, got {value!r}")
    return float(value)


def _count(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProfileError(f"{where} must be a non-negative integer, got {value!r}")
    return value
