"""Dynamic batching: requests for the same (bundle, cut) from any stream ride one tail run.

Triton's two knobs: a batch closes when it holds `max_batch` rows (a request of N rows counts N)
or when its first request has waited `max_queue_delay_ms`, whichever comes first. While a batch
computes, the next one fills, so under load batches grow by themselves and at low load a request
waits at most the delay. Compute runs on a thread pool so the event loop keeps reading frames and
answering while ORT works.

A bundle whose segments are not `batchable` (its graphs bake batch 1 in) still gets the queueing:
its batch is run item by item, and the `mode` label of the batch-size metric says so. Queues are
bounded: a full one refuses at once (RESOURCE_EXHAUSTED) so the edge can back off or run locally,
and a request whose deadline passed while queued is dropped, never computed. A lane whose worker is
stopped (its bundle retired, or the server closing) answers what it holds UNAVAILABLE, never leaves
a request waiting forever. A request whose caller is cancelled (the edge sent a cancel frame, or
its stream ended) leaves the queue at once, so abandoned requests hold no queue slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Executor as Pool
from dataclasses import dataclass, field

import numpy as np

from edgecut.bundle import Bundle
from edgecut.cloud.executor import Executor
from edgecut.cloud.metrics import ServerMetrics
from edgecut.errors import CodecError, DeadlineError, EdgecutError, OverloadedError, UnavailableError

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2  # weight of the newest queue-delay sample in the live estimate
IDLE_HALF_LIFE_S = 1.0  # an idle lane's queue-delay estimate halves every this many seconds


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch run."""

    outputs: dict[str, np.ndarray]
    queue_ms: float  # from submit to the start of its batch's compute
    compute_ms: float  # the whole batch's tail run
    batch_size: int  # requests in that batch


@dataclass(eq=False)
class _Item:
    feeds: Mapping[str, np.ndarray]
    rows: int  # batch size N of this request's tensors
    deadline_ms: int  # absolute unix ms; 0 = none
    enqueued: float  # perf_counter seconds
    future: asyncio.Future[BatchResult]


class _Queue(asyncio.Queue[_Item]):
    """A lane's queue, plus removal of an abandoned item and putting one back at the front."""

    _queue: deque[_Item]  # asyncio.Queue's own storage (its documented subclassing hook, `_init`)

    def discard(self, item: _Item) -> bool:
        try:
            self._queue.remove(item)
        except ValueError:
            return False
        return True

    def unget(self, item: _Item) -> None:
        """Back to the front: it did not fit this batch (the lane's worker is the only getter)."""
        self._queue.appendleft(item)


@dataclass(eq=False)
class _Lane:
    bundle: Bundle
    cut: str
    queue: _Queue
    worker: asyncio.Task[None] | None = None
    delay_ms: float = 0.0  # EWMA of queue delay
    busy: bool = False  # a batch is computing
    last_batch: float = 0.0  # perf_counter seconds when the last batch finished
    gap_s: float = 0.0  # EWMA of the time between arrivals, s
    last_arrival: float = 0.0  # perf_counter seconds
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.bundle.manifest.model

    def observe_arrival(self, now: float) -> None:
        if self.last_arrival:
            self.gap_s += EWMA_ALPHA * (now - self.last_arrival - self.gap_s)
        self.last_arrival = now

    def delay_estimate_ms(self, now: float) -> float:
        """The EWMA while there is work; decaying once idle, so a burst is not reported forever."""
        if self.busy or not self.queue.empty():
            return self.delay_ms
        return self.delay_ms * 0.5 ** ((now - self.last_batch) / IDLE_HALF_LIFE_S)


