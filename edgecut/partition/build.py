"""From a loaded model to a verified bundle directory, written atomically."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecut.bundle import Bundle, Cut, Manifest, Segment, load_bundle, sha256_file, write_manifest
from edgecut.errors import UsageError, VerificationError
from edgecut.images import photo_feeds, random_feeds
from edgecut.partition.batching import batched_if_safe
from edgecut.partition.cuts import DEFAULT_MAX_CUTS, select_positions
from edgecut.partition.graph import Position, analyse
from edgecut.partition.load import LoadedModel
from edgecut.partition.segments import build_segment, verify

log = logging.getLogger(__name__)
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB ceiling, with margin


def sample_inputs(
    loaded: LoadedModel,
    count: int = 4,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Real photos for image models, seeded random tensors otherwise."""
    graph_inputs = [i for i in loaded.model.graph.input]
    if loaded.preprocess.kind == "image" and len(graph_inputs) == 1:
        name = graph_inputs[0].name
        return photo_feeds(name, loaded.preprocess, count)
    from edgecut.partition.graph import analyse as _analyse

    specs = _analyse(loaded.model).inputs
    rng = np.random.default_rng(seed)
    return [random_feeds(specs, rng) for _ in range(count)]


def partition(
    loaded: LoadedModel,
    out: Path,
    *,
    max_cuts: int = DEFAULT_MAX_CUTS,
    mode: str = "useful",
    force: bool = False,
    signing_key: Any = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> Bundle:
    """Cut, write segments, verify composition, write the manifest; all or nothing on disk."""
    if out.exists() and not force:
        raise UsageError(f"output directory '{out}' exists (use --force to replace it)")
    t0 = time.perf_counter()
    analysis = analyse(loaded.model)
    kept = select_positions(analysis.positions, max_cuts, mode)
    segments = [
        build_segment(loaded.model, analysis, a, b, f"seg_{i + 1:03d}")
        for i, (a, b) in enumerate(itertools.pairwise(kept))
    ]
    samples = samples or sample_inputs(loaded)
    check = verify(loaded.model, segments, samples)
    verify_cuts(kept, segments, samples[0])
    segments, batchable = batched_if_safe(segments, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        verification = check.to_json() | {"seconds": round(time.perf_counter() - t0, 2)}
        manifest = _write(tmp, loaded, analysis.inputs, analysis.outputs, kept, segments, verification)
        manifest = dataclasses.replace(manifest, batchable=batchable)
        write_manifest(tmp, manifest, signing_key)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("partitioned %s into %d cuts in %.1f s", loaded.name, len(kept), time.perf_counter() - t0)
    return load_bundle(out)


def verify_cuts(
    kept: Sequence[Position], segments: Sequence[onnx.ModelProto], sample: Mapping[str, np.ndarray]
) -> None:
    """Each inner cut through the path a request takes: head → encode → decode → tail, on a real
    sample; the frame must carry one item on axis 0 (what the tail service reads as the batch) and
    the tail must give the unsplit output. A cut that fails is a partitioning bug: raised, naming
    the cut, instead of shipping a cut the server refuses on every request."""
    from edgecut.codec import CodecSpec, decode, encode, header_of
    from edgecut.runtime import SegmentChain, make_session

    sessions = [make_session(s.SerializeToString()) for s in segments]
    ids = _cut_ids(len(kept))
    frontier = dict(sample)
    reference = SegmentChain(sessions).run(frontier)
    for depth in range(1, len(kept) - 1):
        frontier = SegmentChain(sessions[depth - 1 : depth]).run(frontier)
        specs = kept[depth].frontier
        frame = encode({t.name: frontier[t.name] for t in specs}, specs, CodecSpec("none"))
        rows = {t.shape[0] for t in header_of(frame).tensors if t.shape}
        if rows != {1}:
            raise VerificationError(
                f"cut {ids[depth]}: a one-item request carries {sorted(rows)} rows on axis 0 "
                "(the tail service reads axis 0 as the batch)"
            )
        tail = SegmentChain(sessions[depth:]).run(decode(frame, specs))
        for name, want in reference.items():
            if not np.allclose(
                tail[name], want, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(want), initial=1))
            ):
                raise VerificationError(f"cut {ids[depth]}: encode → decode → tail differs from the model")


def _cut_ids(n: int) -> list[str]:
    return ["input", *[f"c{i:02d}" for i in range(1, n - 1)], "output"]


def _write(
    root: Path,
    loaded: LoadedModel,
    inputs: Any,
    outputs: Any,
    kept: list[Position],
    segments: list[onnx.ModelProto],
    verification: dict[str, Any],
) -> Manifest:
    (root / "segments").mkdir()
    ids = _cut_ids(len(kept))
    cuts = tuple(Cut(ids[d], d, p.index, p.frontier) for d, p in enumerate(kept))
    segs = []
    for i, seg in enumerate(segments):
        rel = f"segments/{seg.graph.name}.onnx"
        _save(seg, root / rel)
        segs.append(
            Segment(
                rel,
                ids[i],
                ids[i + 1],
                tuple(t.name for t in kept[i].frontier),
                tuple(t.name for t in kept[i + 1].frontier),
            )
        )
    labels_file = None
    if loaded.labels:
        labels_file = "labels.json"
        (root / labels_file).write_text(json.dumps(loaded.labels))
    files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return Manifest(
        model=loaded.name,
        version=loaded.version,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        preprocess=loaded.preprocess,
        cuts=cuts,
        segments=tuple(segs),
        files=files,
        labels_file=labels_file,
        verification=verification,
    )


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save(model, str(path))
