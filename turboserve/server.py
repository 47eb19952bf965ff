"""`turboserve serve`: the HTTP server (OpenAI and TEI wire formats) over the encoder engine.

One request pipeline (`make_route`) serves the model routes: read the body under the payload limit,
validate into a plain `Parsed`, answer overload before tokenizing (429), tokenize off the event loop,
submit to the engine (bounded queue, 429 when full, 413 when larger than the whole queue), await the result while watching for the client going away (its queued work is dropped), and
shape the answer. Routes differ only in their parse and respond functions. Errors keep each API's own
shape: OpenAI {"error": {"message", "type", "param", "code"}}, TEI {"error", "error_type"}.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
import orjson
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Route

from . import __version__, parallel
from .encoder import Encoder, sparse_entries
from .engine import DeadlineExceeded, EncoderEngine, NotReady, Overloaded, TooLarge, measure_cost_table
from .errors import InputTooLongError, InvalidInputError, TurboServeError
from .metrics import Metrics

log = logging.getLogger("turboserve")


class JSONResponse(_StarletteJSONResponse):
    """JSON via orjson: the stdlib encoder spent ~17% of the event loop's time formatting embedding
    floats under load."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class ServerConfig:
    model: str | None = None
    dtype: str = "fp32"                       # fp32 | bf16 | int8 | auto (a layer-wise precision plan)
    quality_bound: float = 0.999              # dtype auto: min cosine of pooled embeddings against fp32
    calibration: str | None = None            # dtype auto: calibration texts, one per line
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    max_batch_tokens: int = 4096
    max_queued_requests: int = 512
    max_queued_tokens: int = 262144
    max_client_batch_size: int = 1024         # inputs in one request
    request_timeout: float = 60.0
    payload_limit: int = 2 * 1024 * 1024      # bytes
    policy: str = "fifo"                      # "fifo" | "dp" (see docs/benchmarks.md: FIFO measured >= DP here)
    lazy_timeout: float = 0.0                 # seconds; 0 = hungry
    auto_truncate: bool = False
    served_name: str | None = None
    access_log: bool = False                  # uvicorn's per-request log line (metrics count requests)
    tensor_parallel: int = 1                  # ranks the model is sharded over (parallel.py)
    kv_dtype: str | None = None               # decoders: KV cache element type (None: the model's dtype)
    device: str = "cpu"                       # "cuda": the Triton backend (ops/cuda.py)
    cuda_graphs: bool = True                  # decoders on cuda: decode steps replay CUDA graphs
    pipeline: bool = True                     # engine stages on their own threads (engine.py)
    max_input_length: int | None = None       # encoders: tokens per input (None: the model's own limit)
    task: str = "auto"                        # decoders: "generate", "embed", or auto (embed with modules.json)
    classifier_tokens: list | None = None     # a causal LM as classifier / reranker (Encoder.load)
    pair_template: str | None = None          # text pairs as one input (Encoder.load)
    pooling: str | None = None                # encoders: a pooling mode over the model's own (Encoder.load)

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_queued_requests", "max_queued_tokens", "max_client_batch_size",
                     "payload_limit", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:     # 0 would refuse, or never schedule, everything
                raise InvalidInputError(f"{name} must be a positive integer, not {value!r}")
        if not self.request_timeout > 0:
            raise InvalidInputError(f"request_timeout must be positive, not {self.request_timeout!r}")
        if self.task not in ("auto", "embed", "generate"):
            raise InvalidInputError(f"task must be auto, embed or generate, not {self.task!r}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "Validation"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# TEI error_type -> OpenAI error type
_OPENAI_TYPES = {"Validation": "invalid_request_error", "Empty": "invalid_request_error",
                 "Overloaded": "rate_limit_error", "Unhealthy": "service_unavailable", "Backend": "server_error",
                 "Timeout": "timeout", "PayloadTooLarge": "invalid_request_error", "Tokenizer": "invalid_request_error"}


def error_body(api: str, err: ApiError) -> dict:
    if api == "openai":
        return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.kind, "server_error"),
                          "param": None, "code": err.status}}
    return {"error": err.message, "error_type": err.kind}


