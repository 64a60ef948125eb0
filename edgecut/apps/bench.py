"""`edgecut bench sweep BUNDLE …`: flags → SweepConfig → measure → results, plots and a summary.

The work lives in `edgecut.apps.sweep`; this module only translates the command line, shows progress
on stderr (stdout stays clean for `--json`) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecut import credentials
from edgecut.flags import REMOVED_IN, add_renamed

if TYPE_CHECKING:
    from edgecut.apps.sweep.records import Measurement, RunInfo

log = logging.getLogger(__name__)

# --quick: a CI smoke test: one link, cloud-only + one inner cut + edge-only, two requests each
QUICK: dict[str, Any] = {"bandwidth": "32mbit", "rtt": "5ms", "requests": 2, "warmup": 1, "auto_warmup": 0}
DEFAULTS: dict[str, Any] = {
    "bandwidth": "0.5,2,8,32,128mbit",
    "rtt": "5,40ms",
    "requests": 10,
    "warmup": 2,
    "auto_warmup": 20,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_verb", metavar="COMMAND", required=True)
    p = sub.add_parser("sweep", help="measure every cut × codec × link through the real pipeline")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--out", type=Path, required=True, help="directory for results and plots")
    p.add_argument(
        "--bandwidth",
        help=f"each way, comma separated; bare numbers take the last unit (default {DEFAULTS['bandwidth']})",
    )
    p.add_argument("--rtt", help=f"added round-trip times (default {DEFAULTS['rtt']})")
    p.add_argument("--codec", default="int8,int4", help="codecs at inner cuts (default int8,int4)")
    p.add_argument(
        "--cuts",
        help="inner cuts to sweep, comma separated (default: 4 evenly "
        "spaced, the deepest included); input and output always run",
    )
    p.add_argument(
        "--edge-profile", type=Path, help="edge timings to plan with (default: the bundle's profiles/*.json)"
    )
    p.add_argument(
        "--pace",
        action="store_true",
        help="replay edge compute at the profile's speed (rows say paced:<device>)",
    )
    p.add_argument("--edge-threads", type=int, default=1, help="edge ORT threads (default 1)")
    p.add_argument(
        "--min-cut",
        default="",
        help="privacy: the planner and the shipped auto never use a cut shallower than this (cut id "
        "or depth); shallower grid cells, cloud-only included, are still measured for reference",
    )
    add_renamed(
        p,
        "--server",
        "--cloud",
        metavar="HOST:PORT",
        help="a running tail service (default: spawn one on 127.0.0.1 for the run)",
    )
    p.add_argument("--spawn-cloud", action=_SpawnIsDefault, nargs=0, help=argparse.SUPPRESS)
    p.add_argument("--server-key", type=Path, help="with --server: its service.pub")
    credentials.add_arguments(p.add_argument_group("with --server: TLS and device token"))
    add_renamed(
        p,
        "--server-threads",
        "--cloud-threads",
        type=int,
        default=1,
        help="ORT threads of a spawned service (default 1; 0 = all cores)",
    )
    p.add_argument("--images", type=Path, help="photos directory (default: scikit-image samples)")
    p.add_argument("--requests", type=int, help=f"timed requests per run (default {DEFAULTS['requests']})")
    p.add_argument("--warmup", type=int, help=f"untimed requests first (default {DEFAULTS['warmup']})")
    p.add_argument(
        "--auto-warmup",
        type=int,
        help="more untimed requests for the shipped auto first, per link: it tries each option "
        f"it has no figure for once before it settles (default {DEFAULTS['auto_warmup']})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 32mbit/5ms, input + one inner cut + output, 2 requests",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    r = sub.add_parser("report", help="redraw the plots and summary from a sweep's results.json")
    r.add_argument("out", type=Path, help="the sweep's output directory")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=run_report)


class _SpawnIsDefault(argparse.Action):
    """`--spawn-cloud` (0.1) asked for what happens anyway without --server: accepted, with a warning."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(
            f"warning: --spawn-cloud is deprecated and goes in {REMOVED_IN}: a service is spawned "
            "whenever --server is not given",
            file=sys.stderr,
        )


