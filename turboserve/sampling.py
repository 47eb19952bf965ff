"""Sampling parameters and the batched sampler.

Order of operations on a row of logits (as vLLM and transformers do it): repetition penalty (over
prompt and output tokens), presence and frequency penalties (over output tokens), logit_bias (OpenAI's:
added to the logits), and while fewer than min_tokens tokens have been generated the end-of-sequence
and stop token ids masked out (vLLM's min_tokens), then greedy (temperature 0) or temperature ->
top-k -> top-p -> min-p -> a draw from the request's own generator.
Each request owns a torch.Generator seeded from its `seed` (or from the engine's generator), so a
seeded request draws the same tokens whatever runs beside it. Logprobs are of the model's raw
distribution (log-softmax of the logits before any penalty or temperature).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidInputError

MAX_LOGPROBS = 5


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16          # None: up to the context length
    temperature: float = 1.0             # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # top alternatives per token, 0..5 (None: no logprobs)
    prompt_logprobs: int | None = None   # the same for the prompt's tokens (each given those before it)
    logit_bias: dict[int, float] | None = None    # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0                  # EOS and stop_token_ids cannot end the output before this many

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop or [], (list, tuple)):
            raise InvalidInputError("stop must be a string or a list of strings")
        if not isinstance(self.stop_token_ids or [], (list, tuple)):
            raise InvalidInputError("stop_token_ids must be a list of token ids")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise InvalidInputError("logit_bias must map token ids to numbers")
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0
        numbers = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInputError(f"{name} must be a number, not {value!r}")
        if any(isinstance(v, bool) for v in (self.max_tokens, self.n, self.top_k, self.min_tokens)):
            raise InvalidInputError("n, max_tokens, min_tokens and top_k must be integers, not booleans")
        checks = [
            (isinstance(self.n, int) and 1 <= self.n <= 16, "n must be an integer from 1 to 16"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens must be a positive integer"),
            (0.0 <= self.temperature <= 10.0, "temperature must be in [0, 10]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be -1, 0 or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                       and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer from 0 to {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and not isinstance(self.prompt_logprobs, bool)
                                              and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be an integer from 0 to {MAX_LOGPROBS}"),
            (all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
             "stop must be up to 16 non-empty strings"),
            (all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be token ids"),
            (all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.logit_bias),
             "logit_bias keys must be token ids"),
            (all(isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
                 for b in self.logit_bias.values()), "logit_bias values must be numbers in [-100, 100]"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0 and (
                self.max_tokens is None or not isinstance(self.max_tokens, int) or self.min_tokens <= self.max_tokens),
             "min_tokens must be an integer from 0 to max_tokens"),
            # continuation i (n <= 16) draws from seed + i: all within torch.Generator's 64-bit range
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and -2**63 <= self.seed <= 2**63 - 17),
             "seed must be an integer in [-2^63, 2^63 - 17]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message)

    @property
    def greedy(self) -> bool:
        """Temperatures under 1e-5 are greedy too (as vLLM's): logits / 1e-40 overflow to inf."""
        return self.temperature < 1e-5 or self.top_k == 1


# ---------------------------------------------------------------------- masks (on [R, V] logits)
def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top token always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs               # mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                    params: SamplingParams, end_ids=()) -> torch.Tensor:
    """One row [V]. repetition: HF's rule over prompt and output tokens (positive logits divided,
    negative multiplied); presence / frequency: OpenAI's rule over output tokens; logit_bias added;
    before min_tokens outputs, `end_ids` (the model's EOS unless ignore_eos) and stop_token_ids
    masked to -inf."""
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        v = logits[seen]
        logits[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if len(output_ids) < params.min_tokens:
        ends = [*params.stop_token_ids, *(() if params.ignore_eos else end_ids)]
        if ends:
            logits[torch.tensor(ends, dtype=torch.long)] = float("-inf")
    return logits


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)
            or bool(params.logit_bias) or params.min_tokens > 0)


@dataclass
class Draw:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None      # the most likely alternatives, with logprobs


def scored(logprobs: torch.Tensor, token: int, top: int) -> Draw:
    """`token`'s entry of a row of log-probabilities, with the `top` most likely alternatives."""
    draw = Draw(token, float(logprobs[token]))
    if top > 0:
        best = logprobs.topk(top)
        draw.top = list(zip(best.indices.tolist(), best.values.tolist()))
    return draw


def sample(logits: torch.Tensor, requests: list, end_ids=()) -> list[Draw]:
    """logits: fp32 [R, V], one row per request in `requests` (objects with .params, .prompt_ids,
    .output_ids and .generator); end_ids: the model's end-of-sequence ids (min_tokens holds them off)."""
    logprobs = None
    if any(r.params.logprobs is not None for r in requests):
        logprobs = logits.log_softmax(-1)
    # greedy rows without penalties: one argmax over all of them, no per-row copy (a clone and an
    # argmax per row cost ~110 us a token on GPT-2's 50257-entry vocabulary)
    plain = [i for i, r in enumerate(requests) if r.params.greedy and not _has_penalties(r.params)]
    # (numpy's argmax: 0.3 ms for [45, 50257] fp32 against torch's 2.0 ms; both take the first maximum;
    # all rows plain: no gathered copy of them)
    rows = logits if len(plain) == len(requests) else logits[plain]
    argmax = dict(zip(plain, rows.numpy().argmax(-1).tolist())) if plain else {}
    out = []
    for i, r in enumerate(requests):
        p = r.params
        if i in argmax:
            token = argmax[i]
        elif p.greedy:
            token = int(apply_penalties(logits[i].clone(), r.prompt_ids, r.output_ids, p, end_ids).argmax())
        else:
            row = apply_penalties(logits[i].clone(), r.prompt_ids, r.output_ids, p, end_ids)
            row = (row - row.max()) / p.temperature         # the max first: no overflow at small T
            row = apply_min_p(apply_top_p(apply_top_k(row[None], p.top_k), p.top_p), p.min_p)[0]
            token = int(torch.multinomial(row.softmax(-1), 1, generator=r.generator))
        out.append(Draw(token) if p.logprobs is None else scored(logprobs[i], token, p.logprobs))
    return out


class StopChecker:
    """Incremental detokenization with stop strings: `update(output_ids)` returns the text that is
    safe to show (never a part of a stop string that might still complete, never half a UTF-8
    character) and whether a stop string ended the output; the text is cut where the stop string
    starts, and the stop string is not included."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.stopped = False

    def update(self, output_ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        search_from = max(0, len(self.text) - self.holdback - 1)
        cut = min((i for i in (text.find(s, search_from) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self.text
        self.text = text
        if final:
            return text
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":        # an incomplete multi-byte character
            end -= 1
        # the hold-back counts real characters: a stop string's start followed by half a character
        # is still held back
        return text[:max(end - self.holdback if self.stops else end, 0)]
