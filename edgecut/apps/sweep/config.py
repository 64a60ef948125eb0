"""What to sweep: links, cuts, codecs, inputs and the edge profile, validated before anything runs.

Every bad input is found here, before a service is spawned, and reported as one line: a bandwidth
such as `8mbps` (the emulator's parser says which units it accepts), an unknown cut or codec, a
bundle with no profile to plan from, an empty images directory.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecut import credentials
from edgecut.apps.sweep.records import Cell, Link
from edgecut.bundle import Bundle, Manifest
from edgecut.codec import CodecSpec
from edgecut.credentials import ClientCredentials
from edgecut.errors import ProfileError, UsageError
from edgecut.netem import parse_bandwidth, parse_duration_ms
from edgecut.profile import Profile, load_profile

log = logging.getLogger(__name__)

INNER_CUTS = 4  # inner cuts swept by default, evenly spaced, the deepest included
JPEG_BASELINE = "jpeg90"  # the cloud-only upload: what a device would send without edgecut


@dataclass(frozen=True)
class SweepConfig:
    """Everything `edgecut bench sweep` needs; flags map one to one."""

    bundle: Path  # bundle directory
    out: Path  # output directory for results.{csv,json} and the PNGs
    bandwidths: tuple[str, ...] = ("0.5mbit", "2mbit", "8mbit", "32mbit", "128mbit")  # each way
    rtts: tuple[str, ...] = ("5ms", "40ms")  # added round-trip times
    codecs: tuple[str, ...] = ("int8", "int4")  # codecs at inner cuts
    cuts: tuple[str, ...] = ()  # inner cuts to sweep; () = INNER_CUTS evenly spaced
    edge_profile: Path | None = None  # None = the bundle's own profiles/*.json (exactly one)
    pace: bool = False  # replay edge compute at the profile's speed (PacedRunner)
    edge_threads: int = 1  # ORT intra-op threads of the edge runner
    cloud: str | None = None  # HOST:PORT of a running tail service; None = spawn one
    server_key: Path | None = None  # that service's service.pub (with `cloud`)
    token: str | None = field(default=None, repr=False)  # with `cloud`: device token
    tls_ca: Path | None = None  # with `cloud`: PEM roots (TLS); tls_cert/tls_key: mTLS pair
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cloud_threads: int = 1  # ORT threads of a spawned service (0 = all cores); 1 leaves the
    # other core of a 2-core box to the edge, like two machines, and multi-threaded ORT stalls
    # whenever another process takes one of its cores
    images: Path | None = None  # directory of photos; None = scikit-image's sample photos
    warmup: int = 2  # requests per run excluded from the figures
    auto_warmup: int = 0  # more untimed requests for the shipped auto, before any run's: it
    # tries each option it has no figure for once, and settles only after that
    requests: int = 10  # timed requests per run
    min_cut: str = ""  # cut id or depth the planner and the shipped auto may not go below ("" = none)

    def __post_init__(self) -> None:
        if self.requests < 1 or self.warmup < 0 or self.auto_warmup < 0:
            raise UsageError(
                f"--requests must be >= 1, --warmup and --auto-warmup >= 0, got {self.requests}, "
                f"{self.warmup}, {self.auto_warmup}"
            )
        if self.cloud is None and (self.token or self.tls_ca or self.tls_cert or self.tls_key):
            raise UsageError("--token and --tls-* reach a running service: they need --server")
        if self.edge_threads < 0 or self.cloud_threads < 0:
            raise UsageError("thread counts must be >= 0")

    def credentials(self) -> ClientCredentials:
        """TLS and token for `cloud` (empty for a spawned service: plaintext on loopback)."""
        return credentials.from_files(self.token, self.tls_ca, self.tls_cert, self.tls_key)

    def links(self) -> list[Link]:
        """Every bandwidth × RTT pair, parsed (raises UsageError naming the bad one)."""
        return [
            Link(bw, parse_bandwidth(bw), parse_duration_ms(rtt))
            for bw in self.bandwidths
            for rtt in self.rtts
        ]

    def command(self) -> str:
        """The command line that reproduces this sweep."""
        args = [
            "edgecut",
            "bench",
            "sweep",
            str(self.bundle),
            "--bandwidth",
            ",".join(self.bandwidths),
            "--rtt",
            ",".join(self.rtts),
            "--codec",
            ",".join(self.codecs),
            "--requests",
            str(self.requests),
            "--warmup",
            str(self.warmup),
            "--auto-warmup",
            str(self.auto_warmup),
            "--edge-threads",
            str(self.edge_threads),
            "--out",
            str(self.out),
        ]
        if self.cuts:
            args += ["--cuts", ",".join(self.cuts)]
        if self.min_cut:
            args += ["--min-cut", self.min_cut]
        if self.edge_profile is not None:
            args += ["--edge-profile", str(self.edge_profile)]
        if self.pace:
            args.append("--pace")
        if self.cloud is not None:
            args += ["--server", self.cloud, "--server-key", str(self.server_key)]
            for flag, path in (
                ("--tls-ca", self.tls_ca),
                ("--tls-cert", self.tls_cert),
                ("--tls-key", self.tls_key),
            ):
                args += [flag, str(path)] if path is not None else []  # the token is never recorded
        else:
            args += ["--server-threads", str(self.cloud_threads)]
        if self.images is not None:
            args += ["--images", str(self.images)]
        return shlex.join(args)


def split_list(text: str) -> tuple[str, ...]:
    """'0.5,2,8mbit' → ('0.5mbit', '2mbit', '8mbit'): bare numbers take the last item's unit."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"empty list {text!r}")
    unit = re.sub(r"^[\d.]*\s*", "", items[-1])
    return tuple(item + unit if re.fullmatch(r"[\d.]+", item) else item for item in items)


