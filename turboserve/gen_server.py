"""OpenAI completions and chat completions for decoder models, streaming or not.

`turboserve serve` builds this app instead of the encoder one when the model directory holds a
decoder (arch.is_decoder). One handler serves both routes: check every field (nothing is queued
for a request that will be refused), parse (completions: prompt text or token ids, or a list of
them; chat: messages rendered with the model's chat template; both off the event loop) ->
AsyncLLM.submit (one engine request per prompt, one shared queue) -> either collect the events into
one JSON answer or forward them as server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`. A client that disconnects, streaming or not, has its requests aborted, which frees
their KV blocks before the next engine step. Errors use the OpenAI error shape and the encoder
server's codes; an error mid-stream is one error event, then `[DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import orjson
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import parallel
from .errors import InvalidInputError, TurboServeError
from .llm import AsyncLLM, DecoderTokenizer, EngineDead, LLMEngine, QueueFull, StreamEvent
from .metrics import LATENCY_BUCKETS
from .sampling import Draw, SamplingParams
from .server import ApiError, JSONResponse, ServerConfig, _read_json, _until_disconnect, error_body, error_response, log


class GenMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("turboserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.running = Gauge("turboserve_running_requests", "sequences in the running batch", registry=r)
        self.waiting = Gauge("turboserve_waiting_requests", "sequences waiting to start", registry=r)
        self.kv_usage = Gauge("turboserve_kv_cache_usage", "fraction of KV cache blocks in use", registry=r)
        self.preemptions = Gauge("turboserve_preemptions", "sequences preempted so far (recomputed later)", registry=r)
        self.step_tokens = Histogram("turboserve_step_tokens", "tokens per engine step",
                                     buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        self.step_seconds = Histogram("turboserve_step_seconds", "engine step time", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("turboserve_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("turboserve_time_per_output_token_seconds", "mean time between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)

    def step(self, llm: AsyncLLM, seconds: float, outputs) -> None:
        e = llm.engine
        self.step_seconds.observe(seconds)
        self.step_tokens.observe(e.last_step_tokens)
        self.running.set(len(e.running))
        self.waiting.set(len(e.waiting))
        self.kv_usage.set(e.blocks.used_blocks / e.blocks.num_blocks)
        self.preemptions.set(e.stats.preemptions)
        for out in outputs:
            s = out.seq
            if len(s.output_ids) == 1:
                self.ttft.observe(s.first_token_time - s.arrival)
            if out.finished and len(s.output_ids) > 1:
                self.tpot.observe((time.perf_counter() - s.first_token_time) / (len(s.output_ids) - 1))


def _num(body: dict, key: str, default, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ApiError(400, f"`{key}` must be a{'n integer' if kind is int else ' number'}")
    return kind(v)


def _flag(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"`{key}` must be a boolean")
    return v


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """OpenAI fields that would change the answer and that this server does not implement are a 400,
    not silently ignored (a client asking for JSON output or tool calls must not get plain text)."""
    given = {k: v for k, v in body.items() if v not in (None, False, {}, [])}
    for key in ("tools", "functions", "suffix", "audio", "prediction"):
        if key in given:
            raise ApiError(400, f"`{key}` is not supported by this server")
    if "echo" in given and chat:
        raise ApiError(400, "`echo` is for completions (chat completions have no prompt text to echo)")
    fmt = given.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "`response_format` other than {\"type\": \"text\"} is not supported by this server")
    if "best_of" in given and given["best_of"] != body.get("n", 1):
        raise ApiError(400, "`best_of` other than `n` is not supported by this server")
    if given.get("modalities") not in (None, ["text"]):
        raise ApiError(400, "only the text modality is supported")


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: a JSON object whose keys are token ids as strings."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ApiError(400, "`logit_bias` must be an object mapping token ids to numbers")
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise ApiError(400, "`logit_bias` keys must be token ids") from None


def sampling_from(body: dict, chat: bool) -> SamplingParams:
    _refuse_unsupported(body, chat)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "`stop` must be a string or a list of strings")
    if chat:
        top = body.get("top_logprobs")
        logprobs = (0 if top is None else top) if _flag(body, "logprobs") else None
        max_tokens = body.get("max_completion_tokens")
        max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    else:
        logprobs = body.get("logprobs")
        max_tokens = body.get("max_tokens", 16)
    # echo with logprobs: the prompt's tokens are scored too (what evaluation harnesses read)
    prompt_logprobs = logprobs if not chat and _flag(body, "echo") else None
    try:
        return SamplingParams(
            n=_num(body, "n", 1, int), max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0),
            top_p=_num(body, "top_p", 1.0), top_k=_num(body, "top_k", 0, int), min_p=_num(body, "min_p", 0.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0),
            presence_penalty=_num(body, "presence_penalty", 0.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0),
            seed=body.get("seed"), stop=stop or [], stop_token_ids=body.get("stop_token_ids") or [],
            ignore_eos=_flag(body, "ignore_eos"), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=_logit_bias(body),
            min_tokens=_num(body, "min_tokens", 0, int))
    except InvalidInputError as exc:
        raise ApiError(400, str(exc)) from None


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt)


MAX_PROMPTS = 64


def _prompts(tokenizer: DecoderTokenizer, prompt) -> list[list[int]]:
    """A completions `prompt`: a string, token ids, or a list of either (one choice group each)."""
    if isinstance(prompt, str) and prompt:
        return [tokenizer.encode(prompt)]
    if _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS and all(
            (isinstance(p, str) and p) or _is_ids(p) for p in prompt):
        return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
    raise ApiError(400, "`prompt` must be a non-empty string, a list of token ids, or a list of up to "
                        f"{MAX_PROMPTS} of either")


def _messages(body) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "`messages` must be a non-empty list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a `role` string and `content`")
        content = m.get("content")
        if isinstance(content, list):           # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, "only text content parts are supported")
            if not all(isinstance(p.get("text", ""), str) for p in content):
                raise ApiError(400, "a text content part's `text` must be a string")
            content = "".join(p.get("text", "") for p in content)
        if content is None and m["role"] == "assistant":     # e.g. an earlier turn that only called tools
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, "message `content` must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _logprobs_payload(draws, tokenizer, chat: bool, offset: int = 0):
    """OpenAI's logprobs of `draws` (None: not asked for). Completions' text_offset counts each
    token's own text from `offset` (the characters of the choice's earlier tokens)."""
    if draws is None:
        return None
    tokens = [tokenizer.decode([d.token], False) for d in draws]
    if chat:
        return {"content": [{"token": t, "logprob": d.logprob, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": (a := tokenizer.decode([i], False)), "logprob": lp,
                                               "bytes": list(a.encode())} for i, lp in (d.top or [])]}
                            for t, d in zip(tokens, draws)]}
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [d.logprob for d in draws],
            "top_logprobs": [None if d.logprob is None else
                             {tokenizer.decode([i], False): lp for i, lp in (d.top or [])} for d in draws],
            "text_offset": offsets}


def _api_error(exc: BaseException) -> ApiError:
    """The HTTP answer to an engine error, raised at submit or delivered on a request's queue."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "Overloaded")
    if isinstance(exc, EngineDead):
        return ApiError(503, str(exc), "Unhealthy")
    if isinstance(exc, TurboServeError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {exc}", "Backend")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _Job:
    """One HTTP request's generation: its engine requests (one per prompt) feeding one queue."""
    llm: AsyncLLM
    request_ids: list[str]
    queue: asyncio.Queue
    params: SamplingParams
    choices: int
    prompt_tokens: int
    deadline: float          # for the first event only: a request still queued then is answered 504
    started: bool = False

    def abort(self) -> None:
        for rid in self.request_ids:
            self.llm.abort(rid)

    async def next(self) -> StreamEvent:
        timeout = None if self.started else max(0.0, self.deadline - time.perf_counter())
        try:
            ev = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            self.abort()
            raise ApiError(504, "the request's deadline passed before its first token", "Timeout") from None
        self.started = True
        if isinstance(ev, BaseException):
            raise _api_error(ev)
        return ev


def make_gen_app(config: ServerConfig) -> Starlette:
    metrics = GenMetrics()
    state = SimpleNamespace(status="loading", llm=None, tokenizer=None, name=config.served_name, error=None,
                            on_rank_failure=None)
    started = int(time.time())

    def load() -> None:
        try:
            from .allocator import keep_freed_memory
            from .decoder import DecoderModel
            torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
            keep_freed_memory()                   # as LLM.load does (docs/benchmarks.md: freed outputs)
            model = DecoderModel(config.model, config.dtype, device=config.device, kv_dtype=config.kv_dtype)
            if config.tensor_parallel != 1:
                model = parallel.start(model, config.tensor_parallel, config.threads)
                parallel.on_failure(model, lambda exc: state.on_rank_failure and state.on_rank_failure(exc))
            else:
                model.tune_kernels()              # tensor-parallel ranks tune their own shards
            tok = DecoderTokenizer(model.model_dir)
            engine = LLMEngine(model, tok, max_batch_tokens=config.max_batch_tokens,
                               max_waiting=config.max_queued_requests, cuda_graphs=config.cuda_graphs)
            state.llm, state.tokenizer = AsyncLLM(engine, metrics), tok
            state.name = config.served_name or model.model_dir.name
            log.info("ready: decoder %s (%s), dtype %s, threads %d, memory budget: weights %.0f MiB + %s KV cache "
                     "%.0f MiB (%d blocks of %d tokens), step budget %d tokens, <= %d waiting",
                     model.model_dir, model.spec.model_type, config.dtype, torch.get_num_threads(),
                     model.weight_bytes / 2**20, model.kv_dtype, engine.kv_cache_bytes / 2**20, engine.blocks.num_blocks,
                     engine.blocks.block_size, config.max_batch_tokens, config.max_queued_requests)
            state.status = "ready"
        except Exception as exc:
            log.error("model failed to load: %s", exc)
            state.status, state.error = "failed", str(exc)
            if state.on_rank_failure is not None:       # serve(): a server without its model exits 1
                state.on_rank_failure(exc)

    def require_ready() -> AsyncLLM:
        llm = state.llm
        if state.status != "ready" or llm is None or not llm.alive():
            reason = {"loading": "the model is loading", "shutting_down": "the server is shutting down",
                      "failed": f"the model failed to load: {state.error}"}.get(state.status,
                                                                                 "the engine has failed")
            raise ApiError(503, reason, "Unhealthy")
        return llm

    def make_handler(route: str, chat: bool):
        async def handler(request: HttpRequest) -> Response:
            status = 200
            try:
                body = await _read_json(request, config.payload_limit)
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                llm = require_ready()
                tok: DecoderTokenizer = state.tokenizer
                params = sampling_from(body, chat)          # every field checked before anything starts
                stream = _flag(body, "stream")
                options = body.get("stream_options")
                if options is not None and not isinstance(options, dict):
                    raise ApiError(400, "`stream_options` must be an object")
                include_usage = _flag(options or {}, "include_usage")
                loop = asyncio.get_running_loop()
                try:                  # tokenizing a large prompt must not stall the other streams
                    if chat:
                        messages = _messages(body)
                        prompts = [await loop.run_in_executor(None, tok.apply_chat_template, messages)]
                    else:
                        prompts = await loop.run_in_executor(None, _prompts, tok, body.get("prompt"))
                except InvalidInputError as exc:
                    raise ApiError(400, str(exc)) from None
                if len(prompts) * params.n > llm.engine.max_waiting:
                    raise ApiError(400, f"{len(prompts)} prompts x n = {params.n} is over this server's bound of "
                                        f"{llm.engine.max_waiting} waiting sequences")
                rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
                job = _Job(llm, [rid] if len(prompts) == 1 else [f"{rid}-{k}" for k in range(len(prompts))],
                           asyncio.Queue(), params, len(prompts) * params.n, sum(map(len, prompts)),
                           time.perf_counter() + config.request_timeout)
                try:
                    for k, (r, ids) in enumerate(zip(job.request_ids, prompts)):
                        llm.submit(r, ids, params, queue=job.queue, index_base=k * params.n)
                except TurboServeError as exc:
                    job.abort()       # the prompts already submitted
                    raise _api_error(exc) from None
                meta = {"id": rid, "created": int(time.time()), "model": state.name}
                echo = None
                if not chat and _flag(body, "echo"):     # each prompt as given, or its ids decoded
                    raw = body.get("prompt")
                    raw = [raw] if isinstance(raw, str) or _is_ids(raw) else raw
                    echo = [(r if isinstance(r, str) else tok.decode(r, False), ids) for r, ids in zip(raw, prompts)]
                if stream:           # what fails before the first token (504, 429) is a real HTTP status
                    try:
                        first = await job.next()
                    except BaseException:
                        job.abort()
                        raise
                    return StreamingResponse(_sse(job, chat, include_usage, meta, tok, first, echo),
                                             media_type="text/event-stream")
                payload = await _collect(job, chat, meta, request, tok, echo)
                if payload is None:
                    status = 499                      # client closed the request; nobody reads this
                    return Response(status_code=499)
                return JSONResponse(payload)
            except ApiError as err:
                status = err.status
                return error_response("openai", err)
            finally:
                metrics.requests.labels(route, str(status)).inc()
        return handler

    async def _collect(job: _Job, chat, meta, request, tok, echo=None):
        """The whole answer, or None if the client went away first (its requests aborted at once).
        echo: per prompt (text, token ids), put before its choices' text and logprobs."""
        n = job.choices
        text, lps, count, reasons = [""] * n, [[] for _ in range(n)], [0] * n, [None] * n
        prompt_lps = [None] * n
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            finished = 0
            while finished < n:
                get = asyncio.ensure_future(job.next())
                done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.abort()
                    return None
                ev = get.result()
                text[ev.index] += ev.text
                count[ev.index] = ev.num_tokens
                lps[ev.index].extend(ev.logprobs or [])
                if ev.prompt_logprobs is not None:
                    prompt_lps[ev.index] = ev.prompt_logprobs
                if ev.finished:
                    reasons[ev.index] = ev.finish_reason
                    finished += 1
        except BaseException:
            job.abort()
            raise
        finally:
            watcher.cancel()
        choices = []
        for i in range(n):
            if echo is not None:
                prompt_text, prompt_ids = echo[i // job.params.n]
                text[i] = prompt_text + text[i]
                if prompt_lps[i] is not None:      # the first prompt token has no logprob
                    lps[i] = [Draw(prompt_ids[0]), *prompt_lps[i][1:], *lps[i]]
            lp = _logprobs_payload(lps[i] if job.params.logprobs is not None else None, tok, chat)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text[i]},
                                "logprobs": lp, "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": text[i], "logprobs": lp, "finish_reason": reasons[i]})
        completion = sum(count)
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(job.prompt_tokens, completion)}

    async def _sse(job: _Job, chat, include_usage, meta, tok, first: StreamEvent, echo=None):
        """Server-sent events. Starlette cancels this generator when the client disconnects; the
        `finally` then aborts the unfinished requests, freeing their KV blocks before the next step.
        echo: as _collect's, sent with each choice's first chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = job.choices
        count, offsets = [0] * n, [0] * n
        pending = [[] for _ in range(n)]       # draws of tokens whose text is still held back
        echoed = [echo is None] * n
        done = 0

        def chunk(choice) -> bytes:
            payload = {**meta, "object": obj, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return b"data: " + orjson.dumps(payload) + b"\n\n"
        try:
            if chat:
                for i in range(n):
                    yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            waiting = first
            while done < n:
                ev, waiting = waiting, None
                if ev is None:
                    try:
                        ev = await job.next()
                    except ApiError as err:
                        yield b"data: " + orjson.dumps(error_body("openai", err)) + b"\n\n"
                        break
                i = ev.index
                if not echoed[i]:                   # a continuation's first event
                    echoed[i] = True
                    prompt_text, prompt_ids = echo[i // job.params.n]
                    ev.text = prompt_text + ev.text
                    if ev.prompt_logprobs is not None:
                        pending[i] = [Draw(prompt_ids[0]), *ev.prompt_logprobs[1:]]
                count[i] = ev.num_tokens
                pending[i].extend(ev.logprobs or [])
                if not ev.text and not ev.finished:
                    continue
                lp = None
                if job.params.logprobs is not None:
                    lp = _logprobs_payload(pending[i], tok, chat, offsets[i])
                    offsets[i] += sum(len(t) for t in lp.get("tokens", []))
                pending[i] = []
                reason = ev.finish_reason if ev.finished else None
                if chat:
                    yield chunk({"index": i, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp,
                                 "finish_reason": reason})
                else:
                    yield chunk({"index": i, "text": ev.text, "logprobs": lp, "finish_reason": reason})
                done += ev.finished
            else:
                if include_usage:
                    yield b"data: " + orjson.dumps({**meta, "object": obj, "choices": [],
                                                    "usage": _usage(job.prompt_tokens, sum(count))}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if done < n:
                job.abort()

    async def health(request):
        """200 when the engine is making progress: while sequences run, a step ended in the last 10 s;
        when idle, it answers a one-token probe (ahead of the queue, past its bound) within 10 s."""
        try:
            llm = require_ready()
            if llm.engine.running and time.monotonic() - llm.last_step < 10.0:
                return Response(status_code=200)
            rid = "health-" + uuid.uuid4().hex
            queue = llm.submit(rid, [0], SamplingParams(temperature=0.0, max_tokens=1), admit=False)
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=10.0)
            finally:
                llm.abort(rid)
            if isinstance(ev, BaseException):
                raise ApiError(503, f"engine did not answer: {ev}", "Unhealthy")
            return Response(status_code=200)
        except TimeoutError:
            return JSONResponse({"error": "engine did not answer within 10 s", "error_type": "Unhealthy"},
                                status_code=503)
        except (ApiError, EngineDead) as err:
            return JSONResponse({"error": str(getattr(err, "message", err)), "error_type": "Unhealthy"},
                                status_code=503)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.name or "default", "object": "model", "created": started, "owned_by": "turboserve"}]})

    async def prometheus(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load, name="turboserve-load", daemon=True)
        loader.start()
        yield
        state.status = "shutting_down"
        # SIGTERM while loading: let the load end (the interpreter exiting under it aborted)
        await asyncio.get_running_loop().run_in_executor(None, loader.join)
        if state.llm is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.llm.stop)
            parallel.close(state.llm.engine.model)

    app = Starlette(routes=[
        Route("/v1/completions", make_handler("/v1/completions", False), methods=["POST"]),
        Route("/v1/chat/completions", make_handler("/v1/chat/completions", True), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.turboserve = state
    return app
