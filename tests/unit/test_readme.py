"""The README's commands are the real ones: the test command is what `.ci/run` runs, and every
command of the tour parses with the real CLI, under its current spellings (no deprecation warning).

The tour is not executed here (it starts servers on other machines and reads the user's photos);
each verb's behaviour is tested elsewhere. What can rot silently is the spelling, and that is
caught here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgecut.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SERVER = "gpu-host:50051"


def _tour() -> list[str]:
    block = README.split("## What you do with it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line.startswith("edgecut ")]


def test_the_tour_has_every_verb_a_user_needs() -> None:
    verbs = {shlex.split(c)[1] for c in _tour()}
    assert {"keys", "partition", "inspect", "cloud", "profile", "edge", "plan", "bench", "netem"} <= verbs


@pytest.mark.parametrize("command", _tour(), ids=lambda c: " ".join(shlex.split(c)[1:3]))
def test_tour_command_parses_with_the_real_cli(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "[" not in command and "…" not in command, "the tour must be copy-pasteable"
    argv = shlex.split(command.replace('"$SERVER"', SERVER))[1:]
    build_parser(argv).parse_args(argv)  # argparse exits (fails the test) on an unknown or missing flag
    assert "warning" not in capsys.readouterr().err


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.*?)\n```", README, re.S)
    assert command is not None
    assert command.group(1) in (REPO / ".ci" / "run").read_text().splitlines()
