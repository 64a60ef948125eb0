"""Profile format: JSON round trip, scaling, and refusal of bad, garbled or incomplete profiles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgecut.profile import (
    FORMAT_VERSION,
    CodecTiming,
    Profile,
    ProfileError,
    SegmentTiming,
    load_profile,
    percentile,
    save_profile,
)


def make_profile() -> Profile:
    return Profile(
        model="effl0",
        model_version="1",
        manifest_sha256="ab" * 32,
        device="this-machine-1t",
        runtime="ort",
        threads=1,
        mode="measured",
        source="edgecut profile, 200 runs after 20 warm-up",
        segments=(
            SegmentTiming("seg_001", 2.0, 2.5, 200, peak_mem_bytes=12_000_000),
            SegmentTiming("seg_002", 3.0, 3.4, 200),
        ),
        codecs=(CodecTiming("c01", "int8+zstd", 0.4, 0.2, 21_000),),
        created_at="2025-01-01T00:00:00+00:00",
    )


def test_json_round_trip(tmp_path):
    profile = make_profile()
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    path = tmp_path / "sub" / "p.json"
    save_profile(profile, path)
    assert load_profile(path) == profile
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION


def test_lookups():
    profile = make_profile()
    assert profile.segment_ms("seg_002") == 3.0
    assert {(c.cut, c.codec): c.bytes_ for c in profile.codecs}[("c01", "int8+zstd")] == 21_000


def test_missing_segment_names_it():
    with pytest.raises(ProfileError, match="'seg_009'") as info:
        make_profile().segment_ms("seg_009")
    assert "this-machine-1t" in str(info.value)


def test_scaled_multiplies_times_and_labels_the_source():
    scaled = make_profile().scaled(5.0, "raspberry-pi-4", "Pi 4 ≈ 5× one core (49 ms / 9.2 ms)")
    assert (scaled.mode, scaled.scale, scaled.device) == ("scaled", 5.0, "raspberry-pi-4")
    assert scaled.source.startswith("Pi 4")
    assert scaled.segment_ms("seg_001") == 10.0
    assert scaled.segments[0].p90_ms == 12.5
    assert scaled.segments[0].peak_mem_bytes == 12_000_000  # memory does not scale with speed
    assert scaled.codecs[0].encode_ms == pytest.approx(2.0)
    assert scaled.codecs[0].bytes_ == 21_000
    assert scaled.scaled(2.0, "slower", "x").scale == 10.0  # compounds to the measurement
    assert Profile.from_json(scaled.to_json()) == scaled
    with pytest.raises(ProfileError):
        make_profile().scaled(0.0, "x", "y")


def test_unsupported_version_is_refused():
    d = make_profile().to_json() | {"format_version": 2}
    with pytest.raises(ProfileError, match="unsupported profile format_version 2") as info:
        Profile.from_json(d)
    assert info.value.hint


@pytest.mark.parametrize(
    "change",
    [
        {"format_version": "1"},
        {"mode": "guessed"},
        {"threads": True},
        {"device": None},
        {"segments": {}},
        {"segments": [{"segment": "s", "latency_ms": -1, "p90_ms": 1, "runs": 1}]},
        {"segments": [{"segment": "s", "latency_ms": float("nan"), "p90_ms": 1, "runs": 1}]},
        {"segments": [{"segment": "s", "latency_ms": 1, "p90_ms": 1}]},
        {"codecs": [{"cut": "c01", "codec": "x", "encode_ms": 1, "decode_ms": 1}]},
        {"segments": [{"segment": "s", "latency_ms": 1, "p90_ms": 1, "runs": 1}] * 2},
    ],
)
def test_bad_fields_are_refused(change):
    with pytest.raises(ProfileError):
        Profile.from_json(make_profile().to_json() | change)


def test_missing_field_is_named():
    d = make_profile().to_json()
    del d["manifest_sha256"]
    with pytest.raises(ProfileError, match="manifest_sha256"):
        Profile.from_json(d)


def test_missing_and_garbled_files_are_one_line_errors(tmp_path):
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "nope.json")
    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"format_version": 1,\n  "model": ')
    with pytest.raises(ProfileError, match=r"garbled\.json: not valid JSON \(line 2") as info:
        load_profile(garbled)
    assert "\n" not in str(info.value)
    not_object = tmp_path / "list.json"
    not_object.write_text("[]")
    with pytest.raises(ProfileError, match=r"list\.json: profile must be a JSON object"):
        load_profile(not_object)


def test_planner_and_profile_import_nothing_heavy():
    code = (
        "import sys, edgecut.planner, edgecut.profile; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'onnxruntime'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_timings_use_one_percentile_definition():
    """Median and p90 are numpy's linear percentiles, whoever measures (profiler, tail service)."""
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 100.0]
    timing = SegmentTiming.measured("seg_001", samples)
    assert (timing.latency_ms, timing.p90_ms, timing.runs) == (3.5, 52.5, 6)
    assert percentile(range(11), 90) == 9.0
    assert SegmentTiming.measured("seg_001", []).runs == 0
