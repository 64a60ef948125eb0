"""Edge precision variants of a bundle's segments (int8 heads), as the manifest records them.

A variant is a second copy of every segment (e.g. `segments/int8/seg_003.onnx`, written by
`edgecut.partition.int8`) that the edge may run instead of the float one. Per cut the manifest
records what the variant head costs and what it changes: edge latency float vs variant (profiled at
partition time, per thread count), model bytes of the head, and top-1 agreement of variant head +
float tail with the unsplit float model on held-out photos — bare and through each calibrated codec.
A cut whose agreement loses more than the accuracy budget is recorded with `offered: false` and
never planned or run. The tail service always runs float segments.

Manifest section `variants`: a list of
`{precision, method, files: {float file: variant file}, budget, threads, heldout_samples,
heldout_photos, calibration_samples, cuts: [{cut, edge_ms: {precision: {threads: ms}},
model_bytes: {precision: bytes}, agreement, codec_agreement: {codec: agreement}, offered}]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgecut.bundle import Manifest
from edgecut.errors import BundleError, UsageError

FLOAT = "float"
PRECISIONS = (FLOAT, "int8")  # what `--precision` may name besides "auto"
DEFAULT_BUDGET = 0.01  # largest top-1 disagreement (0..1) a variant may add to be offered


@dataclass(frozen=True)
class VariantCut:
    """One cut of a variant: its head measured against the float head."""

    cut: str
    edge_ms: Mapping[str, Mapping[str, float]]  # precision -> threads (str) -> median head ms
    model_bytes: Mapping[str, int]  # precision -> bytes of the head's segment files
    agreement: float  # top-1 agreement, variant head + float tail vs unsplit float, 0..1
    codec_agreement: Mapping[str, float]  # codec -> agreement through that codec, 0..1
    offered: bool  # within the budget: the planner and `edge run` may use it


@dataclass(frozen=True)
class HeadVariant:
    precision: str
    files: Mapping[str, str]  # float segment file -> variant file, logical bundle paths
    budget: float
    cuts: tuple[VariantCut, ...]

    def at(self, cut: str) -> VariantCut | None:
        return next((c for c in self.cuts if c.cut == cut), None)

    def offered(self, cut: str) -> bool:
        row = self.at(cut)
        return row is not None and row.offered


def head_variants(m: Manifest) -> dict[str, HeadVariant]:
    """The manifest's variants by precision (empty for a bundle without any)."""
    try:
        return {str(v["precision"]): _variant(v) for v in m.variants}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest variants are malformed: {type(exc).__name__}: {exc}") from exc


def _variant(v: Mapping[str, Any]) -> HeadVariant:
    cuts = tuple(
        VariantCut(
            str(c["cut"]),
            {p: {str(t): float(ms) for t, ms in row.items()} for p, row in c["edge_ms"].items()},
            {p: int(b) for p, b in c["model_bytes"].items()},
            float(c["agreement"]),
            {str(k): float(a) for k, a in c.get("codec_agreement", {}).items()},
            bool(c["offered"]),
        )
        for c in v["cuts"]
    )
    return HeadVariant(str(v["precision"]), dict(v["files"]), float(v["budget"]), cuts)


def check_precision(m: Manifest, precision: str, cut: str | None = None) -> None:
    """UsageError unless `precision` can run (at `cut`, when given)."""
    if precision in ("auto", FLOAT):
        return
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}' (use {', '.join((*PRECISIONS, 'auto'))})")
    variant = head_variants(m).get(precision)
    if variant is None:
        raise UsageError(
            f"bundle '{m.model}' has no {precision} head",
            hint="quantize it with `edgecut bundle quantize BUNDLE` (or partition with --int8-head)",
        )
    if cut is not None and m.cut(cut).depth > 0 and not variant.offered(cut):
        offered = ", ".join(c.cut for c in variant.cuts if c.offered) or "none"
        raise UsageError(
            f"the {precision} head at cut '{cut}' is not offered: it loses more than the "
            f"{variant.budget:.1%} accuracy budget (offered cuts: {offered})"
        )
