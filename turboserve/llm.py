"""Generation with temporal fusion (Flover): iteration-level batching over a paged KV cache.

Every engine step the scheduler picks {sequence: tokens} under a token budget: first the running
sequences (one decode token each, or the next chunk of a long prompt), then waiting sequences whose
prompt blocks fit. All of it runs as one packed forward pass (decoder.py). A sequence joins at the
step after it arrives and leaves the step it finishes, freeing its KV blocks at once. When a running
sequence cannot get a block, the newest running sequence is preempted: its blocks are freed and it
waits at the head of the queue to be recomputed (prompt plus the tokens it had generated), which
gives the same tokens it would have produced. Never an error, never a hang.

Three layers: `LLMEngine` (synchronous: add / abort / step), `LLM` (offline `generate`) and
`AsyncLLM` (a thread stepping the engine, async per-request streams; the server uses it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import native
from .allocator import keep_freed_memory
from .decoder import DecoderModel, StepBatch
from .ops import use_device_on_this_thread
from .errors import InputTooLongError, InvalidInputError, TurboServeError
from .kv_cache import BlockManager, CacheFull
from .loader import read_json
from .sampling import SamplingParams, StopChecker, sample, scored
from .workspace import available_memory

log = logging.getLogger("turboserve")


class QueueFull(TurboServeError):
    """Too many waiting requests (HTTP 429)."""


class EngineDead(TurboServeError):
    """The engine thread failed or is stopping (HTTP 503)."""


# ---------------------------------------------------------------------- tokenizer
class DecoderTokenizer:
    """tokenizer.json plus tokenizer_config.json (special tokens, chat template)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer
        f = model_dir / "tokenizer.json"
        if not f.is_file():
            raise InvalidInputError(f"{model_dir} has no tokenizer.json")
        self.tok = Tokenizer.from_file(str(f))
        self.tok.no_padding()            # a tokenizer.json may pad or truncate to a fixed length
        self.tok.no_truncation()
        cfg_file = model_dir / "tokenizer_config.json"
        self.config = read_json(cfg_file) if cfg_file.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):            # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        tmpl = model_dir / "chat_template.jinja"
        if self.chat_template is None and tmpl.is_file():
            self.chat_template = tmpl.read_text()

    def special(self, name: str) -> str | None:
        v = self.config.get(name)
        return v.get("content") if isinstance(v, dict) else v

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt as transformers renders it: the same Jinja environment (sandboxed, trim and
        lstrip blocks, loop controls, its tojson and strftime_now, raise_exception), no tools or
        documents, every special token, and the assistant's turn opened."""
        if not self.chat_template:
            raise InvalidInputError("this model has no chat template (tokenizer_config.json chat_template)")
        import datetime
        import json

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        specials = {name: self.special(name) or "" for name in self.SPECIAL_TOKENS}
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **specials)
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"chat template: {exc}") from None
        return self.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------- requests
_ids = itertools.count()


@dataclass
class Sequence:
    """One generated continuation (a request with n > 1 has n of them)."""
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int
    stop_checker: StopChecker
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=lambda: [None])     # params.prompt_logprobs: token i's Draw
    num_computed: int = 0            # tokens whose K/V are in the cache
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    streamed_chars: int = 0          # AsyncLLM: how much text and how many tokens it has sent on
    streamed_tokens: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __hash__(self):
        return self.seq_id

    def __eq__(self, other):
        return self is other


