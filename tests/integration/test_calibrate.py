"""Calibration and fidelity on the real EfficientNet-Lite0 bundle (calibrated by the session fixture).

Fidelity is recomputed here on fresh views of the held-out photos (another seed than the stored
report) and held to the thresholds: int8 top-1 agreement >= 99.5 % on the confident views at every
cut (not one flip), int4 per-channel >= 98 % on all views (not met: xfail). On all views int8 flips
one or two near-ties in 64 (98.4 %), which is what the near-tie test pins down.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecut.bundle import Preprocess, load_bundle
from edgecut.cli import main
from edgecut.codec import Calibration, CodecSpec
from edgecut.errors import UsageError
from edgecut.images import sample_photos
from edgecut.keys import generate_keys, load_signing_private, load_signing_public
from edgecut.partition.calibrate import (
    DEFAULT_CODECS,
    HELDOUT_AUGMENT,
    INPUT_CODECS,
    augmented_inputs,
    calibrate_bundle,
    photo_sets,
    round_trip,
    run_chain,
    run_frontiers,
    segment_chains,
)
from edgecut.partition.fidelity import confident

HELDOUT_SAMPLES = 64
HELDOUT_SEED = 100  # the stored report used seed 1; calibration seed 0
NEAR_TIE_LOGITS = 0.1  # a top-1 flip is excusable only where the top two logits are this close
INT8 = ("int8-channel", "int8-tensor")


@dataclasses.dataclass(frozen=True)
class Measured:
    agreement: float
    agreement_confident: float  # on the views where the unsplit top-1 probability >= 0.5
    flip_margins: tuple[float, ...]  # the unsplit model's top-2 logit margin on each flipped sample


@pytest.fixture(scope="module")
def recomputed(effl0_bundle: Path) -> dict[tuple[str, str], Measured]:
    """(cut, codec) -> agreement on a fresh held-out set, with the calibration the bundle stores."""
    bundle = load_bundle(effl0_bundle)
    m = bundle.manifest
    chains = segment_chains(bundle)
    _, photos = photo_sets("builtin", m)
    inputs = augmented_inputs(photos, m.preprocess, HELDOUT_SAMPLES, HELDOUT_AUGMENT, HELDOUT_SEED)
    frontiers = run_frontiers(m, chains, inputs)
    reference = frontiers[-1][m.outputs[0].name]
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    sure = confident(reference)
    out = {}
    for cut, frontier in zip(m.cuts[:-1], frontiers, strict=False):
        calibration = Calibration.from_json(m.calibration[cut.id])
        for codec in (*INT8, "int4-channel"):
            _, decoded = round_trip(m, cut.id, frontier, CodecSpec.parse(codec), calibration)
            logits = run_chain(chains[cut.depth :], decoded, m.batchable)[m.outputs[0].name]
            flipped = logits.argmax(1) != reference.argmax(1)
            out[cut.id, codec] = Measured(
                1 - flipped.mean(), 1 - flipped[sure].mean(), tuple(margin[flipped].round(4))
            )
    return out


def _below(
    measured: dict[tuple[str, str], Measured], codecs: tuple[str, ...], threshold: float
) -> dict[str, float]:
    return {
        f"{cut}/{codec}": round(v.agreement, 4)
        for (cut, codec), v in measured.items()
        if codec in codecs and v.agreement < threshold
    }


def test_fixture_bundle_has_calibration_and_fidelity_for_every_cut(effl0_bundle: Path) -> None:
    m = load_bundle(effl0_bundle).manifest
    cuts = [c.id for c in m.cuts if c.id != "output"]
    assert sorted(m.calibration) == sorted(cuts)
    pca = {c for c in cuts if c not in ("input", "c12")}  # c12 is a pooled vector: no channels to mix
    assert set(m.bottlenecks) == pca
    expected = {
        (c, str(CodecSpec.parse(k)))
        for c in cuts
        for k in DEFAULT_CODECS
        if not k.startswith("pca") or c in pca
    }
    expected |= {("input", str(CodecSpec.parse(k))) for k in INPUT_CODECS}
    assert {(r["cut"], r["codec"]) for r in m.fidelity} == expected
    for row in m.fidelity:
        assert row["bytes"] > 0 and 0 <= row["agreement"] <= 1 and row["max_abs_error"] >= 0
        assert row["samples"] >= 32
    ranges = Calibration.from_json(m.calibration["c01"]).ranges
    assert all(lo.shape == (m.cut("c01").frontier[0].shape[1],) for lo, _ in ranges.values())


def test_int8_flips_only_near_ties(recomputed: dict[tuple[str, str], Measured]) -> None:
    """int8 never changes a confident answer: each flip is a near-tie in the unsplit model."""
    flips = {k: v.flip_margins for k, v in recomputed.items() if k[1] in INT8 and v.flip_margins}
    assert all(max(margins) < NEAR_TIE_LOGITS for margins in flips.values()), flips


def test_int8_agreement_on_confident_views_at_least_99_5_percent(
    recomputed: dict[tuple[str, str], Measured],
) -> None:
    """The headline measure: on all views of the held-out photos int8 flips 1-2 near-ties in 64
    (98.4 %), on the confident views none."""
    low = {k: v.agreement_confident for k, v in recomputed.items() if k[1] in INT8}
    assert {k: v for k, v in low.items() if v < 0.995} == {}


@pytest.mark.xfail(
    strict=True,
    reason=(
        "issue 3 target not met: int4 per-channel top-1 agreement measured 79.7 % (c01) to 96.9 % "
        "(c07, c12) on 64 held-out crops, 81.2 % at input; 16 levels over one calibrated range per "
        "channel is too coarse for EfficientNet-Lite0"
    ),
)
def test_int4_channel_agreement_at_least_98_percent(recomputed: dict[tuple[str, str], Measured]) -> None:
    assert _below(recomputed, ("int4-channel",), 0.98) == {}


@pytest.fixture
def bundle_copy(effl0_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(effl0_bundle, tmp_path / "effl0"))


@pytest.fixture
def photo_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in sample_photos()[:5]:
        Image.fromarray(image).save(folder / f"{name}.jpg", quality=90)
    yield folder


def test_directory_source_calibrates_and_signs(bundle_copy: Path, photo_dir: Path, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    before = load_bundle(bundle_copy).manifest.files
    bundle = calibrate_bundle(
        load_bundle(bundle_copy),
        str(photo_dir),
        signing_key=load_signing_private(keys.signing_key),
        codecs=("int8-tensor",),
        calib_count=4,
        heldout_count=2,
        seed=3,
    )
    signed = load_bundle(bundle_copy, public_key=load_signing_public(keys.signing_pub))
    assert signed.signed and signed.manifest == bundle.manifest
    # without a pca codec the fixture's bottleneck files are stale: removed, and unlisted
    assert bundle.manifest.files == {k: v for k, v in before.items() if not k.startswith("codecs/")}
    assert not bundle.manifest.bottlenecks and not list((bundle_copy / "codecs").glob("*.npz"))
    assert {r["codec"] for r in bundle.manifest.fidelity} == {"int8-tensor-z3", *INPUT_CODECS}
    assert all(r["samples"] == 2 for r in bundle.manifest.fidelity)
    calibrate_bundle(signed, str(photo_dir), codecs=("fp16",), calib_count=2, heldout_count=1)
    assert not (bundle_copy / "manifest.sig").exists()  # stale, so removed: "not signed"


def test_directory_of_four_or_more_images_is_split(effl0_bundle: Path, photo_dir: Path) -> None:
    calib, heldout = photo_sets(str(photo_dir), load_bundle(effl0_bundle).manifest)
    assert (len(calib), len(heldout)) == (4, 1)
    assert not any(np.array_equal(h, c) for h in heldout for c in calib if h.shape == c.shape)


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None], ids=["empty", "missing"])
def test_empty_or_missing_directory_is_a_usage_error(
    effl0_bundle: Path, tmp_path: Path, make: object
) -> None:
    folder = tmp_path / "nothing"
    make(folder)  # type: ignore[operator]
    with pytest.raises(UsageError, match="images directory"):
        calibrate_bundle(load_bundle(effl0_bundle), str(folder))


def test_tensor_models_are_refused(effl0_bundle: Path) -> None:
    m = load_bundle(effl0_bundle).manifest
    tensors = dataclasses.replace(m, preprocess=Preprocess(kind="none"))
    with pytest.raises(UsageError, match="takes tensors"):
        photo_sets("builtin", tensors)


def test_inspect_shows_fidelity_table_and_json(
    effl0_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(effl0_bundle), "--fidelity"]) == 0
    table = capsys.readouterr().out
    assert "codec fidelity on held-out photos" in table and "int4-channel-z3" in table
    assert main(["inspect", str(effl0_bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["fidelity"]) == len(load_bundle(effl0_bundle).manifest.fidelity)