def error_response(api: str, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(api, err), status_code=err.status)


@dataclass
class Parsed:
    """A validated request: inputs for the model plus what shaping the answer needs."""
    inputs: list
    pairs: list | None = None
    kind: str = "embed"
    truncate: bool = False
    options: dict = field(default_factory=dict)


class State:
    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.encoder: Encoder | None = None
        self.engine: EncoderEngine | None = None
        self.status = "loading"          # loading | ready | shutting_down | failed
        self.tokenizing = 0              # requests in the tokenizer now (event-loop thread only)
        self.error: str | None = None
        self.started = int(time.time())
        self.on_rank_failure = None      # serve() sets it: a dead tensor-parallel rank stops the server

    @property
    def name(self) -> str:
        if self.config.served_name:
            return self.config.served_name
        return self.encoder.model_dir.name if self.encoder is not None else (self.config.model or "default")

    def require_ready(self) -> EncoderEngine:
        if self.status != "ready" or self.engine is None or not self.engine.alive():
            reason = {"loading": "the model is loading", "shutting_down": "the server is shutting down",
                      "failed": f"the model failed to load: {self.error}"}.get(self.status, "the engine has failed")
            raise ApiError(503, reason, "Unhealthy")
        return self.engine


# ---------------------------------------------------------------------- parsing helpers
def _is_token_list(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _inputs(value, field_name: str, limit: int, api: str) -> list:
    """str | token ids | list of (str | token ids) -> a non-empty list of inputs."""
    if isinstance(value, str) or _is_token_list(value):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ApiError(422 if api == "tei" else 400, f"`{field_name}` must be a string, a list of token ids, "
                       f"or a list of those; got {type(value).__name__}")
    if not items:
        raise ApiError(400, f"`{field_name}` is empty", "Empty")
    if len(items) > limit:              # TEI: a batch-size error is 413 "Validation"
        raise ApiError(413 if api == "tei" else 400,
                       f"`{field_name}` has {len(items)} inputs; at most {limit} are accepted per request")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"`{field_name}[{i}]` is an empty string", "Empty")
        elif not _is_token_list(item):
            raise ApiError(422 if api == "tei" else 400,
                           f"`{field_name}[{i}]` must be a string or a non-empty list of token ids")
    return items


def _bool(body: dict, key: str, default: bool, api: str) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(422 if api == "tei" else 400, f"`{key}` must be a boolean")
    return v


def _dimensions(body: dict, hidden: int, api: str) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= hidden:
        raise ApiError(422 if api == "tei" else 400, f"`dimensions` must be an integer in [1, {hidden}]")
    return d


def _object(body, api: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(422 if api == "tei" else 400, "the request body must be a JSON object")
    return body


# ---------------------------------------------------------------------- routes: parse + respond
def parse_openai_embeddings(body, state: State) -> Parsed:
    body = _object(body, "openai")
    if "input" not in body:
        raise ApiError(400, "`input` is required")
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "`encoding_format` must be 'float' or 'base64'")
    inputs = _inputs(body["input"], "input", state.config.max_client_batch_size, "openai")
    try:
        inputs = state.encoder.with_prompt(inputs)         # the model's default prompt, if it has one
    except InvalidInputError as exc:
        raise ApiError(400, str(exc)) from None
    return Parsed(inputs, truncate=state.config.auto_truncate,
                  options={"format": fmt, "dimensions": _dimensions(body, state.encoder.dimension, "openai")})


def _shape_vectors(vectors: torch.Tensor, dims: int | None, normalize: bool) -> torch.Tensor:
    if dims is not None:
        vectors = vectors[:, :dims]
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors


