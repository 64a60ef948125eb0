"""`edgecut edge run`: the agent on a device, from flags to one result line per input.

The setup (bundle, runtimes, session, cut choice) lives in `edgecut.edge.startup`; sources (a
directory, files, stdin paths, a video or a camera) and the output format live here because they
are the command line's business.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from edgecut.edge.agent import FALLBACKS, Agent, Input, Result, file_input, image_input
from edgecut.edge.runner import RUNTIMES
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import DependencyError, UsageError
from edgecut.images import list_images
from edgecut.planner import parse_accuracy_budget
from edgecut.runtime import tensorrt_options

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def open_source(specs: Sequence[str], stdin: TextIO) -> Iterator[Input]:
    """Inputs from `-` (paths on stdin), a video, `camera:N`, or any mix of directories and files."""
    if list(specs) == ["-"]:
        lines = (line.strip() for line in stdin)
        return (file_input(i, p) for i, p in enumerate(p for p in lines if p))
    streams = [s for s in specs if s == "-" or _is_stream(s)]
    if streams and len(specs) == 1:
        return _frames(specs[0])
    if streams:
        raise UsageError(
            f"--source {streams[0]} must be the only source (got {len(specs)})",
            hint="run one agent per video, camera or stdin",
        )
    paths: list[str] = []
    for spec in specs:
        paths += [str(p) for p in list_images(Path(spec))] if Path(spec).is_dir() else [spec]
    return (file_input(i, p) for i, p in enumerate(paths))


def _is_stream(spec: str) -> bool:
    return spec.startswith("camera:") or Path(spec).suffix.lower() in VIDEO_SUFFIXES


def _frames(spec: str) -> Iterator[Input]:
    try:
        import cv2
    except ModuleNotFoundError:
        raise DependencyError(
            f"reading '{spec}' needs OpenCV, which is not installed",
            hint="pip install opencv-python-headless",
        ) from None
    device = spec.split(":", 1)[1] if spec.startswith("camera:") else None
    capture = cv2.VideoCapture(int(device) if device is not None else spec)
    if not capture.isOpened():
        raise UsageError(f"cannot open '{spec}'")
    return _read_frames(capture, spec, cv2.COLOR_BGR2RGB, cv2.cvtColor)


def _read_frames(capture: object, spec: str, code: int, convert: object) -> Iterator[Input]:
    position = 0
    try:
        while True:
            ok, frame = capture.read()  # type: ignore[attr-defined]
            if not ok:
                return
            rgb = np.ascontiguousarray(convert(frame, code))  # type: ignore[operator]
            yield image_input(position, f"{spec}#{position}", rgb)
            position += 1
    finally:
        capture.release()  # type: ignore[attr-defined]


def format_result(r: Result) -> str:
    """One human line per result."""
    if r.where == "failed":
        return f"{r.input}: error: {r.error}"
    t = r.timings_ms
    best = r.top5[0] if r.top5 else None
    label = (best[1] or f"class {best[0]}") if best else "?"
    prob = f" ({best[2]:.2f})" if best else ""
    parts = [
        f"{r.input}: {label}{prob}",
        f"cut {r.cut}/{r.codec} ({r.cut_mode})",
        r.where,
        f"total {t.get('total_ms', 0):.1f} ms",
        f"edge {t.get('edge_ms', 0):.1f}",
    ]
    if r.where == "cloud":
        parts += [f"wire {t['wire_ms']:.1f}", f"server {t['server_ms']:.1f}", f"up {r.bytes_up} B"]
    if r.error:
        parts.append(f"(cloud: {r.error})")
    return "  ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="edge_verb", metavar="COMMAND", required=True)
    p = sub.add_parser("run", help="classify inputs, splitting the model with a tail service")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    p.add_argument(
        "--server",
        help="tail service HOST:PORT, several (replicas: HOST:PORT,HOST:PORT) or a gRPC target "
        "(ipv4:…, dns:///NAME:PORT); omit with --cut output",
    )
    p.add_argument("--server-key", type=Path, help="the tail service's service.pub")
    p.add_argument(
        "--source",
        nargs="+",
        required=True,
        help="a directory, files, '-' (paths on stdin), a video file or camera:N",
    )
    p.add_argument("--cut", default="auto", help="cut id, or 'auto' (planner; default)")
    p.add_argument("--codec", default="int8", help="one codec: int8 (default), int4, fp16, none, jpeg90, …")
    p.add_argument("--runtime", choices=RUNTIMES, default="ort", help="head runtime")
    p.add_argument(
        "--providers", default="cpu", help="comma-separated ORT providers: cpu, xnnpack, cuda, tensorrt"
    )
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0 = default)")
    p.add_argument("--in-flight", type=int, default=4, help="requests outstanding (default 4)")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="local",
        help="when the cloud cannot answer: compute locally, or retry once then fail",
    )
    p.add_argument("--deadline-ms", type=int, default=2000, help="per request (default 2000)")
    p.add_argument("--min-cut", default="0", help="never cut shallower than this cut id or depth")
    p.add_argument(
        "--max-accuracy-drop",
        default="1%",
        help="auto: top-1 disagreement budget by the bundle's fidelity table (default 1%%; 'off' also "
        "allows options the table does not cover); a fixed --cut over it gets a warning",
    )
    p.add_argument("--edge-profile", type=Path, help="auto: edge timings from this profile")
    p.add_argument("--signing-pub", type=Path, help="require a bundle signed with this key")
    p.add_argument(
        "--token", default=os.environ.get("EDGECUT_TOKEN"), help="device token (default: $EDGECUT_TOKEN)"
    )
    p.add_argument("--tls-ca", type=Path, help="PEM roots: use TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mTLS")
    p.add_argument("--tls-key", type=Path, help="client key for mTLS")
    p.add_argument("--trt-cache", metavar="DIR", help="TensorRT: cache built engines in DIR (Jetson)")
    p.add_argument("--trt-fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    p.add_argument("--device-key", type=Path, help="device.key: open a bundle encrypted for this device")
    p.add_argument(
        "--precision",
        choices=("float", "int8", "auto"),
        default="float",
        help="edge head precision: int8 needs an int8 head in the bundle; auto lets the planner choose",
    )
    p.add_argument(
        "--answer",
        default="",
        metavar="top<k>|full",
        help="what the tail sends back (default: top5 for classifiers, else full)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per result")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    if "," in args.codec:
        raise UsageError(
            f"--codec {args.codec}: the agent sends with one codec",
            hint="compare several with `edgecut plan … --codec int8,int4` or `edgecut bench sweep`",
        )
    return EdgeConfig(
        bundle=args.bundle,
        server=args.server,
        server_key=args.server_key,
        cut=args.cut,
        codec=args.codec,
        runtime=args.runtime,
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        threads=args.threads,
        in_flight=args.in_flight,
        fallback=args.fallback,
        deadline_ms=args.deadline_ms,
        min_cut=args.min_cut,
        max_accuracy_drop=parse_accuracy_budget(args.max_accuracy_drop),
        edge_profile=args.edge_profile,
        signing_pub=args.signing_pub,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        device_key=args.device_key,
        precision=args.precision,
        provider_options=tensorrt_options(args.trt_cache, args.trt_fp16),
        answer=args.answer,
    )


def stop_on_signals(agent: Agent) -> None:
    """Ctrl-C and SIGTERM (systemd stop) stop reading inputs and drain the ones in flight.

    While the source is being read (it may block on stdin or a camera) the signal interrupts the
    read; anywhere else it only sets the agent's stop flag, so every started input still gets
    exactly one result. SIGINT is re-armed because shells start background jobs with it ignored.
    """

    def handler(signum: int, frame: object) -> None:
        if agent.reading:
            raise KeyboardInterrupt
        agent.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    counts = dict.fromkeys(("cloud", "local", "failed"), 0)
    fallbacks = 0  # local answers to requests meant for the cloud

    def emit(result: Result) -> None:
        nonlocal fallbacks
        counts[result.where] += 1
        fallbacks += result.where == "local" and result.error is not None
        line = json.dumps(result.to_json()) if args.json else format_result(result)
        print(line, flush=True)

    sources = open_source(args.source, sys.stdin)
    with start_agent(config) as agent:
        stop_on_signals(agent)
        agent.run(sources, emit)
    # A run that never reached the cloud says so loudly: the local fallback would otherwise hide it.
    never = fallbacks > 0 and not counts["cloud"]
    log.log(
        logging.WARNING if never else logging.INFO,
        "%d input(s): %d cloud, %d local (%d of them fallbacks), %d failed%s",
        sum(counts.values()),
        counts["cloud"],
        counts["local"],
        fallbacks,
        counts["failed"],
        " — every request meant for the cloud was computed locally" if never else "",
    )
    if agent.interrupted:
        return 130
    return 1 if counts["failed"] else 0
