"""What each (cut, codec) option costs, assembled from a bundle, profiles and fidelity.

The planner is pure math over `CutCost`s; this module is where measurements meet it. Byte counts
come from the bundle's fidelity report (measured on real held-out photos at partition time) or,
without one, from the frontier size and the codec's bits per value — marked as estimated. The
accuracy of an option is its fidelity row's top-1 agreement (read only through `agreement`); an
option without a row has an unknown accuracy (None), which an accuracy budget excludes: unknown is
not exact. Lossless options (edge-only, codec "none") need no row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgecut.answers import AnswerSpec, answer_bytes, default_for
from edgecut.bundle import Bundle, Manifest
from edgecut.planner import CutCost
from edgecut.profile import CodecTiming, Profile
from edgecut.sealing import request_overhead_bytes
from edgecut.variants import FLOAT, VariantCut, head_variants

FRAME_FIELDS_BYTES = 64  # request id, model, version, cut, deadline: the Frame's own fields
DEFAULT_SUITE = "x25519"


def seal_overhead_bytes(suite: str = DEFAULT_SUITE) -> int:
    """Bytes a request frame carries beyond its codec payload under the service key's suite."""
    return request_overhead_bytes(suite) + FRAME_FIELDS_BYTES


SEAL_OVERHEAD_BYTES = seal_overhead_bytes()  # with the default suite (profiles seal with it)
BITS = {"none": 32, "fp16": 16, "int8": 8, "int6": 8, "int4": 4, "pca": 2, "jpeg": 1, "webp": 1, "png": 8}
DEFAULT_CODECS = ("int8-channel-z3",)
INPUT_BASELINE = "jpeg90"  # at an image model's input: what a user would upload without edgecut


@dataclass(frozen=True)
class CloudTimes:
    """The tail's per-segment latency (from ServerInfo or a cloud profile) and its decode cost."""

    segment_ms: Mapping[str, float]  # segment name ("seg_003") -> median ms on the server
    decode_ms: float = 0.0  # open + decode per request, ms (any cut)
    cut_decode_ms: Mapping[str, float] = field(default_factory=dict)  # per cut, as the server served them


def cloud_times_from(profile: Profile) -> CloudTimes:
    return CloudTimes(
        {t.segment: t.latency_ms for t in profile.segments},
        max((c.decode_ms for c in profile.codecs), default=0.0),
    )


def cut_costs(
    bundle: Bundle,
    edge: Profile,
    cloud: CloudTimes,
    codecs: Sequence[str] = DEFAULT_CODECS,
    precisions: Sequence[str] = (FLOAT,),
    suite: str = DEFAULT_SUITE,
    answer: AnswerSpec | None = None,
) -> list[CutCost]:
    """One CutCost per allowed (cut, precision, codec); "output" (edge-only) with codec "none".

    A precision variant (int8 head) is listed only at cuts where the bundle offers it. `suite` is
    the service key's HPKE suite: the ML-KEM hybrid adds about 1 KB to every request. Downlink
    bytes are the sealed answer in the format the edge asks for (`answer`; default: top-5 for
    classifiers, as the agent asks), not the model's full output."""
    down = answer_bytes(bundle.manifest.outputs, answer or default_for(bundle.manifest.outputs))
    costs = []
    for precision in precisions:
        costs += _costs_at(bundle, edge, cloud, codecs, precision, seal_overhead_bytes(suite), down)
    return costs


def _costs_at(
    bundle: Bundle,
    edge: Profile,
    cloud: CloudTimes,
    codecs: Sequence[str],
    precision: str,
    overhead: int,
    down: int,
) -> list[CutCost]:
    m = bundle.manifest
    variant = head_variants(m).get(precision) if precision != FLOAT else None
    costs = []
    for cut in m.cuts:
        vrow = variant.at(cut.id) if variant is not None else None
        if variant is not None and (cut.depth == 0 or vrow is None or not vrow.offered):
            continue  # no head to quantize, or the variant loses more than the accuracy budget
        edge_ms = sum(edge.segment_ms(s.name) for s in m.head(cut.id))
        weight_bytes = sum(bundle.size_bytes(s.file) for s in m.head(cut.id))
        head_drop = 0.0
        if vrow is not None:
            edge_ms, weight_bytes, head_drop = _variant_head(m, edge, vrow, precision, edge_ms)
        if cut.id == m.cuts[-1].id:
            costs.append(
                CutCost(
                    cut.id,
                    cut.depth,
                    "none",
                    edge_ms,
                    0.0,
                    0.0,
                    0,
                    0,
                    0.0,
                    weight_bytes,
                    head_drop,
                    precision,
                )
            )
            continue
        cloud_ms = sum(_cloud_ms(cloud, edge, s.name) for s in m.tail(cut.id))
        for codec in _codecs_for(m, cut.id, codecs):
            timing = _codec_timing(edge, cut.id, codec)
            bytes_up, drop = _bytes_and_drop(m, cut.id, codec, timing, overhead)
            if vrow is not None:
                drop = _variant_drop(vrow, codec, None if drop is None else drop + head_drop)
            encode_ms = timing.encode_ms if timing else 0.0
            decode_ms = _decode_ms(cloud, cut.id, timing)
            costs.append(
                CutCost(
                    cut.id,
                    cut.depth,
                    codec,
                    edge_ms,
                    encode_ms,
                    decode_ms,
                    bytes_up,
                    down,
                    cloud_ms,
                    weight_bytes,
                    drop,
                    precision,
                )
            )
    return costs


