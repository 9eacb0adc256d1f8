"""The engine loop: one thread owns the `LLM`; HTTP handlers talk to it through an inbox.

The engine is not thread-safe, so handlers never call it. They put requests and aborts in
an inbox; the loop thread drains the inbox, runs `step()`, and hands the step's snapshots to
the asyncio queues of their streams with one `loop.call_soon_threadsafe` a step (one wake-up
of the event loop however many requests progressed). The model runs in that thread, so the
event loop stays free to accept connections and notice disconnects.

The server asks the engine for deltas (streaming) or one final output (otherwise), so each
completion's finish reason arrives exactly once; latency histograms come from the engine's
own request metrics, whichever kind a request asked for.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ember.engine import LLM, RequestOutput, SamplingParams
from ember.serve.metrics import Metrics

_ACCEPTED = object()  # first item on a stream's queue once the engine took its requests


class ServerBusy(Exception):
    """The waiting queue is full; the handler answers 429."""


class EngineFailed(Exception):
    """`step()` raised something other than a user error; every request in flight gets it."""


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt), as they come."""

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.request_ids = request_ids
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.unfinished = set(request_ids)

    def put(self, item: Any) -> None:
        """Called from the engine thread."""
        hand_over(self.loop, [(self, item)])

    async def accepted(self) -> None:
        """Wait until the engine added the requests; re-raise its error (e.g. a bad prompt) if not."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.unfinished.clear()
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, Any]]) -> None:
    """Queue items on their streams (all of `loop`) in one event-loop callback; from the engine thread."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


@dataclass
class _Tracked:
    stream: RequestStream
    ttft_observed: bool = False


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[list[int]]
    params: list[SamplingParams]
    arrival: float = field(default_factory=time.perf_counter)
    lora_name: str | None = None  # the LoRA adapter the request picked by its model name


class AsyncEngine:
    def __init__(self, llm: LLM, max_waiting: int | None = None, metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Add | list[str]] = []  # adds, and lists of request ids to abort
        self._pending = 0  # engine requests in the inbox, not yet in the scheduler
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.gauges: dict[str, Any] = {}
        self._publish()

    # --- called from the event loop --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _has_room(self) -> bool:
        """Room for one more: below --max-waiting, or nothing queued and a free batch slot."""
        if self.max_waiting is None:
            return True
        waiting = self._pending + self.gauges["waiting"]
        return waiting < self.max_waiting or (
            waiting == 0 and self.gauges["running"] < self.llm.scheduler.max_num_seqs)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams],
               lora_name: str | None = None) -> RequestStream:
        """Queue one engine request per prompt; raises ServerBusy when the queue is full."""
        base = uuid.uuid4().hex
        stream = RequestStream([f"{base}-{i}" for i in range(len(prompts))], asyncio.get_running_loop())
        with self._lock:
            if not self._has_room():
                self.metrics.rejected += 1
                raise ServerBusy(f"The server is busy ({self._pending + self.gauges['waiting']} requests waiting); "
                                 "try again later.")
            self._inbox.append(_Add(stream, prompts, params, lora_name=lora_name))
            self._pending += len(prompts)
            self._wake.notify()
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop whatever of `stream` is unfinished (the client left); cheap when nothing is."""
        if not stream.unfinished:
            return
        with self._lock:
            self._inbox.append(list(stream.unfinished))
            self._wake.notify()
        stream.unfinished.clear()

    # --- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        while True:
            with self._lock:
                while not self._inbox and not llm.has_unfinished() and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    break
                if self._inbox:  # else the gauges are as the last step left them
                    # Admit under the lock so `_has_room` never sees a request in neither count.
                    for item in self._inbox:
                        self._add(item) if isinstance(item, _Add) else self._abort(item)
                    self._inbox, self._pending = [], 0
                    self._publish()
            if not llm.has_unfinished():
                continue
            try:
                outputs = llm.step()
            except Exception as e:  # a bug or an impossible pool; fail loudly but keep serving
                traceback.print_exc()  # the operator's log gets the whole story; clients get one line
                self._fail_all(EngineFailed(f"The engine failed: {e}"))
                continue
            ready: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
            for out in outputs:
                stream = self._deliver(out)
                if stream is not None:
                    ready.setdefault(stream.loop, []).append((stream, out))
            for loop, items in ready.items():
                hand_over(loop, items)
            with self._lock:
                self._publish()

    def _add(self, item: _Add) -> None:
        added: list[str] = []
        try:
            for rid, ids, params in zip(item.stream.request_ids, item.prompts, item.params):
                self.llm.add_request(ids, params, request_id=rid, arrival_time=item.arrival, lora_name=item.lora_name)
                added.append(rid)
        except Exception as e:  # EmberError (bad prompt/params) becomes a 400 in the handler
            for rid in added:
                self.llm.abort(rid)
            item.stream.put(e)
            return
        for rid in added:
            self._tracked[rid] = _Tracked(item.stream)
        item.stream.put(_ACCEPTED)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            tracked = self._tracked.pop(rid, None)
            if tracked is not None:  # still running: its KV blocks go back to the pool now
                self.llm.abort(rid)
                self.metrics.finished["abort"] += 1

    def _deliver(self, out: RequestOutput) -> RequestStream | None:
        """Record `out`'s metrics; returns the stream it goes to (None: the request was aborted)."""
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return None
        m = out.metrics
        if not tracked.ttft_observed and m.first_token_time is not None:
            tracked.ttft_observed = True
            self.metrics.ttft.observe(m.first_token_time - m.arrival_time)
        for o in out.outputs:  # delta and final outputs carry each completion's finish once
            if o.finish_reason is not None:
                self.metrics.finished[o.finish_reason] += 1
        if out.finished:
            del self._tracked[out.request_id]
            if m.first_token_time is not None and m.num_generated_tokens > 1:
                self.metrics.tpot.observe((m.finished_time - m.first_token_time) / (m.num_generated_tokens - 1))
        return tracked.stream

    def _fail_all(self, error: Exception) -> None:
        for rid, tracked in list(self._tracked.items()):
            self.llm.abort(rid)
            tracked.stream.put(error)
        self._tracked.clear()

    def _publish(self) -> None:
        """Snapshot what /metrics and `_has_room` read (caller holds the lock)."""
        llm, sched, bm = self.llm, self.llm.scheduler, self.llm.block_manager
        self.gauges = {
            "running": len({s.request_id for s in sched.running}),
            "waiting": len({s.request_id for s in sched.waiting}),
            "kv_used": bm.num_used, "kv_free": bm.num_free, "kv_total": bm.num_blocks,
            "hit_rate": bm.hit_rate, "preemptions": sched.num_preemptions,
            "generation_tokens": llm.stats["generated_tokens"], "prompt_tokens": llm.stats["prompt_tokens"],
            "spec_proposed": llm.stats["spec_proposed_tokens"], "spec_accepted": llm.stats["spec_accepted_tokens"],
            "spec_acceptance_rate": llm.spec_acceptance_rate, "spec_mean_accepted_length": llm.spec_mean_accepted_length,
        }
