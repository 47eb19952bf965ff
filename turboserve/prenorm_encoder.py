"""Encoders on the pre-norm layer library (decoder.py): embedding models built on a causal LM's trunk
(Qwen3-Embedding, gte-Qwen2, e5-mistral and the like: a LLaMA, Qwen2, Qwen3, Mistral or GPT-2 body
whose sentence-transformers pooling is usually the last token's state), and ModernBERT, a
bidirectional encoder with the same pre-norm layer shape (RoPE, GeGLU, LayerNorms without bias).

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

from pathlib import Path

import torch

from .decoder import DecoderModel, StepBatch
from .errors import ModelLoadError
from .packing import PackedBatch


class PreNormEncoderModel:
    BLOCK_SIZE = 16          # the paged attention kernels' native block (one vector of fp32 keys)

    position_offset = None   # positions count 0 .. L-1 (RoPE or learned), as pack_tokens' default
    type_emb = None          # no token types: text pairs are refused
    head = None              # no sequence-classification head

    def __init__(self, model_dir: Path, dtype: str = "fp32", device: str = "cpu"):
        self.decoder = d = DecoderModel(model_dir, dtype, device, kv_dtype="fp32", with_lm_head=False)
        self.spec, self.dtype_name, self.device = d.spec, dtype, d.device
        self.causal = not d.spec.bidirectional
        self.hidden, self.vocab_size, self.max_tokens = d.hidden, d.vocab_size, d.max_positions
        # the scratch cache holds what attention reads: bf16 where q, k, v are bf16 (a bf16 model, or
        # any 16-bit GPU path), else fp32
        self.kv_dtype = "bf16" if d.attn_dtype == torch.bfloat16 else "fp32"
        self._cache = None
        self._cache_blocks = 0

    @property
    def weight_bytes(self) -> int:
        return self.decoder.weight_bytes

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
            self._cache = d.ops.allocate_kv_cache(1, blocks, d.num_kv_heads, self.BLOCK_SIZE, d.head_dim,
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

    def classify(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        raise ModelLoadError("this model has no sequence-classification head")
