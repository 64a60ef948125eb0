"""Codec calibration and fidelity: per-cut quantization ranges, and what each codec costs in accuracy.

Ranges come from the head's activations on augmented photos (`Calibration.from_samples`: a
percentile band per channel, so a few outliers are clipped instead of coarsening every code).
Fidelity is then measured on a *held-out* set: other augmentations (other seed and parameters) and,
when a directory gives at least `SPLIT_MIN_IMAGES` images, other images too. Each (cut, codec) row
states the mean frame bytes per batch-1 request, the top-1 agreement with the unsplit model and the
largest logit error — the accuracy budget the planner reads.

The built-in source is scikit-image's seven photos; they are not split (held-out would be one or two
photos), so there the held-out set differs by augmentation only. Models without image preprocessing
are refused: ranges fitted to random tensors would describe nothing the model ever sees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgecut.bundle import SIGNATURE, Bundle, Manifest, Preprocess, load_bundle, write_manifest
from edgecut.codec import Calibration, CodecSpec, decode, encode
from edgecut.errors import UsageError
from edgecut.images import list_images, load_image, sample_photos
from edgecut.runtime import OrtOptions, SegmentChain

log = logging.getLogger(__name__)

DEFAULT_CODECS = ("int8-channel", "int8-tensor", "int6-channel", "int4-channel", "fp16")
INPUT_CODECS = ("jpeg90",)  # also measured at cut "input": the cloud-only baseline
SPLIT_MIN_IMAGES = 4  # a directory with at least this many images is split: every 4th is held out
PERCENTILE = 99.99  # of each channel's values; the band outside is clipped by the quantizer
MIN_VALUES_PER_CHANNEL = 1024  # fewer calibration values per channel: one range for the tensor

Progress = Callable[[int, int], None]  # (cuts done, cuts in all), for a caller's progress bar


@dataclass(frozen=True)
class Augment:
    """Random resized crop + horizontal flip, drawn once per sample (Inception-style)."""

    scale: tuple[float, float]  # crop size as a fraction of the photo's shorter side
    aspect: tuple[float, float]  # crop width / height; the crop is stretched to the model size
    flip: float  # probability of a horizontal flip


CALIBRATION_AUGMENT = Augment(scale=(0.5, 1.0), aspect=(3 / 4, 4 / 3), flip=0.5)
HELDOUT_AUGMENT = Augment(scale=(0.55, 1.0), aspect=(4 / 5, 5 / 4), flip=0.5)


@dataclass(frozen=True)
class FidelityRow:
    """One (cut, codec) measurement on the held-out set."""

    cut: str
    codec: str  # canonical text form, str(CodecSpec)
    bytes: int  # mean encoded frame bytes per batch-1 request (before sealing)
    agreement: float  # fraction 0..1 of samples whose top-1 class matches the unsplit model
    max_abs_error: float  # largest |logit - unsplit logit| over samples and classes
    samples: int  # held-out samples measured

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibrate_bundle(
    bundle: Bundle,
    source: str,
    *,
    signing_key: Any = None,
    codecs: Sequence[str] | None = None,
    calib_count: int = 48,
    heldout_count: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
) -> Bundle:
    """Store per-cut ranges and the fidelity table in the bundle's manifest; return it reloaded.

    `source` is "builtin" or a directory of images. Only manifest.json (and its signature) change:
    no file is added, so the listed hashes stay valid. Without `signing_key` an old signature is
    removed: it no longer matches, and "not signed" is the truth where "tampered" would not be.
    """
    t0 = time.perf_counter()
    m = bundle.manifest
    calib_photos, heldout_photos = photo_sets(source, m)
    chains = segment_chains(bundle)
    calib = augmented_inputs(calib_photos, m.preprocess, calib_count, CALIBRATION_AUGMENT, seed)
    frontiers = run_frontiers(m, chains, calib)
    calibration = {c.id: fit_calibration(f) for c, f in zip(m.cuts[:-1], frontiers, strict=False)}
    heldout = augmented_inputs(heldout_photos, m.preprocess, heldout_count, HELDOUT_AUGMENT, seed + 1)
    rows = measure_fidelity(m, chains, heldout, calibration, codecs, progress)
    manifest = dataclasses.replace(
        m,
        calibration={cut: c.to_json() for cut, c in calibration.items()},
        fidelity=tuple(r.to_json() for r in rows),
    )
    if signing_key is None:
        (bundle.root / SIGNATURE).unlink(missing_ok=True)
    write_manifest(bundle.root, manifest, signing_key)
    log.info(
        "calibrated %s on %d + %d samples in %.1f s",
        bundle.name,
        calib_count,
        heldout_count,
        time.perf_counter() - t0,
    )
    return load_bundle(bundle.root)


def fit_calibration(frontier: Mapping[str, np.ndarray]) -> Calibration:
    """Per-channel percentile ranges, or one range per tensor where channels see few values.

    A (N, 1280) feature vector gives each channel only N values: its 99.99th percentile is the
    sample maximum, and held-out inputs then clip (measured at EfficientNet-Lite0's pooled
    features: top-1 agreement 97 % per channel vs 100 % per tensor, 48 samples).
    """
    ranges = dict(Calibration.from_samples([frontier], PERCENTILE).ranges)
    for name, x in frontier.items():
        if name in ranges and x.ndim >= 2 and x.size // x.shape[1] < MIN_VALUES_PER_CHANNEL:
            ranges.update(Calibration.from_samples([{name: x.reshape(-1)}], PERCENTILE).ranges)
    return Calibration(ranges)


def photo_sets(source: str, m: Manifest) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration photos, held-out photos) as RGB uint8 arrays."""
    if m.preprocess.kind != "image" or len(m.inputs) != 1:
        raise UsageError(
            f"model '{m.model}' takes tensors, not one image: calibration needs photos",
            hint="the bundle was written without calibration; encode with fp16 or ranges computed per frame",
        )
    if source == "builtin":
        photos = [image for _, image in sample_photos()]
        return photos, photos
    paths = list_images(Path(source))
    photos = [load_image(p) for p in paths]
    if len(photos) < SPLIT_MIN_IMAGES:
        return photos, photos
    return ([p for i, p in enumerate(photos) if i % 4 != 3], [p for i, p in enumerate(photos) if i % 4 == 3])


