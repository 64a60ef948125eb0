"""Codec calibration and fidelity: per-cut ranges and bottlenecks, and what each codec costs in accuracy.

Calibration and held-out sets are split BY PHOTO: the built-in source takes scikit-image's (and
matplotlib's) photos as `edgecut.images` divides them; a directory of at least `SPLIT_MIN_IMAGES`
images holds out every 4th; `heldout=DIR` names the user's own evaluation folder. Calibration
views are random resized crops (`CALIBRATION_AUGMENT`); held-out views keep the photo's subject
(`HELDOUT_AUGMENT`: at least 70 % of the shorter side, near-square, flipped half the time).

From the calibration views: affine ranges (`Calibration.from_samples`, a percentile band per
channel) and, for the pca codecs, each cut's bottleneck (`edgecut.bottleneck`): the basis, then per
bit budget the smallest k whose mean KL divergence from the unsplit model on the calibration views
is within `KL_SLACK` of keeping every component; the bottlenecks go to `codecs/<cut>.npz`, listed
and hashed in the manifest.
On the held-out views each (cut, codec) gets a `FidelityRow` (`edgecut.partition.fidelity`): bytes,
top-1 agreement on the confident views (the headline), on all views, mean KL, top-5 overlap, and
the counts they rest on — the accuracy budget the planner reads. Models without image
preprocessing are refused: ranges fitted to random tensors would describe nothing the model sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgecut import bottleneck
from edgecut.bundle import SIGNATURE, Bundle, Manifest, Preprocess, load_bundle, write_manifest
from edgecut.codec import Calibration, CodecSpec, decode, encode
from edgecut.errors import UsageError
from edgecut.images import CALIBRATION_PHOTOS, HELDOUT_PHOTOS, list_images, load_image, sample_photos
from edgecut.partition.fidelity import FidelityRow, mean_kl, row
from edgecut.runtime import OrtOptions, SegmentChain

log = logging.getLogger(__name__)

# pca4 at two zstd levels by default: level 19 finds ~13 % more in the same codes (measured at
# EfficientNet-Lite0 c05) for more edge encode time, which the fidelity rows' bytes and the
# profiles let the planner weigh. pca3 and pca2 keep too little at shallow cuts (benchmarks/).
DEFAULT_CODECS = ("int8-channel", "int8-tensor", "int6-channel", "int4-channel", "fp16", "pca4", "pca4-z19")
# Also measured at cut "input": the cloud-only baselines, each an image a plain service would upload.
INPUT_CODECS = ("jpeg50", "jpeg75", "jpeg90", "webp50", "webp75", "webp90", "png")
SPLIT_MIN_IMAGES = 4  # a directory with at least this many images is split: every 4th is held out
PERCENTILE = 99.99  # of each channel's values; the band outside is clipped by the quantizer
MIN_VALUES_PER_CHANNEL = 1024  # fewer calibration values per channel: one range for the tensor
# The pca codec's k per cut and bit budget: the smallest k (on a grid of sixteenths of C) whose
# mean KL(unsplit ‖ codec) on the calibration views is at most KL_SLACK times that of keeping all C
# components at the same bit budget: dropping components may add 35 % to the quantizer's own
# divergence. (An absolute target does not transfer: most calibration views are unsure, and their
# KL is dominated by near-ties.) KL_SLACK was set in the previous round and is not re-tuned here;
# the grid went from 10 uneven fractions to sixteenths so k is not forced up to the next coarse step.
KL_SLACK = 1.35
K_FRACTIONS = tuple(i / 16 for i in range(1, 17))
BOTTLENECK_DIR = "codecs"

Progress = Callable[[int, int], None]  # (cuts done, cuts in all), for a caller's progress bar


@dataclass(frozen=True)
class Augment:
    """Random resized crop + horizontal flip, drawn once per sample (Inception-style)."""

    scale: tuple[float, float]  # crop size as a fraction of the photo's shorter side
    aspect: tuple[float, float]  # crop width / height; the crop is stretched to the model size
    flip: float  # probability of a horizontal flip


CALIBRATION_AUGMENT = Augment(scale=(0.5, 1.0), aspect=(3 / 4, 4 / 3), flip=0.5)
HELDOUT_AUGMENT = Augment(scale=(0.7, 1.0), aspect=(9 / 10, 10 / 9), flip=0.5)


def calibrate_bundle(
    bundle: Bundle,
    source: str,
    *,
    heldout: str | None = None,
    signing_key: Any = None,
    codecs: Sequence[str] | None = None,
    calib_count: int = 64,
    heldout_count: int = 96,
    seed: int = 0,
    progress: Progress | None = None,
) -> Bundle:
    """Store per-cut ranges, bottlenecks and the fidelity table in the bundle; return it reloaded.

    `source` is "builtin" or a directory of images; `heldout` an optional directory of evaluation
    images (then all of `source` calibrates). The manifest changes, and for pca codecs
    `codecs/<cut>.npz` files are added to it (listed with their hashes). Without `signing_key` an
    old signature is removed: it no longer matches, and "not signed" is the truth.
    """
    t0 = time.perf_counter()
    m = bundle.manifest
    calib_photos, heldout_photos = photo_sets(source, m, heldout)
    chains = segment_chains(bundle)
    names = [str(CodecSpec.parse(c)) for c in (codecs or DEFAULT_CODECS)]
    calib = augmented_inputs(calib_photos, m.preprocess, calib_count, CALIBRATION_AUGMENT, seed)
    frontiers = run_frontiers(m, chains, calib)
    budgets = sorted({s.pca_bits for s in map(CodecSpec.parse, names) if s.scheme == "pca"})
    calibration = {}
    for cut, frontier in zip(m.cuts[:-1], frontiers, strict=False):
        pca = budgets if cut.id != "input" else []  # 3 colour channels: nothing to decorrelate
        fitted = fit_bottlenecks(m, chains, cut.depth, frontier, frontiers[-1], pca)
        calibration[cut.id] = Calibration(fit_calibration(frontier).ranges, fitted)
    files = _write_bottlenecks(bundle.root, calibration)
    heldout_views = augmented_inputs(heldout_photos, m.preprocess, heldout_count, HELDOUT_AUGMENT, seed + 1)
    rows = measure_fidelity(m, chains, heldout_views, calibration, names, progress, len(heldout_photos))
    manifest = dataclasses.replace(
        m,
        calibration={cut: c.to_json() for cut, c in calibration.items()},
        fidelity=tuple(r.to_json() for r in rows),
        files={k: v for k, v in m.files.items() if not k.startswith(f"{BOTTLENECK_DIR}/")}
        | {f: h for f, h in files.values()},
        bottlenecks={cut: f for cut, (f, _) in files.items()},
    )
    if signing_key is None:
        (bundle.root / SIGNATURE).unlink(missing_ok=True)
    write_manifest(bundle.root, manifest, signing_key)
    log.info(
        "calibrated %s on %d views of %d photos, measured on %d views of %d photos in %.1f s",
        bundle.name,
        calib_count,
        len(calib_photos),
        heldout_count,
        len(heldout_photos),
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


def fit_bottlenecks(
    m: Manifest,
    chains: Sequence[SegmentChain],
    depth: int,
    frontier: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    budgets: Sequence[int],
) -> dict[str, bottleneck.Bottleneck]:
    """The cut's bottleneck per float tensor, one variant per bit budget; {} where a float tensor
    has no spatial extent to decorrelate (e.g. a pooled feature vector), so pca skips that cut."""
    floats = {k: v for k, v in frontier.items() if v.dtype.kind == "f"}
    if not budgets or not floats or not all(bottleneck.fits(v.shape) for v in floats.values()):
        return {}
    bases = {k: bottleneck.fit_basis(v) for k, v in floats.items()}
    plain = {k: bottleneck.Bottleneck(*basis, {}) for k, basis in bases.items()}
    coefficients = {k: bottleneck.project(floats[k], b, b.basis.shape[1]) for k, b in plain.items()}
    logits = reference[m.outputs[0].name]
    variants: dict[str, dict[int, bottleneck.Variant]] = {k: {} for k in floats}
    for budget in budgets:

        def fitted(fraction: float, budget: int = budget) -> dict[str, bottleneck.Variant]:
            out = {}
            for k, (_, basis, variance) in bases.items():
                kept = max(1, round(fraction * basis.shape[1]))
                out[k] = bottleneck.fit_variant(coefficients[k], variance, budget, kept)
            return out

        def kl(fraction: float, budget: int = budget) -> float:
            chosen = fitted(fraction)
            feeds = dict(frontier)
            for k, b in plain.items():
                one = dataclasses.replace(b, variants={budget: chosen[k]})
                feeds[k] = bottleneck.decode_codes(
                    bottleneck.encode_codes(floats[k], one, budget), one, budget, floats[k].shape
                )
            return mean_kl(logits, run_chain(chains[depth:], feeds, m.batchable)[m.outputs[0].name])

        target = KL_SLACK * kl(1.0)
        fraction = _smallest(K_FRACTIONS, partial(_within, kl, target))
        log.debug("pca%d at depth %d: k = %.3g of the channels", budget, depth, fraction)
        for k, v in fitted(fraction).items():
            variants[k][budget] = v
    return {k: dataclasses.replace(b, variants=variants[k]) for k, b in plain.items()}


def _within(kl: Callable[[float], float], target: float, fraction: float) -> bool:
    return kl(fraction) <= target


def _smallest(grid: Sequence[float], ok: Callable[[float], bool]) -> float:
    """The smallest grid value that is ok (binary search: ok is taken as monotone), else the last."""
    lo, hi = 0, len(grid) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(grid[mid]) else (mid + 1, hi)
    return grid[lo]


def _write_bottlenecks(root: Path, calibration: Mapping[str, Calibration]) -> dict[str, tuple[str, str]]:
    """cut -> (relative file, sha256) for every cut with bottlenecks; stale files are removed."""
    folder = root / BOTTLENECK_DIR
    for old in folder.glob("*.npz") if folder.is_dir() else ():
        old.unlink()
    out = {}
    for cut, c in calibration.items():
        if c.bottlenecks:
            folder.mkdir(exist_ok=True)
            data = bottleneck.to_npz(c.bottlenecks)
            (folder / f"{cut}.npz").write_bytes(data)
            out[cut] = (f"{BOTTLENECK_DIR}/{cut}.npz", hashlib.sha256(data).hexdigest())
    return out


def photo_sets(
    source: str, m: Manifest, heldout: str | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration photos, held-out photos) as RGB uint8 arrays; no photo is in both."""
    if m.preprocess.kind != "image" or len(m.inputs) != 1:
        raise UsageError(
            f"model '{m.model}' takes tensors, not one image: calibration needs photos",
            hint="the bundle was written without calibration; encode with fp16 or ranges computed per frame",
        )
    if source == "builtin":
        calib = [image for _, image in sample_photos(CALIBRATION_PHOTOS)]
        held = [image for _, image in sample_photos(HELDOUT_PHOTOS)]
    elif heldout is not None:
        calib, held = _load_all(source), _load_all(heldout)
    else:
        photos = _load_all(source)
        if len(photos) < SPLIT_MIN_IMAGES:
            raise UsageError(
                f"images directory '{source}' has {len(photos)} images: need at least "
                f"{SPLIT_MIN_IMAGES} to hold some out by photo",
                hint="add images, or name an evaluation folder of your own with --heldout DIR",
            )
        calib = [p for i, p in enumerate(photos) if i % 4 != 3]
        held = [p for i, p in enumerate(photos) if i % 4 == 3]
    if heldout is not None and source == "builtin":
        held = _load_all(heldout)
    shared = {_digest(p) for p in calib} & {_digest(p) for p in held}
    if shared:
        raise UsageError(f"{len(shared)} photo(s) are in both the calibration and the held-out set")
    return calib, held


