"""The encoder serving engine: bounded admission, the batch scheduler, and one model thread.

Three owners, kept apart: policy (scheduler.py decides batches from token counts), memory (the
model's workspace) and device (this engine's worker thread runs forward passes). The asyncio side
calls `submit()`; the worker thread answers through `loop.call_soon_threadsafe`.

Admission: a request is refused with `Overloaded` (HTTP 429) when the queue already holds
`max_queued_requests` requests or its tokens would pass `max_queued_tokens`; nothing waits unbounded.
A request's deadline passing drops its queued items (`DeadlineExceeded`, HTTP 504); a cancelled
request (client gone) has its queued items dropped before they reach the model.

Pipeline (pipeline=True, the default): three threads joined by bounded queues, so the model thread
does nothing but forward passes back to back. The scheduler thread takes the queue, plans batches and
packs batch N+1 while the model thread runs batch N (forward and pooling, which read the workspace);
the answer thread copies out, accounts and resolves batch N-1 (response encoding then runs on the event
loop). Each queue holds one batch, so at most three batches are in flight and planning never runs far
ahead of the model. An error in a batch fails only that batch's requests, whichever stage it hits; an
unexpected error in a stage kills the engine (health 503) and fails everything still in flight.
pipeline=False runs the three stages inline on one thread (the baseline of benchmarks/serve.py's
model-busy figure).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import native
from .encoder import Encoder
from .errors import TurboServeError
from .loader import weights_fingerprint
from .model import sentence_embedding
from .ops import use_device_on_this_thread
from .parallel import RankFailure
from .packing import pack_tokens
from .scheduler import CostTable, dp_partition, fifo_partition
from .tokenizer import Encoded

log = logging.getLogger("turboserve")


class Overloaded(TurboServeError):
    """The queue bounds are reached: come back later (HTTP 429)."""


class TooLarge(TurboServeError):
    """A request larger than the whole queue: it can never be admitted (HTTP 413)."""


KINDS = ("embed", "classify", "hidden")


class NotReady(TurboServeError):
    """Loading, shutting down, or the engine died (HTTP 503)."""


class DeadlineExceeded(TurboServeError):
    """The request's deadline passed before it was served (HTTP 504)."""


@dataclass
class Timings:
    tokenize: float = 0.0
    queue: float = 0.0
    inference: float = 0.0


@dataclass
class Job:
    """One client request: several inputs, answered together."""
    items: list[Encoded]
    kind: str                         # "embed" | "classify" | "hidden" (per-token states)
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    first_start: float | None = None
    inference: float = 0.0
    admitted: bool = True             # counted against the queue bounds (health probes are not)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.items)


@dataclass
class WorkItem:
    job: Job
    index: int

    @property
    def length(self) -> int:
        return len(self.job.items[self.index].ids)


_END = object()


class _Stage:
    """A pipeline stage: one thread applying `fn` to the items of a one-slot queue, in order. An
    exception from `fn` fails that item's requests (`discard(item, error)`) and the stage goes on;
    after the engine died every item is discarded, so nothing upstream blocks and every request gets
    an answer."""

    def __init__(self, name: str, fn, engine: "EncoderEngine", discard):
        self.fn, self.engine, self.discard = fn, engine, discard
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        self.queue.put(item)

    def _loop(self) -> None:
        use_device_on_this_thread(self.engine.encoder.model.device)
        while True:
            item = self.queue.get()
            if item is _END:
                return
            self.engine._call(self.fn, item, self.discard)


@dataclass
class _Done:
    """A batch the model has run: what the answer stage needs."""
    batch: list
    lengths: list[int]
    tokens: int
    pooled: torch.Tensor | None
    logits: torch.Tensor | None
    hidden: tuple | None             # per sequence fp32 [L_i, H], copied out of the workspace
    elapsed: float


