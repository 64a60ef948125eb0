"""Planner: true argmin, constraints, objectives, hysteresis and the link estimator."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecut.errors import UsageError
from edgecut.planner import (
    STAGES,
    Constraints,
    CutCost,
    Ewma,
    LinkEstimate,
    LinkEstimator,
    PlanError,
    Replanner,
    parse_accuracy_budget,
    plan,
    predict_ms,
)

MBIT = 1e6


def cost(depth: int, edge_ms: float, bytes_up: int, cloud_ms: float, **kw: object) -> CutCost:
    base: dict[str, object] = {
        "cut": f"c{depth:02d}",
        "depth": depth,
        "codec": "int8",
        "edge_ms": edge_ms,
        "encode_ms": 1.0,
        "decode_ms": 0.5,
        "bytes_up": bytes_up,
        "bytes_down": 4000,
        "cloud_ms": cloud_ms,
    }
    return CutCost(**(base | kw))  # type: ignore[arg-type]


def realistic_table() -> list[CutCost]:
    """A Pi-class edge and a GPU tail: JPEG at the input, shrinking int8 frontiers, edge-only."""
    return [
        cost(0, 0.0, 150_000, 4.0, cut="input", codec="jpeg", encode_ms=4.0),
        cost(1, 15.0, 300_000, 3.0),
        cost(2, 55.0, 80_000, 2.0),
        cost(3, 115.0, 10_000, 1.0),
        cost(4, 200.0, 0, 0.0, cut="output", codec="none", encode_ms=0.0, decode_ms=0.0, bytes_down=0),
    ]


def link(mbit: float, rtt_ms: float = 10.0, queue_ms: float = 0.0) -> LinkEstimate:
    return LinkEstimate(up_bps=mbit * MBIT, down_bps=mbit * MBIT, rtt_ms=rtt_ms, queue_ms=queue_ms)


costs_st = st.lists(
    st.builds(
        CutCost,
        cut=st.sampled_from(["input", "c01", "c02", "c03", "output"]),
        depth=st.integers(0, 6),
        codec=st.sampled_from(["none", "fp16", "int8", "int4"]),
        edge_ms=st.floats(0, 500),
        encode_ms=st.floats(0, 20),
        decode_ms=st.floats(0, 20),
        bytes_up=st.integers(0, 2_000_000),
        bytes_down=st.integers(0, 10_000),
        cloud_ms=st.floats(0, 100),
        edge_weight_bytes=st.integers(0, 10**9),
        accuracy_drop=st.floats(0, 0.2),
    ),
    min_size=1,
    max_size=12,
)
links_st = st.builds(
    LinkEstimate,
    up_bps=st.floats(1e4, 1e9),
    down_bps=st.floats(1e4, 1e9),
    rtt_ms=st.floats(0, 300),
    queue_ms=st.floats(0, 100),
)
constraints_st = st.builds(
    Constraints,
    min_depth=st.integers(0, 4),
    max_edge_weight_bytes=st.none() | st.integers(0, 10**9),
    max_accuracy_drop=st.none() | st.floats(0, 0.2),
)


def brute_force_latency(c: CutCost, lk: LinkEstimate) -> float:
    if c.bytes_up == 0:
        return c.edge_ms
    up = c.bytes_up * 8 / lk.up_bps * 1000
    down = c.bytes_down * 8 / lk.down_bps * 1000
    return c.edge_ms + c.encode_ms + up + lk.rtt_ms + lk.queue_ms + c.cloud_ms + down + c.decode_ms


def is_allowed(c: CutCost, k: Constraints) -> bool:
    mem_ok = k.max_edge_weight_bytes is None or c.edge_weight_bytes <= k.max_edge_weight_bytes
    acc_ok = k.max_accuracy_drop is None or c.accuracy_drop <= k.max_accuracy_drop
    return c.depth >= k.min_depth and mem_ok and acc_ok


@settings(max_examples=300, deadline=None)
@given(costs_st, links_st, constraints_st)
def test_plan_is_the_brute_force_argmin(costs, lk, constraints):
    allowed = [c for c in costs if is_allowed(c, constraints)]
    if not allowed:
        with pytest.raises(PlanError):
            plan(costs, lk, constraints)
        return
    p = plan(costs, lk, constraints)
    best = min(brute_force_latency(c, lk) for c in allowed)
    assert p.chosen.allowed
    assert p.chosen.predicted_ms == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert [r.cost for r in p.rows] == list(costs)
    assert [r.allowed for r in p.rows] == [is_allowed(c, constraints) for c in costs]


@settings(max_examples=200, deadline=None)
@given(costs_st, links_st)
def test_throughput_is_the_slowest_stage(costs, lk):
    for c in costs:
        s = plan([c], lk).chosen.stages_ms
        expected = (
            c.edge_ms
            if c.edge_only
            else max(
                c.edge_ms + c.encode_ms,
                s["up"] + s["down"],
                lk.queue_ms + c.cloud_ms + c.decode_ms,
            )
        )
        assert predict_ms(c, lk, "throughput") == pytest.approx(expected)
        assert predict_ms(c, lk, "throughput") <= predict_ms(c, lk, "latency") + 1e-9


def test_stage_breakdown_adds_up_to_latency():
    c = cost(2, 30.0, 125_000, 5.0)
    row = plan([c], link(10, rtt_ms=20, queue_ms=3)).chosen
    assert tuple(row.stages_ms) == STAGES
    assert row.stages_ms["up"] == pytest.approx(100.0)  # 1 Mbit at 10 Mbit/s
    assert row.stages_ms["down"] == pytest.approx(3.2)
    assert row.predicted_ms == pytest.approx(sum(row.stages_ms.values()))
    assert row.predicted_ms == pytest.approx(30 + 1 + 100 + 20 + 3 + 5 + 3.2 + 0.5)


def test_edge_only_has_no_network_cost():
    edge_only = realistic_table()[-1]
    for lk in (link(0.001, rtt_ms=5000, queue_ms=999), link(1000, rtt_ms=0)):
        assert predict_ms(edge_only, lk) == 200.0
        assert predict_ms(edge_only, lk, "throughput") == 200.0
        row = plan([edge_only], lk).chosen
        assert sum(v for k, v in row.stages_ms.items() if k != "edge") == 0


def test_ties_go_to_fewer_bytes_up():
    a = cost(1, 10.0, 20_000, 5.0, encode_ms=9.0)
    b = cost(2, 10.0, 10_000, 5.0, encode_ms=9.0 + 10_000 * 8 / 10e6 * 1000)
    assert predict_ms(a, link(10)) == pytest.approx(predict_ms(b, link(10)))
    assert plan([a, b], link(10)).chosen.cost == b
    assert plan([b, a], link(10)).chosen.cost == b


def test_min_depth_alone():
    table = realistic_table()
    assert plan(table, link(100)).chosen.cost.cut == "input"
    p = plan(table, link(100), Constraints(min_depth=1))
    assert p.chosen.cost.depth >= 1
    assert p.rows[0].reason == "min_depth: depth 0 < 1"


def test_edge_weight_budget_alone():
    table = [c for c in realistic_table()]
    table = [CutCost(**{**vars(c), "edge_weight_bytes": c.depth * 100}) for c in table]
    p = plan(table, link(1), Constraints(max_edge_weight_bytes=350))
    assert p.chosen.cost.cut == "c03"  # edge-only would win but needs 400 B
    assert "max_edge_weight_bytes" in p.rows[-1].reason
    assert not p.rows[-1].allowed


def test_accuracy_budget_alone():
    table = [
        CutCost(**{**vars(c), "accuracy_drop": 0.02 if c.codec == "int8" else 0.0}) for c in realistic_table()
    ]
    p = plan(table, link(10), Constraints(max_accuracy_drop=0.01))
    assert p.chosen.cost.codec in ("jpeg", "none")
    assert "max_accuracy_drop" in p.rows[2].reason


def test_constraints_combined_list_every_broken_one():
    c = cost(0, 0.0, 1000, 1.0, edge_weight_bytes=500, accuracy_drop=0.1)
    ok = cost(3, 50.0, 1000, 1.0)
    k = Constraints(min_depth=1, max_edge_weight_bytes=100, max_accuracy_drop=0.05)
    p = plan([c, ok], link(10), k)
    assert p.chosen.cost == ok
    assert p.rows[0].reason.count(";") == 2
    for name in ("min_depth", "max_edge_weight_bytes", "max_accuracy_drop"):
        assert name in p.rows[0].reason


@pytest.mark.parametrize(
    ("constraints", "names"),
    [
        (Constraints(min_depth=9), ["min_depth"]),
        (Constraints(max_edge_weight_bytes=-1), ["max_edge_weight_bytes"]),
        (Constraints(min_depth=4, max_accuracy_drop=0.0), ["min_depth", "max_accuracy_drop"]),
    ],
)
def test_nothing_allowed_names_the_binding_constraint(constraints, names):
    table = [CutCost(**{**vars(c), "accuracy_drop": 0.01}) for c in realistic_table()]
    with pytest.raises(PlanError) as info:
        plan(table, link(10), constraints)
    for name in names:
        assert name in str(info.value)
        assert name in (info.value.hint or "")
    assert "of 5 options" in str(info.value)


def test_empty_table_is_a_plan_error():
    with pytest.raises(PlanError, match="no cut options"):
        plan([], link(10))


def test_bad_inputs_are_usage_errors():
    from edgecut.errors import UsageError

    with pytest.raises(UsageError):
        plan(realistic_table(), link(10), objective="speed")
    with pytest.raises(UsageError):
        LinkEstimate(up_bps=0, down_bps=1, rtt_ms=1)
    with pytest.raises(UsageError):
        Ewma(alpha=0)


def test_choice_moves_deeper_as_bandwidth_drops_and_back():
    table = realistic_table()
    bandwidths = [100 * 0.01 ** (i / 60) for i in range(61)]  # 100 → 1 Mbit/s, log-spaced
    replanner = Replanner(table)
    down = [replanner.update(link(bw))[0].cost.depth for bw in bandwidths]
    up = [replanner.update(link(bw))[0].cost.depth for bw in reversed(bandwidths)]
    assert down[0] == 0 and down[-1] == 4
    assert down == sorted(down) and up == sorted(up, reverse=True)
    assert 3 in down  # passes through an intermediate cut, not just the two ends
    # Without hysteresis every cut but the bulky c01 has its own bandwidth window.
    assert {plan(table, link(bw)).chosen.cost.depth for bw in bandwidths} == {0, 2, 3, 4}
    assert up[-1] == 0


def test_replanner_switches_on_a_step_and_logs_why(caplog):
    replanner = Replanner(realistic_table())
    caplog.set_level(logging.INFO, logger="edgecut.planner")
    assert replanner.update(link(100)) == (replanner.current, False)
    assert replanner.current is not None and replanner.current.cost.cut == "input"
    row, switched = replanner.update(link(1))
    assert switched and row.cost.cut == "output"
    assert "cut switch input/jpeg -> output/none" in caplog.text
    assert "up 1.00 Mbit/s" in caplog.text
    row, switched = replanner.update(link(100))
    assert switched and row.cost.cut == "input"


def test_replanner_is_stable_under_noise():
    # At 10 Mbit/s these two are 3 % apart; ±5 % bandwidth jitter never opens a 10 % gap.
    a = cost(1, 5.0, 100_000, 5.0)
    b = cost(2, 66.0, 20_000, 5.0)
    gap = abs(predict_ms(a, link(10)) - predict_ms(b, link(10))) / predict_ms(a, link(10))
    assert gap < 0.03
    rng = random.Random(6)
    replanner = Replanner([a, b], margin=0.10)
    choices = set()
    for _ in range(1000):
        row, switched = replanner.update(link(10 * rng.uniform(0.95, 1.05), rtt_ms=20))
        assert not switched
        choices.add(row.cost.cut)
    assert len(choices) == 1
    # Without hysteresis the same noise flips the choice: the test above is not vacuous.
    plain = {plan([a, b], link(10 * rng.uniform(0.95, 1.05), rtt_ms=20)).chosen.cost.cut for _ in range(1000)}
    assert len(plain) == 2


def test_replanner_respects_absolute_min_gain():
    a = cost(1, 1.0, 1000, 1.0)
    b = cost(2, 0.0, 1000, 1.0)  # 1 ms faster, which is > 10 % of ~15 ms
    replanner = Replanner([a], min_gain_ms=2.0)
    replanner.update(link(10))
    replanner.update_costs([a, b])
    assert replanner.update(link(10)) == (replanner.current, False)
    assert replanner.current is not None and replanner.current.cost == a


def test_replanner_leaves_an_option_that_is_no_longer_allowed():
    a = cost(1, 1.0, 1000, 1.0)
    b = cost(2, 50.0, 1000, 1.0)
    replanner = Replanner([a, b])
    assert replanner.update(link(10))[0].cost == a
    replanner.update_costs([b])
    row, switched = replanner.update(link(10))
    assert switched and row.cost == b


def test_ewma_first_sample_then_smooths():
    e = Ewma(alpha=0.5)
    assert e.value is None
    assert e.add(10) == 10
    assert e.add(20) == 15


def test_link_estimator_starts_from_the_prior():
    prior = LinkEstimate(up_bps=5e6, down_bps=20e6, rtt_ms=40, queue_ms=2)
    assert LinkEstimator(prior=prior).estimate() == prior


def test_link_estimator_converges_to_the_true_link():
    true_up, true_down, true_rtt = 20 * MBIT, 50 * MBIT, 30.0
    rng = random.Random(1)
    est = LinkEstimator(alpha=0.2)
    for _ in range(300):
        est.observe_rtt(true_rtt + rng.gauss(0, 2))
        est.observe_queue(max(0.0, 5 + rng.gauss(0, 1)))
        up, down = rng.randint(10_000, 200_000), 4000
        wire = true_rtt + up * 8 / true_up * 1000 + down * 8 / true_down * 1000
        est.observe_transfer(up, down, wire + rng.gauss(0, 2))
        # A download-heavy probe (small request, big reply) teaches the down direction.
        big = rng.randint(50_000, 200_000)
        wire = true_rtt + 100 * 8 / true_up * 1000 + big * 8 / true_down * 1000
        est.observe_transfer(100, big, wire + rng.gauss(0, 2))
    got = est.estimate()
    assert got.up_bps == pytest.approx(true_up, rel=0.1)
    assert got.down_bps == pytest.approx(true_down, rel=0.15)
    assert got.rtt_ms == pytest.approx(true_rtt, rel=0.1)
    assert got.queue_ms == pytest.approx(5, abs=1)


def test_link_estimator_ignores_impossible_samples():
    est = LinkEstimator()
    before = est.estimate()
    est.observe_transfer(100_000, 4000, 0.0)
    est.observe_transfer(100_000, 4000, -5.0)
    est.observe_transfer(100_000, 4000, before.rtt_ms - 1)  # faster than the RTT allows
    est.observe_transfer(0, 0, 80.0)
    est.observe_rtt(-1)
    est.observe_queue(float("nan"))
    assert est.estimate() == before


def test_unknown_accuracy_is_excluded_under_a_budget_and_allowed_without_one():
    table = [
        CutCost(**{**vars(c), "accuracy_drop": None if c.depth == 1 else 0.0}) for c in realistic_table()
    ]
    budget = plan(table, link(10), Constraints(max_accuracy_drop=0.01))
    unknown = next(r for r in budget.rows if r.cost.depth == 1)
    assert not unknown.allowed and "accuracy unknown" in unknown.reason
    assert all(r.allowed for r in plan(table, link(10)).rows)


@pytest.mark.parametrize(
    ("text", "value"), [("1%", 0.01), ("0.005", 0.005), ("off", None), ("None", None), ("0%", 0.0)]
)
def test_parse_accuracy_budget(text: str, value: float | None) -> None:
    assert parse_accuracy_budget(text) == value


@pytest.mark.parametrize("text", ["lots", "150%", "-1%"])
def test_parse_accuracy_budget_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="--max-accuracy-drop"):
        parse_accuracy_budget(text)
