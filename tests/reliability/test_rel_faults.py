"""Short profile of the fault run: the tail SIGKILLed and restarted mid-stream, the link reset and
stalled through the emulator, the agent's lane overloaded; every input answered exactly once."""

from __future__ import annotations

from pathlib import Path

from faults import FAULTS, run_with_faults
from support import EdgeClient

from edgecut.keys import KeyPaths

INPUTS = 80  # short profile; the benchmark runs several rounds of every fault


def test_every_input_answered_exactly_once_through_faults(
    rel_bundles: Path, rel_keys: KeyPaths, rel_edge: EdgeClient, tmp_path: Path
) -> None:
    run = run_with_faults(rel_bundles, rel_keys, tmp_path, rel_edge, INPUTS)
    assert [fault for _, fault in run.injected] == list(FAULTS)
    assert run.positions == list(range(INPUTS)), f"lost {run.lost}, duplicated {run.duplicated}"
    assert {r.where for r in run.results} <= {"cloud", "local"}, [
        r.error for r in run.results if r.where == "failed"
    ]
    killed_at = next(p for p, fault in run.injected if fault == "sigkill_restart")
    after = [r.where for r in run.results[killed_at:]]
    assert "local" in after, "the kill went unnoticed: the fault was not injected"
    recovered = [r.where for r in run.results[run.recovery_from :]]
    assert "cloud" in recovered, "faults cleared, back-off ceiling passed: the agent never came back"
    assert run.flood_sent > 0
