"""The command line's shared vocabulary: one spelling per idea, old spellings kept one release.

Every verb names the same thing the same way: `--server HOST:PORT` for a tail service,
`--server-key` for its public key, `--service-key` for its private key, `--signing-pub` for the
bundle-signing public key, `--codec` (a comma-separated list where a verb compares several codecs,
one value where it runs one). A renamed flag still parses under its old spelling until the next
minor release, with one warning on stderr naming the new spelling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

REMOVED_IN = "0.2"  # the release that drops the old spellings


class _Renamed(argparse.Action):
    """Stores like `store` (`append` when asked); warns when given under an old spelling."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, current: str, append: bool = False, **kwargs: Any
    ) -> None:
        self.current, self.append = current, append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None and option_string != self.current:
            print(
                f"warning: {option_string} is deprecated and goes in {REMOVED_IN}; use {self.current}",
                file=sys.stderr,
            )
        if self.append:  # a repeatable flag: keep every value, in order
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def add_renamed(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    current: str,
    *old: str,
    **kwargs: Any,
) -> argparse.Action:
    """`parser.add_argument(current, **kwargs)` that also accepts `old` spellings, with a warning."""
    dest = kwargs.pop("dest", current.lstrip("-").replace("-", "_"))
    return parser.add_argument(current, *old, action=_Renamed, current=current, dest=dest, **kwargs)


def comma_list(text: str) -> tuple[str, ...]:
    """`a, b,c` → ("a", "b", "c"): how every list-valued flag is read."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
