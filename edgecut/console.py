"""Rich consoles for tables and logs: full width on a terminal, 150 columns when piped or logged.

A piped rich console defaults to 80 columns, which folds the wide cost and fidelity tables into
unreadable columns in CI logs and files.
"""

from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 150  # columns when stdout/stderr is not a terminal


def stdout_console() -> Console:
    """For tables and results."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


def stderr_console() -> Console:
    """For logs and progress, so stdout stays data."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=PIPED_WIDTH)
