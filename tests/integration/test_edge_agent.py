"""The edge agent end to end on loopback, against a real tail service.

Uses the fixtures of tests/integration/conftest.py (`keys`, `bundles_dir`, `tail_server`: a real
service from `create_server` on 127.0.0.1:0 in a background event loop).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edgecut.bundle import load_bundle, write_manifest
from edgecut.cli import main
from edgecut.edge.agent import Input, Result, image_input
from edgecut.edge.cli import open_source
from edgecut.edge.runner import OrtRunner
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import NotFoundError, SealError, UnavailableError
from edgecut.images import prepare, sample_photos
from edgecut.keys import KeyPaths, generate_keys

# ---------------------------------------------------------------- helpers (edge-side only)


def augmented_photos() -> list[tuple[str, np.ndarray]]:
    """The scikit-image photos × 4 views (as is, mirrored, centre crop, rotated): 28 inputs."""
    out = []
    for name, im in sample_photos():
        h, w = im.shape[:2]
        views = {
            "": im,
            "+flip": im[:, ::-1],
            "+crop": im[h // 8 : h - h // 8, w // 8 : w - w // 8],
            "+rot90": np.rot90(im),
        }
        out += [(name + tag, np.ascontiguousarray(v)) for tag, v in views.items()]
    return out


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray]]:
    return augmented_photos()


@pytest.fixture(scope="module")
def reference(effl0_bundle: Path, photos: list[tuple[str, np.ndarray]]) -> list[int]:
    """Top-1 of the unsplit model (all segments chained here) for every photo."""
    bundle = load_bundle(effl0_bundle)
    m, runner = bundle.manifest, OrtRunner(bundle)
    tops = []
    for _, im in photos:
        out = runner.run({m.inputs[0].name: prepare(im, m.preprocess)}, 0, len(m.segments) - 1)
        tops.append(int(np.argmax(out.outputs[m.outputs[0].name])))
    return tops


def inputs(photos: list[tuple[str, np.ndarray]]) -> list[Input]:
    return [image_input(i, name, im) for i, (name, im) in enumerate(photos)]


def run_agent(config: EdgeConfig, items: list[Input], on_result: Any = None) -> list[Result]:
    results: list[Result] = []

    def emit(r: Result) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r)

    with start_agent(config) as agent:
        agent.run(items, emit)
    return results


def config(bundle: Path, port: int, keys: KeyPaths, **kw: Any) -> EdgeConfig:
    return EdgeConfig(bundle=bundle, server=f"127.0.0.1:{port}", server_key=keys.service_pub, threads=1, **kw)


def exactly_once(results: list[Result], n: int) -> None:
    assert sorted(r.position for r in results) == list(range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("cut", "codec"), [("input", "fp16"), ("c01", "int8"), ("c06", "int8"), ("c11", "int8")]
)
def test_split_matches_unsplit_top1(
    effl0_bundle: Path,
    keys: KeyPaths,
    tail_server: Any,
    photos: list,
    reference: list[int],
    cut: str,
    codec: str,
) -> None:
    with tail_server() as server:
        results = run_agent(config(effl0_bundle, server.port, keys, cut=cut, codec=codec), inputs(photos))
    exactly_once(results, len(photos))
    assert {r.where for r in results} == {"cloud"}
    agree = np.mean([r.top5[0][0] == reference[r.position] for r in results])
    assert agree >= 0.99, f"cut {cut}/{codec}: top-1 agreement {agree:.1%}"
    r = results[0]
    assert r.bytes_up > 0 and r.bytes_down > 0 and r.cut == cut and r.cut_mode == "fixed"
    t = r.timings_ms
    assert t["total_ms"] >= t["edge_ms"] + t["encode_ms"] and t["wire_ms"] > 0


@pytest.mark.parametrize("fallback", ["local", "fail"])
def test_server_killed_mid_run_every_input_answered_once(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, photos: list, reference: list[int], fallback: str
) -> None:
    with tail_server() as server:

        def kill_after_third(r: Result) -> None:
            if r.position == 2:
                server.call(server.server.stop(0))

        results = run_agent(
            config(
                effl0_bundle, server.port, keys, cut="c06", in_flight=2, fallback=fallback, deadline_ms=1500
            ),
            inputs(photos[:12]),
            kill_after_third,
        )
    exactly_once(results, 12)
    where = Counter(r.where for r in results)
    assert where["cloud"] >= 3
    if fallback == "local":
        assert where["local"] > 0 and not where["failed"]
        assert all(r.top5[0][0] == reference[r.position] for r in results)
    else:
        assert where["failed"] > 0 and not where["local"]
        assert all(r.error for r in results if r.where == "failed")


def test_unreachable_at_start(effl0_bundle: Path, keys: KeyPaths, photos: list) -> None:
    cfg = config(effl0_bundle, free_port(), keys, cut="c06", fallback="local")
    results = run_agent(cfg, inputs(photos[:3]))
    assert [r.where for r in results] == ["local"] * 3
    with pytest.raises(UnavailableError, match="unreachable"):
        run_agent(dataclasses.replace(cfg, fallback="fail"), inputs(photos[:1]))


def test_local_fallback_logs_once_then_warns_periodically(
    effl0_bundle: Path, keys: KeyPaths, photos: list, caplog: pytest.LogCaptureFixture
) -> None:
    """20 inputs computed locally (no cloud at all): one INFO line about it, not one per input;
    the periodic warning still says the cloud is not being used."""
    cfg = config(effl0_bundle, free_port(), keys, cut="c06", fallback="local")
    items = [image_input(i, photos[i % len(photos)][0], photos[i % len(photos)][1]) for i in range(20)]
    with caplog.at_level(logging.DEBUG, logger="edgecut.edge.agent"):
        results = run_agent(cfg, items)
    assert [r.where for r in results] == ["local"] * 20
    records = [r for r in caplog.records if r.name == "edgecut.edge.agent"]
    info = [r for r in records if r.levelno == logging.INFO]
    assert 1 <= len(info) <= 2 and "locally" in info[-1].getMessage()
    assert sum("computing cut c06 locally" in r.getMessage() for r in records) == 20  # rest at DEBUG
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert sum("requests meant for the cloud were all computed locally" in w for w in warnings) == 4


def test_wrong_server_key_is_one_clear_error(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, tmp_path: Path
) -> None:
    other = generate_keys(tmp_path / "other")
    with tail_server() as server, pytest.raises(SealError, match=r"^wrong server key: "):
        run_agent(config(effl0_bundle, server.port, other, cut="c06"), [])


def test_server_lacks_the_model_version(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, tmp_path: Path
) -> None:
    v2 = tmp_path / "effl0-v2"
    shutil.copytree(effl0_bundle, v2)
    write_manifest(v2, dataclasses.replace(load_bundle(v2).manifest, version="2"))
    with tail_server() as server, pytest.raises(NotFoundError) as err:
        run_agent(config(v2, server.port, keys, cut="c06"), [])
    assert str(err.value).endswith(
        "has no model 'efficientnet-lite0' version '2' (serves: efficientnet-lite0:1)"
    )


def test_cli_bad_inputs_get_one_line_each(
    effl0_bundle: Path,
    keys: KeyPaths,
    tail_server: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each bad input is one result line, and its path appears once (in the line and the warning),
    not once from the image loader and again from the agent."""
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for name, im in sample_photos()[:2]:
        Image.fromarray(im).save(photos_dir / f"{name}.png")
    (photos_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 32, 32), np.float32))
    with tail_server() as server:
        code = main(
            [
                "edge",
                "run",
                "--bundle",
                str(effl0_bundle),
                "--server",
                f"127.0.0.1:{server.port}",
                "--server-key",
                str(keys.service_pub),
                "--source",
                str(photos_dir),
                "--cut",
                "c06",
                "--json",
            ]
        )
        captured = capsys.readouterr()
        lines = [json.loads(x) for x in captured.out.splitlines()]
        assert code == 1 and len(lines) == 3
        bad = [x for x in lines if x["where"] == "failed"]
        broken = str(photos_dir / "broken.jpg")
        assert len(bad) == 1 and bad[0]["input"] == broken
        assert bad[0]["error"] == "not a readable image (UnidentifiedImageError)"
        logged = "".join(captured.err.split())  # the log console may wrap a long line
        assert logged.count("broken.jpg") == 1 and "notareadableimage" in logged, captured.err
        assert all(x["top5"] and x["top5"][0]["label"] for x in lines if x["where"] == "cloud")

        code = main(
            [
                "edge",
                "run",
                "--bundle",
                str(effl0_bundle),
                "--server",
                f"127.0.0.1:{server.port}",
                "--server-key",
                str(keys.service_pub),
                "--source",
                str(tmp_path / "wrong.npy"),
                "--cut",
                "c06",
            ]
        )
    out = capsys.readouterr().out.strip()
    assert code == 1 and out.count("\n") == 0 and "the model needs float32[1, 3, 224, 224]" in out
    assert out.count("wrong.npy") == 1, out


