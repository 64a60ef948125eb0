"""`edgecut plan BUNDLE --edge-profile P (--server HOST:PORT | --server-profile P) --bandwidth 8mbit`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from edgecut import credentials, serverinfo
from edgecut.bundle import Manifest
from edgecut.console import stdout_console
from edgecut.flags import add_renamed, comma_list
from edgecut.planner import Constraints, Plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--edge-profile", type=Path, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    add_renamed(where, "--server", "--cloud", metavar="HOST:PORT", help="ask a tail service (ServerInfo)")
    add_renamed(
        where, "--server-profile", "--cloud-profile", type=Path, help="a profile recorded on the server"
    )
    credentials.add_arguments(p.add_argument_group("with --server: TLS and device token"))
    p.add_argument("--bandwidth", required=True, help="e.g. 8mbit, 512kbit (both directions)")
    p.add_argument("--rtt", default="0ms", help="round-trip time, e.g. 40ms")
    p.add_argument("--queue-ms", type=float, default=0.0, help="server queue delay to assume")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument(
        "--min-cut",
        default="0",
        help="privacy: never a cut shallower than this (cut id or depth; raw input never leaves the device)",
    )
    p.add_argument(
        "--codec",
        default="int8-channel",
        help="codecs to compare, comma separated, tried at every cut (the input also tries jpeg90 unless an "
        "image codec is given)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        default="1%",
        help="top-1 disagreement budget by the bundle's fidelity table, e.g. 0.5%% (default 1%%); "
        "'off' also allows options the table does not cover",
    )
    p.add_argument(
        "--key-suite",
        default="x25519",
        choices=["x25519", "mlkem768-x25519"],
        help="with --server-profile: the service key's suite (sets the seal overhead; --server asks)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="edge head precision(s): float, int8, or auto (float + every head the bundle offers)",
    )
    p.add_argument("--max-edge-mem", type=int, help="bytes of segment weights the edge may hold")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecut.bundle import load_bundle
    from edgecut.costs import cloud_times_from, cut_costs
    from edgecut.netem import LinkConfig
    from edgecut.planner import LinkEstimate, parse_accuracy_budget, plan
    from edgecut.profile import load_profile

    bundle = load_bundle(args.bundle)
    link = LinkConfig.parse(args.bandwidth, args.rtt)
    if args.server_profile:
        cloud, suite = cloud_times_from(load_profile(args.server_profile)), args.key_suite
    else:
        info = serverinfo.ask(
            args.server,
            bundle.manifest.model,
            bundle.manifest.version,
            credentials=credentials.from_args(args),
        )
        cloud, suite = info.times, info.key_suite
    precisions = _precisions(bundle.manifest, args.precision)
    costs = cut_costs(
        bundle, load_profile(args.edge_profile), cloud, comma_list(args.codec), precisions, suite=suite
    )
    min_depth = bundle.manifest.depth_of(args.min_cut)
    constraints = Constraints(min_depth, args.max_edge_mem, parse_accuracy_budget(args.max_accuracy_drop))
    result = plan(
        costs,
        LinkEstimate(link.up_bps or 1e12, link.down_bps or 1e12, link.rtt_ms, args.queue_ms),
        constraints,
        args.objective,
    )
    if args.json:
        print(json.dumps(plan_json(result, constraints), indent=1))
    else:
        console = stdout_console()
        console.print(plan_table(result))
        console.print(budget_note(result, constraints))
    return 0


def _precisions(m: Manifest, text: str) -> tuple[str, ...]:
    from edgecut.variants import FLOAT, check_precision, head_variants

    if text == "auto":
        return (FLOAT, *head_variants(m))
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    for name in names:
        check_precision(m, name)
    return names


def budget_note(result: Plan, constraints: Constraints) -> str:
    """One line on the accuracy budget: its value, and options it excluded for lack of a row."""
    budget = constraints.max_accuracy_drop
    if budget is None:
        return "accuracy budget: off (options without a fidelity row are allowed, accuracy unknown)"
    unknown = sum(1 for r in result.rows if r.cost.accuracy_drop is None)
    note = f"accuracy budget: top-1 disagreement <= {budget:.2%} by the bundle's fidelity table"
    if unknown:
        note += (
            f"; {unknown} option(s) without a fidelity row excluded as unknown "
            "(--max-accuracy-drop off allows them)"
        )
    return note


def agreement_text(drop: float | None) -> str:
    return "?" if drop is None else f"{1 - drop:.1%}"


def plan_json(result: Plan, constraints: Constraints | None = None) -> dict[str, object]:
    budget = constraints.max_accuracy_drop if constraints else None
    return {
        "objective": result.objective,
        "max_accuracy_drop": budget,
        "chosen": {
            "cut": result.chosen.cost.cut,
            "precision": result.chosen.cost.precision,
            "codec": result.chosen.cost.codec,
        },
        "rows": [
            {
                "cut": r.cost.cut,
                "precision": r.cost.precision,
                "codec": r.cost.codec,
                "predicted_ms": r.predicted_ms,
                "stages_ms": dict(r.stages_ms),
                "bytes_up": r.cost.bytes_up,
                "agreement": None if r.cost.accuracy_drop is None else 1 - r.cost.accuracy_drop,
                "allowed": r.allowed,
                "reason": r.reason,
            }
            for r in result.rows
        ],
    }


def plan_table(result: Plan) -> Table:
    t = Table(title=f"predicted {result.objective} per cut — {result.link}")
    for col in (
        "",
        "cut",
        "precision",
        "codec",
        "edge",
        "encode",
        "up",
        "rtt",
        "queue",
        "cloud",
        "down",
        "total ms",
        "bytes up",
        "agree",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("", "cut", "precision", "codec", "note") else "right")
    for r in result.rows:
        mark = "→" if r is result.chosen else ""
        s = r.stages_ms
        t.add_row(
            mark,
            r.cost.cut,
            r.cost.precision,
            r.cost.codec,
            *(f"{s[k]:.1f}" for k in ("edge", "encode", "up", "rtt", "queue", "cloud", "down")),
            f"{r.predicted_ms:.1f}",
            str(r.cost.bytes_up),
            agreement_text(r.cost.accuracy_drop),
            r.reason,
            style="bold green" if mark else ("dim" if not r.allowed else None),
        )
    return t
