"""A new user's papercuts: each bad input ends in one `error:` line and a non-zero exit, never a
traceback; renamed flags keep their 0.1 spelling with a warning; Ctrl-C exits 130 everywhere.

Tiny real ONNX models and real subprocesses (for missing extras, signals and busy ports).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgecut.cli import build_parser, main
from edgecut.cloud.spawn import tail_process
from edgecut.edge.cli import open_source
from edgecut.edge.profile_cli import warn_oversubscribed
from edgecut.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "effl0" / "this-machine-1t" / "results.json"


def _tiny(path: Path, external: bool = False) -> Path:
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if external:
        onnx.save(
            model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
        )
    else:
        onnx.save(model, str(path))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cli(*argv: str, hide: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`edgecut …` in a fresh interpreter where the modules in `hide` cannot be imported."""
    code = f"import sys\nfor m in {list(hide)!r}: sys.modules[m] = None\nfrom edgecut.cli import main\n"
    code += f"sys.exit(main({list(argv)!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, Path]:
    """(bundles directory holding one tiny bundle, service.key)."""
    assert (
        main(["partition", str(_tiny(tmp_path / "tiny.onnx")), "-o", str(tmp_path / "bundles" / "tiny")]) == 0
    )
    assert main(["keys", "gen", "--out", str(tmp_path / "keys")]) == 0
    return tmp_path / "bundles", tmp_path / "keys" / "service.key"


# --- one vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "dest", "new"),
    [
        (
            ["plan", "b", "--edge-profile", "p", "--bandwidth", "8mbit", "--cloud", "h:1"],
            "server",
            "--server",
        ),
        (
            ["plan", "b", "--edge-profile", "p", "--bandwidth", "8mbit", "--cloud-profile", "c"],
            "server_profile",
            "--server-profile",
        ),
        (["bench", "sweep", "b", "--out", "o", "--cloud", "h:1"], "server", "--server"),
        (["bench", "sweep", "b", "--out", "o", "--cloud-threads", "2"], "server_threads", "--server-threads"),
        (["profile", "b", "--out", "o", "--codecs", "int8"], "codec", "--codec"),
        (["profile", "b", "--out", "o", "--device", "pi4"], "device_name", "--device-name"),
        (["cloud", "serve", "--key", "k"], "key", "--service-key"),
        (["inspect", "b", "--key", "k"], "signing_pub", "--signing-pub"),
    ],
)
def test_old_spellings_still_parse_with_one_warning(
    argv: list[str], dest: str, new: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser(argv).parse_args(argv)
    assert getattr(args, dest) not in (None, "")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"use {new}" in err and "deprecated" in err


def test_new_spellings_parse_silently(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "plan",
        "b",
        "--edge-profile",
        "p",
        "--bandwidth",
        "8mbit",
        "--server",
        "h:1",
        "--codec",
        "int8,int4",
    ]
    assert build_parser(argv).parse_args(argv).server == "h:1"
    argv = ["bench", "sweep", "b", "--out", "o", "--spawn-cloud"]
    build_parser(argv).parse_args(argv)
    assert "--spawn-cloud is deprecated" in capsys.readouterr().err  # a no-op: spawning is the default
    argv = ["cloud", "serve", "--service-key", "k", "--device", "cpu"]
    assert build_parser(argv).parse_args(argv).key == [Path("k")]  # repeatable: a rotation holds several
    assert capsys.readouterr().err == ""


def test_verbose_is_accepted_after_the_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["partition", str(_tiny(tmp_path / "m.onnx")), "-o", str(tmp_path / "b")]) == 0
    assert main(["inspect", str(tmp_path / "b"), "-v", "--json"]) == 0
    assert main(["inspect", "-v", str(tmp_path / "b")]) == 0
    code, _, err = _run(capsys, "inspect", str(tmp_path / "nope"), "--verbose")
    assert code == 1 and "error: " in err and "Traceback" in err  # -v shows the traceback