@dataclass
class StepOutput:
    seq: Sequence
    text: str                  # the text safe to show so far (grows monotonically)
    new_tokens: int
    finished: bool


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class LLMEngine:
    def __init__(self, model: DecoderModel, tokenizer: DecoderTokenizer, *, max_num_seqs: int = 64,
                 max_batch_tokens: int = 2048, block_size: int = 16, kv_cache_bytes: int | None = None,
                 max_waiting: int = 1024, prefix_caching: bool = True, seed: int = 0, cuda_graphs: bool = True):
        """cuda_graphs: on a CUDA model, replay decode steps from CUDA graphs (False: every step eager,
        for debugging and to measure what the graphs save)."""
        for name, value in (("max_num_seqs", max_num_seqs), ("max_batch_tokens", max_batch_tokens),
                            ("block_size", block_size), ("max_waiting", max_waiting)):
            if not isinstance(value, int) or value < 1:        # 0 would leave every step empty: a spin
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_batch_tokens, self.max_waiting = max_num_seqs, max_batch_tokens, max_waiting
        self.max_context = model.max_positions
        per_token = model.kv_bytes_per_token()
        device = getattr(model, "device", torch.device("cpu"))
        if kv_cache_bytes is not None and kv_cache_bytes < per_token * self.max_context:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds {kv_cache_bytes // per_token} tokens, less than one "
                             f"sequence at the model's context of {self.max_context} tokens "
                             f"(at least {per_token * self.max_context} bytes)")
        if kv_cache_bytes is None:
            world = getattr(getattr(model, "tp", None), "world", 1)       # each rank allocates its own shard
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or world) if world > 1 else 1   # on this machine
            kv_cache_bytes = default_kv_budget(per_token, max_num_seqs, self.max_context, device, ranks)
            if kv_cache_bytes < per_token * self.max_context:       # memory for less than one full context
                self.max_context = max(block_size, kv_cache_bytes // per_token // block_size * block_size)
                log.warning("the KV cache that fits in memory holds %d tokens: the context is cut from %d to that",
                            self.max_context, model.max_positions)
        num_blocks = max(kv_cache_bytes // (per_token * block_size), -(-self.max_context // block_size))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.kv_cache_bytes = num_blocks * block_size * per_token
        if device.type == "cuda" and cuda_graphs:
            # decode steps replay CUDA graphs (ops/cuda_graphs.py); their padding sequences write into
            # one block past the ones the block manager hands out
            from .ops.cuda_graphs import DecodeGraphs
            self.cache = model.allocate_cache(num_blocks + 1, block_size)
            self._forward = DecodeGraphs(lambda step: self.model.forward(step, self.cache),
                                         max_blocks=-(-self.max_context // block_size), pad_block=num_blocks,
                                         device=device)
        else:
            self.cache = model.allocate_cache(num_blocks, block_size)
            self._forward = lambda step: self.model.forward(step, self.cache)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._rng = torch.Generator().manual_seed(seed)
        self._by_request: dict[str, list[Sequence]] = {}
        self.stream_text = False         # AsyncLLM sets it: streams need the text after every token
        self.last_step_tokens = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    admit: bool = True) -> list[Sequence]:
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty")
        if any(not isinstance(t, int) or t < 0 or t >= self.model.vocab_size for t in prompt_ids):
            raise InvalidInputError(f"prompt token ids must be integers in [0, {self.model.vocab_size})")
        if any(t >= self.model.vocab_size for t in (*params.logit_bias, *params.stop_token_ids)):
            raise InvalidInputError(f"logit_bias and stop_token_ids take token ids in [0, {self.model.vocab_size})")
        room = self.max_context - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(prompt_ids) + max_tokens > self.max_context or room < 1:
            raise InputTooLongError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together over the "
                f"model's context length of {self.max_context} tokens")
        if request_id in self._by_request:
            raise InvalidInputError(f"request id {request_id!r} is already in use")
        if admit and len(self.waiting) + params.n > self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} sequences are waiting (bound {self.max_waiting})")
        seqs = []
        for i in range(params.n):
            g = torch.Generator()
            g.manual_seed(params.seed + i if params.seed is not None
                          else int(torch.randint(0, 2**62, (1,), generator=self._rng)))
            seqs.append(Sequence(request_id, i, list(prompt_ids), params, g, max_tokens,
                                 StopChecker(self.tokenizer, params.stop)))
        self._by_request[request_id] = seqs
        if admit:
            self.waiting.extend(seqs)
        else:                                   # a health probe: ahead of the queue
            self.waiting.extendleft(reversed(seqs))
        return seqs

    def abort(self, request_id: str) -> None:
        """Drop a request: its KV blocks are freed now, before the next step."""
        for seq in self._by_request.pop(request_id, []):
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self.blocks.free(seq)
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)

    def request_done(self, request_id: str) -> bool:
        return request_id not in self._by_request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_batch_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:          # preempted below to make room for an older one
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                plan = [(s, k) for s, k in plan if s is not victim]
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, seq.num_computed + n)
            plan.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            try:
                seq.num_computed = self.blocks.allocate_prompt(seq, seq.tokens,
                                                               reuse=seq.params.prompt_logprobs is None)
            except CacheFull:
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def _batch(self, plan: list[tuple[Sequence, int]]) -> tuple[StepBatch, list[Sequence], list]:
        """The step's inputs, the sequences that sample, and (sequence, position) of the prompt positions
        whose logits score the next prompt token (prompt_logprobs), whose logit rows follow the
        sampled ones."""
        bs = self.blocks.block_size
        ids, pos, blocks, offsets, cu, ctx, rows, sampled = [], [], [], [], [0], [], [], []
        prompt_rows, scoring = [], []
        for seq, n in plan:
            start = seq.num_computed
            toks = seq.tokens
            table = self.blocks.tables[seq]
            ids.extend(toks[start:start + n])
            pos.extend(range(start, start + n))
            blocks.extend(table[p // bs] for p in range(start, start + n))
            offsets.extend(p % bs for p in range(start, start + n))
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            if start + n == len(toks):
                rows.append(cu[-1] - 1)
                sampled.append(seq)
            if seq.params.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1; each once (a recomputed prompt is not rescored)
                for p in range(max(start, len(seq.prompt_logprobs) - 1), min(start + n, len(seq.prompt_ids) - 1)):
                    prompt_rows.append(cu[-2] + p - start)
                    scoring.append((seq, p))
        step = StepBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(cu), torch.tensor(ctx),
                         self.blocks.block_table_tensor([s for s, _ in plan]), torch.tensor(blocks),
                         torch.tensor(offsets),
                         torch.tensor(rows + prompt_rows, dtype=torch.long), max(ctx))
        return step, sampled, scoring

    # ------------------------------------------------------------------ step
    def step(self) -> list[StepOutput]:
        plan = self.schedule()
        if not plan:
            return []
        step, sampled, scoring = self._batch(plan)
        self.last_step_tokens = len(step.input_ids)
        logits = self._forward(step).cpu()       # sampling runs on the CPU, with per-request generators
        if scoring:
            prompt_lp = logits[len(sampled):].log_softmax(-1)
            for (seq, p), row in zip(scoring, prompt_lp):
                seq.prompt_logprobs.append(scored(row, seq.prompt_ids[p + 1], seq.params.prompt_logprobs))
            logits = logits[:len(sampled)]
        for seq, n in plan:
            seq.num_computed += n
            if seq.num_computed <= len(seq.prompt_ids):
                self.stats.prompt_tokens += n
            self.blocks.register_full_blocks(seq, seq.tokens[:seq.num_computed])
        self.stats.steps += 1
        outputs = []
        now = time.perf_counter()
        for seq, draw in zip(sampled, sample(logits, sampled, self.model.eos_token_ids)):
            seq.output_ids.append(draw.token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.params.logprobs is not None:
                seq.logprobs.append(draw)
            self.stats.generated_tokens += 1
            outputs.append(self._check_finished(seq, draw.token))
        return outputs

    def _check_finished(self, seq: Sequence, token: int) -> StepOutput:
        p = seq.params
        reason = None
        if token in p.stop_token_ids:
            reason = "stop"
        elif not p.ignore_eos and token in self.model.eos_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens or len(seq.tokens) >= self.max_context:
            reason = "length"
        text = ""
        if reason is not None or p.stop or self.stream_text:         # detokenize only when someone looks
            visible = seq.output_ids[:-1] if reason == "stop" else seq.output_ids     # not the stop token
            text = seq.stop_checker.update(visible, final=reason is not None)
            if seq.stop_checker.stopped:
                reason = "stop"
                text = seq.stop_checker.text
        if reason is not None:
            seq.finish_reason = reason
            seq.finish_time = time.perf_counter()
            self._release(seq)
        return StepOutput(seq, text, 1, reason is not None)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        group = self._by_request.get(seq.request_id, [])
        if all(s.finish_reason is not None for s in group):
            self._by_request.pop(seq.request_id, None)


def default_kv_budget(bytes_per_token: int, max_num_seqs: int, max_context: int,
                      device: torch.device = torch.device("cpu"), local_ranks: int = 1) -> int:
    """Room for every running sequence at full context, capped at a quarter of available memory
    shared by the tensor-parallel ranks on this machine (each allocates its shard's cache of this
    size), or on a GPU 80% of its free memory, which the cache is there to use. May be less than one
    full context: the engine then cuts its context to what fits."""
    want = bytes_per_token * max_num_seqs * max_context
    avail = available_memory(device)
    if device.type == "cuda":
        return min(want, int(avail * 0.8))
    avail = 8 << 30 if avail is None else avail
    return min(want, avail // (4 * max(1, local_ranks)))


# ---------------------------------------------------------------------- offline API
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list | None = None      # params.prompt_logprobs: None, then a Draw per prompt token


def _completion(seq: Sequence) -> CompletionOutput:
    return CompletionOutput(seq.index, seq.stop_checker.text, list(seq.output_ids), seq.finish_reason,
                            seq.logprobs if seq.params.logprobs is not None else None)


class LLM:
    """Offline generation: `LLM.load(path, dtype="fp32").generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: DecoderModel, tokenizer: DecoderTokenizer, **engine_kw):
        self.model, self.tokenizer = model, tokenizer
        self.engine_kw = engine_kw
        self.engine = LLMEngine(model, tokenizer, **engine_kw)
        self.last_sequences: list[Sequence] = []      # of the last generate() call (benchmarks read timings)

    @classmethod
    def load(cls, path, dtype: str = "fp32", threads: int | None = None, tensor_parallel: int = 1,
             kv_dtype: str | None = None, device: str = "cpu", **engine_kw) -> "LLM":
        """kv_dtype: the KV cache's element type (fp32 | bf16 | int8; default: the model's dtype).
        device: "cpu", or "cuda" for the Triton backend (docs/gpu.md).
        tensor_parallel: ranks to shard the model over (parallel.py; each rank gets threads / N);
        the engine stays in this process. Call close() to stop the ranks."""
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer, not {threads!r}")
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        keep_freed_memory()
        model = DecoderModel(path, dtype, device=device, kv_dtype=kv_dtype)
        if tensor_parallel != 1:
            from . import parallel
            model = parallel.start(model, tensor_parallel, threads)      # each rank tunes its shard
        else:
            model.tune_kernels()
        return cls(model, DecoderTokenizer(model.model_dir), **engine_kw)

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (a single-process model holds nothing to release)."""
        from . import parallel
        parallel.close(self.model)

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str) and prompt:
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidInputError("a prompt must be a non-empty string or a list of token ids")

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for one prompt (a string or token ids) or a list of them, with one SamplingParams
        for all or a list of one per prompt. Every prompt is checked before any is queued: a bad one
        raises and leaves nothing behind."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidInputError("prompts must be a prompt or a non-empty list of prompts")
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidInputError(f"{len(plist)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        if not all(isinstance(p, SamplingParams) for p in plist):
            raise InvalidInputError("params must be SamplingParams (or a list of them)")
        ids = [self.prompt_ids(prompt) for prompt in prompts]
        groups = []
        try:
            for i, (prompt_ids, p) in enumerate(zip(ids, plist)):
                rid = f"offline-{next(_ids)}-{i}"
                groups.append((rid, self.engine.add_request(rid, prompt_ids, p)))
        except BaseException:
            for rid, _ in groups:                 # the ones already queued go too
                self.engine.abort(rid)
            raise
        while self.engine.has_work():
            self.engine.step()
        self.last_sequences = [s for _, seqs in groups for s in seqs]
        return [RequestOutput(rid, seqs[0].prompt_ids, [_completion(s) for s in seqs],
                              seqs[0].prompt_logprobs if seqs[0].params.prompt_logprobs is not None else None)
                for rid, seqs in groups]


# ---------------------------------------------------------------------- async API (the server's)
@dataclass
class StreamEvent:
    """What one engine step added to a continuation (deltas: a slow reader's queue holds each token
    once, not the whole output again per step)."""
    index: int
    text: str            # text new since this continuation's previous event ("" while held back)
    token_ids: list[int]  # tokens new since the previous event
    num_tokens: int      # tokens generated so far
    finished: bool
    finish_reason: str | None
    logprobs: list | None  # the new tokens' draws (None: not asked for)
    prompt_logprobs: list | None = None     # in a continuation's first event, if asked for: see RequestOutput


class AsyncLLM:
    """A thread steps the engine while there is work; each request gets an asyncio.Queue of
    StreamEvents. Requests are added and aborted through a lock-guarded inbox, applied between steps,
    so an abort frees the request's KV blocks before the next step. `last_step` (monotonic) is when
    the last step ended: while sequences run, that the engine keeps stepping is its health."""

    def __init__(self, engine: LLMEngine, metrics=None):
        self.engine, self.metrics = engine, metrics
        engine.stream_text = True
        self._lock = threading.Condition()
        self._inbox: list = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._stopping = False
        self.dead: BaseException | None = None
        self.last_step = time.monotonic()
        native.release_thread_pool()       # the model was built on this thread; the engine thread runs it
        self._thread = threading.Thread(target=self._run, name="turboserve-llm", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None and not self._stopping

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               admit: bool = True, queue: asyncio.Queue | None = None, index_base: int = 0) -> asyncio.Queue:
        """The request's queue of StreamEvents. admit=False (health probes) skips the bound on waiting
        sequences and goes to the front. Several requests may share one `queue` (an OpenAI request
        with several prompts), their events' indices offset by `index_base`."""
        if not self.alive():
            raise EngineDead("the generation engine is not running")
        e = self.engine
        queue = queue if queue is not None else asyncio.Queue()
        loop = asyncio.get_running_loop()
        if admit and params.n > e.max_waiting:
            raise InvalidInputError(f"n = {params.n} is over this server's bound of {e.max_waiting} waiting sequences")
        with self._lock:
            incoming = sum(x[3].n for x in self._inbox if x[0] == "add")
            if admit and len(e.waiting) + incoming + params.n > e.max_waiting:
                raise QueueFull(f"{len(e.waiting) + incoming} sequences are waiting (bound {e.max_waiting})")
            self._check(prompt_ids, params)       # on the caller's side: errors become HTTP answers
            self._streams[request_id] = (loop, queue, index_base)
            self._inbox.append(("add", request_id, prompt_ids, params, admit))
            self._lock.notify()
        return queue

    def _check(self, prompt_ids, params) -> None:
        e = self.engine
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty")
        room = e.max_context - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if room < 1 or len(prompt_ids) + max_tokens > e.max_context:
            raise InputTooLongError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together over the "
                f"model's context length of {e.max_context} tokens")
        if any(not isinstance(t, int) or t < 0 or t >= e.model.vocab_size for t in prompt_ids):
            raise InvalidInputError(f"prompt token ids must be integers in [0, {e.model.vocab_size})")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._inbox.append(("abort", request_id))
            self._lock.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    def _emit(self, request_id: str, event) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, queue, base = target
            if base and isinstance(event, StreamEvent):
                event.index += base
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:            # the caller's event loop is closed: nobody will read this
                self._streams.pop(request_id, None)
                self.engine.abort(request_id)

    @staticmethod
    def _event(out: StepOutput) -> StreamEvent:
        """The step's delta of one continuation (on the engine thread, which owns the sequence)."""
        s = out.seq
        text, new = out.text[s.streamed_chars:], s.output_ids[s.streamed_tokens:]
        lps = s.logprobs[s.streamed_tokens:] if s.params.logprobs is not None else None
        prompt = s.prompt_logprobs if s.params.prompt_logprobs is not None and s.streamed_tokens == 0 else None
        s.streamed_chars, s.streamed_tokens = max(s.streamed_chars, len(out.text)), len(s.output_ids)
        return StreamEvent(s.index, text, new, len(s.output_ids), out.finished, s.finish_reason, lps, prompt)

    def _run(self) -> None:
        e = self.engine
        use_device_on_this_thread(getattr(e.model, "device", "cpu"))
        try:
            while True:
                with self._lock:
                    while not self._inbox and not e.has_work():
                        if self._stopping:
                            return
                        self._lock.wait(1.0)
                    inbox, self._inbox = self._inbox, []
                for item in inbox:
                    if item[0] == "add":
                        try:
                            e.add_request(item[1], item[2], item[3], item[4])
                        except Exception as exc:   # noqa: BLE001 - this request's error, not the engine's
                            self._emit(item[1], exc if isinstance(exc, TurboServeError) else
                                       InvalidInputError(f"the request could not be added: {exc}"))
                    else:
                        e.abort(item[1])
                t = time.perf_counter()
                outputs = e.step()
                self.last_step = time.monotonic()
                if self.metrics is not None:
                    self.metrics.step(self, time.perf_counter() - t, outputs)
                for out in outputs:
                    self._emit(out.seq.request_id, self._event(out))
                # after all of the step's events: sibling continuations may finish in the same step
                done = {out.seq.request_id for out in outputs if out.finished and e.request_done(out.seq.request_id)}
                if done:
                    with self._lock:
                        for rid in done:
                            self._streams.pop(rid, None)
        except BaseException as exc:
            log.exception("generation engine died")
            self.dead = exc
            with self._lock:
                streams, self._streams = self._streams, {}
            for loop, queue, _ in streams.values():
                loop.call_soon_threadsafe(queue.put_nowait, EngineDead("the generation engine failed"))