def _load_all(directory: str) -> list[np.ndarray]:
    return [load_image(p) for p in list_images(Path(directory))]


def _digest(photo: np.ndarray) -> str:
    return hashlib.sha256(photo.tobytes() + str(photo.shape).encode()).hexdigest()


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
    photos: int = 0,
) -> list[FidelityRow]:
    """Round-trip every cut's frontier through each codec and run the tail: rows per cut × codec.

    Frames are encoded one sample at a time (as requests travel), decoded, then the tail runs on
    the re-stacked batch. Cut "output" is skipped: its frontier is the answer itself; a pca codec
    is skipped at cuts without a fitted bottleneck. `photos`: distinct photos behind `inputs`.
    """
    frontiers = run_frontiers(m, chains, inputs)
    reference = frontiers[-1][m.outputs[0].name]
    names = [str(CodecSpec.parse(c)) for c in (codecs or DEFAULT_CODECS)]
    rows, cuts = [], m.cuts[:-1]
    for done, (cut, frontier) in enumerate(zip(cuts, frontiers, strict=False), start=1):
        extra = [str(CodecSpec.parse(c)) for c in INPUT_CODECS] if cut.id == "input" else []
        for name in dict.fromkeys(names + extra):
            spec, calib = CodecSpec.parse(name), calibration.get(cut.id)
            if spec.scheme == "pca" and (calib is None or not calib.bottlenecks):
                continue
            if spec.is_image and cut.id != "input":
                continue
            frames, decoded = round_trip(m, cut.id, frontier, spec, calib)
            logits = run_chain(chains[cut.depth :], decoded, m.batchable)[m.outputs[0].name]
            rows.append(row(cut.id, name, frames, logits, reference, photos))
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
    norm = (m.preprocess.mean, m.preprocess.std) if spec.is_image else None
    n = next(iter(frontier.values())).shape[0]
    sizes, parts = [], []
    for i in range(n):
        frame = encode(
            {k: v[i : i + 1] for k, v in frontier.items()}, specs, spec, calibration, image_norm=norm
        )
        sizes.append(len(frame))
        parts.append(decode(frame, specs, image_norm=norm, calibration=calibration))
    return sizes, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