def test_edge_run_takes_one_codec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["edge", "run", "--bundle", str(tmp_path), "--source", str(tmp_path), "--codec", "int8,int4"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "one codec" in _one_error(err) and "hint:" in err


# --- bad inputs: one line, no traceback ---------------------------------------------------------


def test_onnx_whose_external_data_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny(tmp_path / "m.onnx", external=True)
    assert main(["partition", str(model), "-o", str(tmp_path / "ok")]) == 0  # beside it: fine
    (tmp_path / "m.onnx.data").unlink()
    code, _, err = _run(capsys, "partition", str(model), "-o", str(tmp_path / "b"))
    assert code == 1 and "m.onnx.data" in _one_error(err) and "hint:" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("argv", "hide", "extra"),
    [
        (["partition", "efficientnet-lite0", "-o", "out"], ("torch", "onnx"), "partition"),
        (
            ["cloud", "serve", "--bundles", ".", "--service-key", "k"],
            ("prometheus_client", "grpc_health"),
            "cloud",
        ),
    ],
    ids=["partition", "cloud-serve"],
)
def test_a_verb_without_its_extra_names_the_extra(
    argv: list[str], hide: tuple[str, ...], extra: str, tmp_path: Path
) -> None:
    proc = _cli(*[str(tmp_path / a) if a in ("out", ".") else a for a in argv], hide=hide)
    assert proc.returncode == 1
    assert "not installed" in _one_error(proc.stderr)
    assert f'pip install "edgecut[{extra}]"' in proc.stderr


def test_bench_report_without_matplotlib_keeps_the_summary(tmp_path: Path) -> None:
    shutil.copy(RESULTS, tmp_path / "results.json")
    proc = _cli("bench", "report", str(tmp_path), hide=("matplotlib",))
    assert proc.returncode == 0, proc.stderr
    assert "failed requests" in proc.stdout  # the summary table and footer came out
    assert 'warning: plots skipped: matplotlib is not installed; pip install "edgecut[bench]"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "results.json").stat().st_size > 0 and not list(tmp_path.glob("*.png"))


def test_several_source_directories_and_files(tmp_path: Path) -> None:
    for name in ("a/1.png", "a/2.jpg", "b/3.png", "c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    inputs = list(
        open_source([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c.png")], io.StringIO())
    )
    assert [Path(i.name).name for i in inputs] == ["1.png", "2.jpg", "3.png", "c.png"]
    assert [i.position for i in inputs] == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="only source"):
        open_source(["camera:0", str(tmp_path / "a")], io.StringIO())
    with pytest.raises(UsageError, match="no images"):
        open_source([str(tmp_path / "a"), str(tmp_path / "empty")], io.StringIO()) if (
            tmp_path / "empty"
        ).mkdir() is None else None


def test_torch_factory_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "my_factory.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.zeros(1, 8)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_factory", raising=False)
    assert main(["partition", "my_factory:make", "-o", str(tmp_path / "b")]) == 0
    code, _, err = _run(capsys, "partition", "no_such_factory:make", "-o", str(tmp_path / "c"))
    assert code == 2 and "no_such_factory" in _one_error(err) and "hint:" in err


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA"
)
def test_device_cuda_without_cuda_is_refused(
    served: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundles, key = served
    code, out, err = _run(
        capsys, "cloud", "serve", "--bundles", str(bundles), "--service-key", str(key), "--device", "cuda"
    )
    assert code == 1 and "--device cuda" in _one_error(err) and "onnxruntime-gpu" in err
    assert "listening" not in out


def test_calibrate_inputs_are_checked_before_partitioning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(_tiny(tmp_path / "m.onnx"))
    out = str(tmp_path / "b")
    code, _, err = _run(capsys, "partition", model, "-o", out, "--calibrate", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in _one_error(err)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.jpg").write_text("not a photo")
    code, _, err = _run(capsys, "partition", model, "-o", out, "--calibrate", str(tmp_path / "photos"))
    assert code == 1 and "broken.jpg" in _one_error(err)
    code, _, err = _run(capsys, "partition", model, "-o", out, "--calibrate", "builtin")
    assert code == 2 and "takes tensors" in _one_error(err)
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_profile_warns_when_threads_exceed_cores(capsys: pytest.CaptureFixture[str]) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    warn_oversubscribed(cores)
    assert capsys.readouterr().err == ""
    warn_oversubscribed(cores + 2)
    err = capsys.readouterr().err
    assert f"--threads {cores + 2}" in err and f"{cores} core(s)" in err


# --- signals and ports ------------------------------------------------------------------------


def test_cloud_serve_ctrl_c_exits_130(served: tuple[Path, Path]) -> None:
    bundles, key = served
    with tail_process(bundles, key) as (process, _):
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130


# netem's Ctrl-C: tests/unit/test_netem.py::test_netem_prints_address_and_ctrl_c_exits_130
# a busy --metrics-port is covered by tests/integration/test_hardening.py (main's refusal)