def augmented_inputs(
    photos: Sequence[np.ndarray], pre: Preprocess, count: int, augment: Augment, seed: int
) -> np.ndarray:
    """`count` model inputs stacked on axis 0, cycling through the photos, each augmented."""
    if count < 1:
        raise UsageError(f"need at least one sample, got {count}")
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [pre.apply(_augment(photos[i % len(photos)], pre.size, augment, rng)) for i in range(count)]
    )


def _augment(
    image: np.ndarray, size: tuple[int, int], augment: Augment, rng: np.random.Generator
) -> np.ndarray:
    h, w = image.shape[:2]
    side = rng.uniform(*augment.scale) * min(h, w)
    ratio = np.sqrt(rng.uniform(*augment.aspect))
    cw, ch = min(w, max(1, round(side * ratio))), min(h, max(1, round(side / ratio)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = Image.fromarray(image[top : top + ch, left : left + cw])
    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    out = np.asarray(im)
    return out[:, ::-1] if rng.random() < augment.flip else out


def segment_chains(bundle: Bundle) -> list[SegmentChain]:
    """One single-segment chain per segment, so any head or tail is a slice of this list.

    One thread each: batched runs keep a core busy anyway, and ONNX Runtime's spinning worker
    threads cost 3-4x on a shared 2-core machine (measured: 9 ms vs 40 ms per image).
    """
    return [
        SegmentChain.from_files([bundle.path(s.file)], OrtOptions(threads=1))
        for s in bundle.manifest.segments
    ]


def run_chain(
    chains: Sequence[SegmentChain], feeds: Mapping[str, np.ndarray], batchable: bool
) -> dict[str, np.ndarray]:
    """Run consecutive segments on a batch (axis 0); one sample at a time if not batchable."""
    out = dict(feeds)
    for chain in chains:
        out = _run_batch(chain, out, batchable)
    return out


def _run_batch(
    chain: SegmentChain, feeds: Mapping[str, np.ndarray], batchable: bool
) -> dict[str, np.ndarray]:
    if batchable:
        return chain.run(feeds)
    n = next(iter(feeds.values())).shape[0]
    parts = [chain.run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run_frontiers(
    m: Manifest, chains: Sequence[SegmentChain], inputs: np.ndarray
) -> list[dict[str, np.ndarray]]:
    """Every cut's frontier tensors for a batch of inputs, in cut order (output last)."""
    frontiers = [{m.inputs[0].name: inputs}]
    for chain in chains:
        frontiers.append(_run_batch(chain, frontiers[-1], m.batchable))
    return frontiers


def measure_fidelity(
    m: Manifest,
    chains: Sequence[SegmentChain],
    inputs: np.ndarray,
    calibration: Mapping[str, Calibration],
    codecs: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[FidelityRow]:
    """Round-trip every cut's frontier through each codec and run the tail: rows per cut × codec.

    Frames are encoded one sample at a time (as requests travel), decoded, then the tail runs on
    the re-stacked batch. Cut "output" is skipped: its frontier is the answer itself.
    """
    frontiers = run_frontiers(m, chains, inputs)
    reference = frontiers[-1][m.outputs[0].name]
    names = [str(CodecSpec.parse(c)) for c in (codecs or DEFAULT_CODECS)]
    rows, cuts = [], m.cuts[:-1]
    for done, (cut, frontier) in enumerate(zip(cuts, frontiers, strict=False), start=1):
        extra = [str(CodecSpec.parse(c)) for c in INPUT_CODECS] if cut.id == "input" else []
        for name in dict.fromkeys(names + extra):
            frames, decoded = round_trip(m, cut.id, frontier, CodecSpec.parse(name), calibration.get(cut.id))
            logits = run_chain(chains[cut.depth :], decoded, m.batchable)[m.outputs[0].name]
            rows.append(_row(cut.id, name, frames, logits, reference))
        if progress is not None:
            progress(done, len(cuts))
    return rows


def round_trip(
    m: Manifest,
    cut_id: str,
    frontier: Mapping[str, np.ndarray],
    spec: CodecSpec,
    calibration: Calibration | None,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """(frame bytes per sample, the decoded frontier re-stacked on axis 0)."""
    specs = m.cut(cut_id).frontier
    norm = (m.preprocess.mean, m.preprocess.std) if spec.scheme == "jpeg" else None
    n = next(iter(frontier.values())).shape[0]
    sizes, parts = [], []
    for i in range(n):
        frame = encode(
            {k: v[i : i + 1] for k, v in frontier.items()}, specs, spec, calibration, image_norm=norm
        )
        sizes.append(len(frame))
        parts.append(decode(frame, specs, image_norm=norm))
    return sizes, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _row(
    cut: str, codec: str, sizes: Sequence[int], logits: np.ndarray, reference: np.ndarray
) -> FidelityRow:
    agree = np.argmax(logits.reshape(len(sizes), -1), 1) == np.argmax(reference.reshape(len(sizes), -1), 1)
    error = float(np.max(np.abs(logits.astype(np.float64) - reference)))
    return FidelityRow(
        cut, codec, round(float(np.mean(sizes))), round(float(agree.mean()), 6), round(error, 6), len(sizes)
    )
