"""Where to cut: predicted time per (cut, codec) option, constraints, and online re-planning.

Pure math over numbers someone else measured: the caller turns a bundle manifest and the edge and
cloud profiles into `CutCost` rows, and a `LinkEstimator` (in `edgecut.link`, re-exported here)
turns real transfers into a `LinkEstimate`. The edge agent imports this module, so it must stay
free of torch and onnx.

Two objectives. "latency" is the time of one request end to end: every stage adds up.
"throughput" is the steady-state period of a pipelined stream: the edge, the link and the cloud
work on different frames at once, so the slowest of the three stages sets the pace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from edgecut.errors import PlanError, UsageError
from edgecut.link import DEFAULT_PRIOR as DEFAULT_PRIOR  # re-exported: callers import these from here
from edgecut.link import Ewma as Ewma
from edgecut.link import LinkEstimate
from edgecut.link import LinkEstimator as LinkEstimator

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "throughput")
DEFAULT_MAX_ACCURACY_DROP = 0.01  # `plan` and `--cut auto`: top-1 disagreement budget, 0..1
STAGES = ("edge", "encode", "up", "rtt", "queue", "decode", "cloud", "down")  # pipeline order


@dataclass(frozen=True)
class CutCost:
    """Everything the planner needs about one (cut, codec) option."""

    cut: str  # cut id, e.g. "input", "c03", "output"
    depth: int  # index in manifest order: 0 = input (cloud-only), N = output (edge-only)
    codec: str  # codec name, e.g. "jpeg", "int8+zstd", "none" for the edge-only cut
    edge_ms: float  # sum of edge segment latencies seg_1..seg_k
    encode_ms: float  # on the edge: quantize, compress, seal the frame
    decode_ms: float  # on the tail: open, decompress, dequantize the frame
    bytes_up: int  # request frame bytes after codec and seal; 0 means edge-only
    bytes_down: int  # answer frame bytes
    cloud_ms: float  # sum of tail segment latencies seg_k+1..seg_N (0 for "output")
    edge_weight_bytes: int = 0  # bytes of the head's segment weights the edge holds (not peak memory)
    accuracy_drop: float | None = 0.0  # 1 - top-1 agreement with the unsplit model, 0..1; None = unknown
    precision: str = "float"  # edge head precision: "float" or a variant such as "int8"

    @property
    def edge_only(self) -> bool:
        """Nothing goes on the wire: the edge runs the whole model."""
        return self.bytes_up == 0


@dataclass(frozen=True)
class Constraints:
    """Limits an option must respect to be chosen at all; None means unlimited."""

    min_depth: int = 0  # options shallower than this are refused (raw input stays on the device)
    max_edge_weight_bytes: int | None = None  # budget for the head's weights on the edge
    max_accuracy_drop: float | None = None  # accuracy budget, 0..1 (0.005 = half a point)

    def violations(self, cost: CutCost) -> list[str]:
        """Why `cost` is not allowed, one phrase per broken constraint (empty if allowed)."""
        found = []
        if cost.depth < self.min_depth:
            found.append(f"min_depth: depth {cost.depth} < {self.min_depth}")
        budget = self.max_edge_weight_bytes
        if budget is not None and cost.edge_weight_bytes > budget:
            found.append(f"max_edge_weight_bytes: {cost.edge_weight_bytes} B of weights > {budget} B")
        if self.max_accuracy_drop is not None:
            if cost.accuracy_drop is None:
                found.append("max_accuracy_drop: accuracy unknown (no fidelity row)")
            elif cost.accuracy_drop > self.max_accuracy_drop:
                found.append(f"max_accuracy_drop: {cost.accuracy_drop:.2%} > {self.max_accuracy_drop:.2%}")
        return found


@dataclass(frozen=True)
class PlanRow:
    """One option as the planner saw it."""

    cost: CutCost
    predicted_ms: float  # objective value: request latency, or stream period per frame
    stages_ms: Mapping[str, float]  # read-only breakdown, keys are STAGES
    allowed: bool
    reason: str  # why not allowed ("" when allowed)


@dataclass(frozen=True)
class Plan:
    """Every option with its prediction, and the one chosen."""

    rows: tuple[PlanRow, ...]  # in the order the costs were given
    chosen: PlanRow
    objective: str
    link: LinkEstimate

    def row(self, cut: str, codec: str, precision: str = "float") -> PlanRow | None:
        """The row for option (cut, precision, codec), if it was planned."""
        key = (cut, codec, precision)
        return next((r for r in self.rows if (r.cost.cut, r.cost.codec, r.cost.precision) == key), None)


def parse_accuracy_budget(text: str | None) -> float | None:
    """`--max-accuracy-drop` as a fraction 0..1; "off" (or "none") disables the budget."""
    if text is None or text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise UsageError(f"--max-accuracy-drop '{text}' is not like 0.5%, 0.005 or off") from None
    if not 0 <= value <= 1:
        raise UsageError(f"--max-accuracy-drop '{text}' must be between 0% and 100%")
    return value


def stages_ms(cost: CutCost, link: LinkEstimate) -> dict[str, float]:
    """Time of each stage of one request, in ms. An edge-only option has no network stage."""
    if cost.edge_only:
        return dict.fromkeys(STAGES, 0.0) | {"edge": cost.edge_ms}
    return {
        "edge": cost.edge_ms,
        "encode": cost.encode_ms,
        "up": cost.bytes_up * 8 / link.up_bps * 1000,
        "rtt": link.rtt_ms,
        "queue": link.queue_ms,
        "decode": cost.decode_ms,
        "cloud": cost.cloud_ms,
        "down": cost.bytes_down * 8 / link.down_bps * 1000,
    }


def predict_ms(cost: CutCost, link: LinkEstimate, objective: str = "latency") -> float:
    """Predicted request latency, or stream period per frame for "throughput", in ms."""
    return _objective_ms(stages_ms(cost, link), _check_objective(objective))


def plan(
    costs: Sequence[CutCost],
    link: LinkEstimate,
    constraints: Constraints | None = None,
    objective: str = "latency",
) -> Plan:
    """Predict every option and choose the fastest allowed one.

    Ties go to fewer bytes up (less exposure, less load on a shared link), then to the shallower
    cut. Raises PlanError when there are no options, or none is allowed; the message names the
    constraint that excluded them.
    """
    constraints = constraints or Constraints()
    _check_objective(objective)
    rows = tuple(_row(cost, link, constraints, objective) for cost in costs)
    allowed = [r for r in rows if r.allowed]
    if not allowed:
        raise _nothing_allowed(rows, constraints)
    chosen = min(allowed, key=lambda r: (r.predicted_ms, r.cost.bytes_up, r.cost.depth))
    return Plan(rows=rows, chosen=chosen, objective=objective, link=link)


def _row(cost: CutCost, link: LinkEstimate, constraints: Constraints, objective: str) -> PlanRow:
    stages = stages_ms(cost, link)
    broken = constraints.violations(cost)
    return PlanRow(
        cost=cost,
        predicted_ms=_objective_ms(stages, objective),
        stages_ms=MappingProxyType(stages),
        allowed=not broken,
        reason="; ".join(broken),
    )


def _objective_ms(stages: Mapping[str, float], objective: str) -> float:
    if objective == "latency":
        return sum(stages.values())
    # RTT is latency, not occupancy: with frames in flight it does not limit the pace.
    return max(
        stages["edge"] + stages["encode"],
        stages["up"] + stages["down"],
        stages["queue"] + stages["decode"] + stages["cloud"],
    )


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def _nothing_allowed(rows: Sequence[PlanRow], constraints: Constraints) -> PlanError:
    if not rows:
        return PlanError("no cut options to plan over (empty cost table)")
    excluded: dict[str, int] = {}
    for row in rows:
        for phrase in constraints.violations(row.cost):
            name = phrase.split(":", 1)[0]
            excluded[name] = excluded.get(name, 0) + 1
    detail = ", ".join(f"{name} excludes {n}" for name, n in excluded.items())
    return PlanError(
        f"no cut satisfies the constraints ({detail} of {len(rows)} options)",
        hint="relax " + " or ".join(excluded),
    )


class Replanner:
    """Online adaptation with hysteresis: holds the current choice and switches only when the best
    alternative is faster by more than `margin` (relative) AND `min_gain_ms` (absolute).

    Both thresholds are needed: the relative one ignores estimator noise on slow paths, the
    absolute one stops flapping between options a fraction of a millisecond apart. Every switch
    is logged at INFO with old and new option, predicted times and the link estimate.
    """

    def __init__(
        self,
        costs: Sequence[CutCost],
        constraints: Constraints | None = None,
        objective: str = "latency",
        margin: float = 0.10,
        min_gain_ms: float = 1.0,
    ) -> None:
        if not (margin >= 0 and min_gain_ms >= 0):
            raise UsageError(f"hysteresis must be >= 0, got margin={margin} min_gain_ms={min_gain_ms}")
        self._costs = tuple(costs)
        self._constraints = constraints or Constraints()
        self._objective = _check_objective(objective)
        self._margin = margin
        self._min_gain_ms = min_gain_ms
        self._current: PlanRow | None = None

    @property
    def current(self) -> PlanRow | None:
        """The option in use, as predicted at the last update; None before the first update."""
        return self._current

    def update(self, link: LinkEstimate) -> tuple[PlanRow, bool]:
        """Re-plan for `link`; returns the option to use and whether it changed.

        The first call makes the initial choice and reports no switch. If the held option is no
        longer allowed (new costs), the best one replaces it regardless of hysteresis.
        """
        new_plan = plan(self._costs, link, self._constraints, self._objective)
        best, held = new_plan.chosen, self._held(new_plan)
        old, self._current = self._current, best
        if old is None:
            log.info("initial cut %s: %.1f ms predicted; %s", _name(best), best.predicted_ms, link)
            return best, False
        if held is None:
            why = "held option no longer allowed"
        elif self._worth_switching(held, best):
            why = f"{held.predicted_ms:.1f} ms predicted for the held option"
        else:
            self._current = held
            return held, False
        log.info(
            "cut switch %s -> %s: %s, %.1f ms for the new one (%s); %s",
            _name(old),
            _name(best),
            why,
            best.predicted_ms,
            self._objective,
            link,
        )
        return best, True

    @property
    def costs(self) -> tuple[CutCost, ...]:
        """The cost table it plans over."""
        return self._costs

    def update_costs(self, costs: Sequence[CutCost]) -> None:
        """Replace the cost table (e.g. a new server profile); takes effect at the next update."""
        self._costs = tuple(costs)

    def _held(self, new_plan: Plan) -> PlanRow | None:
        if self._current is None:
            return None
        held = self._current.cost
        row = new_plan.row(held.cut, held.codec, held.precision)
        return row if row is not None and row.allowed else None

    def _worth_switching(self, held: PlanRow, best: PlanRow) -> bool:
        gain_ms = held.predicted_ms - best.predicted_ms
        return gain_ms > self._margin * held.predicted_ms and gain_ms > self._min_gain_ms


def _name(row: PlanRow) -> str:
    head = "" if row.cost.precision == "float" else f"/{row.cost.precision}"
    return f"{row.cost.cut}{head}/{row.cost.codec}"
