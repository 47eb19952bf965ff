"""Encoders on the pre-norm layer library (decoder.py): embedding models built on a causal LM's trunk
(Qwen3-Embedding, gte-Qwen2, e5-mistral and the like: a LLaMA, Qwen2, Qwen3, Mistral, Gemma 3 or GPT-2
body whose sentence-transformers pooling is usually the last token's state), and the bidirectional
encoders with the same pre-norm layer shape: ModernBERT (RoPE, GeGLU, LayerNorms without bias) and
EmbeddingGemma (Gemma 3 with use_bidirectional_attention).

`PreNormEncoderModel` has the surface of model.EncoderModel that Encoder, the engine, its DP
scheduler and the server use (forward(PackedBatch) -> hidden states [T, H], max_tokens,
weight_bytes, activation_bytes, ...), so these models are served by the same routes, queue and
batching as a BERT one. Inside, a packed batch becomes one step of decoder.DecoderModel in which each
sequence is whole, and its layers, kernels and precisions (fp32, bf16, int8 W8A8) run unchanged, with
no LM head loaded.

A causal model's attention reads K and V through a paged cache that is scratch here: each layer
writes its keys and values and attends over them before the next layer overwrites them, so one
layer's cache serves all layers (Qwen3-0.6B: 8 KiB a token in fp32 instead of 28 times that). It holds
each sequence from the start of a block of BLOCK_SIZE tokens, so a batch needs at most
T + (BLOCK_SIZE - 1) x S slots for T tokens in S sequences; it is grown to the largest batch seen and
kept, as the encoder's workspace is. A bidirectional model needs no cache: its attention is the
encoders' varlen kernel over the step's qkv.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .arch import ACTIVATIONS, decoder_spec_for, is_decoder, is_sequence_classifier, softcaps
from .decoder import DecoderModel, StepBatch
from .errors import ModelLoadError
from .loader import CheckpointView
from .model import pool
from .packing import PackedBatch


@dataclass
class PooledClassifier:
    """ModernBERT's sequence-classification head (rerankers such as gte-reranker-modernbert-base):
    the first token's final state (classifier_pooling "cls") or the mean over the sequence, then
    dense -> activation -> LayerNorm -> classifier."""
    pooling: str
    dense: tuple
    act: str
    norm: tuple
    eps: float
    out: tuple

    @property
    def num_labels(self) -> int:
        return self.out[0].shape[0]

    def __call__(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        h = F.linear(pool(hidden, batch, self.pooling), *self.dense)
        h = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}[self.act](h)
        h = F.layer_norm(h, (h.shape[-1],), *self.norm, self.eps)
        return F.linear(h, *self.out)


@dataclass
class LastTokenClassifier:
    """A causal model's classification head over the final state of each sequence's last token (the
    one that has read the whole input): `score` [labels, hidden] of a ...ForSequenceClassification
    checkpoint (LLaMA, Qwen2, Qwen3, Mistral, Gemma 3: rerankers converted to it such as
    Qwen3-Reranker-seq-cls, reward models, classifiers), or rows of a causal LM's head for the tokens
    it answers with (load_classifier's classifier_tokens). softcap > 0: the logits soft-capped, softcap
    tanh(x / softcap), as the LM's (Gemma 2); difference: one label, the second row's logit minus the
    first's (two classifier tokens)."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float = 0.0
    difference: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.difference else self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        logits = F.linear(pool(hidden, batch, "lasttoken"), self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, 1:] - logits[:, :1] if self.difference else logits


def load_classifier(view: CheckpointView, config: dict, device: torch.device,
                    classifier_tokens: list[int] | None = None) -> PooledClassifier | LastTokenClassifier | None:
    """The head of a ...ForSequenceClassification checkpoint (ModernBERT, or a causal model's `score`),
    or one made from a causal LM's head rows for `classifier_tokens` (token ids: a model that answers
    with a token, as Qwen3-Reranker's "no" / "yes"): with two tokens one logit, the second token's
    minus the first's, whose sigmoid is the softmax probability of the second against the first; else
    a logit per token. None for a model without either (embeddings only)."""
    if classifier_tokens:
        return _token_classifier(view, config, device, classifier_tokens)
    if not is_sequence_classifier(config):
        return None
    if is_decoder(config):
        hidden = decoder_spec_for(config, generation=False).config_value(config, "hidden")
        bias = view.get("score.bias", (None,), required=False)
        return LastTokenClassifier(view.get("score.weight", (None, hidden)).float().to(device),
                                   None if bias is None else bias.float().to(device))
    if config.get("model_type") != "modernbert":
        return None
    pooling = config.get("classifier_pooling", "cls")
    act = ACTIVATIONS.get(config.get("classifier_activation", "gelu"))
    if pooling not in ("cls", "mean") or act is None:
        raise ModelLoadError(f"classifier_pooling {pooling!r} / classifier_activation "
                             f"{config.get('classifier_activation')!r} are not supported")
    h = config["hidden_size"]

    def pair(name, shape):       # on the model's device, as the hidden states it takes
        bias = view.get(name + ".bias", shape[:1], required=False)
        return view.get(name + ".weight", shape).to(device), None if bias is None else bias.to(device)
    return PooledClassifier(pooling, pair("head.dense", (h, h)), act, pair("head.norm", (h,)),
                            float(config.get("norm_eps", 1e-5)), pair("classifier", (None, h)))


def _token_classifier(view: CheckpointView, config: dict, device: torch.device, tokens: list[int]):
    if not is_decoder(config):
        raise ModelLoadError("classifier tokens read a causal LM's head: this model is not a causal LM")
    spec = decoder_spec_for(config, generation=False)
    hidden, vocab = spec.config_value(config, "hidden"), spec.config_value(config, "vocab")
    if not all(0 <= t < vocab for t in tokens) or len(set(tokens)) != len(tokens):
        raise ModelLoadError(f"classifier tokens {tokens} must be distinct ids in [0, {vocab})")
    index = torch.tensor(tokens)
    rows = view.get("lm_head.weight", (vocab, hidden), required=False, rows=index)
    if rows is None:
        if not spec.config_value(config, "tie"):
            raise ModelLoadError("the checkpoint has no lm_head.weight, and its embeddings are not tied")
        rows = view.get(spec.emb_names["word"] + ".weight", (vocab, hidden), rows=index)
    return LastTokenClassifier(rows.contiguous().to(device), softcap=softcaps(spec, config)[1],
                               difference=len(tokens) == 2)


class PreNormEncoderModel:
    BLOCK_SIZE = 16          # the paged attention kernels' native block (one vector of fp32 keys)

    position_offset = None   # positions count 0 .. L-1 (RoPE or learned), as pack_tokens' default
    type_emb = None          # no token types: a text pair is the two texts joined by the tokenizer
    mlm = None               # no masked-LM head (SPLADE pooling is refused)

    def __init__(self, model_dir: Path, dtype: str = "fp32", device: str = "cpu",
                 classifier_tokens: list[int] | None = None):
        self.decoder = d = DecoderModel(
            model_dir, dtype, device, kv_dtype="fp32", with_lm_head=False,
            extra_weights=lambda view, config: load_classifier(view, config, torch.device(device), classifier_tokens))
        d.tune_kernels()
        self.head = d.extra     # a PooledClassifier / LastTokenClassifier (load_classifier), or None
        self.spec, self.dtype_name, self.device, self.ops = d.spec, dtype, d.device, d.ops
        self.causal = not d.bidirectional
        self.hidden, self.vocab_size, self.max_tokens = d.hidden, d.vocab_size, d.max_positions
        # the scratch cache holds what attention reads: bf16 where q, k, v are bf16 (the GPU's 16-bit
        # paths), else fp32 (the CPU's attention is fp32 whatever the model's dtype)
        self.kv_dtype = "bf16" if d.attn_dtype == torch.bfloat16 else "fp32"
        self._cache = None
        self._cache_blocks = 0

    @property
    def weight_bytes(self) -> int:
        return self.decoder.weight_bytes

    # layer-wise precision plans (precision.py): the decoder layers' linears, each in its own precision
    # (int8: the decoder's W8A8 with per-token activations, no SmoothQuant); activations stay fp32
    linear_names = ("qkv", "o", "up", "down")
    smooth_quant = False

    @property
    def layers(self) -> list:
        return self.decoder.layers

    def raw_linears(self, view, i: int) -> dict[str, tuple]:
        return self.decoder.raw_linears(view, i)

    def planned_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: str, smooth=None):
        return self.ops.make_decoder_linear(weight, bias, dtype)

    def linears_changed(self) -> None:
        """The layers allocate their activations per call; int8 linears a plan put in get their kernel
        choice measured."""
        self.decoder.tune_kernels()

    def activation_bytes(self, tokens: int, sequences: int | None = None) -> int:
        """The most a batch of `tokens` tokens in `sequences` sequences (default: as many as tokens, the
        worst case) allocates besides the weights: a causal model's scratch cache (a block started per
        sequence) and the layer's largest live activations (fp32): the residual stream, its norm, and
        either qkv with its normed q / k, attention's output and O's, or the MLP's up projection and
        its activation."""
        d = self.decoder
        nh, kvh, hd = d.num_heads, d.num_kv_heads, d.head_dim
        up = 2 * d.intermediate if d.spec.gated_mlp else d.intermediate
        attention = (nh + 2 * kvh) * hd + (nh + kvh) * hd + nh * hd + d.hidden
        if not self.causal and kvh != nh:
            attention += (nh + 2 * kvh) * hd + 3 * nh * hd      # q | k | v rejoined, then K / V repeated per group
        mlp = up + d.intermediate
        activations = 4 * tokens * (3 * d.hidden + max(attention, mlp))
        if not self.causal:
            return activations
        sequences = tokens if sequences is None else sequences
        return activations + self._cache_bytes(min(tokens, -(-tokens // self.BLOCK_SIZE) + sequences))

    def _cache_bytes(self, blocks: int) -> int:
        d = self.decoder
        per_token = d.ops.kv_bytes_per_token(1, d.num_kv_heads, d.head_dim, self.kv_dtype)
        return blocks * self.BLOCK_SIZE * per_token

    def _scratch(self, blocks: int):
        if blocks > self._cache_blocks:
            d = self.decoder
            self._cache = None            # the old one goes before the new one is made
            self._cache = d.ops.allocate_kv_cache(1, blocks, d.heads()[1], self.BLOCK_SIZE, d.head_dim,
                                                  self.kv_dtype)[0]
            self._cache_blocks = blocks
        return self._cache

    def step_for(self, batch: PackedBatch) -> tuple[StepBatch, int]:
        """The decoder step that runs `batch` with every sequence whole, and the cache blocks it needs
        (a causal model's sequence s owns blocks first[s] .. first[s] + ceil(L_s / BLOCK_SIZE) - 1; a
        bidirectional model needs none)."""
        bs = self.BLOCK_SIZE
        lengths = batch.lengths()
        blocks = (lengths + bs - 1) // bs if self.causal else torch.zeros_like(lengths)
        first = torch.cumsum(blocks, 0) - blocks
        total = int(blocks.sum())
        # entries past a sequence's own blocks are never read; clamped so that none points past the cache
        tables = torch.clamp(first[:, None] + torch.arange(int(blocks.max()))[None, :], max=max(total - 1, 0))
        seq = torch.repeat_interleave(torch.arange(batch.num_seqs), lengths)
        step = StepBatch(input_ids=batch.input_ids, positions=batch.positions, cu_q=batch.cu_tensor,
                         ctx_len=lengths, block_tables=tables.to(torch.int32),
                         slot_blocks=first[seq] + batch.positions // bs, slot_offsets=batch.positions % bs,
                         logit_rows=torch.empty(0, dtype=torch.int64), max_ctx=batch.max_len)
        return step, total

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states [T, H] (fp32, a fresh tensor) of the packed batch, each sequence
        attending over its own tokens (causally, or both ways)."""
        step, blocks = self.step_for(batch)
        cache = self._scratch(blocks) if self.causal else None
        return self.decoder.hidden_states(step, [cache] * self.decoder.num_layers)

    @property
    def num_labels(self) -> int | None:
        return None if self.head is None else self.head.num_labels

    @torch.inference_mode()
    def classify(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.head is None:
            raise ModelLoadError("this model has no sequence-classification head")
        return self.head(hidden.float(), batch)
