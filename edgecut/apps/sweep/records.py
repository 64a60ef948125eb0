"""The sweep's rows: one `Measurement` per request, plus what the run was, written as CSV and JSON.

A figure is only as good as the record of how it was made, so every row carries its mode ("live"
or "paced:<device>") and machine, and the JSON adds the command that reproduces the run.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgecut.errors import UsageError

ROLES = ("grid", "planner", "auto")  # a grid cell; the planner fed the true link, run as a fixed
# cut; the shipped agent on `--cut auto` (its own probes and estimates) through the same link


@dataclass(frozen=True)
class Link:
    """One emulated link setting (symmetric bandwidth, added round trip)."""

    bandwidth: str  # as the user wrote it, e.g. "8mbit"
    bandwidth_bps: float  # bits/s, each direction
    rtt_ms: float  # round-trip time added by the emulator, ms

    @property
    def label(self) -> str:
        return f"{self.bandwidth}/{self.rtt_ms:g}ms"


@dataclass(frozen=True)
class Cell:
    """What one run measures: a cut with a codec, as a grid cell or as the optimizer's choice."""

    cut: str  # cut id: "input" (cloud-only), "output" (edge-only) or an inner cut
    codec: str  # codec text; "jpeg90" at input, "none" at output
    role: str = "grid"  # one of ROLES

    @property
    def label(self) -> str:
        return f"{self.cut}/{self.codec}"


@dataclass(frozen=True)
class Measurement:
    """One request, end to end, as the edge agent saw it; times in ms, sizes in bytes."""

    bandwidth: str  # link setting, as given
    bandwidth_bps: float
    rtt_ms: float
    role: str  # one of ROLES
    cut: str
    codec: str
    request: int  # 0-based among the timed requests of this run (warm-up excluded)
    input: str  # image name
    where: str  # "cloud" | "local" (edge-only) | "failed"
    mode: str  # "live" or "paced:<device>": how edge compute was produced
    machine: str  # the machine that ran the edge side
    at: str  # ISO 8601 time the request finished
    edge_ms: float  # head segments (paced when mode says so)
    encode_ms: float  # quantize + compress + seal + queue on the stream
    wire_ms: float  # answer arrival − frames queued − server time: link, gRPC, framing
    server_queue_ms: float
    server_decode_ms: float  # open + decompress + dequantize on the tail
    server_compute_ms: float  # tail segments
    server_encode_ms: float  # answer encode + seal
    decode_ms: float  # opening + decoding the answer on the edge
    total_ms: float  # head start → decoded answer
    bytes_up: int  # sealed request bytes
    bytes_down: int  # sealed answer bytes
    top1: int  # class index the split pipeline answered (-1 when failed)
    top1_reference: int  # class index of the unsplit model on the same input
    predicted_ms: float  # planner's prediction for this (cut, codec) at this link
    error: str = ""  # why it failed, when it did
    chosen: str = ""  # role "auto": the cut/codec the shipped agent chose for this request
    predicted_edge_ms: float = math.nan  # the head's part of `predicted_ms` (replayed when paced)

    @property
    def ok(self) -> bool:
        return self.where != "failed"

    @property
    def agrees(self) -> bool:
        return self.ok and self.top1 == self.top1_reference

    @property
    def cell(self) -> Cell:
        return Cell(self.cut, self.codec, self.role)

    @property
    def link(self) -> Link:
        return Link(self.bandwidth, self.bandwidth_bps, self.rtt_ms)


@dataclass(frozen=True)
class RunInfo:
    """How the sweep was run: enough to reproduce it and to judge its figures."""

    command: str  # the edgecut command line that reproduces this run
    revision: str  # `git describe --always --dirty` of the code that ran
    packages: Mapping[str, str]  # versions of the packages the figures depend on
    started_at: str  # ISO 8601
    wall_s: float  # whole sweep, s
    machine: str
    mode: str  # "live" or "paced:<device>"
    bundle: str  # bundle directory
    model: str  # model id:version
    manifest_sha256: str
    edge_profile: Mapping[str, Any]  # device, mode, scale, source, path of the profile used
    edge_runtime: str  # runner name, e.g. "ort[cpu]x1 paced as pi4"
    cloud: Mapping[str, Any]  # address, spawned or not, device and threads
    link_emulator: str  # how the link is emulated
    warmup: int  # requests per run excluded from every figure
    requests: int  # timed requests per run
    load_1min: tuple[float, ...] = ()  # load average at start, at each link, at the end
    pacing: str = ""  # what was paced and how ("" in results from before codec pacing)
    auto_warmup: int = 0  # untimed requests the shipped auto had first, per link


def save_csv(rows: Sequence[Measurement], path: Path) -> None:
    """Every measurement, one row each, columns in field order."""
    names = [f.name for f in fields(Measurement)]
    with _open(path) as out:
        writer = csv.DictWriter(out, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _round(v) for k, v in asdict(row).items()})


def save_json(info: RunInfo, summary: Mapping[str, Any], rows: Sequence[Measurement], path: Path) -> None:
    """The run description, the summary figures and every measurement, in one file."""
    head = json.dumps({"run": asdict(info), "summary": summary}, indent=1, allow_nan=False, default=str)
    # One compact line per measurement: a tenth of the size, and still diffable line by line.
    lines = [json.dumps({k: _round(v) for k, v in asdict(r).items()}, allow_nan=False) for r in rows]
    with _open(path) as out:
        out.write(head[:-2] + ',\n "measurements": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")


def load_json(path: Path) -> tuple[RunInfo, list[Measurement]]:
    """Read back `results.json`, to redraw plots and the summary without measuring again."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        fields_ = {"revision": "not recorded", "packages": {}, **doc["run"]}  # older results
        run = RunInfo(**{**fields_, "load_1min": tuple(doc["run"].get("load_1min", ()))})
        return run, [_measurement(m) for m in doc["measurements"]]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a sweep's results.json ({exc})") from None


def _measurement(d: dict[str, Any]) -> Measurement:
    """JSON has no NaN: a time written as null (a failed request's) comes back as NaN."""
    values: dict[str, Any] = {k: math.nan if v is None else v for k, v in d.items()}
    return Measurement(**values)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def _open(path: Path) -> Any:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
