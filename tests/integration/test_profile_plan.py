"""`edgecut profile` on this machine, then `edgecut plan` over the real bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecut.bundle import load_bundle
from edgecut.cli import main
from edgecut.profile import load_profile


@pytest.fixture(scope="module")
def profiles(effl0_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("profiles")
    assert (
        main(
            [
                "profile",
                str(effl0_bundle),
                "--out",
                str(d / "here.json"),
                "--runs",
                "3",
                "--threads",
                "1",
                "--codec",
                "int8,int4,jpeg90",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "profile",
                str(effl0_bundle),
                "--out",
                str(d / "pi.json"),
                "--runs",
                "3",
                "--threads",
                "1",
                "--codec",
                "int8,int4,jpeg90",
                "--scale",
                "5",
                "--source",
                "Pi 4 ~ 5x one core here (docs/architecture.md)",
                "--device",
                "pi4",
            ]
        )
        == 0
    )
    return d / "pi.json", d / "here.json"


def _plan(capsys: pytest.CaptureFixture[str], bundle: Path, profiles: tuple[Path, Path], *extra: str) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert (
        main(
            [
                "plan",
                str(bundle),
                "--edge-profile",
                str(profiles[0]),
                "--server-profile",
                str(profiles[1]),
                "--json",
                "--codec",
                "int8,int4",
                *extra,
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)


def test_profile_is_complete_and_labelled(effl0_bundle: Path, profiles: tuple[Path, Path]) -> None:
    pi, here = (load_profile(p) for p in profiles)
    assert pi.mode == "scaled" and pi.scale == 5 and "docs/architecture.md" in pi.source
    assert here.mode == "measured"
    assert len(here.segments) == len(json.loads((effl0_bundle / "manifest.json").read_text())["segments"])
    assert {c.cut for c in here.codecs} >= {"input", "c01"}
    for a, b in zip(pi.segments, here.segments, strict=True):
        assert a.segment == b.segment


def test_plan_picks_the_cheapest_allowed_row(
    capsys: pytest.CaptureFixture[str], effl0_bundle: Path, profiles: tuple[Path, Path]
) -> None:
    fast = _plan(capsys, effl0_bundle, profiles, "--bandwidth", "1gbit", "--rtt", "1ms")
    slow = _plan(capsys, effl0_bundle, profiles, "--bandwidth", "0.2mbit", "--rtt", "80ms")
    for result in (fast, slow):
        allowed = [r for r in result["rows"] if r["allowed"]]
        best = min(allowed, key=lambda r: r["predicted_ms"])
        assert result["chosen"]["cut"] == best["cut"]
    assert fast["chosen"]["cut"] != "output"  # a fast link ships work to the (faster) server
    assert slow["chosen"]["cut"] == "output"  # a 0.2 Mbit/s link: run everything locally
    private = _plan(capsys, effl0_bundle, profiles, "--bandwidth", "1gbit", "--min-cut", "3")
    assert all(not r["allowed"] for r in private["rows"][:3])
    by_id = _plan(capsys, effl0_bundle, profiles, "--bandwidth", "1gbit", "--min-cut", "c03")
    assert load_bundle(effl0_bundle).manifest.cut("c03").depth == 3
    # a cut id means its depth, as on the edge, the tail service and the sweep
    assert [r["allowed"] for r in by_id["rows"]] == [r["allowed"] for r in private["rows"]]


def test_plan_bad_input(
    capsys: pytest.CaptureFixture[str], effl0_bundle: Path, profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    base = ["plan", str(effl0_bundle), "--server-profile", str(profiles[1])]
    assert main([*base, "--edge-profile", str(profiles[0]), "--bandwidth", "8mbps"]) == 2
    assert "8mbps" in capsys.readouterr().err
    assert main([*base, "--edge-profile", str(tmp_path / "none.json"), "--bandwidth", "8mbit"]) == 1
    assert "not found" in capsys.readouterr().err


def _plan_json(
    capsys: pytest.CaptureFixture[str], bundle: Path, profiles: tuple[Path, Path], *extra: str
) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    base = ["plan", str(bundle), "--edge-profile", str(profiles[0]), "--server-profile", str(profiles[1])]
    assert main([*base, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_keeps_the_default_accuracy_budget(
    capsys: pytest.CaptureFixture[str], effl0_bundle: Path, profiles: tuple[Path, Path]
) -> None:
    """A slow edge, a fast tail, a fast link and no accuracy flag: the choice agrees with the
    unsplit model on >= 99 % of the fidelity table's held-out views (the JPEG upload does not)."""
    fidelity = {(r["cut"], r["codec"]): r["agreement"] for r in load_bundle(effl0_bundle).manifest.fidelity}
    for codecs in ([], ["--codec", "int8,int4,jpeg90"]):
        result = _plan_json(capsys, effl0_bundle, profiles, "--bandwidth", "1gbit", "--rtt", "1ms", *codecs)
        chosen = result["chosen"]
        row = next(r for r in result["rows"] if (r["cut"], r["codec"]) == (chosen["cut"], chosen["codec"]))
        assert row["agreement"] >= 0.99 and result["max_accuracy_drop"] == 0.01
        jpeg = next(r for r in result["rows"] if r["cut"] == "input" and r["codec"] == "jpeg90")
        assert fidelity[("input", "jpeg90")] < 0.99 and not jpeg["allowed"]
        assert "max_accuracy_drop" in jpeg["reason"]