def respond_openai_embeddings(p: Parsed, results, encoded, state: State):
    vectors = _shape_vectors(torch.stack(results), p.options["dimensions"],
                             state.encoder.pooling.normalize)
    data = []
    for i, v in enumerate(vectors):
        if p.options["format"] == "base64":
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            emb = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(len(e.ids) for e in encoded)
    return {"object": "list", "data": data, "model": state.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _tei_inputs(body, state: State) -> tuple[dict, list, bool]:
    """/embed and /embed_all: the body, its `inputs` with the model's named prompt (TEI's
    `prompt_name`; else its default prompt) before each text, and `truncate`."""
    body = _object(body, "tei")
    if "inputs" not in body:
        raise ApiError(422, "`inputs` is required")
    inputs = _inputs(body["inputs"], "inputs", state.config.max_client_batch_size, "tei")
    return body, _prompted(body, inputs, state), _bool(body, "truncate", state.config.auto_truncate, "tei")


def _prompted(body: dict, inputs, state: State) -> list:
    """TEI's `prompt_name` (else the model's default prompt) before each text input."""
    prompt_name = body.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise ApiError(422, "`prompt_name` must be a string")
    try:
        return state.encoder.with_prompt(inputs, prompt_name)
    except InvalidInputError as exc:
        raise ApiError(422, str(exc)) from None


def parse_tei_embed(body, state: State) -> Parsed:
    body, inputs, truncate = _tei_inputs(body, state)
    return Parsed(inputs, truncate=truncate, options={"normalize": _bool(body, "normalize", True, "tei"),
                                                      "dimensions": _dimensions(body, state.encoder.dimension, "tei")})


def respond_tei_embed(p: Parsed, results, encoded, state: State):
    return _shape_vectors(torch.stack(results), p.options["dimensions"], p.options["normalize"]).tolist()


def parse_tei_embed_sparse(body, state: State) -> Parsed:
    """TEI /embed_sparse: a SPLADE model's vocabulary weights above 0, per input."""
    if state.encoder.pooling.mode != "splade":
        raise ApiError(424, "this model is not a SPLADE model: /embed_sparse needs a masked-LM checkpoint served "
                       "with --pooling splade (or a sentence-transformers SparseEncoder)", "Backend")
    _, inputs, truncate = _tei_inputs(body, state)
    return Parsed(inputs, truncate=truncate)


def respond_tei_embed_sparse(p: Parsed, results, encoded, state: State):
    return [[{"index": i, "value": v} for i, v in sparse_entries(r).items()] for r in results]


def parse_tei_similarity(body, state: State) -> Parsed:
    """TEI /similarity (the sentence-similarity task): {"inputs": {"source_sentence", "sentences"},
    "parameters": {"truncate", "prompt_name"}} -> each sentence's cosine to the source sentence."""
    body = _object(body, "tei")
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise ApiError(422, "`inputs` must be an object with `source_sentence` and `sentences`")
    source, sentences = inputs.get("source_sentence"), inputs.get("sentences")
    # the source sentence is one of the request's inputs too
    _query_and_texts(source, sentences, ("source_sentence", "sentences"), state.config.max_client_batch_size - 1)
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(422, "`parameters` must be an object")
    return Parsed(_prompted(params, [source, *sentences], state),
                  truncate=_bool(params, "truncate", state.config.auto_truncate, "tei"))


def respond_tei_similarity(p: Parsed, results, encoded, state: State):
    vectors = torch.nn.functional.normalize(torch.stack(results).double(), dim=-1)
    return (vectors[1:] @ vectors[0]).tolist()


def parse_tei_embed_all(body, state: State) -> Parsed:
    """TEI /embed_all: every token's last hidden state, per input (no pooling, no normalizing)."""
    _, inputs, truncate = _tei_inputs(body, state)
    return Parsed(inputs, kind="hidden", truncate=truncate)


def respond_tei_embed_all(p: Parsed, results, encoded, state: State):
    return [r.tolist() for r in results]


def _require_head(state: State, rerank: bool) -> None:
    labels = state.encoder.model.num_labels
    if labels is None:
        raise ApiError(424, "this model has no classification head: it serves /embed and /v1/embeddings", "Backend")
    if rerank and labels != 1:
        raise ApiError(424, "this model is a classifier with several labels, not a reranker", "Backend")


def _query_and_texts(query, texts, names: tuple[str, str], limit: int, api: str = "tei") -> None:
    """A rerank's query and texts, or a similarity's source sentence and sentences: checked as TEI
    does (422, 400 "Empty", 413), or for the OpenAI-shaped routes with a 400 each."""
    q, t = names
    tei = api == "tei"
    if not isinstance(query, str) or not query:
        raise ApiError(422 if tei else 400, f"`{q}` must be a non-empty string")
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, f"`{t}` must be a non-empty list of strings", "Empty" if tei else "Validation")
    if len(texts) > limit:
        raise ApiError(413 if tei else 400, f"`{t}` has {len(texts)} entries; at most {limit} are accepted")
    if not all(isinstance(x, str) and x for x in texts):
        raise ApiError(422 if tei else 400, f"every entry of `{t}` must be a non-empty string")