class EncoderEngine:
    def __init__(self, encoder: Encoder, *, max_batch_tokens: int = 4096, max_queued_requests: int = 512,
                 max_queued_tokens: int = 262144, policy: str = "fifo", lazy_timeout: float = 0.0,
                 cost_table: CostTable | None = None, metrics=None, pipeline: bool = True):
        self.encoder = encoder
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.policy = policy
        self.lazy_timeout = lazy_timeout          # 0: hungry (run as soon as the model is idle)
        self.cost_table = cost_table
        # The table measures batches in isolation. Serving adds a per-batch cost it does not see (each
        # of the ~100 GIL-releasing ops of a forward waits for the busy event loop to hand the GIL
        # back). Without a term for it the DP exploited table noise and cut a longtail queue of 120
        # into 15-22 batches where 3 fit, losing 30% throughput to FIFO (docs/benchmarks.md). The
        # table's own smallest cell, the fixed cost of one forward, stands in for it.
        self.batch_overhead = float(cost_table.cost(1, cost_table.lengths[0])) if cost_table is not None else 0.0
        self.metrics = metrics
        self._queue: list[WorkItem] = []
        self._queued_tokens = 0
        self._jobs: dict[asyncio.Future, Job] = {}     # admitted jobs not yet answered
        self._cv = threading.Condition()
        self._stopping = False
        self.dead: BaseException | None = None
        self.batches_run = 0
        self.items_run = 0
        self.busy_seconds = 0.0          # model thread time in forward + pooling
        self.last_batch = time.monotonic()   # when the model stage last finished a batch
        self._state_lock = threading.Lock()     # job.remaining / results: answer stage vs scheduler
        self.pipeline = pipeline
        native.release_thread_pool()       # the model was loaded on this thread; the engine's threads run it
        self._answer = _Stage("turboserve-answer", self._answer_batch, self, self._discard_done) if pipeline else None
        self._model = _Stage("turboserve-model", self._model_batch, self, self._discard_packed) if pipeline else None
        self._thread = threading.Thread(target=self._run, name="turboserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    def submit(self, items: list[Encoded], kind: str, timeout: float, admit: bool = True) -> asyncio.Future:
        """Queue a request; its future resolves to (per-input results, Timings).
        admit=False (health probes) skips the queue bounds."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        loop = asyncio.get_running_loop()
        job = Job(items, kind, time.perf_counter() + timeout, loop, loop.create_future(), admitted=admit)
        job.results = [None] * len(items)
        job.remaining = len(items)
        tokens = job.tokens
        with self._cv:
            if self._stopping or self.dead is not None:
                raise NotReady("the engine is shutting down" if self._stopping else "the engine has failed")
            if not admit:
                self._queue.insert(0, WorkItem(job, 0))
                self._cv.notify()
                return job.future
            if tokens > self.max_queued_tokens:
                raise TooLarge(f"the request has {tokens} tokens; the queue holds at most {self.max_queued_tokens}")
            self._check_room(tokens)
            self._queued_tokens += tokens
            self._jobs[job.future] = job
            self._queue.extend(WorkItem(job, i) for i in range(len(items)))
            self._report_queue()
            self._cv.notify()
        return job.future

    def cancel(self, future: asyncio.Future) -> None:
        """Drop a request's queued work (its client went away); items already in the model finish,
        the rest never reach it."""
        with self._cv:
            job = self._jobs.get(future)
            if job is not None:
                job.cancelled = True

    def progressing(self, within: float) -> bool:
        """Busy (admitted work waiting or running) and a batch finished in the last `within`
        seconds: a probe would only queue behind that work, so this is the health answer."""
        with self._cv:
            busy = bool(self._jobs)
        return busy and time.monotonic() - self.last_batch < within

    def check_room(self) -> None:
        """Overloaded if a request could not be queued now (asked before tokenizing it)."""
        with self._cv:
            self._check_room(1)

    def _check_room(self, tokens: int) -> None:
        """Overloaded unless one more request of `tokens` fits in both bounds (under self._cv)."""
        if len(self._jobs) >= self.max_queued_requests or self._queued_tokens + tokens > self.max_queued_tokens:
            raise Overloaded(f"queue full ({len(self._jobs)} requests, {self._queued_tokens} tokens queued)")

    @property
    def queue_depth(self) -> tuple[int, int]:
        return len(self._jobs), self._queued_tokens

    def _threads(self) -> list[threading.Thread]:
        return [self._thread] + ([self._model.thread, self._answer.thread] if self.pipeline else [])

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads()) and self.dead is None and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, then stop the threads."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        deadline = time.perf_counter() + timeout
        for t in self._threads():
            t.join(max(0.0, deadline - time.perf_counter()))

    # ------------------------------------------------------------------ worker side
    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self._jobs), self._queued_tokens)

    def _take(self) -> list[WorkItem]:
        """Wait for work (hungry: at once; lazy: until the budget fills or the timeout passes)."""
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return []
                self._cv.wait(timeout=1.0)
            if self.lazy_timeout > 0:
                first = self._queue[0].job.enqueued
                while (sum(i.length for i in self._queue) < self.max_batch_tokens and not self._stopping
                       and time.perf_counter() - first < self.lazy_timeout):
                    self._cv.wait(timeout=max(0.0, self.lazy_timeout - (time.perf_counter() - first)))
            items, self._queue = self._queue, []
            return items

    def _finish_job_accounting(self, job: Job) -> None:
        if not job.admitted:
            return
        with self._cv:
            self._jobs.pop(job.future, None)
            self._queued_tokens -= job.tokens
            self._report_queue()

    def _resolve(self, job: Job, error: BaseException | None = None) -> None:
        if error is None:
            result = (job.results, Timings(queue=(job.first_start or time.perf_counter()) - job.enqueued,
                                           inference=job.inference))
        else:
            result = error

        def deliver():
            if job.future.done():
                return
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        try:
            job.loop.call_soon_threadsafe(deliver)
        except RuntimeError:        # the caller's event loop is closed: nobody is waiting for this answer
            pass

    def _drop_dead_items(self, items: list[WorkItem]) -> list[WorkItem]:
        with self._state_lock:
            return self._drop_dead_items_locked(items)

    def _drop_dead_items_locked(self, items: list[WorkItem]) -> list[WorkItem]:
        now = time.perf_counter()
        live = []
        for item in items:
            job = item.job
            if job.remaining < 0:                # failed or dropped already (maybe in an earlier batch)
                continue
            if job.cancelled or now > job.deadline:
                job.remaining = -1               # never resolve, nor account, twice
                self._finish_job_accounting(job)
                if not job.cancelled:
                    self._resolve(job, DeadlineExceeded("the request's deadline passed while it was queued"))
                continue
            live.append(item)
        return live

    def plan(self, items: list[WorkItem]) -> list[list[WorkItem]]:
        lengths = [i.length for i in items]
        if self.policy == "dp" and self.cost_table is not None:
            groups = dp_partition(lengths, self.cost_table, self.max_batch_tokens,
                                  batch_overhead=self.batch_overhead)
        else:
            groups = fifo_partition(lengths, self.max_batch_tokens)
        return [[items[i] for i in g] for g in groups]

    def _run(self) -> None:
        """The scheduler stage: take, plan, drop what is dead, pack; then the model stage (inline
        without the pipeline)."""
        use_device_on_this_thread(self.encoder.model.device)
        try:
            while True:
                items = self._take()
                if not items:
                    break
                for batch in self.plan(items):
                    batch = self._drop_dead_items(batch)
                    if not batch:
                        continue
                    packed = self._pack(batch)
                    if packed is None:
                        continue
                    if self.pipeline:
                        self._model.put((batch, packed))
                    else:
                        self._call(self._model_batch, (batch, packed), self._discard_packed)
        except BaseException as exc:
            self._die(exc)
        finally:
            if self.pipeline:
                self._model.put(_END)
                self._model.thread.join()
                self._answer.put(_END)

    def _call(self, fn, item, discard) -> None:
        """Run one stage on one batch; its failure fails that batch's requests only."""
        if self.dead is not None:
            discard(item, NotReady("the engine has failed"))
            return
        try:
            fn(item)
        except RankFailure as exc:      # a tensor-parallel rank is gone: so is the engine (/health 503)
            self._die(exc)
            discard(item, NotReady(str(exc)))
        except Exception as exc:
            log.exception("a batch failed in %s", fn.__name__)
            discard(item, exc)
        except BaseException as exc:
            self._die(exc)
            discard(item, NotReady("the engine has failed"))

    def _die(self, exc: BaseException) -> None:
        """A bug in the engine: report unhealthy and fail everything queued."""
        if self.dead is None:
            log.error("engine died", exc_info=exc)
            self.dead = exc
        with self._cv:
            pending, self._queue = self._queue, []
            in_flight = list(self._jobs.values())     # taken from the queue but not answered too
        self._fail_jobs([i.job for i in pending] + in_flight, NotReady("the engine has failed"))

    def _fail_jobs(self, jobs, error: BaseException) -> None:
        with self._state_lock:
            for job in {id(j): j for j in jobs}.values():
                if job.remaining > 0:            # 0: answered already; < 0: failed or dropped
                    job.remaining = -1
                    self._finish_job_accounting(job)
                    self._resolve(job, error)

    def _discard_packed(self, item, error: BaseException) -> None:
        self._fail_jobs([w.job for w in item[0]], error)

    def _discard_done(self, done: _Done, error: BaseException) -> None:
        self._fail_jobs([w.job for w in done.batch], error)

    def _pack(self, batch: list[WorkItem]):
        start = time.perf_counter()
        with self._state_lock:
            for item in batch:
                if item.job.first_start is None:
                    item.job.first_start = start
        encoded = [i.job.items[i.index] for i in batch]
        try:
            return pack_tokens([e.ids for e in encoded], [e.type_ids for e in encoded],
                               self.encoder.model.position_offset)
        except Exception as exc:        # this batch fails, the engine goes on
            log.exception("packing a batch failed")
            self._fail_jobs([i.job for i in batch], exc)
            return None

    def _model_batch(self, item) -> None:
        """The model stage: forward and pooling (both read the workspace, so they stay together)."""
        batch, packed = item
        enc = self.encoder
        start = time.perf_counter()
        hidden = enc.model.forward(packed)
        kinds = {i.job.kind for i in batch}
        # results leave the model's device here (no-ops on the CPU)
        pooled = sentence_embedding(hidden, packed, enc.pooling, enc.model).cpu() if "embed" in kinds else None
        logits = enc.model.classify(hidden, packed).cpu() if "classify" in kinds else None
        cu = packed.cu_seqlens
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        states = (hidden.float().cpu().clone().split(lengths)          # the workspace is reused
                  if "hidden" in kinds else None)
        elapsed = time.perf_counter() - start
        self.busy_seconds += elapsed
        self.last_batch = time.monotonic()
        done = _Done(batch, lengths, packed.num_tokens, pooled, logits, states, elapsed)
        if self.pipeline:
            self._answer.put(done)
        else:
            self._call(self._answer_batch, done, self._discard_done)

    def _answer_batch(self, done: _Done) -> None:
        """The answer stage: copy each input's row out, account, resolve finished requests."""
        served = any(item.job.admitted for item in done.batch)    # not a batch of health probes only
        if served:
            self.batches_run += 1
            self.items_run += len(done.batch)
        if self.metrics is not None and served:
            self.metrics.batch(len(done.batch), done.tokens, done.elapsed)
            self.metrics.model_busy.inc(done.elapsed)
        with self._state_lock:
            for row, item in enumerate(done.batch):
                job = item.job
                if job.remaining < 0:
                    continue
                out = {"embed": done.pooled, "classify": done.logits, "hidden": done.hidden}[job.kind][row]
                job.results[item.index] = out.clone()
                job.inference += done.elapsed * done.lengths[row] / done.tokens
                job.remaining -= 1
                if job.remaining == 0:
                    self._finish_job_accounting(job)
                    self._resolve(job)


# ---------------------------------------------------------------------- cost table
COST_VERSION = "3"          # bump when what a cell measures changes (cached tables keyed by it);
                            # 3: pooling includes the Dense modules and SPLADE's masked-LM head
COST_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
COST_LENGTHS = [8, 16, 32, 64, 128, 256, 512]


def cost_cache_path(encoder: Encoder, max_batch_tokens: int) -> Path:
    """Keyed by everything a cell's time depends on: weights, dtype (and precision plan), threads,
    the model's device and tensor-parallel degree, the budget, and the kernels' sources."""
    model = encoder.model
    tp = getattr(getattr(model, "tp", None), "world", 1)
    kernels = [Path(__file__).with_name("native").joinpath("kernels.c").read_text()]
    if model.device.type == "cuda":
        kernels.append(Path(__file__).with_name("ops").joinpath("triton_kernels.py").read_text())
    ident = [COST_VERSION, weights_fingerprint(encoder.model_dir), encoder.dtype, encoder.pooling_key(),
             str(torch.get_num_threads()),
             str(model.device), f"tp{tp}", str(max_batch_tokens), *kernels]
    plan = getattr(encoder, "precision_plan", None)
    if plan is not None:
        ident.append(json.dumps(plan.layers, sort_keys=True))
    key = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    return native.cache_dir() / "costs" / f"{key}.json"


def measure_cost_table(encoder: Encoder, max_batch_tokens: int, use_cache: bool = True) -> CostTable:
    """Batch latency (pack + forward + pooling, best of 3) over a (batch size, length) grid, on this
    machine, cached on disk (cost_cache_path: model, dtype, threads, device, tensor-parallel degree,
    budget and kernel sources). About 5-20 s for MiniLM on 2 cores."""
    path = cost_cache_path(encoder, max_batch_tokens)
    if use_cache and path.exists():
        return CostTable.from_json(json.loads(path.read_text()))
    t0 = time.perf_counter()
    limit = encoder.model.max_tokens
    lengths = [n for n in COST_LENGTHS if n <= limit] or [limit]
    model = encoder.model
    rng = np.random.default_rng(0)
    seconds = []
    for b in COST_SIZES:
        row = []
        for n in lengths:
            if b * n > max_batch_tokens:
                row.append(float("nan"))
                continue
            ids = [list(rng.integers(1000, min(model.vocab_size, 20000), n)) for _ in range(b)]
            seqs = [[int(t) for t in s] for s in ids]
            runs = []
            for _ in range(3):
                # what a batch costs the engine: packing, forward and pooling
                s = time.perf_counter()
                packed = pack_tokens(seqs, None, model.position_offset)
                pooled = sentence_embedding(model.forward(packed), packed, encoder.pooling, model)
                if pooled.is_cuda:
                    torch.cuda.synchronize(pooled.device)      # time the work, not its launch
                runs.append(time.perf_counter() - s)
            row.append(float(np.min(runs)))
        seconds.append(row)
    table = CostTable(COST_SIZES, lengths, seconds,
                      {"dtype": encoder.dtype, "threads": torch.get_num_threads(), "budget": max_batch_tokens,
                       "measured_in_s": round(time.perf_counter() - t0, 2)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_json()))
    os.replace(tmp, path)
    return table
