"""Device tokens that change without a restart: the token file is re-read when it changes.

Revoking a device, or adding one, must not cost every other device an outage. The service checks
the token file's stat (inode, size, mtime, ctime: an edit in place and a rename over it both
show) each time it authenticates a call and before each request it opens, and re-reads the file
when it changed. So a removed token is refused on its very next request, open streams included
(UNAUTHENTICATED), and a new one is accepted on its first call; no signal, no poll interval. (The
Kubernetes manifests in deploy/k8s copy the Secret into memory at pod start, so there a token
change reaches a pod when it restarts: `kubectl rollout restart`, one pod at a time.)

The rules of the file are those of `config.load_tokens`, at start and on reload alike: mode 0600
(a group- or world-readable file is refused, its tokens may have leaked), only sha256 digests kept.
A changed file that is unusable (bad line, too open, gone) is refused with one ERROR line naming
why, and the tokens loaded before stay in force, as a server reload keeps its running
configuration when the new one is broken; the next change is tried again.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from edgecut.cloud.config import DeviceGrant, load_tokens
from edgecut.errors import UsageError
from edgecut.sealing import token_digest

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int, int, int] | None


class TokenStore:
    """The token file's grants by token digest, re-read whenever the file changes (event loop only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        self._grants = load_tokens(path)  # at start a bad file stops the server
        self.reloads = 0  # successful re-reads since start (tests and logs)

    def __len__(self) -> int:
        return len(self.current())

    def current(self) -> dict[str, DeviceGrant]:
        """The grants in force now: re-read first when the file changed since last looked at."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            self._reload()
        return self._grants

    def find(self, token: str) -> DeviceGrant | None:
        """The grant of a presented token (None: unknown or revoked)."""
        return self.find_digest(token_digest(token))

    def find_digest(self, digest: str) -> DeviceGrant | None:
        """The grant of a token digest, compared with every stored one in constant time."""
        wanted, found = digest.encode(), None
        for stored, grant in self.current().items():
            if hmac.compare_digest(stored.encode(), wanted):
                found = grant
        return found

    def _reload(self) -> None:
        try:
            grants = load_tokens(self.path)
        except UsageError as exc:
            log.error(
                "tokens file changed but was not loaded, the %d token(s) loaded before stay in force: %s",
                len(self._grants),
                exc.message,
            )
            return
        added = len(grants.keys() - self._grants.keys())
        removed = len(self._grants.keys() - grants.keys())
        self._grants = grants
        self.reloads += 1
        log.info(
            "tokens file %s re-read: %d token(s), %d added, %d removed",
            self.path,
            len(grants),
            added,
            removed,
        )


def _stamp(path: Path) -> _Stamp:
    """What changes when the file does (None: it cannot be looked at now)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