def _variant_head(
    m: Manifest, edge: Profile, row: VariantCut, precision: str, float_ms: float
) -> tuple[float, int, float]:
    """(edge ms, head bytes, accuracy drop) of a variant head. Its time comes from the edge
    profile where that has the variant's segments ("int8/seg_003"); otherwise it is the float
    time scaled by the float/variant ratio profiled at partition time (another CPU: an estimate,
    Arm int8 kernels differ — profile the device)."""
    names = [f"{precision}/{s.name}" for s in m.head(row.cut)]
    profiled = {t.segment for t in edge.segments}
    if all(n in profiled for n in names):
        ms = sum(edge.segment_ms(n) for n in names)
    else:
        f, v = row.edge_ms.get(FLOAT, {}).get("1"), row.edge_ms.get(precision, {}).get("1")
        ms = float_ms * (v / f) if f and v else float_ms
    return ms, row.model_bytes.get(precision, 0), max(0.0, 1.0 - row.agreement)


def _variant_drop(row: VariantCut, codec: str, bound: float | None) -> float | None:
    """Measured drop of variant head + codec + float tail, else the sum of the two drops."""
    measured = next((a for c, a in row.codec_agreement.items() if _same_codec(c, codec)), None)
    return max(0.0, 1.0 - measured) if measured is not None else bound


def _decode_ms(cloud: CloudTimes, cut_id: str, timing: CodecTiming | None) -> float:
    """The server's open + decode at this cut as it served it; else its overall figure (a cloud
    profile); else this device's own figure for the codec (the same work, on a slower CPU)."""
    served = cloud.cut_decode_ms.get(cut_id, 0.0) or cloud.decode_ms
    return served if served > 0 or timing is None else timing.decode_ms


def _cloud_ms(cloud: CloudTimes, edge: Profile, segment: str) -> float:
    """The server's time for a segment; one it has not timed is assumed as slow as the edge
    (unknown is not free: zero would make offloading look better than it is)."""
    ms = cloud.segment_ms.get(segment)
    return ms if ms is not None else edge.segment_ms(segment)


def _codecs_for(m: Manifest, cut_id: str, codecs: Sequence[str]) -> list[str]:
    """The given tensor codecs wherever they apply (pca only where the bundle has a bottleneck for
    the cut); at an image model's input also the image uploads given, or else every image upload
    the fidelity report measured (JPEG at each quality, WebP, PNG: the honest cloud-only
    baselines) and JPEG q90."""
    from edgecut.codec import CodecSpec

    specs = [(c, CodecSpec.parse(c)) for c in codecs]
    tensors = [c for c, s in specs if not s.is_image and (s.scheme != "pca" or cut_id in m.bottlenecks)]
    if cut_id != "input" or m.preprocess.kind != "image":
        return tensors
    images = [c for c, s in specs if s.is_image]
    if not images:
        measured = [str(r["codec"]) for r in m.fidelity if r["cut"] == "input"]
        images = [INPUT_BASELINE, *(c for c in measured if CodecSpec.parse(c).is_image)]
    return list(dict.fromkeys([*tensors, *images]))


def agreement(row: Mapping[str, object]) -> float:
    """A fidelity row's top-1 agreement with the unsplit model, 0..1: the one place that reads it.

    The headline is the agreement on the views where the unsplit model is confident (top-1
    probability >= 0.5): elsewhere any perturbation flips near-ties. Rows written before that
    field existed (or with no confident view) fall back to the agreement on all views."""
    confident = row.get("agreement_confident")
    return float(str(confident if confident is not None else row["agreement"]))


def option_agreement(m: Manifest, cut_id: str, codec: str) -> float | None:
    """Top-1 agreement of (cut, codec) by the bundle's fidelity table; 1.0 for lossless options,
    None when the table has no row for it (unknown)."""
    if cut_id == m.cuts[-1].id or _lossless(codec):
        return 1.0
    row = _fidelity(m, cut_id, codec)
    return None if row is None else agreement(row)


def _lossless(codec: str) -> bool:
    from edgecut.codec import CodecSpec

    return CodecSpec.parse(codec).scheme == "none"


def _fidelity(m: Manifest, cut_id: str, codec: str) -> Mapping[str, object] | None:
    for row in m.fidelity:
        if row["cut"] == cut_id and _same_codec(str(row["codec"]), codec):
            return row
    return None


def _same_codec(a: str, b: str) -> bool:
    from edgecut.codec import CodecSpec

    return str(CodecSpec.parse(a)) == str(CodecSpec.parse(b))


def _bytes_and_drop(
    m: Manifest, cut_id: str, codec: str, timing: CodecTiming | None, overhead: int
) -> tuple[int, float | None]:
    """Sealed request bytes and accuracy drop (None = unknown): bytes from the fidelity report
    (real photos) first, then the profile's measurement (one input, already sealed), then an
    estimate."""
    agree = option_agreement(m, cut_id, codec)
    drop = None if agree is None else max(0.0, 1.0 - agree)
    row = _fidelity(m, cut_id, codec)
    if row is not None:
        return int(float(str(row["bytes"]))) + overhead, drop
    if timing is not None:  # measured sealed with the default suite
        return timing.bytes_ - SEAL_OVERHEAD_BYTES + overhead, drop
    from edgecut.codec import CodecSpec

    scheme = CodecSpec.parse(codec).scheme
    elems = sum(t.numel for t in m.cut(cut_id).frontier)
    return elems * BITS.get(scheme, 32) // 8 + overhead, drop


def _codec_timing(edge: Profile, cut_id: str, codec: str) -> CodecTiming | None:
    return next((c for c in edge.codecs if c.cut == cut_id and _same_codec(c.codec, codec)), None)
