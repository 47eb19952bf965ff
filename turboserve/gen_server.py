"""OpenAI completions and chat completions for decoder models, streaming or not.

`turboserve serve` builds this app instead of the encoder one when the model directory holds a
decoder (arch.is_decoder). One handler serves both routes: parse (completions: prompt text or token
ids; chat: messages rendered with the model's chat template) -> AsyncLLM.submit -> either collect
the events into one JSON answer or forward them as server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`. A client that disconnects has its request aborted, which frees its KV
blocks before the next engine step. Errors use the OpenAI error shape and the encoder server's codes.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from types import SimpleNamespace

import orjson
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import parallel
from .errors import InputTooLongError, InvalidInputError, TurboServeError
from .llm import AsyncLLM, DecoderTokenizer, EngineDead, LLMEngine, QueueFull, StreamEvent
from .metrics import LATENCY_BUCKETS
from .sampling import SamplingParams
from .server import ApiError, JSONResponse, ServerConfig, _read_json, error_response, log


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


def sampling_from(body: dict, chat: bool) -> SamplingParams:
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "`stop` must be a string or a list of strings")
    if chat:
        logprobs = body.get("top_logprobs", 0) if body.get("logprobs") else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        logprobs = body.get("logprobs")
        max_tokens = body.get("max_tokens", 16)
    try:
        return SamplingParams(
            n=_num(body, "n", 1, int), max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0),
            top_p=_num(body, "top_p", 1.0), top_k=_num(body, "top_k", 0, int), min_p=_num(body, "min_p", 0.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0),
            presence_penalty=_num(body, "presence_penalty", 0.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0),
            seed=body.get("seed"), stop=stop or [], stop_token_ids=body.get("stop_token_ids") or [],
            ignore_eos=bool(body.get("ignore_eos", False)), logprobs=logprobs)
    except InvalidInputError as exc:
        raise ApiError(400, str(exc)) from None


def _prompt_ids(tokenizer: DecoderTokenizer, prompt) -> list[int]:
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_ids(tokenizer, prompt[0])
    raise ApiError(400, "`prompt` must be a non-empty string or a list of token ids (one prompt per request)")


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
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "message `content` must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _logprobs_payload(events_logprobs, token_ids, tokenizer, chat: bool, start: int = 0):
    if events_logprobs is None:
        return None
    draws = events_logprobs[start:]
    if chat:
        return {"content": [{"token": tokenizer.decode([d.token], False), "logprob": d.logprob, "bytes": None,
                             "top_logprobs": [{"token": tokenizer.decode([t], False), "logprob": lp, "bytes": None}
                                              for t, lp in (d.top or [])]} for d in draws]}
    return {"tokens": [tokenizer.decode([d.token], False) for d in draws],
            "token_logprobs": [d.logprob for d in draws],
            "top_logprobs": [{tokenizer.decode([t], False): lp for t, lp in (d.top or [])} for d in draws],
            "text_offset": []}


def make_gen_app(config: ServerConfig) -> Starlette:
    metrics = GenMetrics()
    state = SimpleNamespace(status="loading", llm=None, tokenizer=None, name=config.served_name, error=None,
                            on_rank_failure=None)
    started = int(time.time())

    def load() -> None:
        try:
            from .decoder import DecoderModel
            torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
            model = DecoderModel(config.model, config.dtype, device=config.device, kv_dtype=config.kv_dtype)
            if config.tensor_parallel != 1:
                model = parallel.start(model, config.tensor_parallel, config.threads)
                parallel.on_failure(model, lambda exc: state.on_rank_failure and state.on_rank_failure(exc))
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
                params = sampling_from(body, chat)
                try:
                    ids = tok.apply_chat_template(_messages(body)) if chat else _prompt_ids(tok, body.get("prompt"))
                except InvalidInputError as exc:
                    raise ApiError(400, str(exc)) from None
                rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
                try:
                    queue = llm.submit(rid, ids, params)
                except (InputTooLongError, InvalidInputError) as exc:
                    raise ApiError(400, str(exc)) from None
                except QueueFull as exc:
                    raise ApiError(429, str(exc), "Overloaded") from None
                except EngineDead as exc:
                    raise ApiError(503, str(exc), "Unhealthy") from None
                stream = bool(body.get("stream", False))
                include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
                deadline = time.perf_counter() + config.request_timeout
                meta = {"id": rid, "created": int(time.time()), "model": state.name}
                if stream:
                    return StreamingResponse(_sse(llm, rid, queue, params, ids, chat, include_usage, meta, deadline,
                                                  request, tok),
                                             media_type="text/event-stream")
                return JSONResponse(await _collect(llm, rid, queue, params, ids, chat, meta, deadline, request, tok))
            except ApiError as err:
                status = err.status
                return error_response("openai", err)
            finally:
                metrics.requests.labels(route, str(status)).inc()
        return handler

    async def _next(llm, rid, queue, deadline, request):
        """The next event; aborts the request if the client left or the deadline passed."""
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=max(0.0, min(0.5, deadline - time.perf_counter())))
            except TimeoutError:
                if time.perf_counter() >= deadline:
                    llm.abort(rid)
                    raise ApiError(504, "the request's deadline passed", "Timeout") from None
                if await request.is_disconnected():
                    llm.abort(rid)
                    raise asyncio.CancelledError
                continue
            if isinstance(ev, QueueFull):
                raise ApiError(429, str(ev), "Overloaded")
            if isinstance(ev, EngineDead) or not isinstance(ev, TurboServeError) and isinstance(ev, BaseException):
                raise ApiError(503, str(ev), "Unhealthy")
            if isinstance(ev, BaseException):
                raise ApiError(400, str(ev))
            return ev

    async def _collect(llm, rid, queue, params, ids, chat, meta, deadline, request, tok):
        final: dict[int, StreamEvent] = {}
        try:
            while len(final) < params.n:
                ev = await _next(llm, rid, queue, deadline, request)
                if ev.finished:
                    final[ev.index] = ev
        except BaseException:
            llm.abort(rid)
            raise
        choices = []
        for i in range(params.n):
            ev = final[i]
            lp = _logprobs_payload(ev.logprobs, ev.token_ids, tok, chat)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": ev.text},
                                "logprobs": lp, "finish_reason": ev.finish_reason})
            else:
                choices.append({"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason})
        completion = sum(len(ev.token_ids) for ev in final.values())
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

    async def _sse(llm, rid, queue, params, ids, chat, include_usage, meta, deadline, request, tok):
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent_text = [""] * params.n
        sent_tokens = [0] * params.n
        done = 0

        def chunk(choice) -> bytes:
            payload = {**meta, "object": obj, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return b"data: " + orjson.dumps(payload) + b"\n\n"
        try:
            if chat:
                for i in range(params.n):
                    yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
            while done < params.n:
                try:
                    ev = await _next(llm, rid, queue, deadline, request)
                except ApiError as err:
                    yield b"data: " + orjson.dumps({"error": {"message": err.message, "type": err.kind,
                                                                          "code": err.status}}) + b"\n\n"
                    return
                delta = ev.text[len(sent_text[ev.index]):]
                lp = _logprobs_payload(ev.logprobs, ev.token_ids, tok, chat, sent_tokens[ev.index])
                sent_text[ev.index] = ev.text
                sent_tokens[ev.index] = len(ev.token_ids)
                if not delta and not ev.finished:
                    continue
                reason = ev.finish_reason if ev.finished else None
                if chat:
                    yield chunk({"index": ev.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                                 "finish_reason": reason})
                else:
                    yield chunk({"index": ev.index, "text": delta, "logprobs": lp, "finish_reason": reason})
                done += ev.finished
            if include_usage:
                completion = sum(sent_tokens)
                yield b"data: " + orjson.dumps({**meta, "object": obj, "choices": [], "usage": {
                    "prompt_tokens": len(ids), "completion_tokens": completion,
                    "total_tokens": len(ids) + completion}}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if done < params.n:
                llm.abort(rid)            # the client went away mid-stream: free its KV blocks now

    async def health(request):
        """200 only when the engine produces a token for a one-token probe (which skips the queue bound)."""
        try:
            llm = require_ready()
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
        threading.Thread(target=load, name="turboserve-load", daemon=True).start()
        yield
        state.status = "shutting_down"
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