def parse_tei_rerank(body, state: State) -> Parsed:
    body = _object(body, "tei")
    _require_head(state, rerank=True)
    query, texts = body.get("query"), body.get("texts")
    _query_and_texts(query, texts, ("query", "texts"), state.config.max_client_batch_size)
    return Parsed([query] * len(texts), list(texts), "classify", _bool(body, "truncate", state.config.auto_truncate, "tei"),
                  {"raw": _bool(body, "raw_scores", False, "tei"), "return_text": _bool(body, "return_text", False, "tei"),
                   "texts": texts})


def respond_tei_rerank(p: Parsed, results, encoded, state: State):
    logits = torch.stack(results)[:, 0]
    scores = logits if p.options["raw"] else torch.sigmoid(logits)
    out = [{"index": i, "score": float(s)} for i, s in enumerate(scores)]
    if p.options["return_text"]:
        for r in out:
            r["text"] = p.options["texts"][r["index"]]
    return sorted(out, key=lambda r: -r["score"])


def parse_cohere_rerank(body, state: State) -> Parsed:
    """/v1/rerank and /v2/rerank: the Cohere / Jina wire format that RAG frameworks' rerankers speak
    (as vLLM and Infinity serve it): `query`, `documents` (strings or {"text": ...}), `top_n`,
    `return_documents` (default true, as Jina's and vLLM's)."""
    body = _object(body, "openai")
    _require_head(state, rerank=True)
    query, docs = body.get("query"), body.get("documents")
    texts = [d.get("text") if isinstance(d, dict) else d for d in docs] if isinstance(docs, list) else docs
    _query_and_texts(query, texts, ("query", "documents"), state.config.max_client_batch_size, "openai")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ApiError(400, "`top_n` must be a positive integer")
    return Parsed([query] * len(texts), texts, "classify", state.config.auto_truncate,
                  {"top_n": top_n or len(texts), "documents": _bool(body, "return_documents", True, "openai"),
                   "texts": texts})


def respond_cohere_rerank(p: Parsed, results, encoded, state: State):
    scores = torch.sigmoid(torch.stack(results)[:, 0]).tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:p.options["top_n"]]
    tokens = sum(len(e.ids) for e in encoded)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": state.name, "usage": {"total_tokens": tokens},
            "results": [{"index": i, "relevance_score": scores[i],
                         **({"document": {"text": p.options["texts"][i]}} if p.options["documents"] else {})}
                        for i in order]}


def parse_tei_predict(body, state: State) -> Parsed:
    body = _object(body, "tei")
    _require_head(state, rerank=False)
    raw = body.get("inputs")
    bad = ApiError(422, "`inputs` must be a string, a [text, text_pair] list, or a list of [text] / [text, text_pair] lists")
    if isinstance(raw, str):
        groups, single = [[raw]], True
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        if len(raw) != 2:
            raise bad
        groups, single = [raw], True
    elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        groups, single = raw, False
    elif isinstance(raw, list) and not raw:
        raise ApiError(400, "`inputs` is empty", "Empty")
    else:
        raise bad
    if len(groups) > state.config.max_client_batch_size:
        raise ApiError(413, f"`inputs` has {len(groups)} entries; at most {state.config.max_client_batch_size} are accepted")
    for g in groups:
        if not 1 <= len(g) <= 2 or not all(isinstance(t, str) and t for t in g):
            raise bad
    texts = [g[0] for g in groups]
    pairs = [g[1] if len(g) == 2 else None for g in groups] if any(len(g) == 2 for g in groups) else None
    return Parsed(texts, pairs, "classify", _bool(body, "truncate", state.config.auto_truncate, "tei"),
                  {"raw": _bool(body, "raw_scores", False, "tei"), "single": single})


