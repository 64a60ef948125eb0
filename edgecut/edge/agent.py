"""The edge agent loop: inputs in, one result per input out, whatever the network does.

For each input: preprocess as the bundle says, run the head (segments 1..k), encode the frontier,
seal and queue it on the tail session, then go on to the next input while that frame is on the
wire; at most `in_flight` inputs are outstanding. Results are emitted in input order. A request
whose stream broke (a replica died or failed it) is resent under a fresh id, to another replica
when there is one, up to `cloud_attempts` sends in all; a request the cloud cannot answer (down,
too slow, overloaded) is then retried once or computed locally (segments k+1..N) per `fallback`;
either way it yields exactly one result, marked with where it was computed. A run that keeps
falling back says so: one INFO line at the first local answer (the rest of the run at DEBUG), a
warning after every `FALLBACK_WARN_AFTER` local answers in a row (and `edgecut edge run` in its
summary line). A cut the server refuses outright leaves the auto plan.
Bad inputs yield one error result each and the loop keeps going.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgecut import answers
from edgecut.answers import AnswerSpec
from edgecut.bundle import Bundle
from edgecut.edge.cutchoice import CutChoice
from edgecut.edge.pacing import PacedRunner
from edgecut.edge.runner import Runner
from edgecut.edge.session import Reply, TailSession, Ticket, is_retryable
from edgecut.errors import EdgecutError, RemoteError, UnavailableError, UsageError
from edgecut.images import load_image, prepare

log = logging.getLogger(__name__)

FALLBACKS = ("local", "fail")
REFUSALS = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND")  # the cut itself, not load
FALLBACK_WARN_AFTER = 5  # local answers in a row before the run warns that the cloud is not used


@dataclass(frozen=True)
class Input:
    """One thing to classify: `load` is called lazily so a bad file fails only its own result."""

    position: int  # 0-based order in the source
    name: str  # file path, "camera:0#12", or a sample name
    load: Callable[[], np.ndarray] = field(repr=False)  # RGB uint8 image, or a model-input tensor


@dataclass(frozen=True)
class Result:
    """Exactly one per input."""

    position: int
    input: str
    where: str  # "cloud" | "local" | "failed"
    cut: str | None = None
    codec: str | None = None
    cut_mode: str = "fixed"  # "fixed" (--cut ID) or "auto" (planner)
    top5: tuple[tuple[int, str | None, float], ...] = ()  # (class index, name, probability)
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None  # why it failed, or why it ran locally

    def to_json(self) -> dict[str, object]:
        d = {k: v for k, v in vars(self).items() if k != "top5"}
        d["top5"] = [{"index": i, "label": n, "prob": round(p, 5)} for i, n, p in self.top5]
        d["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
        return d


@dataclass(frozen=True)
class AgentOptions:
    """Behaviour of the loop (the cut and codec come from the CutChoice)."""

    in_flight: int = 4  # most inputs outstanding at once
    fallback: str = "local"  # "local": compute the tail here; "fail": retry once, then fail
    cloud_attempts: int = 3  # sends per input while streams break (replicas dying) before falling back
    answer: AnswerSpec | None = None  # what the tail sends back; None = top-5 for classifiers

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.in_flight < 1:
            raise UsageError(f"in-flight must be >= 1, got {self.in_flight}")


@dataclass
class _Work:
    """An input between its head and its result."""

    item: Input
    cut: str = ""
    codec: str = ""
    frontier: dict[str, np.ndarray] = field(default_factory=dict)
    payload: bytes = b""
    t0: float = 0.0  # perf_counter at head start
    edge_ms: float = 0.0
    encode_ms: float = 0.0
    ticket: Ticket | None = None
    error: EdgecutError | None = None  # submit failed
    result: Result | None = None  # already final (bad input, edge-only cut)
    attempts: int = 0

    def settled(self) -> bool:
        return self.ticket is None or self.ticket.future.done()


class Agent:
    """Runs inputs through head → session → (cloud | local tail), one Result each."""

    def __init__(
        self,
        bundle: Bundle,
        head: Runner,
        tail: Runner,
        session: TailSession | None,
        choice: CutChoice,
        options: AgentOptions | None = None,
    ) -> None:
        self.bundle, self.head, self.tail, self.session = bundle, head, tail, session
        self.choice, self.options = choice, options or AgentOptions()
        self.answer = self.options.answer or answers.default_for(bundle.manifest.outputs)
        self.labels = bundle.labels()
        self.interrupted = False  # set when Ctrl-C / SIGTERM stopped the source early
        self.fallbacks_in_a_row = 0  # requests meant for the cloud answered locally, consecutively
        self.resent = 0  # requests resent after their stream broke
        self.reading = False  # True while the input source runs (see `_read`)

    def request_stop(self) -> None:
        """Stop reading inputs; everything already started is still finished and emitted.

        This is what Ctrl-C and SIGTERM do (see `edgecut.edge.cli`): a flag, not an exception,
        so no input can be half-emitted or emitted twice, wherever the signal lands.
        """
        self.interrupted = True

    def run(self, inputs: Iterable[Input], emit: Callable[[Result], None]) -> int:
        """Process every input, emitting results in order; returns how many were emitted."""
        window: deque[_Work] = deque()
        emitted = 0
        for item in self._read(inputs):
            work = _Work(item)
            self._start(work)
            window.append(work)
            while window and (len(window) >= self.options.in_flight or window[0].settled()):
                emit(self._finish(window.popleft()))
                emitted += 1
        if self.interrupted:
            log.warning("interrupted: finishing %d input(s) already started", len(window))
        while window:
            emit(self._finish(window.popleft()))
            emitted += 1
        return emitted

    def _read(self, inputs: Iterable[Input]) -> Iterator[Input]:
        """Inputs until the source ends or a stop is requested.

        `reading` is True only while the source itself runs: a signal handler may raise
        KeyboardInterrupt there (a source can block on stdin or a camera), nowhere else.
        """
        source = iter(inputs)
        while not self.interrupted:
            self.reading = True
            try:
                item = next(source, None)
            except KeyboardInterrupt:
                self.interrupted = True
                return
            finally:
                self.reading = False
            if item is None:
                return
            yield item

    def _start(self, work: _Work) -> None:
        item = work.item
        work.attempts = 0
        try:
            feeds = self._prepare(item)
            if not self.choice.ready:
                self.choice.calibrate(feeds)
            work.cut, work.codec = self.choice.current()
            self._run_head(work, feeds)
        except EdgecutError as exc:
            work.result = self._failed(work, _unnamed(str(exc), item.name))

    def _prepare(self, item: Input) -> dict[str, np.ndarray]:
        m = self.bundle.manifest
        data = item.load()
        if m.preprocess.kind == "image" and data.dtype == np.uint8 and data.ndim == 3:
            return {m.inputs[0].name: prepare(data, m.preprocess)}
        spec = m.inputs[0]
        if tuple(data.shape) != spec.shape or str(data.dtype) != spec.dtype:
            raise UsageError(
                f"input is {data.dtype}{list(data.shape)}, the model needs {spec.dtype}{list(spec.shape)}"
            )
        return {spec.name: data}

    def _run_head(self, work: _Work, feeds: dict[str, np.ndarray]) -> None:
        depth = self.bundle.manifest.cut(work.cut).depth
        work.t0 = time.perf_counter()
        if depth:
            run = self.head.run(feeds, 0, depth - 1, self.choice.precision)
            work.frontier = run.outputs
            self.choice.observe_edge(0, run.timings_ms)
        else:
            work.frontier = feeds
        work.edge_ms = (time.perf_counter() - work.t0) * 1e3
        if depth == len(self.bundle.manifest.segments):  # "output": edge-only, nothing sent
            work.result = self._done(work, answers.Answer(full=work.frontier), "local", {})
            return
        t1 = time.perf_counter()
        work.payload = self.choice.encode(work.cut, work.codec, work.frontier)
        if isinstance(self.head, PacedRunner):  # a device replay: its encode runs at its speed too
            self.head.pace_stage((time.perf_counter() - t1) * 1e3)
        self._submit(work)
        work.encode_ms = (time.perf_counter() - t1) * 1e3
        self.choice.observe_encode(work.cut, work.codec, work.encode_ms, len(work.payload))

    def _submit(self, work: _Work) -> None:
        work.attempts += 1
        work.error = work.ticket = None
        if self.session is None:
            work.error = UsageError("no tail service configured")
            return
        try:
            work.ticket = self.session.submit(work.cut, work.payload, self.answer)
        except EdgecutError as exc:
            work.error = exc

    def _finish(self, work: _Work) -> Result:
        """The input's one result (computed once, kept on `work`)."""
        if work.result is None:
            work.result = self._answer(work)
        return work.result

    def _answer(self, work: _Work) -> Result:
        try:
            if work.error is not None:
                raise work.error
            if work.ticket is None or self.session is None:
                raise UsageError("internal: a request without a ticket")
            return self._from_cloud(work, self.session.wait(work.ticket))
        except EdgecutError as exc:
            return self._recover(work, exc)

    def _recover(self, work: _Work, exc: EdgecutError) -> Result:
        # While the cloud keeps failing, one INFO line starts the run of local answers and the
        # rest go to DEBUG: a user sees it once, then the periodic warning, not a line per input.
        level = logging.DEBUG if self.fallbacks_in_a_row else logging.INFO
        if isinstance(exc, UnavailableError) and work.attempts < self.options.cloud_attempts:
            again = level if work.attempts <= 1 else logging.DEBUG  # the first resend, not each
            log.log(again, "%s: %s; resending (attempt %d)", work.item.name, exc, work.attempts + 1)
            self.resent += 1
            self._submit(work)
            return self._answer(work)
        if isinstance(exc, RemoteError) and exc.status in REFUSALS:
            self.choice.refused(work.cut, work.codec, str(exc))
        if self.options.fallback == "local":
            log.log(
                level,
                "%s: cloud failed (%s); computing cut %s locally%s",
                work.item.name,
                exc,
                work.cut,
                " (further local answers are logged at DEBUG until the cloud answers again)"
                if level == logging.INFO
                else "",
            )
            self._count_fallback(str(exc))
            try:
                return self._local(work, str(exc))
            except Exception as local:  # the input still gets its one result: a failed one
                log.debug("local fallback failed", exc_info=True)
                return self._failed(work, f"cloud: {exc}; local fallback: {type(local).__name__}: {local}")
        if is_retryable(exc) and work.attempts < 2:
            log.info("%s: cloud failed (%s); retrying once with a fresh request id", work.item.name, exc)
            self._submit(work)
            return self._answer(work)
        return self._failed(work, f"cloud: {exc}")

    def _count_fallback(self, why: str) -> None:
        self.fallbacks_in_a_row += 1
        if self.fallbacks_in_a_row % FALLBACK_WARN_AFTER == 0:
            log.warning(
                "the last %d requests meant for the cloud were all computed locally (last: %s)",
                self.fallbacks_in_a_row,
                why,
            )

    def _local(self, work: _Work, why: str) -> Result:
        t0 = time.perf_counter()
        depth = self.bundle.manifest.cut(work.cut).depth
        run = self.tail.run(work.frontier, depth, len(self.bundle.manifest.segments) - 1)
        outputs = run.outputs
        if self.tail is self.head:  # the same runtime: these are this device's timings too
            self.choice.observe_edge(depth, run.timings_ms)
        local_ms = (time.perf_counter() - t0) * 1e3
        answer = answers.Answer(full=outputs)
        return self._done(work, answer, "local", {"local_tail_ms": local_ms}, error=why)

    def _from_cloud(self, work: _Work, reply: Reply) -> Result:
        t0 = time.perf_counter()
        # CodecError if bad, or not in the format that was asked for
        answer = answers.decode_answer(reply.payload, self.bundle.manifest.outputs, reply.answer)
        answer_ms = (reply.received - work.t0) * 1e3
        # Not "now - t0": in-order emission may have kept this answer waiting behind another.
        total_ms = answer_ms + (time.perf_counter() - t0) * 1e3
        wire_ms = (reply.received - reply.wire_start) * 1e3 - reply.timings.total_ms
        self.choice.observe(reply, wire_ms, work.cut, work.codec)
        self.fallbacks_in_a_row = 0
        t = reply.timings
        timings = {
            "encode_ms": work.encode_ms,
            "wire_ms": wire_ms,
            "server_queue_ms": t.queue_ms,
            "server_decode_ms": t.decode_ms,
            "server_compute_ms": t.compute_ms,
            "server_encode_ms": t.encode_ms,
            "server_ms": t.total_ms,
            "answer_ms": answer_ms,
        }
        result = self._done(work, answer, "cloud", timings, total_ms=total_ms)
        return replace(result, bytes_up=reply.bytes_up, bytes_down=reply.bytes_down)

    def _done(
        self,
        work: _Work,
        answer: answers.Answer,
        where: str,
        timings: Mapping[str, float],
        *,
        total_ms: float | None = None,
        error: str | None = None,
    ) -> Result:
        ranked = answer.top(self.bundle.manifest.outputs[0].name, 5)
        total = (time.perf_counter() - work.t0) * 1e3 if total_ms is None else total_ms
        return Result(
            work.item.position,
            work.item.name,
            where,
            work.cut,
            work.codec,
            self.choice.mode,
            top5(ranked, self.labels),
            {"edge_ms": work.edge_ms, **timings, "total_ms": total},
            error=error,
        )

    def _failed(self, work: _Work, why: str) -> Result:
        log.warning("%s: %s", work.item.name, why)
        return Result(
            work.item.position,
            work.item.name,
            "failed",
            work.cut or None,
            work.codec or None,
            self.choice.mode,
            error=why,
        )


def top5(ranked: answers.Ranked, labels: list[str] | None) -> tuple[tuple[int, str | None, float], ...]:
    """The (up to) five most likely classes of the first item, with softmax probabilities and
    names when the bundle has them; the same whether the answer came ranked or in full."""
    pairs = zip(ranked.indices[0][:5].tolist(), ranked.probs()[0][:5].tolist(), strict=True)
    return tuple((i, labels[i] if labels and i < len(labels) else None, p) for i, p in pairs)


def image_input(position: int, name: str, image: np.ndarray) -> Input:
    """An in-memory image as an Input (demo, tests, video frames)."""
    return Input(position, name, lambda: image)


def file_input(position: int, path: str) -> Input:
    """A file path as an Input: `.npy` holds a model-input tensor, anything else an image."""
    p = Path(path)
    if p.suffix.lower() == ".npy":
        return Input(position, path, lambda: _load_npy(p))
    return Input(position, path, lambda: load_image(p, path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"not a readable .npy tensor ({exc.__class__.__name__})") from None


def _unnamed(message: str, name: str) -> str:
    """The error without a leading "<input name>: ": a Result (and its log line) names its input
    once already, while `load_image` names the file for its other callers."""
    return message.removeprefix(f"{name}: ")
