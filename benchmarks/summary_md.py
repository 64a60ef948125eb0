"""Print a sweep's summary (results.json) as a Markdown table, for the READMEs.

Usage: python benchmarks/summary_md.py benchmarks/results/effl0/pi4-scaled-5x/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def table(path: Path) -> str:
    s = json.loads(path.read_text())["summary"]
    rows = [
        "| link | auto (shipped) | auto ms | planner (true link) | planner ms | predicted | oracle "
        "| oracle ms | regret | edge-only ms | cloud-only ms | auto ÷ best baseline | overhead |",
        "|---|---|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for x in s["links"]:
        rows.append(
            f"| {x['bandwidth']} / {x['rtt_ms']:g} ms | {x['auto']} | {x['auto_ms']:.1f} | "
            f"{x['planner']} | {x['planner_ms']:.1f} | {x['planner_predicted_ms']:.1f} | "
            f"{x['oracle']} | {x['oracle_ms']:.1f} | "
            f"{x['regret']:.3f} | {x['edge_only_ms']:.1f} | {x['cloud_only_ms']:.1f} | "
            f"{x['auto_vs_best_baseline']:.3f} | {x['overhead']:.3f} |"
        )
    t = s["totals"]
    rows.append("")
    rows.append(
        f"Regret ≤ {t['regret_target']} in {t['regret_within_target']} of {t['links']} links "
        f"(max {t['regret_max']:.3f}); auto chose the best-measured option in "
        f"{t['auto_chose_oracle_cut']} of {t['links']}; auto ÷ best baseline ≤ 1.00 in "
        f"{t['vs_baselines_within_target']} of {t['links']} (max {t['vs_baselines_max']:.3f}); "
        f"speedup over cloud-only: mean {t['speedup_vs_cloud_only_mean']:.2f}×, geometric mean "
        f"{t['speedup_vs_cloud_only_geomean']:.2f}×; overhead median {t['overhead_median']:.3f}, "
        f"worst {t['overhead_max']:.3f}; prediction error median "
        f"{t['prediction_error_abs_median_pct']:.1f} %, max {t['prediction_error_abs_max_pct']:.1f} %"
        f"{_without_head(t)}; failed requests {t['failed_requests']}."
    )
    return "\n".join(rows)


def _without_head(t: dict[str, Any]) -> str:
    """The error on what the paced head does not replay; absent from sweeps before it existed."""
    if t.get("prediction_error_without_head_abs_median_pct") is None:
        return ""
    return (
        f" (without the edge head, on cells that send: median "
        f"{t['prediction_error_without_head_abs_median_pct']:.1f} %, max "
        f"{t['prediction_error_without_head_abs_max_pct']:.1f} %)"
    )


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
