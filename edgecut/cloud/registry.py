"""The bundles a tail service serves: a directory scanned at start and re-scanned while running.

Each subdirectory holding `manifest.json` is a bundle, served under (model, version) from its
manifest. Bundles are verified on load (hashes always, the signature when a key is configured); one
that fails (bad hashes, or ONNX Runtime refusing it at warm-up) is logged once and skipped until
its files change, so a bad upload never takes the others down. Removed or replaced bundles are
retired: new requests stop finding them at once, and `on_retire` runs only when the last in-flight
request holding them has released them, so a request never loses its sessions mid-compute.
Sessions and queues are shared by (bundle name, manifest sha256), so `on_retire` is skipped while
another entry with the same contents (the same bundle copied in again) is served or draining.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecut.bundle import MANIFEST, Bundle, Cut, load_bundle
from edgecut.errors import BundleError, NotFoundError

log = logging.getLogger(__name__)

Stamp = int  # hash of every file's (path, mtime_ns, size): cheap change detection


@dataclass(eq=False)
class Entry:
    """One loaded bundle and how many requests hold it right now."""

    bundle: Bundle
    directory: Path
    stamp: Stamp
    refs: int = 0
    retired: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # owners attach data, e.g. profiles

    @property
    def key(self) -> tuple[str, str]:
        return self.bundle.manifest.model, self.bundle.manifest.version


class Registry:
    """Thread-safe table (model, version) → Entry, kept in sync with a directory by `scan`."""

    def __init__(
        self,
        root: Path,
        *,
        public_key: Any = None,
        on_load: Callable[[Entry], None] = lambda e: None,
        on_retire: Callable[[Entry], None] = lambda e: None,
    ) -> None:
        if not root.is_dir():
            raise BundleError(f"bundles directory '{root}' does not exist")
        self.root = root
        self._public_key = public_key
        self._on_load, self._on_retire = on_load, on_retire
        self._lock = threading.Lock()
        self._by_dir: dict[Path, Entry] = {}
        self._failed: dict[Path, Stamp] = {}  # skipped dirs, retried when their stamp changes
        self._draining: set[Entry] = set()  # retired entries still held by requests

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._by_dir.values(), key=lambda e: (e.key[0], _version_key(e.key[1])))

    def scan(self) -> tuple[int, int]:
        """Bring the table in line with the directory; returns (loaded, retired) counts."""
        found = self._stamps()
        # Retire first: a bundle moved to another directory must not clash with its old self.
        gone = [e for d, e in list(self._by_dir.items()) if d not in found]
        for entry in gone:
            log.info("bundle %s removed from %s: retiring", entry.bundle.name, entry.directory)
            self._retire(entry)
        loaded = 0
        for directory, stamp in found.items():
            current = self._by_dir.get(directory)
            if (current and current.stamp == stamp) or self._failed.get(directory) == stamp:
                continue
            loaded += self._load(directory, stamp, current)
        return loaded, len(gone)

    @contextmanager
    def acquire(self, model: str, version: str) -> Iterator[Entry]:
        """Hold the bundle serving (model, version) for one request; "" = newest version."""
        entry = self._find(model, version)
        try:
            yield entry
        finally:
            self._release(entry)

    def cut(self, entry: Entry, cut_id: str) -> Cut:
        manifest = entry.bundle.manifest
        for cut in manifest.cuts:
            if cut.id == cut_id:
                return cut
        raise NotFoundError(
            f"{entry.bundle.name} has no cut {cut_id!r} (cuts: {', '.join(c.id for c in manifest.cuts)})"
        )

    def _stamps(self) -> dict[Path, Stamp]:
        # Hidden directories are staging areas (copy in, then rename): never served half-written.
        return {
            d: _stamp(d)
            for d in sorted(self.root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file()
        }

    def _load(self, directory: Path, stamp: Stamp, current: Entry | None) -> int:
        entry = None
        try:
            bundle = load_bundle(
                directory, public_key=self._public_key, require_signature=self._public_key is not None
            )
            entry = Entry(bundle, directory, stamp)
            self._check_unique(entry, current)
            self._on_load(entry)
        except Exception as exc:  # ORT errors at warm-up too: one bad bundle never stops the scan
            error = (
                exc
                if isinstance(exc, BundleError)
                else BundleError(f"cannot serve it: {type(exc).__name__}: {exc}")
            )
            self._failed[directory] = stamp
            log.error("skipping bundle %s: %s", directory.name, error)
            if entry is not None:
                self._drop(entry)  # sessions its warm-up created
            return 0
        self._failed.pop(directory, None)
        with self._lock:
            self._by_dir[directory] = entry
        if current is not None:
            self._retire(current)
        log.info("serving %s from %s (manifest %s)", bundle.name, directory.name, bundle.manifest_sha256[:12])
        return 1

    def _check_unique(self, entry: Entry, current: Entry | None) -> None:
        with self._lock:
            for other in self._by_dir.values():
                if other.key == entry.key and other is not current:
                    raise BundleError(
                        f"{entry.bundle.name} is already served from "
                        f"{other.directory.name}; model and version must be unique"
                    )

    def _find(self, model: str, version: str) -> Entry:
        with self._lock:
            live = [e for e in self._by_dir.values() if e.key[0] == model]
            matches = [e for e in live if e.key[1] == version] if version else live
            if not matches:
                raise NotFoundError(self._not_found(model, version, live))
            entry = max(matches, key=lambda e: _version_key(e.key[1]))
            entry.refs += 1
            return entry

    def _not_found(self, model: str, version: str, live: list[Entry]) -> str:
        if live:
            versions = ", ".join(sorted((e.key[1] for e in live), key=_version_key))
            return f"model {model!r} has no version {version!r} (versions: {versions})"
        models = sorted({e.key[0] for e in self._by_dir.values()})
        return f"model {model!r} is not served (models: {', '.join(models) or 'none'})"

    def _retire(self, entry: Entry) -> None:
        with self._lock:
            if self._by_dir.get(entry.directory) is entry:
                del self._by_dir[entry.directory]
            entry.retired = True
            if entry.refs:
                self._draining.add(entry)
                return
        self._drop(entry)

    def _release(self, entry: Entry) -> None:
        with self._lock:
            entry.refs -= 1
            idle = entry.retired and entry.refs == 0
            if idle:
                self._draining.discard(entry)
        if idle:
            log.info("retired %s drained", entry.bundle.name)
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        """`on_retire`, unless another entry still uses the same sessions and queues."""
        same = (entry.bundle.name, entry.bundle.manifest_sha256)
        with self._lock:
            others = [*self._by_dir.values(), *self._draining]
            shared = any((o.bundle.name, o.bundle.manifest_sha256) == same for o in others if o is not entry)
        if not shared:
            self._on_retire(entry)


def _stamp(directory: Path) -> Stamp:
    """Covers every file, not just the manifest: a bundle caught half-copied fails to verify,
    and must be retried once the copy completes even though its manifest did not change."""
    parts = []
    for path in sorted(directory.rglob("*")):
        try:
            st = path.stat()
        except OSError:
            continue  # vanished while we looked; the next scan sees the result
        parts.append((str(path), st.st_mtime_ns, st.st_size))
    return hash(tuple(parts))


def _version_key(version: str) -> tuple[Any, ...]:
    """Order "2" < "10" and "1.9" < "1.10": numeric parts compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", version))