def test_auto_cut_plans_and_says_so(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, photos: list, reference: list[int]
) -> None:
    with tail_server() as server:
        results = run_agent(
            config(effl0_bundle, server.port, keys, cut="auto", min_cut=2), inputs(photos[:6])
        )
    exactly_once(results, 6)
    assert all(r.cut_mode == "auto" and r.where in ("cloud", "local") for r in results)
    assert all(load_bundle(effl0_bundle).manifest.cut(r.cut or "").depth >= 2 for r in results)
    assert all(r.top5[0][0] == reference[r.position] for r in results)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_drains_in_flight_and_exits_cleanly(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    image = tmp_path / "chelsea.png"
    Image.fromarray(sample_photos()[0][1]).save(image)
    with tail_server() as server:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgecut.cli",
                "edge",
                "run",
                "--bundle",
                str(effl0_bundle),
                "--server",
                f"127.0.0.1:{server.port}",
                "--server-key",
                str(keys.service_pub),
                "--source",
                "-",
                "--cut",
                "c06",
                "--json",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert agent.stdin is not None and agent.stdout is not None
        for _ in range(40):  # more than in flight: the agent is mid-stream when signalled
            agent.stdin.write(f"{image}\n")
        agent.stdin.flush()
        lines = [agent.stdout.readline() for _ in range(3)]
        agent.send_signal(sig)
        out, err = agent.communicate(timeout=30)  # also closes stdin
    positions = [json.loads(x)["position"] for x in lines + out.splitlines()]
    assert agent.returncode == 130, err[-1000:]
    assert positions == list(range(len(positions))), "each started input answered once, in order"
    assert "finishing" in err or len(positions) == 40


def test_stdin_source_reads_paths(tmp_path: Path) -> None:
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.npy")]
    items = list(open_source(["-"], io.StringIO("\n".join(paths) + "\n\n")))
    assert [(i.position, i.name) for i in items] == [(0, paths[0]), (1, paths[1])]


def test_video_source_without_opencv_is_a_clear_error() -> None:
    try:
        import cv2  # noqa: F401
    except ModuleNotFoundError:
        from edgecut.errors import DependencyError

        with pytest.raises(DependencyError, match="needs OpenCV"):
            list(open_source(["camera:0"], io.StringIO()))
    else:
        pytest.skip("OpenCV is installed here")


def test_edge_import_path_pulls_no_torch_onnx_cloud_or_partition() -> None:
    code = (
        "import sys, edgecut.edge.agent, edgecut.edge.cli, edgecut.edge.session, "
        "edgecut.edge.runner, edgecut.edge.cutchoice, edgecut.planner; "
        "bad = [m for m in sys.modules if m == 'torch' or m == 'onnx' or "
        "m.startswith(('torch.', 'onnx.', 'edgecut.cloud', 'edgecut.partition'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_demo_runs_end_to_end(
    effl0_bundle: Path, tmp_path: Path, photos: list[tuple[str, np.ndarray]], reference: list[int]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(effl0_bundle, cache / "edgecut" / "bundles" / "effl0")  # reused, not rebuilt
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgecut.cli", "demo"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = load_bundle(effl0_bundle).labels()
    cat = reference[[name for name, _ in photos].index("chelsea")]  # the demo's first photo, the cat
    assert (labels[cat] if labels else f"class {cat}") in proc.stdout
    assert "21 results, 0 failed" in proc.stdout
