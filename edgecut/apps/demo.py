"""`edgecut demo`: split inference of real photos through a local tail service, in one command.

Partitions EfficientNet-Lite0 (cached and re-verified on later runs), generates throwaway keys,
starts the tail service as a separate process on a free loopback port, runs the edge agent on the
photos shipped with scikit-image at three cuts, prints what each cost, and stops the service.
Everything heavy (torch for partitioning, the cloud package) is imported inside functions: this
module is the one place where edge and cloud meet, and only as two processes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from edgecut.bundle import Bundle, load_bundle
from edgecut.cloud.spawn import tail_service
from edgecut.console import stdout_console
from edgecut.errors import EdgecutError

if TYPE_CHECKING:
    from edgecut.edge.agent import Result

log = logging.getLogger(__name__)

MODEL = "efficientnet-lite0"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecut" / "bundles"


def cached_bundle(root: Path) -> Bundle:
    """The demo bundle under `root/effl0`: reused if it verifies, (re)built otherwise."""
    target = root / "effl0"
    if (target / "manifest.json").exists():
        try:
            return load_bundle(target)
        except EdgecutError as exc:
            log.warning("cached bundle unusable (%s): rebuilding", exc)
    from edgecut.partition.build import partition
    from edgecut.partition.load import load_model

    bundle = partition(load_model(MODEL), target, force=True)
    try:
        from edgecut.partition.calibrate import calibrate_bundle
    except ImportError:
        return bundle
    # A light calibration (int8 only, 16 + 16 photos: ~2 s) keeps the demo well under a minute;
    # `edgecut partition --calibrate builtin` does the full one.
    calibrate_bundle(bundle, "builtin", calib_count=16, heldout_count=16, codecs=["int8"])
    return load_bundle(target)


def _runs(bundle: Bundle) -> list[tuple[str, str]]:
    """Three cuts: the cloud-only JPEG baseline, a middle cut and the deepest one, int8."""
    inner = [c.id for c in bundle.manifest.cuts[1:-1]]
    return [("input", "jpeg90"), (inner[len(inner) // 2], "int8"), (inner[-1], "int8")]


def run_demo(console: Console) -> list[Result]:
    """Do the whole demo and return the agent's results (for the table)."""
    from edgecut.edge.agent import image_input
    from edgecut.edge.startup import EdgeConfig, start_agent
    from edgecut.images import HELDOUT_PHOTOS, sample_photos
    from edgecut.keys import generate_keys

    with console.status("partitioning EfficientNet-Lite0 (cached after the first run)…"):
        bundle = cached_bundle(cache_dir())
    console.log(f"bundle {bundle.name}: {len(bundle.manifest.cuts)} cuts at {bundle.root}")
    # The cat first, then the photos calibration never saw: seven rows per cut, not all 17 photos.
    photos = sample_photos(("chelsea", *HELDOUT_PHOTOS))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="edgecut-demo-") as tmp, contextlib.ExitStack() as stack:
        keys = generate_keys(Path(tmp) / "keys")
        with console.status("starting the tail service (loads and warms up the bundle)…"):
            address = stack.enter_context(tail_service(bundle.root.parent, keys.service_key))
        console.log(f"tail service listening on {address} (a separate process)")
        for cut, codec_name in _runs(bundle):
            # One request at a time, so each row is one request's latency, not queueing.
            config = EdgeConfig(
                bundle=bundle.root,
                server=address,
                server_key=keys.service_pub,
                cut=cut,
                codec=codec_name,
                fallback="fail",
                in_flight=1,
            )
            with console.status(f"edge agent at cut {cut} ({codec_name})…"), start_agent(config) as agent:
                agent.run([image_input(0, *photos[0])], lambda r: None)  # warm-up, not shown
                agent.run([image_input(i, n, im) for i, (n, im) in enumerate(photos)], results.append)
        console.log("stopping the tail service")
    return results


def table(results: list[Result]) -> Table:
    t = Table(
        title="edgecut demo: EfficientNet-Lite0 split between this process and a tail service on loopback"
    )
    for name in (
        "image",
        "top-1",
        "cut",
        "codec",
        "where",
        "bytes up",
        "edge ms",
        "wire ms",
        "server ms",
        "total ms",
    ):
        t.add_column(name, justify="right" if "ms" in name or "bytes" in name else "left")
    for r in results:
        tm = r.timings_ms
        label = (
            "error: " + (r.error or "") if r.where == "failed" else (r.top5[0][1] or f"class {r.top5[0][0]}")
        )
        t.add_row(
            r.input,
            label,
            r.cut or "",
            r.codec or "",
            r.where,
            f"{r.bytes_up:,}",
            f"{tm.get('edge_ms', 0):.1f}",
            f"{tm.get('wire_ms', 0):.1f}",
            f"{tm.get('server_ms', 0):.1f}",
            f"{tm.get('total_ms', 0):.1f}",
        )
    return t


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = stdout_console()
    t0 = time.perf_counter()
    logging.getLogger("edgecut.edge.session").setLevel(logging.WARNING)  # one "connected" per cut
    results = run_demo(console)
    console.print(table(results))
    failed = sum(1 for r in results if r.where == "failed")
    console.print(
        f"{len(results)} results, {failed} failed, in {time.perf_counter() - t0:.1f} s. "
        "One request in flight, after one warm-up request per cut; live timings on this "
        "machine (edge and tail share its cores). Bytes up are sealed frames."
    )
    return 1 if failed else 0
