"""`edgecut inspect BUNDLE`: what a bundle offers, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from edgecut.bundle import Bundle, load_bundle
from edgecut.console import stdout_console
from edgecut.flags import add_renamed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--fidelity", action="store_true", help="show codec fidelity per cut")
    add_renamed(
        p, "--signing-pub", "--key", type=Path, help="bundle-signing public key: also verify the signature"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = None
    if args.signing_pub is not None:
        from edgecut.keys import load_signing_public

        key = load_signing_public(args.signing_pub)
    bundle = load_bundle(args.bundle, public_key=key)
    if args.json:
        m = bundle.manifest.to_json()
        print(
            json.dumps(
                {k: m[k] for k in ("model", "version", "cuts", "verification", "fidelity")}
                | {"variants": m.get("variants", []), "encryption": _encryption(m.get("encryption"))}
                | {"signed": bundle.signed},
                indent=1,
            )
        )
        return 0
    console = stdout_console()
    console.print(cuts_table(bundle))
    if args.fidelity:
        console.print(fidelity_table(bundle))
    for variant in bundle.manifest.variants:
        console.print(variant_table(variant))
    return 0


def _encryption(section: dict | None) -> dict | None:
    """What `--json` says about encryption: who can open it and which files (no key material)."""
    if not section:
        return None
    return {k: section[k] for k in ("scheme", "suite", "key_id")} | {"files": sorted(section["files"])}


def variant_table(variant: Mapping[str, Any]) -> Table:
    t = Table(
        title=f"{variant['precision']} edge heads — agreement on {variant['heldout_samples']} held-out "
        f"samples of {variant['heldout_photos']} photos, budget {100 * float(variant['budget']):.1f} %"
    )
    for col in ("cut", "float ms (1t)", f"{variant['precision']} ms (1t)", "bytes", "agreement", "offered"):
        t.add_column(col, justify="left" if col == "cut" else "right")
    p = str(variant["precision"])
    for c in variant["cuts"]:
        ms, size = c["edge_ms"], c["model_bytes"]
        t.add_row(
            str(c["cut"]),
            f"{ms['float']['1']:.2f}",
            f"{ms[p]['1']:.2f}",
            f"{_human(size['float'])} → {_human(size[p])}",
            f"{100 * float(c['agreement']):.1f} %",
            "yes" if c["offered"] else "no",
        )
    return t


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cuts_table(bundle: Bundle) -> Table:
    m = bundle.manifest
    v = m.verification
    title = (
        f"{bundle.name} — {len(m.cuts)} cuts, verified max |Δ| "
        f"{v.get('max_abs_diff', float('nan')):.2g}" + (", signature verified" if bundle.signed else "")
    )
    t = Table(title=title)
    for col in ("cut", "depth", "frontier", "fp32 bytes", "edge segments"):
        t.add_column(col, justify="right" if col in ("depth", "fp32 bytes") else "left")
    for c in m.cuts:
        frontier = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in c.frontier)
        t.add_row(c.id, str(c.depth), frontier, _human(c.bytes_fp32), str(len(m.head(c.id))))
    return t


def fidelity_table(bundle: Bundle) -> Table:
    """One row per (cut, codec). The headline is top-1 agreement on the held-out views where the
    unsplit model is confident; each row says how many views, confident views and photos it rests
    on. Bytes are also shown against JPEG q90 of the input, the cloud-only upload to beat."""
    rows = bundle.manifest.fidelity
    jpeg = next((r for r in rows if r["cut"] == "input" and r["codec"] == "jpeg90"), None)
    first = rows[0] if rows else {}
    basis = (
        f" — {first.get('views', first.get('samples', '?'))} views of {first.get('photos', '?')} "
        f"photos, {first.get('confident_views', '?')} confident"
    )
    t = Table(
        title="codec fidelity on held-out photos" + basis
        if rows
        else "no fidelity report (partition with --calibrate builtin)"
    )
    columns = ("cut", "codec", "bytes", "× jpeg90", "top-1 confident", "top-1 all", "mean KL", "top-5")
    for col in (*columns, "max |Δ logit|"):
        t.add_column(col, justify="left" if col in ("cut", "codec") else "right")
    for r in rows:
        t.add_row(
            str(r["cut"]),
            str(r["codec"]),
            _human(float(r["bytes"])),
            f"{float(r['bytes']) / float(jpeg['bytes']):.3f}" if jpeg else "–",
            _percent(r.get("agreement_confident"), r.get("confident_views")),
            _percent(r["agreement"], r.get("views", r.get("samples"))),
            _number(r.get("mean_kl")),
            _percent(r.get("top5_overlap"), None),
            f"{float(r['max_abs_error']):.3g}",
        )
    return t


def _percent(value: object, count: object) -> str:
    if value is None:
        return "–" if count is None else f"– (n={count})"
    text = f"{100 * float(str(value)):.1f} %"
    return text if count is None else f"{text} (n={count})"


def _number(value: object) -> str:
    return "–" if value is None else f"{float(str(value)):.3g}"
