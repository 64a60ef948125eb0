"""What the service serves, as each protocol names it.

Native clients see one `ModelInfo` per bundle with its cuts (ServerInfo). The Open Inference
Protocol has no cuts, so each (bundle, cut) is a model of its own:

- `<model>` is the whole network, cloud-only: its inputs are the bundle's inputs (cut `input`);
- `<model>@<cut>` is the tail behind that cut (e.g. `efficientnet-lite0@c11`): its inputs are the
  cut's frontier tensors, what the edge's head produced;
- the protocol's model version is the bundle version; empty means the newest one served.

`@` cannot appear in a model name (bundle names are file-system and URL safe), so the split is
unambiguous. Outputs are always the bundle's outputs.
"""

from __future__ import annotations

from typing import Any

from edgecut.bundle import Cut, Manifest, Segment
from edgecut.cloud.registry import Entry
from edgecut.errors import NotFoundError
from edgecut.v1 import edgecut_pb2 as pb

CUT_SEPARATOR = "@"
WHOLE_MODEL_CUT = "input"  # the cut whose tail is the whole network


def split_name(name: str) -> tuple[str, str]:
    """An Open Inference Protocol model name as (bundle model, cut id)."""
    model, sep, cut = name.partition(CUT_SEPARATOR)
    if sep and not cut:
        raise NotFoundError(f"model name {name!r}: no cut after {CUT_SEPARATOR!r} (e.g. {model}@c11)")
    return model, cut or WHOLE_MODEL_CUT


def oip_name(manifest: Manifest, cut: Cut) -> str:
    return manifest.model if cut.id == WHOLE_MODEL_CUT else f"{manifest.model}{CUT_SEPARATOR}{cut.id}"


def oip_names(entries: list[Entry]) -> list[str]:
    """Every Open Inference Protocol model name the entries serve (the `output` cut has no tail)."""
    names = {
        oip_name(e.bundle.manifest, cut)
        for e in entries
        for cut in e.bundle.manifest.cuts
        if e.bundle.manifest.tail(cut.id)
    }
    return sorted(names)


def model_info(entry: Entry) -> pb.ModelInfo:
    """ServerInfo's view of one bundle: cuts with their measured tail and decode times."""
    manifest, timings = entry.bundle.manifest, entry.extra.get("timings", {})
    decode = entry.extra.get("decode_ms", {})
    cuts = [
        pb.CutInfo(
            id=cut.id,
            depth=cut.depth,
            tail=[_profile(s, timings) for s in manifest.tail(cut.id)],
            decode_ms=decode.get(cut.id, 0.0),
        )
        for cut in manifest.cuts
    ]
    return pb.ModelInfo(
        name=manifest.model, version=manifest.version, cuts=cuts, manifest_sha256=entry.bundle.build_sha256
    )


def _profile(segment: Segment, timings: dict[str, Any]) -> pb.SegmentProfile:
    name = segment.name
    timing = timings.get(name)
    return pb.SegmentProfile(segment=name, latency_ms=timing.latency_ms if timing else 0.0)
