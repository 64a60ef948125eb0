"""The honest evaluation set and the bottleneck codec on it: held-out photos never calibrate, and
the pca codec keeps the confident answers at a shallow cut of the real EfficientNet-Lite0 bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecut.bundle import load_bundle
from edgecut.cli import main
from edgecut.codec import CodecSpec, calibration_for
from edgecut.errors import UsageError
from edgecut.images import CALIBRATION_PHOTOS, HELDOUT_PHOTOS, sample_photos
from edgecut.partition.calibrate import (
    HELDOUT_AUGMENT,
    augmented_inputs,
    photo_sets,
    round_trip,
    run_chain,
    run_frontiers,
    segment_chains,
)
from edgecut.partition.fidelity import confident, top1_agreement

SHALLOW = "c05"  # 6th of 14 cuts: inside the first 40 % of the cut list


def test_builtin_photos_are_split_by_photo(effl0_bundle: Path) -> None:
    assert not set(CALIBRATION_PHOTOS) & set(HELDOUT_PHOTOS)
    calib, held = photo_sets("builtin", load_bundle(effl0_bundle).manifest)
    assert len(calib) >= 8 and len(held) >= 5
    assert not any(h.shape == c.shape and np.array_equal(h, c) for h in held for c in calib)


def test_a_photo_in_both_folders_is_refused(effl0_bundle: Path, tmp_path: Path) -> None:
    (name, image), *_ = sample_photos(("coffee",))
    for folder in ("calib", "held"):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / f"{name}.png")
    with pytest.raises(UsageError, match="in both"):
        photo_sets(str(tmp_path / "calib"), load_bundle(effl0_bundle).manifest, str(tmp_path / "held"))


def test_stored_rows_say_what_they_rest_on(effl0_bundle: Path) -> None:
    m = load_bundle(effl0_bundle).manifest
    for row in m.fidelity:
        assert row["views"] == row["samples"] >= 30 and row["photos"] == len(HELDOUT_PHOTOS)
        assert 0 <= row["confident_views"] <= row["views"] and row["mean_kl"] >= 0
        assert 0 <= row["top5_overlap"] <= 1
    assert {r["codec"] for r in m.fidelity if r["cut"] == "input"} >= {"jpeg50", "jpeg90", "webp75", "png"}
    png = next(r for r in m.fidelity if r["cut"] == "input" and r["codec"] == "png")
    assert png["agreement"] == 1.0  # lossless: the same pixels, the same answer


def test_pca_bottleneck_keeps_confident_answers_on_fresh_heldout_views(effl0_bundle: Path) -> None:
    """At a shallow cut, pca4 sends at most 0.2x JPEG q90's bytes at >= 99 % top-1 agreement on
    >= 30 confident held-out views (the issue's target, on the stored report), and on held-out
    views that report never saw (another seed) changes no more than one confident answer in 20."""
    bundle = load_bundle(effl0_bundle)
    m = bundle.manifest
    stored = {r["codec"]: r for r in m.fidelity if r["cut"] in (SHALLOW, "input")}
    assert stored["pca4-z3"]["bytes"] <= 0.2 * stored["jpeg90"]["bytes"]
    assert stored["pca4-z19"]["bytes"] < stored["pca4-z3"]["bytes"]  # same codes, deeper search
    assert stored["pca4-z3"]["confident_views"] >= 30
    assert stored["pca4-z3"]["agreement_confident"] >= 0.99
    assert bundle.path(m.bottlenecks[SHALLOW]).is_file() and m.bottlenecks[SHALLOW] in m.files
    chains = segment_chains(bundle)
    _, photos = photo_sets("builtin", m)
    inputs = augmented_inputs(photos, m.preprocess, 48, HELDOUT_AUGMENT, seed=100)
    frontiers = run_frontiers(m, chains, inputs)
    reference = frontiers[-1][m.outputs[0].name]
    cut = m.cut(SHALLOW)
    sizes, decoded = round_trip(
        m, cut.id, frontiers[cut.depth], CodecSpec.parse("pca4"), calibration_for(bundle, cut.id)
    )
    logits = run_chain(chains[cut.depth :], decoded, m.batchable)[m.outputs[0].name]
    mask = confident(reference)
    assert mask.sum() >= 15
    assert top1_agreement(reference, logits, mask) >= 0.95
    assert np.mean(sizes) <= 0.3 * stored["jpeg90"]["bytes"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--calibrate", "/nonexistent/photos"], "images directory '/nonexistent/photos' does not exist"),
        (["--heldout", "/tmp"], "--heldout needs --calibrate"),
        (["--calibrate", "builtin", "--heldout", "/nonexistent/held"], "does not exist"),
    ],
)
def test_calibrate_flag_errors_are_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "bundle"
    assert main(["partition", "efficientnet-lite0", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[0].startswith("error: ") and message in err[0]
    assert not any("Traceback" in line for line in err) and not out.exists()
