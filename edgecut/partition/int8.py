"""int8 edge heads: static post-training quantization of every segment, measured per cut.

Each segment is quantized on its own with `onnxruntime.quantization.quantize_static` (QDQ format,
per-channel symmetric int8 weights, uint8 activations with MinMax ranges), calibrated on the
bundle's calibration photos run through the preceding *float* segments — the inputs that segment
sees in the float model. Every segment is quantized because the edge may move its cut at run time:
the int8 head at cut k is int8 segments 1..k, the tail stays float on the server.

Per cut the manifest records (edgecut.variants): head latency float vs int8 profiled here at 1 and
2 threads, head bytes, and top-1 agreement of int8 head + float tail with the float chain (which
matches the unsplit model within the partition-time verification, ≤ 1e-4 of the output scale) on
held-out photos, bare and through each calibrated codec. A cut that loses more than the accuracy
budget is recorded as not offered. These latencies are this CPU's: Arm int8 kernels differ, so
re-profile on the device before trusting the int8/float ratio there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecut.bundle import SIGNATURE, Bundle, Manifest, load_bundle, sha256_file, write_manifest
from edgecut.codec import CodecSpec, calibration_for
from edgecut.errors import DependencyError, UsageError
from edgecut.partition.calibrate import (
    CALIBRATION_AUGMENT,
    HELDOUT_AUGMENT,
    augmented_inputs,
    photo_sets,
    round_trip,
    run_chain,
    run_frontiers,
    segment_chains,
)
from edgecut.runtime import OrtOptions, SegmentChain, make_session
from edgecut.variants import DEFAULT_BUDGET, FLOAT

log = logging.getLogger(__name__)

PRECISION = "int8"
METHOD = "onnxruntime quantize_static: QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax"
THREADS = (1, 2)  # head latency is profiled at these intra-op thread counts
PROFILE_RUNS = 15  # timed runs per (segment, precision, threads), after WARMUP_RUNS
WARMUP_RUNS = 3


def quantize_bundle(
    bundle: Bundle,
    source: str = "builtin",
    *,
    budget: float = DEFAULT_BUDGET,
    signing_key: Any = None,
    calib_count: int = 32,
    heldout_count: int = 64,
    seed: int = 0,
) -> Bundle:
    """Add `segments/int8/*.onnx` and the per-cut int8 report to the bundle; return it reloaded."""
    m = bundle.manifest
    if m.encryption:
        raise UsageError(f"bundle '{bundle.name}' is encrypted: quantize the plaintext bundle, then protect")
    if not 0 <= budget < 1:
        raise UsageError(f"accuracy budget must be in [0, 1), got {budget}")
    t0 = time.perf_counter()
    calib_photos, heldout_photos = heldout_split(source, m)
    chains = segment_chains(bundle)
    calib = augmented_inputs(calib_photos, m.preprocess, calib_count, CALIBRATION_AUGMENT, seed)
    frontiers = run_frontiers(m, chains, calib)
    files = {}
    for i, seg in enumerate(m.segments):
        rel = f"segments/{PRECISION}/{Path(seg.file).name}"
        quantize_segment(bundle.path(seg.file), bundle.path(rel), frontiers[i])
        files[seg.file] = rel
    int8_chains = [SegmentChain.from_files([bundle.path(r)], OrtOptions(threads=1)) for r in files.values()]
    heldout = augmented_inputs(heldout_photos, m.preprocess, heldout_count, HELDOUT_AUGMENT, seed + 1)
    agreement = measure_agreement(bundle, chains, int8_chains, heldout)
    latency = profile_heads(bundle, list(files.values()), frontiers)
    cuts = [
        _cut_row(bundle, list(files.values()), c.id, agreement[c.id], latency, budget)
        for c in m.cuts
        if c.depth > 0
    ]
    variant = {
        "precision": PRECISION,
        "method": METHOD,
        "files": files,
        "budget": budget,
        "threads": list(THREADS),
        "calibration_samples": calib_count,
        "heldout_samples": heldout_count,
        "heldout_photos": len(heldout_photos),
        "cuts": cuts,
    }
    listed = dict(m.files) | {rel: sha256_file(bundle.path(rel)) for rel in files.values()}
    others = tuple(v for v in m.variants if v.get("precision") != PRECISION)
    manifest = dataclasses.replace(m, files=listed, variants=(*others, variant))
    if signing_key is None:
        (bundle.root / SIGNATURE).unlink(missing_ok=True)
    write_manifest(bundle.root, manifest, signing_key)
    log.info("int8 heads for %s in %.1f s", bundle.name, time.perf_counter() - t0)
    return load_bundle(bundle.root)


def heldout_split(source: str, m: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration photos, held-out photos): the one place this module asks for them."""
    return photo_sets(source, m)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a stacked frontier, one sample at a time."""

    def __init__(self, frontier: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
        n = next(iter(frontier.values())).shape[0]
        self._items: Iterator[dict[str, np.ndarray]] = iter(
            [{k: frontier[k][i : i + 1] for k in names} for i in range(n)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._items


def quantize_segment(src: Path, dst: Path, frontier: Mapping[str, np.ndarray]) -> None:
    """QDQ-quantize one segment, calibrated on `frontier` (its float inputs, stacked on axis 0)."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ModuleNotFoundError as exc:
        raise DependencyError("int8 heads need onnxruntime's quantization tools and onnx") from exc
    names = [i.name for i in make_session(src).get_inputs()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        quantize_static(
            str(src),
            str(dst),
            _Reader(frontier, names),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            calibration_providers=["CPUExecutionProvider"],
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice through the root logger (`logging.warning`, which
    installs a stderr handler when the root has none) and its sessions' native warnings; keep
    both out of the CLI's output."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)


def measure_agreement(
    bundle: Bundle,
    chains: Sequence[SegmentChain],
    int8_chains: Sequence[SegmentChain],
    inputs: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Per cut: {"none": agreement of int8 head + float tail, codec: ... through that codec}."""
    m = bundle.manifest
    out_name = m.outputs[0].name
    reference = run_chain(chains, {m.inputs[0].name: inputs}, m.batchable)[out_name]
    frontier: dict[str, np.ndarray] = {m.inputs[0].name: inputs}
    result = {}
    for cut in m.cuts[1:]:
        frontier = frontier | run_chain(int8_chains[cut.depth - 1 : cut.depth], frontier, m.batchable)
        head_out = {t.name: frontier[t.name] for t in cut.frontier}
        logits = run_chain(chains[cut.depth :], head_out, m.batchable)[out_name]
        rows = {"none": _agree(logits, reference)}
        cal = calibration_for(bundle, cut.id)  # ranges and the pca bottlenecks
        for codec in _codecs(m, cut.id):
            _, decoded = round_trip(m, cut.id, head_out, CodecSpec.parse(codec), cal)
            rows[codec] = _agree(run_chain(chains[cut.depth :], decoded, m.batchable)[out_name], reference)
        result[cut.id] = rows
    return result


def _codecs(m: Manifest, cut_id: str) -> list[str]:
    if cut_id == m.cuts[-1].id:
        return []
    return [
        str(r["codec"])
        for r in m.fidelity
        if r["cut"] == cut_id and not CodecSpec.parse(str(r["codec"])).is_image
    ]


def _agree(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose top-1 class matches the reference's, rounded like fidelity rows."""
    n = reference.shape[0]
    same = np.argmax(logits.reshape(n, -1), 1) == np.argmax(reference.reshape(n, -1), 1)
    return round(float(same.mean()), 6)


def profile_heads(
    bundle: Bundle,
    int8_files: Sequence[str],
    frontiers: Sequence[Mapping[str, np.ndarray]],
    runs: int = PROFILE_RUNS,
) -> dict[tuple[str, int, int], float]:
    """Median ms per (precision, threads, segment index) on one calibration sample.

    Warm-up excluded; the (segment, precision, threads) runs are interleaved in a shuffled order so
    drift on a shared machine does not favour one precision. Worker threads do not spin between
    runs: 56 idle sessions spinning would steal the cores from the one being timed."""
    m = bundle.manifest
    files = {
        FLOAT: [bundle.path(s.file) for s in m.segments],
        PRECISION: [bundle.path(f) for f in int8_files],
    }
    keys = [(p, t, i) for p in files for t in THREADS for i in range(len(m.segments))]
    sessions = {k: _quiet_session(files[k[0]][k[2]], k[1]) for k in keys}
    feeds = {k: {n: v[:1] for n, v in frontiers[k[2]].items() if n in m.segments[k[2]].inputs} for k in keys}
    times: dict[tuple[str, int, int], list[float]] = {k: [] for k in keys}
    order = [k for k in keys for _ in range(WARMUP_RUNS + runs)]
    random.Random(0).shuffle(order)
    seen: dict[tuple[str, int, int], int] = dict.fromkeys(keys, 0)
    for k in order:
        t0 = time.perf_counter()
        sessions[k].run(None, feeds[k])
        ms = (time.perf_counter() - t0) * 1e3
        seen[k] += 1
        if seen[k] > WARMUP_RUNS:
            times[k].append(ms)
    return {k: statistics.median(v) for k, v in times.items()}


def _quiet_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cut_row(
    bundle: Bundle,
    int8_files: Sequence[str],
    cut_id: str,
    agreement: Mapping[str, float],
    latency: Mapping[tuple[str, int, int], float],
    budget: float,
) -> dict[str, Any]:
    m = bundle.manifest
    depth = m.cut(cut_id).depth
    edge_ms = {
        p: {str(t): round(sum(latency[(p, t, i)] for i in range(depth)), 3) for t in THREADS}
        for p in (FLOAT, PRECISION)
    }
    model_bytes = {
        FLOAT: sum(bundle.path(s.file).stat().st_size for s in m.segments[:depth]),
        PRECISION: sum(bundle.path(f).stat().st_size for f in int8_files[:depth]),
    }
    codec_agreement = {k: v for k, v in agreement.items() if k != "none"}
    return {
        "cut": cut_id,
        "edge_ms": edge_ms,
        "model_bytes": model_bytes,
        "agreement": agreement["none"],
        "codec_agreement": codec_agreement,
        "offered": 1.0 - agreement["none"] <= budget + 1e-9,
    }
