"""`edgecut bench sweep`: the --quick preset end to end, the report's arithmetic, bad input.

The sweep spawns a real tail service (a subprocess on 127.0.0.1:0) or uses the in-process one
from conftest's `tail_server` (`--server`), puts the real link emulator in front of it and runs the
real edge agent. No test asserts a wall-clock time: only that every figure exists, is labelled,
and that each bad input is one clear line with the right exit code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from edgecut.apps.sweep import report
from edgecut.apps.sweep.config import split_list
from edgecut.apps.sweep.records import Measurement
from edgecut.bundle import load_bundle
from edgecut.cli import main
from edgecut.errors import UsageError
from edgecut.keys import KeyPaths

OUTPUTS = ("results.csv", "results.json", "breakdown.png", "bytes.png", "latency_vs_bandwidth.png")


@pytest.fixture(scope="module")
def edge_profile(effl0_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "here-1t.json"
    assert (
        main(
            [
                "profile",
                str(effl0_bundle),
                "--out",
                str(path),
                "--runs",
                "3",
                "--threads",
                "1",
                "--codec",
                "int8,int4,jpeg90",
                "--device",
                "here-1t",
            ]
        )
        == 0
    )
    return path


def sweep(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["bench", "sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


def check_outputs(out: Path) -> dict[str, Any]:
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for png in OUTPUTS[2:]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {
        "mode",
        "machine",
        "edge_ms",
        "wire_ms",
        "server_compute_ms",
        "bytes_up",
        "top1",
        "top1_reference",
        "predicted_ms",
        "predicted_edge_ms",
    } <= set(header)
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert doc["run"]["command"].startswith("edgecut bench sweep ")
    assert doc["run"]["revision"] and not doc["run"]["revision"].startswith("unknown")
    assert doc["run"]["packages"]["onnxruntime"] != "not installed"
    return doc


def test_quick_sweep_end_to_end(
    capsys: pytest.CaptureFixture[str], effl0_bundle: Path, edge_profile: Path, tmp_path: Path
) -> None:
    code, out, _ = sweep(
        capsys,
        str(effl0_bundle),
        "--edge-profile",
        str(edge_profile),
        "--quick",
        "--min-cut",
        "c03",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0
    printed = json.loads(out)
    doc = check_outputs(tmp_path)
    rows = doc["measurements"]
    cells = {(r["role"], r["cut"], r["codec"]) for r in rows}
    assert ("grid", "input", "jpeg90") in cells and ("grid", "output", "none") in cells
    assert len({c for c in cells if c[0] == "grid"}) >= 3 and any(c[0] == "planner" for c in cells)
    assert all(r["mode"] == "live" and r["machine"] and r["where"] != "failed" for r in rows)
    assert all(r["predicted_ms"] > 0 for r in rows if r["role"] != "auto")
    # the "auto" row is the shipped agent: it chose per request, from the bundle's own options
    shipped = [r for r in rows if r["role"] == "auto"]
    cuts = {c.id for c in load_bundle(effl0_bundle).manifest.cuts}
    assert shipped and all(r["chosen"].split("/")[0] in cuts for r in shipped)
    # --min-cut binds the planner and the shipped auto (raw pixels never leave); the grid still
    # measures the input upload for reference
    m = load_bundle(effl0_bundle).manifest
    floor = m.cut("c03").depth
    assert all(m.cut(r["chosen"].split("/")[0]).depth >= floor for r in shipped)
    assert all(m.cut(r["cut"]).depth >= floor for r in rows if r["role"] == "planner")
    assert "--min-cut c03" in doc["run"]["command"]
    assert sum(r["top1"] == r["top1_reference"] for r in rows) >= len(rows) - 2
    cloud = [r for r in rows if r["where"] == "cloud"]
    assert cloud and all(r["bytes_up"] > 0 and r["server_compute_ms"] > 0 for r in cloud)
    (link,) = printed["links"]
    assert link["bandwidth"] == "32mbit" and link["rtt_ms"] == 5.0
    for key in ("regret", "auto_vs_best_baseline", "speedup_vs_cloud_only", "overhead"):
        assert link[key] > 0, key
    assert doc["run"]["cloud"]["spawned"] is True
    assert doc["summary"]["totals"]["failed_requests"] == 0


def test_paced_sweep_against_a_given_cloud(
    capsys: pytest.CaptureFixture[str],
    tail_server: Any,
    keys: KeyPaths,
    bundles_dir: Path,
    edge_profile: Path,
    tmp_path: Path,
) -> None:
    with tail_server(max_queue_delay_ms=0) as handle:
        code, _, _ = sweep(
            capsys,
            str(bundles_dir / "effl0"),
            "--edge-profile",
            str(edge_profile),
            "--pace",
            "--server",
            f"127.0.0.1:{handle.port}",
            "--server-key",
            str(keys.service_pub),
            "--quick",
            "--cuts",
            "c05",
            "--auto-warmup",
            "3",
            "--out",
            str(tmp_path),
        )
    assert code == 0
    doc = check_outputs(tmp_path)
    assert {r["mode"] for r in doc["measurements"]} == {"paced:here-1t"}
    assert doc["run"]["auto_warmup"] == 3 and "--auto-warmup 3" in doc["run"]["command"]
    assert len([r for r in doc["measurements"] if r["role"] == "auto"]) == doc["run"]["requests"]
    assert doc["run"]["pacing"].startswith("head segments replayed from the profile; codec encode slowed")
    sent = [r for r in doc["measurements"] if r["role"] == "grid" and r["bytes_up"] > 0]
    assert sent and all(0 <= r["predicted_edge_ms"] < r["predicted_ms"] for r in sent)
    assert {r["cut"] for r in doc["measurements"]} >= {"input", "c05", "output"}
    assert doc["run"]["cloud"]["spawned"] is False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bad_inputs(
    effl0_bundle: Path, edge_profile: Path, keys: KeyPaths, tmp_path: Path
) -> dict[str, tuple[list[str], int, str]]:
    """name → (arguments, exit code, a phrase the one error line must contain)."""
    bare = tmp_path / "bare"
    shutil.copytree(effl0_bundle, bare)
    shutil.rmtree(bare / "profiles", ignore_errors=True)
    (tmp_path / "empty").mkdir()
    b, p = str(effl0_bundle), ["--edge-profile", str(edge_profile)]
    out = ["--out", str(tmp_path / "out"), "--quick"]
    return {
        "unreachable cloud": (
            [b, *p, "--server", f"127.0.0.1:{free_port()}", "--server-key", str(keys.service_pub), *out],
            1,
            "unreachable",
        ),
        "cloud without key": ([b, *p, "--server", "127.0.0.1:1", *out], 2, "--server-key"),
        "bundle without profiles": ([str(bare), *out], 1, "ships no profiles"),
        "missing profile file": ([b, "--edge-profile", str(tmp_path / "nope.json"), *out], 1, "not found"),
        "bad bandwidth": ([b, *p, *out, "--bandwidth", "8mbps"], 2, "kbit, mbit"),
        "empty images dir": ([b, *p, *out, "--images", str(tmp_path / "empty")], 2, "no images"),
        "unknown cut": ([b, *p, *out, "--cuts", "c99"], 1, "c99"),
        "jpeg at an inner cut": ([b, *p, *out, "--codec", "jpeg90"], 2, "input cut"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unreachable cloud",
        "cloud without key",
        "bundle without profiles",
        "missing profile file",
        "bad bandwidth",
        "empty images dir",
        "unknown cut",
        "jpeg at an inner cut",
    ],
)
def test_bad_input_is_one_clear_line(
    case: str, bad_inputs: dict[str, tuple[list[str], int, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    args, expected_code, phrase = bad_inputs[case]
    code, out, err = sweep(capsys, *args)
    assert code == expected_code
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and phrase in errors[0], err
    assert len(lines) <= 2 and "Traceback" not in err  # the error, and at most a hint
    assert out == ""


def test_lists_share_a_trailing_unit() -> None:
    assert split_list("0.5,2,8,32,128mbit") == ("0.5mbit", "2mbit", "8mbit", "32mbit", "128mbit")
    assert split_list("5, 40ms") == ("5ms", "40ms")
    assert split_list("512kbit,2mbit") == ("512kbit", "2mbit")
    with pytest.raises(UsageError):
        split_list(" , ")


def row(cut: str, codec: str, role: str, total: float, **kw: Any) -> Measurement:
    base: dict[str, Any] = dict(
        bandwidth="8mbit",
        bandwidth_bps=8e6,
        rtt_ms=10.0,
        role=role,
        cut=cut,
        codec=codec,
        request=0,
        input="x",
        where="cloud" if cut != "output" else "local",
        mode="live",
        machine="m",
        at="t",
        edge_ms=1.0,
        encode_ms=1.0,
        wire_ms=0.0,
        server_queue_ms=0.0,
        server_decode_ms=0.0,
        server_compute_ms=1.0,
        server_encode_ms=0.0,
        decode_ms=0.0,
        total_ms=total,
        bytes_up=1000,
        bytes_down=0,
        top1=1,
        top1_reference=1,
        predicted_ms=total,
    )
    return Measurement(**{**base, **kw})


def test_report_figures_compare_auto_with_other_runs() -> None:
    rows = [
        row("input", "jpeg90", "grid", 40.0),
        row("c05", "int8", "grid", 20.0),
        row("output", "none", "grid", 30.0, bytes_up=0),
        row("c05", "int8", "planner", 20.5),
        row("auto", "auto", "auto", 21.0, chosen="c05/int8"),
    ]
    cells = report.cell_stats(rows)
    (s,) = report.link_summaries(rows, cells)
    assert s.oracle.cell.cut == "c05" and s.oracle.cell.role == "grid"
    assert s.regret == pytest.approx(21 / 20) and s.same_choice and s.planner.total_ms == 20.5
    assert s.vs_baselines == pytest.approx(21 / 30)
    assert s.speedup_vs_cloud == pytest.approx(40 / 21)
    # 1 edge + 1 encode + 1 compute + 10 ms RTT; 1000 B fit the emulator's 4000 B burst (4 ms at
    # 8 Mbit/s) and cross free; 5000 B leave 1000 B = 1 ms on the link
    assert report.overhead(rows[1]) == pytest.approx(20 / 13)
    assert report.overhead(row("c05", "int8", "grid", 20.0, bytes_up=5000)) == pytest.approx(20 / 14)
    totals = report.totals(cells, [s])
    assert totals["regret_within_target"] == 1 and math.isfinite(totals["overhead_median"])


def test_prediction_error_without_the_head_leaves_out_what_pacing_replays() -> None:
    # predicted 30 = 12 head + 18 after it; measured 40 = 12 head (replayed) + 28 after it
    paced = row("c05", "int8", "grid", 40.0, edge_ms=12.0, predicted_ms=30.0, predicted_edge_ms=12.0)
    edge_only = row("output", "none", "grid", 30.0, bytes_up=0, edge_ms=30.0, predicted_edge_ms=30.0)
    old = row("c05", "int8", "grid", 40.0, predicted_ms=30.0)  # results from before the field
    c, e, o = report.cell_stats([paced, edge_only, dataclasses.replace(old, bandwidth="2mbit")])
    assert c.error_pct == pytest.approx(-25.0)
    assert c.error_without_head_pct == pytest.approx((18 - 28) / 28 * 100)
    assert math.isnan(e.error_without_head_pct)  # nothing after the head
    assert math.isnan(o.error_without_head_pct)
    t = report.totals([c, e], [])
    assert t["prediction_error_without_head_abs_median_pct"] == pytest.approx(10 / 28 * 100)