def respond_tei_predict(p: Parsed, results, encoded, state: State):
    logits = torch.stack(results)
    if p.options["raw"]:
        scores = logits
    else:
        scores = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)
    labels = state.encoder.id2label
    rows = [sorted(({"score": float(s), "label": labels.get(j, f"LABEL_{j}")} for j, s in enumerate(row)),
                   key=lambda r: -r["score"]) for row in scores]
    return rows[0] if p.options["single"] else rows


# ---------------------------------------------------------------------- the pipeline
async def _read_json(request: HttpRequest, limit: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the {limit}-byte limit", "PayloadTooLarge")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit", "PayloadTooLarge")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None


async def _until_disconnect(request: HttpRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def make_route(state: State, route: str, api: str, parse, respond):
    async def handler(request: HttpRequest) -> Response:
        t0 = time.perf_counter()
        status = 200
        try:
            body = await _read_json(request, state.config.payload_limit)
            engine = state.require_ready()
            parsed = parse(body, state)
            # overload answered before any tokenizing: a full queue, or as many requests tokenizing
            # as the queue holds (the executor's own queue has no bound)
            try:
                engine.check_room()
            except Overloaded as exc:
                raise ApiError(429, str(exc), "Overloaded") from None
            if state.tokenizing >= state.config.max_queued_requests:
                raise ApiError(429, f"{state.tokenizing} requests are being tokenized", "Overloaded")
            loop = asyncio.get_running_loop()
            state.tokenizing += 1
            try:          # Encoder.tokenize: the tokenizer plus the model's own checks (token types)
                encoded = await loop.run_in_executor(
                    None, state.encoder.tokenize, parsed.inputs, parsed.pairs, parsed.truncate)
            except InputTooLongError as exc:    # TEI: 413 "Validation"
                raise ApiError(413 if api == "tei" else 400, str(exc)) from None
            except InvalidInputError as exc:
                raise ApiError(422 if api == "tei" else 400, str(exc), "Tokenizer" if api == "tei" else "Validation") from None
            finally:
                state.tokenizing -= 1
            t_tok = time.perf_counter() - t0
            try:
                future = engine.submit(encoded, parsed.kind, state.config.request_timeout)
            except Overloaded as exc:
                raise ApiError(429, str(exc), "Overloaded") from None
            except TooLarge as exc:                   # can never be admitted: not "come back later"
                raise ApiError(413, str(exc), "Validation") from None
            except NotReady as exc:
                raise ApiError(503, str(exc), "Unhealthy") from None
            watcher = asyncio.ensure_future(_until_disconnect(request))
            try:
                done, _ = await asyncio.wait({future, watcher}, timeout=state.config.request_timeout + 1,
                                             return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                engine.cancel(future)
                raise
            finally:
                watcher.cancel()
            if future not in done:
                engine.cancel(future)
                if watcher in done:
                    status = 499                      # client closed the request; nobody reads this
                    return Response(status_code=499)
                raise ApiError(504, "the request's deadline passed", "Timeout")
            try:
                results, timings = future.result()
            except DeadlineExceeded as exc:
                raise ApiError(504, str(exc), "Timeout") from None
            except NotReady as exc:
                raise ApiError(503, str(exc), "Unhealthy") from None
            except TurboServeError as exc:
                raise ApiError(422 if api == "tei" else 400, str(exc)) from None
            except Exception as exc:
                log.exception("inference failed")
                raise ApiError(500, f"inference failed: {exc}", "Backend") from None
            payload = respond(parsed, results, encoded, state)
            total = time.perf_counter() - t0
            tokens = sum(len(e.ids) for e in encoded)
            chars = sum(len(x) for x in [*parsed.inputs, *(parsed.pairs or [])] if isinstance(x, str))
            headers = {"x-compute-type": state.encoder.dtype, "x-compute-time": _ms(total),
                       "x-compute-characters": str(chars), "x-compute-tokens": str(tokens),
                       "x-total-time": _ms(total), "x-tokenization-time": _ms(t_tok),
                       "x-queue-time": _ms(timings.queue), "x-inference-time": _ms(timings.inference)}
            state.metrics.stages(tokenize=t_tok, queue=timings.queue, inference=timings.inference, total=total)
            return JSONResponse(payload, headers=headers)
        except ApiError as err:
            status = err.status
            return error_response(api, err)
        finally:
            state.metrics.requests.labels(route, str(status)).inc()
    return handler


# ---------------------------------------------------------------------- plain routes
def make_app(config: ServerConfig, encoder: Encoder | None = None) -> Starlette:
    """The ASGI app. With `encoder` given it is used as is; otherwise the model loads in a background
    thread at start-up while /health answers 503."""
    metrics = Metrics()
    state = State(config, metrics)

    def start_engine(enc: Encoder) -> None:
        table = None
        if config.policy == "dp":
            t = time.perf_counter()
            table = measure_cost_table(enc, config.max_batch_tokens)
            log.info("cost table ready in %.1f s (%s)", time.perf_counter() - t, table.meta)
        state.encoder = enc
        parallel.on_failure(enc.model, lambda exc: state.on_rank_failure and state.on_rank_failure(exc))
        state.engine = EncoderEngine(enc, max_batch_tokens=config.max_batch_tokens,
                                     max_queued_requests=config.max_queued_requests,
                                     max_queued_tokens=config.max_queued_tokens, policy=config.policy,
                                     lazy_timeout=config.lazy_timeout, cost_table=table, metrics=metrics,
                                     pipeline=config.pipeline)
        weights = enc.model.weight_bytes
        log.info("ready: model %s (%s), dtype %s, threads %d, memory budget: weights %.0f MiB + activation "
                 "workspace %.0f MiB at %d batch tokens; queue <= %d requests / %d tokens",
                 enc.model_dir, enc.model.spec.model_type, enc.dtype, torch.get_num_threads(), weights / 2**20,
                 enc.model.activation_bytes(config.max_batch_tokens) / 2**20, config.max_batch_tokens,
                 config.max_queued_requests,
                 config.max_queued_tokens)
        state.status = "ready"

    def load() -> None:
        try:
            enc = Encoder.load(config.model, dtype=config.dtype, threads=config.threads,
                               max_batch_tokens=config.max_batch_tokens, quality_bound=config.quality_bound,
                               calibration=config.calibration, tensor_parallel=config.tensor_parallel,
                               device=config.device, max_input_length=config.max_input_length,
                               classifier_tokens=config.classifier_tokens, pair_template=config.pair_template,
                               pooling=config.pooling)
            start_engine(enc)
        except Exception as exc:
            log.error("model failed to load: %s", exc)
            state.error = str(exc)
            state.status = "failed"
            if state.on_rank_failure is not None:       # serve(): a server without its model exits 1
                state.on_rank_failure(exc)

    async def health(request):
        try:
            engine = state.require_ready()
            if engine.progressing(within=10.0):       # under load: the model keeps finishing batches
                return Response(status_code=200)
            probe = engine.submit(state.encoder.tokenizer.encode(["health"]), "embed",
                                  timeout=10.0, admit=False)
            await asyncio.wait_for(probe, timeout=10.0)
            return Response(status_code=200)
        except ApiError as err:
            return JSONResponse({"error": err.message, "error_type": err.kind}, status_code=503)
        except Exception as exc:
            return JSONResponse({"error": f"engine did not answer: {exc!r}", "error_type": "Unhealthy"}, status_code=503)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.name, "object": "model", "created": state.started, "owned_by": "turboserve"}]})

    async def info(request):
        enc = state.encoder
        model_type = None
        if enc is not None:
            labels = enc.model.num_labels
            if labels is None:
                model_type = {"embedding": {"pooling": enc.pooling.mode}}
            elif labels == 1:
                model_type = {"reranker": {"id2label": {str(k): v for k, v in enc.id2label.items()}}}
            else:
                model_type = {"classifier": {"id2label": {str(k): v for k, v in enc.id2label.items()}}}
        return JSONResponse({
            "model_id": state.name, "model_dtype": config.dtype, "model_type": model_type,
            "max_concurrent_requests": config.max_queued_requests,
            "max_input_length": enc.tokenizer.max_tokens if enc else None,
            "max_batch_tokens": config.max_batch_tokens, "max_batch_requests": None,
            "max_client_batch_size": config.max_client_batch_size, "auto_truncate": config.auto_truncate,
            "tokenization_workers": None, "version": __version__, "status": state.status})

    async def tokenize(request):
        try:
            body = _object(await _read_json(request, config.payload_limit), "tei")
            state.require_ready()
            raw = body.get("inputs")
            texts = [raw] if isinstance(raw, str) else raw
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise ApiError(422, "`inputs` must be a non-empty string or a non-empty list of them")
            if len(texts) > config.max_client_batch_size:
                raise ApiError(413, f"at most {config.max_client_batch_size} inputs per request")
            add = _bool(body, "add_special_tokens", True, "tei")
            texts = _prompted(body, texts, state)     # the tokens /embed would run, as TEI counts them
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(None, state.encoder.tokenizer.tokenize_detailed, texts, add)
            metrics.requests.labels("/tokenize", "200").inc()
            return JSONResponse(out)           # a single string too is a list of one (as TEI answers)
        except ApiError as err:
            metrics.requests.labels("/tokenize", str(err.status)).inc()
            return error_response("tei", err)

    async def decode(request):
        """TEI /decode: token ids (one list, or a list of lists) -> texts, always a list."""
        try:
            body = _object(await _read_json(request, config.payload_limit), "tei")
            state.require_ready()
            raw = body.get("ids")
            batch = [raw] if _is_token_list(raw) else raw
            if not isinstance(batch, list) or not batch or not all(_is_token_list(b) for b in batch):
                raise ApiError(422, "`ids` must be a non-empty list of token ids or a non-empty list of them")
            if len(batch) > config.max_client_batch_size:
                raise ApiError(413, f"at most {config.max_client_batch_size} inputs per request")
            vocab = state.encoder.tokenizer.vocab_size
            if any(not 0 <= t < vocab for b in batch for t in b):
                raise ApiError(422, f"token ids must be in [0, {vocab})", "Tokenizer")
            skip = _bool(body, "skip_special_tokens", True, "tei")
            texts = [state.encoder.tokenizer.decode(b, skip) for b in batch]
            metrics.requests.labels("/decode", "200").inc()
            return JSONResponse(texts)
        except ApiError as err:
            metrics.requests.labels("/decode", str(err.status)).inc()
            return error_response("tei", err)

    async def prometheus(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        if state.engine is not None:
            metrics.queue(*state.engine.queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = None
        if encoder is not None:
            start_engine(encoder)
        else:
            loader = threading.Thread(target=load, name="turboserve-load", daemon=True)
            loader.start()
        yield
        state.status = "shutting_down"
        if loader is not None:       # SIGTERM while loading: let the load end (the interpreter exiting
            await asyncio.get_running_loop().run_in_executor(None, loader.join)   # under it aborted)
        if state.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)
        if encoder is None and state.encoder is not None:
            state.encoder.close()            # tensor-parallel ranks this app started

    routes = [
        Route("/v1/embeddings", make_route(state, "/v1/embeddings", "openai", parse_openai_embeddings,
                                           respond_openai_embeddings), methods=["POST"]),
        Route("/embed", make_route(state, "/embed", "tei", parse_tei_embed, respond_tei_embed), methods=["POST"]),
        Route("/embed_sparse", make_route(state, "/embed_sparse", "tei", parse_tei_embed_sparse,
                                          respond_tei_embed_sparse), methods=["POST"]),
        Route("/similarity", make_route(state, "/similarity", "tei", parse_tei_similarity, respond_tei_similarity),
              methods=["POST"]),
        Route("/embed_all", make_route(state, "/embed_all", "tei", parse_tei_embed_all, respond_tei_embed_all),
              methods=["POST"]),
        Route("/rerank", make_route(state, "/rerank", "tei", parse_tei_rerank, respond_tei_rerank), methods=["POST"]),
        *(Route(r, make_route(state, r, "openai", parse_cohere_rerank, respond_cohere_rerank), methods=["POST"])
          for r in ("/v1/rerank", "/v2/rerank")),
        Route("/predict", make_route(state, "/predict", "tei", parse_tei_predict, respond_tei_predict), methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/decode", decode, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.turboserve = state
    return app


# The model thread releases the GIL inside every torch op and native kernel and must take it back
# after each one; with the event loop busy in Python it waits up to the switch interval (5 ms by
# default) every time, and a forward of ~100 ops slows tenfold under load (measured: 45 req/s at
# overload against 100 below it). A short interval bounds that wait.
SWITCH_INTERVAL = 0.0002


# ServerConfig fields only one kind of server reads (embedding or generation), and their flags
EMBEDDING_SERVER_ONLY = {
    "quality_bound": "--quality-bound", "calibration": "--calibration", "max_queued_tokens": "--max-queued-tokens",
    "max_client_batch_size": "--max-client-batch-size", "policy": "--batch-policy",
    "lazy_timeout": "--lazy-timeout-ms", "auto_truncate": "--auto-truncate", "pipeline": "--no-pipeline",
    "max_input_length": "--max-input-length", "pair_template": "--pair-template", "pooling": "--pooling"}
GENERATION_SERVER_ONLY = {"kv_dtype": "--kv-dtype", "cuda_graphs": "--no-cuda-graphs"}


def serves_generation(config: ServerConfig) -> bool:
    """Which server the model gets: a decoder generates (OpenAI completions and chat) unless `task`
    says embed, or, with task auto, its directory is a sentence-transformers one (modules.json:
    Qwen3-Embedding, gte-Qwen2, e5-mistral); a decoder as a classifier (a ...ForSequenceClassification
    checkpoint, or --classifier-tokens) and every other model get the embedding server (/rerank,
    /predict)."""
    from .arch import is_decoder, is_sequence_classifier
    from .loader import read_config, resolve_model_dir
    model_dir = resolve_model_dir(config.model)
    cfg = read_config(model_dir)
    classifier = bool(config.classifier_tokens) or is_sequence_classifier(cfg)
    if not is_decoder(cfg) or classifier:
        if config.task == "generate":
            raise InvalidInputError(f"task generate needs a decoder model; {model_dir} is "
                                    + ("a classifier here" if classifier else "an encoder"))
        return False
    if config.task != "auto":
        return config.task == "generate"
    return not (model_dir / "modules.json").is_file()


def unused_flags(config: ServerConfig, generation: bool) -> list[str]:
    """The flags set away from their defaults that this kind of server does not read (they were
    ignored silently)."""
    default = ServerConfig()
    fields = EMBEDDING_SERVER_ONLY if generation else GENERATION_SERVER_ONLY
    return [flag for name, flag in fields.items() if getattr(config, name) != getattr(default, name)]


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM: then stop accepting, finish in-flight requests, exit 0.
    A tensor-parallel rank that dies stops it the same way, exiting 1."""
    import uvicorn

    generation = serves_generation(config)
    unused = unused_flags(config, generation)
    if unused:
        log.warning("%s apply to %s only: ignored for this %s", ", ".join(unused),
                    *(("embedding servers", "generation server") if generation else
                      ("generation servers", "embedding server")))
    if generation:
        from .gen_server import make_gen_app
        app = make_gen_app(config)
    else:
        app = make_app(config)
    state = app.state.turboserve
    rank_failures = []

    def rank_failed(exc):                    # a rank died, or the model failed to load: stop, exit 1
        rank_failures.append(exc)
        state.status = "shutting_down"
        server.should_exit = True
    state.on_rank_failure = rank_failed
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           access_log=config.access_log, timeout_graceful_shutdown=config.request_timeout))

    def handle_exit(sig, frame):
        state.status = "shutting_down"       # /health -> 503, new work -> 503
        server.handle_exit(sig, frame)       # stop accepting, drain; a second signal forces exit
    # uvicorn's own signal capture re-raises the signal after draining, so the process would die of
    # SIGTERM; a clean drain is a normal exit here.
    server.capture_signals = contextlib.nullcontext
    signal.signal(signal.SIGTERM, handle_exit)
    sys.setswitchinterval(SWITCH_INTERVAL)
    signal.signal(signal.SIGINT, handle_exit)
    server.run()
    return 1 if rank_failures else 0