def config_from_args(args: argparse.Namespace) -> Any:
    from edgecut.apps.sweep.config import SweepConfig, inner_cuts, split_list
    from edgecut.bundle import load_bundle

    preset = QUICK if args.quick else DEFAULTS
    value = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    codecs = split_list(args.codec)
    cuts = split_list(args.cuts) if args.cuts else ()
    if args.quick:
        codecs = codecs[:1]
        if not cuts:
            inner = inner_cuts(load_bundle(args.bundle).manifest, ())
            cuts = tuple(inner[len(inner) // 2 : len(inner) // 2 + 1])
    return SweepConfig(
        bundle=args.bundle,
        out=args.out,
        bandwidths=split_list(value["bandwidth"]),
        rtts=split_list(value["rtt"]),
        codecs=codecs,
        cuts=cuts,
        edge_profile=args.edge_profile,
        pace=args.pace,
        edge_threads=args.edge_threads,
        cloud=args.server,
        server_key=args.server_key,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cloud_threads=args.server_threads,
        images=args.images,
        warmup=value["warmup"],
        auto_warmup=value["auto_warmup"],
        requests=value["requests"],
        min_cut=args.min_cut,
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgecut.apps.sweep import records
    from edgecut.apps.sweep.run import run_sweep

    cfg = config_from_args(args)
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=None)
        info, rows = run_sweep(
            cfg,
            start=lambda total: progress.update(task, total=total),
            tick=lambda what: progress.update(task, advance=1, description=what),
        )
    records.save_csv(rows, cfg.out / "results.csv")
    return publish(info, rows, cfg.out, args.json)


def run_report(args: argparse.Namespace) -> int:
    from edgecut.apps.sweep import records

    info, rows = records.load_json(args.out / "results.json")
    return publish(info, rows, args.out, args.json)


def publish(info: RunInfo, rows: list[Measurement], out: Path, as_json: bool) -> int:
    """Summary into results.json, the three PNGs, and the table (or JSON) on stdout.

    The PNGs need matplotlib (the `bench` extra), which the demo install lacks: without it the
    results and the summary still come out, and one warning says how to get the plots.
    """
    from edgecut.apps.sweep import plots, records, report
    from edgecut.console import stdout_console

    cells = report.cell_stats(rows)
    links = report.link_summaries(rows, cells)
    summary = report.summary_json(cells, links)
    records.save_json(info, summary, rows, out / "results.json")
    planned = "" if info.mode.startswith("paced") else f", planned with {info.edge_profile['device']}"
    subtitle = f"{info.model}, edge {info.mode}{planned}, cloud {info.cloud['threads']} thread(s)"
    can_plot = _can_plot()
    pngs = plots.save_all(cells, links, out, subtitle) if can_plot else []
    if as_json:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "run": {"mode": info.mode, "wall_s": info.wall_s},
                    **{k: summary[k] for k in ("totals", "links")},
                },
                indent=1,
            )
        )
    else:
        console = stdout_console()
        console.print(
            report.table(
                links,
                f"{info.model}: edge {info.mode}, cloud "
                f"{info.cloud['device']} — median of {info.requests} "
                "requests per run",
            )
        )
        for line in report.footer(summary["totals"]):
            console.print(line, highlight=False)
        console.print(
            f"{len(rows)} requests in {info.wall_s:.0f} s → {out}/results.csv, "
            + ", ".join(["results.json", *(p.name for p in pngs)]),
            highlight=False,
        )
    if not can_plot:
        print(
            "warning: plots skipped: matplotlib is not installed; "
            f'pip install "edgecut[bench]", then `edgecut bench report {out}` draws them',
            file=sys.stderr,
        )
    failed = summary["totals"]["failed_requests"]
    if failed:
        log.error("%d request(s) failed; see the error column of results.csv", failed)
    return 1 if failed else 0


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