class Batcher:
    """Per (bundle, cut) queues with one worker each; create and use on one event loop."""

    def __init__(
        self,
        executor: Executor,
        pool: Pool,
        *,
        max_batch: int,
        max_queue_delay_ms: float,
        max_queue: int,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.executor, self.pool, self.metrics = executor, pool, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_delay_s = max_queue_delay_ms / 1e3
        self._loop = asyncio.get_running_loop()
        self._lanes: dict[tuple[str, str, str], _Lane] = {}

    async def submit(
        self, bundle: Bundle, cut: str, feeds: Mapping[str, np.ndarray], *, deadline_ms: int = 0
    ) -> BatchResult:
        """Queue one request and wait for its result; raises OverloadedError / DeadlineError."""
        _check_deadline(deadline_ms, "arrived")
        rows = _rows(bundle, feeds)
        lane = self._lane(bundle, cut)
        item = _Item(feeds, rows, deadline_ms, time.perf_counter(), self._loop.create_future())
        lane.observe_arrival(item.enqueued)
        try:
            lane.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise OverloadedError(
                f"{bundle.name} cut {cut}: {self.max_queue} requests queued",
                hint="back off, or run the tail on the device",
            ) from None
        try:
            return await item.future
        except asyncio.CancelledError:  # the caller left: free its slot now, not when it is reached
            lane.queue.discard(item)
            raise

    def queue_delay_ms(self) -> float:
        """Live estimate for edge optimizers: the worst lane's queue delay, ~0 when idle."""
        now = time.perf_counter()
        return max((lane.delay_estimate_ms(now) for lane in self._lanes.values()), default=0.0)

    def retire(self, bundle: Bundle) -> None:
        """Stop the lanes of a drained bundle; safe to call from any thread."""
        self._loop.call_soon_threadsafe(self._retire, bundle.name, bundle.manifest_sha256)

    async def close(self) -> None:
        workers = [lane.worker for lane in self._lanes.values() if lane.worker]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._lanes.clear()

    def _retire(self, name: str, sha: str) -> None:
        for key in [k for k in self._lanes if k[:2] == (name, sha)]:
            lane = self._lanes.pop(key)
            if lane.worker:
                lane.worker.cancel()

    def _lane(self, bundle: Bundle, cut: str) -> _Lane:
        key = (bundle.name, bundle.manifest_sha256, cut)
        lane = self._lanes.get(key)
        if lane is None:
            lane = _Lane(bundle, cut, _Queue(self.max_queue))
            lane.worker = self._loop.create_task(self._work(lane), name=f"batcher {key}")
            self._lanes[key] = lane
        return lane

    async def _work(self, lane: _Lane) -> None:
        items: list[_Item] = []
        try:
            while True:
                items = []
                await self._collect(lane, items)
                try:
                    await self._run(lane, items)
                except Exception as exc:  # a worker must outlive any one batch
                    log.exception("batch for %s cut %s failed", lane.bundle.name, lane.cut)
                    _fail(items, EdgecutError(f"tail compute failed: {type(exc).__name__}"))
        except asyncio.CancelledError:
            while not lane.queue.empty():
                items.append(lane.queue.get_nowait())
            _fail(
                items,
                UnavailableError(
                    f"{lane.bundle.name} cut {lane.cut} stopped serving while the request waited",
                    hint="retry",
                ),
            )
            raise

    async def _collect(self, lane: _Lane, items: list[_Item]) -> None:
        """Wait for one request, then for batch-mates until full or the first has waited enough.

        Waiting only pays when a batch-mate is likely to come: when requests arrive further apart
        than the delay (one closed-loop client), the batch closes at once instead of adding the
        full delay to every request. Fills `items` in place, so a cancelled worker knows what it held.
        """
        items.append(await lane.queue.get())
        rows = items[0].rows
        wait_s = self.max_delay_s if lane.gap_s < self.max_delay_s else 0.0
        close_at = items[0].enqueued + wait_s
        while rows < self.max_batch:
            if not lane.queue.empty():
                item = lane.queue.get_nowait()
            else:
                remaining = close_at - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await lane.queue.get()
                except TimeoutError:
                    break
            if rows + item.rows > self.max_batch:  # rows, not requests, are what a batch costs
                lane.queue.unget(item)
                break
            items.append(item)
            rows += item.rows

    async def _run(self, lane: _Lane, items: list[_Item]) -> None:
        live = [i for i in items if _admit(i)]
        if not live:
            return
        start = time.perf_counter()
        batched = lane.bundle.manifest.batchable and len(live) > 1
        run = self._run_batched if batched else self._run_each
        lane.busy = True
        try:
            results = await self._loop.run_in_executor(self.pool, run, lane, live)
        finally:
            lane.busy, lane.last_batch = False, time.perf_counter()
        compute_ms = (time.perf_counter() - start) * 1e3
        for item, result in zip(live, results, strict=True):
            queue_ms = (start - item.enqueued) * 1e3
            lane.delay_ms += EWMA_ALPHA * (queue_ms - lane.delay_ms)
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(BatchResult(result, queue_ms, compute_ms, len(live)))
        self._observe(lane, live, start, compute_ms, batched)

    def _run_batched(self, lane: _Lane, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        names = list(items[0].feeds)
        feeds = {n: np.concatenate([i.feeds[n] for i in items]) for n in names}
        try:
            out = self.executor.run(lane.bundle, lane.cut, feeds)
        except Exception:
            log.warning(
                "batched run of %s cut %s failed: retrying one by one",
                lane.bundle.name,
                lane.cut,
                exc_info=True,
            )
            return self._run_each(lane, items)
        bounds = np.cumsum([i.rows for i in items])[:-1]
        parts = {n: np.split(v, bounds) for n, v in out.items()}
        return [{n: parts[n][k] for n in parts} for k in range(len(items))]

    def _run_each(self, lane: _Lane, items: list[_Item]) -> list[dict[str, np.ndarray] | Exception]:
        results: list[dict[str, np.ndarray] | Exception] = []
        for item in items:
            try:
                results.append(self.executor.run(lane.bundle, lane.cut, item.feeds))
            except EdgecutError as exc:
                results.append(exc)
            except Exception as exc:  # ORT refusing a tensor fails that request only
                log.exception("tail run of %s cut %s failed", lane.bundle.name, lane.cut)
                results.append(EdgecutError(f"tail compute failed: {type(exc).__name__}"))
        return results

    def _observe(
        self, lane: _Lane, items: list[_Item], start: float, compute_ms: float, batched: bool
    ) -> None:
        if self.metrics is None:
            return
        mode = "batched" if batched else "sequential"
        self.metrics.batch_size.labels(lane.model, mode).observe(len(items))
        self.metrics.compute_seconds.labels(lane.model).observe(compute_ms / 1e3)
        for item in items:
            self.metrics.queue_seconds.labels(lane.model).observe(start - item.enqueued)
        nv, version = self.metrics.triton, lane.bundle.manifest.version
        nv.count.labels(lane.model, version).inc(sum(item.rows for item in items))
        nv.exec_count.labels(lane.model, version).inc(1 if batched else len(items))
        nv.queue_us.labels(lane.model, version).inc(sum(start - item.enqueued for item in items) * 1e6)
        nv.compute_us.labels(lane.model, version).inc(compute_ms * 1e3 * len(items))
        self.metrics.queue_delay_ms.set(self.queue_delay_ms())


def _rows(bundle: Bundle, feeds: Mapping[str, np.ndarray]) -> int:
    """The request's batch size N, the same across its tensors; 1 unless the bundle batches."""
    sizes = {int(x.shape[0]) for x in feeds.values() if x.ndim}
    if len(sizes) > 1:
        raise CodecError(f"frame tensors disagree on the batch size: {sorted(sizes)}")
    rows = sizes.pop() if sizes else 1
    if rows != 1 and not bundle.manifest.batchable:
        raise CodecError(f"{bundle.name} is not batchable: send one item per frame, not {rows}")
    return rows


def _admit(item: _Item) -> bool:
    """False for a request whose caller left or whose deadline passed while it queued."""
    if item.future.done():
        return False
    try:
        _check_deadline(item.deadline_ms, "waited in the queue")
    except DeadlineError as exc:
        item.future.set_exception(exc)
        return False
    return True


def _check_deadline(deadline_ms: int, when: str) -> None:
    late_ms = time.time_ns() // 1_000_000 - deadline_ms
    if deadline_ms and late_ms >= 0:
        raise DeadlineError(f"request deadline passed {late_ms} ms ago when it {when}; not computed")


def _fail(items: list[_Item], error: EdgecutError) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