def test_plan_codec_is_honoured_at_the_input_and_unknown_rows_are_excluded(
    capsys: pytest.CaptureFixture[str], effl0_bundle: Path, profiles: tuple[Path, Path]
) -> None:
    result = _plan_json(
        capsys, effl0_bundle, profiles, "--bandwidth", "1gbit", "--codec", "int8,int8-channel-z9"
    )
    rows = {(r["cut"], r["codec"]): r for r in result["rows"]}
    assert ("input", "int8") in rows and rows[("input", "int8")]["agreement"] is not None
    unknown = rows[("c03", "int8-channel-z9")]  # no fidelity row for zstd level 9: unknown
    assert unknown["agreement"] is None and not unknown["allowed"]
    off = _plan_json(
        capsys,
        effl0_bundle,
        profiles,
        "--bandwidth",
        "1gbit",
        "--codec",
        "int8-channel-z9",
        "--max-accuracy-drop",
        "off",
    )
    assert all(r["allowed"] for r in off["rows"]) and off["max_accuracy_drop"] is None
    capsys.readouterr()
    base = [
        "plan",
        str(effl0_bundle),
        "--edge-profile",
        str(profiles[0]),
        "--server-profile",
        str(profiles[1]),
    ]
    assert main([*base, "--bandwidth", "1gbit", "--codec", "int8-channel-z9"]) == 0
    out = capsys.readouterr().out
    assert "agree" in out and "without a fidelity row excluded as unknown" in out


def test_edge_weight_bytes_are_the_head_weights_and_bound_the_plan(effl0_bundle: Path) -> None:
    """The cost table's `edge_weight_bytes` is what it says (the bytes of the head's segment files,
    not a peak-memory figure), and a weight budget refuses deeper cuts by that number."""
    from edgecut.costs import CloudTimes, cut_costs
    from edgecut.link import LinkEstimate
    from edgecut.planner import Constraints, plan
    from edgecut.profile import Profile, SegmentTiming

    bundle = load_bundle(effl0_bundle)
    m = bundle.manifest
    timings = tuple(SegmentTiming(s.name, 1.0, 1.0, 1) for s in m.segments)
    edge = Profile(
        model=m.model,
        model_version=m.version,
        manifest_sha256=bundle.manifest_sha256,
        device="test",
        runtime="ort",
        threads=1,
        mode="measured",
        segments=timings,
        created_at="2026-01-01T00:00:00Z",
    )
    costs = cut_costs(bundle, edge, CloudTimes({s.name: 1.0 for s in m.segments}), codecs=("int8",))
    for c in costs:
        assert c.edge_weight_bytes == sum(bundle.size_bytes(s.file) for s in m.head(c.cut))
    by_cut = {c.cut: c.edge_weight_bytes for c in costs}
    assert by_cut["input"] == 0 < by_cut["c03"] < by_cut["c06"] < by_cut[m.cuts[-1].id]
    result = plan(costs, LinkEstimate(10e6, 10e6, 20.0), Constraints(max_edge_weight_bytes=by_cut["c03"]))
    deeper = [r for r in result.rows if r.cost.edge_weight_bytes > by_cut["c03"]]
    assert deeper and not any(r.allowed for r in deeper)
    assert all("max_edge_weight_bytes" in r.reason and "B of weights" in r.reason for r in deeper)
    assert result.chosen.cost.edge_weight_bytes <= by_cut["c03"]


def test_image_codecs_are_timed_on_the_photo_given(
    effl0_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from edgecut.images import sample_photos

    photo = tmp_path / "chelsea.png"
    Image.fromarray(sample_photos()[0][1]).save(photo)
    common = ["profile", str(effl0_bundle), "--runs", "1", "--threads", "1", "--codec", "png"]
    assert main([*common, "--out", str(tmp_path / "synthetic.json")]) == 0
    assert "--image" in capsys.readouterr().err  # warned: a synthetic image flatters image codecs
    assert main([*common, "--image", str(photo), "--out", str(tmp_path / "photo.json")]) == 0
    synthetic, real = (load_profile(tmp_path / f"{n}.json") for n in ("synthetic", "photo"))
    assert real.source.endswith("on chelsea.png")
    png = {p.source: next(c for c in p.codecs if c.codec == "png") for p in (synthetic, real)}
    assert png[real.source].bytes_ > 10 * png[synthetic.source].bytes_  # a photo is no flat block
    assert main([*common, "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "x.json")]) != 0
    assert "nope.png" in capsys.readouterr().err
