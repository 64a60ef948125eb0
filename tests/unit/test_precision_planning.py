"""The planner's choice is (cut, edge precision, codec): an int8 head is one more option, held
across re-plans by all three, and refused by the accuracy budget like any other option."""

from __future__ import annotations

import dataclasses

from edgecut.planner import Constraints, CutCost, LinkEstimate, Replanner, plan
from edgecut.runtime import PROVIDERS, OrtOptions, _provider_options, tensorrt_options

LINK = LinkEstimate(8e6, 8e6, 20.0, 0.0)


def option(precision: str, edge_ms: float, drop: float) -> CutCost:
    return CutCost("c06", 6, "int8-channel-z3", edge_ms, 0.5, 0.5, 20_000, 300, 5.0, 0, drop, precision)


def test_faster_int8_head_wins_within_the_budget_and_loses_outside_it() -> None:
    costs = [option("float", 30.0, 0.0), option("int8", 12.0, 0.008)]
    chosen = plan(costs, LINK, Constraints(max_accuracy_drop=0.01)).chosen
    assert chosen.cost.precision == "int8"
    result = plan(costs, LINK, Constraints(max_accuracy_drop=0.005))
    assert result.chosen.cost.precision == "float"
    refused = result.row("c06", "int8-channel-z3", "int8")
    assert refused is not None and not refused.allowed and "max_accuracy_drop" in refused.reason
    assert result.row("c06", "int8-channel-z3") is result.chosen  # precision defaults to float


def test_replanner_holds_the_precision_it_chose() -> None:
    costs = [option("float", 30.0, 0.0), option("int8", 12.0, 0.0)]
    replanner = Replanner(costs, margin=0.5)
    row, _ = replanner.update(LINK)
    assert row.cost.precision == "int8"
    # float becomes slightly faster, but not by the hysteresis margin: the int8 choice is held
    replanner.update_costs([dataclasses.replace(costs[0], edge_ms=11.5), costs[1]])
    row, switched = replanner.update(LINK)
    assert (row.cost.precision, switched) == ("int8", False)


def test_tensorrt_options_go_to_the_tensorrt_provider_only() -> None:
    options = OrtOptions(("tensorrt", "cuda", "cpu"), 1, tensorrt_options("/var/cache/trt", fp16=True))
    providers = [PROVIDERS[p] for p in options.providers]
    assert _provider_options(options, providers) == [
        {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": "/var/cache/trt",
            "trt_fp16_enable": "True",
        },
        {},
        {},
    ]
    assert tensorrt_options(None, fp16=False) == ()
