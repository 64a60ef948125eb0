"""What each (cut, codec) option costs, assembled from a bundle, profiles and fidelity.

The planner is pure math over `CutCost`s; this module is where measurements meet it. Byte counts
come from the bundle's fidelity report (measured on real held-out photos at partition time) or,
without one, from the frontier size and the codec's bits per value — marked as estimated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgecut.bundle import Bundle, Manifest
from edgecut.planner import CutCost
from edgecut.profile import CodecTiming, Profile

SEAL_OVERHEAD_BYTES = 89 + 64  # HPKE enc + tag + plaintext header, plus Frame fields
BITS = {"none": 32, "fp16": 16, "int8": 8, "int6": 8, "int4": 4, "pca": 2, "jpeg": 1, "webp": 1, "png": 8}
DEFAULT_CODECS = ("int8-channel-z3",)


@dataclass(frozen=True)
class CloudTimes:
    """The tail's per-segment latency (from ServerInfo or a cloud profile) and its decode cost."""

    segment_ms: Mapping[str, float]  # segment name ("seg_003") -> median ms on the server
    decode_ms: float = 0.0  # open + decode per request, ms


def segment_name(file: str) -> str:
    return file.rsplit("/", 1)[-1].removesuffix(".onnx")


def cloud_times_from(profile: Profile) -> CloudTimes:
    return CloudTimes(
        {t.segment: t.latency_ms for t in profile.segments},
        max((c.decode_ms for c in profile.codecs), default=0.0),
    )


def cut_costs(
    bundle: Bundle, edge: Profile, cloud: CloudTimes, codecs: Sequence[str] = DEFAULT_CODECS
) -> list[CutCost]:
    """One CutCost per allowed (cut, codec); "output" (edge-only) once, with codec "none"."""
    m = bundle.manifest
    down = sum(t.nbytes for t in m.outputs) + SEAL_OVERHEAD_BYTES
    costs = []
    for cut in m.cuts:
        edge_ms = sum(edge.segment_ms(segment_name(s.file)) for s in m.head(cut.id))
        mem = sum(bundle.path(s.file).stat().st_size for s in m.head(cut.id))
        if cut.id == m.cuts[-1].id:
            costs.append(CutCost(cut.id, cut.depth, "none", edge_ms, 0.0, 0.0, 0, 0, 0.0, mem))
            continue
        cloud_ms = sum(_cloud_ms(cloud, edge, segment_name(s.file)) for s in m.tail(cut.id))
        for codec in _codecs_for(m, cut.id, codecs):
            timing = _codec_timing(edge, cut.id, codec)
            bytes_up, drop = _bytes_and_drop(m, cut.id, codec, timing)
            encode_ms = timing.encode_ms if timing else 0.0
            costs.append(
                CutCost(
                    cut.id,
                    cut.depth,
                    codec,
                    edge_ms,
                    encode_ms,
                    cloud.decode_ms,
                    bytes_up,
                    down,
                    cloud_ms,
                    mem,
                    drop,
                )
            )
    return costs


def _cloud_ms(cloud: CloudTimes, edge: Profile, segment: str) -> float:
    """The server's time for a segment; one it has not timed is assumed as slow as the edge
    (unknown is not free: zero would make offloading look better than it is)."""
    ms = cloud.segment_ms.get(segment)
    return ms if ms is not None else edge.segment_ms(segment)


def _codecs_for(m: Manifest, cut_id: str, codecs: Sequence[str]) -> list[str]:
    """At the input of an image model, every image upload the fidelity report measured (JPEG at
    each quality, WebP, PNG; the honest cloud-only baselines), else JPEG q90; elsewhere the given
    codecs, pca only where the bundle has a bottleneck for the cut."""
    from edgecut.codec import CodecSpec

    if cut_id == "input" and m.preprocess.kind == "image":
        measured = [str(r["codec"]) for r in m.fidelity if r["cut"] == "input"]
        return list(dict.fromkeys(["jpeg90", *(c for c in measured if CodecSpec.parse(c).is_image)]))
    specs = [(c, CodecSpec.parse(c)) for c in codecs]
    return [c for c, s in specs if not s.is_image and (s.scheme != "pca" or cut_id in m.bottlenecks)]


def _fidelity(m: Manifest, cut_id: str, codec: str) -> Mapping[str, object] | None:
    for row in m.fidelity:
        if row["cut"] == cut_id and _same_codec(str(row["codec"]), codec):
            return row
    return None


def _same_codec(a: str, b: str) -> bool:
    from edgecut.codec import CodecSpec

    return str(CodecSpec.parse(a)) == str(CodecSpec.parse(b))


def _bytes_and_drop(m: Manifest, cut_id: str, codec: str, timing: CodecTiming | None) -> tuple[int, float]:
    """Sealed request bytes and accuracy drop: fidelity report (real photos) first, then the
    profile's measurement (one synthetic input, already sealed), then an estimate."""
    row = _fidelity(m, cut_id, codec)
    drop = max(0.0, 1.0 - _agreement(row)) if row is not None else 0.0
    if row is not None:
        return int(float(str(row["bytes"]))) + SEAL_OVERHEAD_BYTES, drop
    if timing is not None:
        return timing.bytes_, drop
    from edgecut.codec import CodecSpec

    scheme = CodecSpec.parse(codec).scheme
    elems = sum(t.numel for t in m.cut(cut_id).frontier)
    return elems * BITS.get(scheme, 32) // 8 + SEAL_OVERHEAD_BYTES, drop


def _agreement(row: Mapping[str, object]) -> float:
    """The headline agreement (on the views where the unsplit model is confident), else the
    agreement on all views (reports written before it existed, or with no confident view)."""
    confident = row.get("agreement_confident")
    return float(str(confident if confident is not None else row["agreement"]))


def _codec_timing(edge: Profile, cut_id: str, codec: str) -> CodecTiming | None:
    return next((c for c in edge.codecs if c.cut == cut_id and _same_codec(c.codec, codec)), None)