def check_codecs(codecs: Sequence[str]) -> None:
    """Inner-cut codecs must parse, and JPEG is for images only (the input cut's baseline)."""
    for name in codecs:
        if CodecSpec.parse(name).is_image:
            raise UsageError(
                f"codec {name!r}: an image codec encodes images, so it is only used at the "
                "input cut (the cloud-only baseline, always swept); give inner-cut "
                "codecs such as int8, int4, fp16"
            )


def inner_cuts(manifest: Manifest, wanted: Sequence[str]) -> list[str]:
    """The inner cuts to sweep: the ones asked for (validated), or evenly spaced ones."""
    inner = [c.id for c in manifest.cuts[1:-1]]
    for cut in wanted:
        manifest.cut(cut)  # unknown → BundleError listing the cuts
    if wanted:
        return [c for c in inner if c in wanted]
    if len(inner) <= INNER_CUTS:
        return inner
    picks = np.linspace(0, len(inner) - 1, INNER_CUTS).round().astype(int)
    return [inner[i] for i in sorted(set(picks.tolist()))]


def grid(manifest: Manifest, cuts: Sequence[str], codecs: Sequence[str]) -> list[Cell]:
    """Cloud-only, the inner cuts × codecs, edge-only: the baselines are always in the grid."""
    first, last = manifest.cuts[0].id, manifest.cuts[-1].id
    cloud_only = [JPEG_BASELINE] if manifest.preprocess.kind == "image" else list(codecs)
    cells = [Cell(first, c) for c in cloud_only]
    cells += [Cell(cut, c) for cut in cuts if cut not in (first, last) for c in codecs]
    return [*cells, Cell(last, "none")]


def resolve_profile(bundle: Bundle, path: Path | None) -> tuple[Profile, Path]:
    """The edge profile to plan (and pace) with: the one given, or the bundle's only one."""
    if path is None:
        shipped = sorted((bundle.root / "profiles").glob("*.json"))
        if not shipped:
            raise ProfileError(
                f"bundle '{bundle.name}' ships no profiles (profiles/*.json) and no "
                "--edge-profile was given: the planner needs edge timings",
                hint=f"edgecut profile {bundle.root} --threads 1 --out P.json, then --edge-profile P.json",
            )
        if len(shipped) > 1:
            names = ", ".join(p.name for p in shipped)
            raise UsageError(
                f"bundle '{bundle.name}' ships several profiles ({names}): choose one with --edge-profile"
            )
        path = shipped[0]
    profile = load_profile(path)
    m = bundle.manifest
    if profile.model != m.model:
        raise ProfileError(f"profile {path} is for model '{profile.model}', the bundle is '{m.model}'")
    for segment in m.segments:
        profile.segment_ms(segment.name)  # a missing segment is one clear error
    if profile.manifest_sha256 != bundle.manifest_sha256:
        log.warning(
            "profile %s was measured on another build of %s (manifest sha differs); "
            "its segment names match, timings are used as they are",
            path,
            m.model,
        )
    return profile, path


def load_inputs(images: Path | None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) pairs, all decoded now so a bad file stops the sweep before it starts."""
    from edgecut.images import list_images, load_image, sample_photos

    if images is None:
        return sample_photos()
    return [(p.name, load_image(p)) for p in list_images(images)]
