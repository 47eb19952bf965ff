"""The pre-norm layer library over packed tokens: the causal decoders (GPT-2, LLaMA, Qwen2, Qwen3,
Mistral, Gemma 3) and, bidirectional, ModernBERT and EmbeddingGemma; differences are data in arch.py.

One forward pass runs one engine step: the new tokens of every scheduled sequence, flat [T, H] with
`cu_q` (prefill chunks and single decode tokens side by side, no padding). Per layer:
    h = norm1(x); qkv = h @ Wqkv (+ b); RMSNorm of each q and k head (Qwen3); RoPE on q, k (LLaMA family)
    write k, v into the paged cache at each token's slot
    a = causal attention of each sequence's queries over its own cached context (paged, GQA)
    x = x + a @ Wo (+ b)
    h = norm2(x); x = x + mlp(h)         mlp: fc2(act(fc1 h)) or down(act(gate h) * up h), act silu or gelu
(Gemma 3 also normalizes the attention's and the MLP's outputs before adding them)
then the final norm and the LM head only at the rows whose logits are needed (the last token of a
sequence that samples this step), never at every prefill position.

A bidirectional model (ModernBERT, EmbeddingGemma; prenorm_encoder.py runs it as an encoder) has no cache: q and k
are rotated in place and each sequence attends over all of its tokens through the encoders' varlen
attention, a sliding layer's window (|key - query| < local_attention // 2 + 1) given to the kernel,
which reads only the keys inside it; and it has no LM head.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .arch import DECODER_ACTIVATIONS, DecoderSpec, decoder_spec_for, is_bidirectional, softcaps
from .errors import InvalidInputError, ModelLoadError, UnsupportedArchitectureError
from .loader import CheckpointView, read_config, read_json, read_state_dict, resolve_model_dir
from .ops import backend_for, check_device
from .packing import batch_to

DTYPES = ("fp32", "bf16", "int8")       # the activations' dtype of each: the backend's decoder_act_dtype
KV_DTYPES = ("fp32", "bf16", "int8")


@dataclass
class StepBatch:
    """One engine step's tokens. The engine builds them on the CPU; the model moves them to its device."""
    input_ids: torch.Tensor        # int64 [T]
    positions: torch.Tensor        # int64 [T]
    cu_q: torch.Tensor             # int64 [S + 1]: sequence s's new tokens are rows cu_q[s]..cu_q[s+1]
    ctx_len: torch.Tensor          # int64 [S]: tokens in s's context after this step
    block_tables: torch.Tensor     # int32 [S, W]
    slot_blocks: torch.Tensor      # int64 [T]: cache block of each new token
    slot_offsets: torch.Tensor     # int64 [T]: its offset inside the block
    logit_rows: torch.Tensor       # int64 [R]: rows whose next-token logits are wanted
    max_ctx: int

    def to(self, device: torch.device) -> "StepBatch":
        """The step with its tensors on `device` (itself when they are there already)."""
        return batch_to(self, device)


@dataclass
class DecoderLayer:
    norm1: tuple
    qkv: object
    o: object
    norm2: tuple
    up: object          # fc1, or gate|up fused
    down: object        # fc2 / down
    q_norm: tuple | None = None     # Qwen3, Gemma 3: RMSNorm weights [head_dim] for every q head, and every k head
    k_norm: tuple | None = None
    post_attn_norm: tuple | None = None     # Gemma 3: norms of the attention's and the MLP's outputs
    post_mlp_norm: tuple | None = None


def rope_tables(config: dict, spec: DecoderSpec, head_dim: int, max_pos: int,
                layer_params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, head_dim / 2] with the config's RoPE base and scaling (transformers 4 writes
    `rope_theta` and `rope_scaling`, transformers 5 one `rope_parameters` dict holding both), or with
    `layer_params` (rope_theta and the scaling keys) for a model with RoPE per layer kind."""
    params = config.get("rope_parameters") or {}
    if layer_params is not None:
        theta, scaling = float(layer_params["rope_theta"]), layer_params
    else:
        theta = float(params.get("rope_theta", spec.config_value(config, "rope_theta")))
        scaling = spec.config_value(config, "rope_scaling") or params
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old / low) & (wavelen >= old / high)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise UnsupportedArchitectureError(
            f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return freqs.cos().float(), freqs.sin().float()


class DecoderModel:
    def __init__(self, path=None, dtype: str = "fp32", device: str = "cpu", kv_dtype: str | None = None,
                 with_lm_head: bool = True, extra_weights=None):
        """kv_dtype: the KV cache's element type, "fp32", "bf16" or "int8" (one scale per token and KV
        head); default: the model's dtype (fp32 keeps results equal to transformers').
        with_lm_head: False for a model that only gives hidden states (an embedding model: no logits,
        no int8 copy of a vocabulary-sized head). extra_weights: called with the checkpoint (and the
        config) while it is open, its result kept as `extra` (an encoder's classification head)."""
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        check_device(device)
        self.ops = backend_for(device)
        self.device = torch.device(device)
        self.act_dtype = self.ops.decoder_act_dtype(dtype)
        self.attn_dtype = self.ops.attention_dtype(self.act_dtype)
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in KV_DTYPES:
            raise InvalidInputError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        self.model_dir = resolve_model_dir(path)
        config = read_config(self.model_dir)
        spec = decoder_spec_for(config, generation=with_lm_head)
        view = CheckpointView(read_state_dict(self.model_dir), spec, self.model_dir)
        self.config, self.spec, self.dtype_name = config, spec, dtype
        try:
            self.hidden = spec.config_value(config, "hidden")
            self.num_heads = spec.config_value(config, "heads")
            self.num_layers = spec.config_value(config, "layers")
            self.max_positions = spec.config_value(config, "max_pos")
            self.vocab_size = spec.config_value(config, "vocab")
            self.eps = float(spec.config_value(config, "eps"))
            act_name = spec.config_value(config, "act")
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from exc
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or self.hidden // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads")
        self.intermediate = config.get(spec.cfg_keys["intermediate"]) or 4 * self.hidden
        if act_name not in DECODER_ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {act_name!r}; supported: {', '.join(DECODER_ACTIVATIONS)}")
        if spec.gated_mlp and DECODER_ACTIVATIONS[act_name] not in ("silu", "gelu", "gelu_tanh"):
            raise ModelLoadError(f"gated MLP activation {act_name!r} is not supported (SiLU- or GELU-gated only)")
        self.bidirectional = is_bidirectional(spec, config)
        # Gemma 2's tanh soft-caps (0: none): on attention scores in the paged kernels, on the logits here
        self.attn_softcap, self.final_softcap = softcaps(spec, config)
        if self.attn_softcap and self.bidirectional:
            raise ModelLoadError("attn_logit_softcapping with bidirectional attention is not supported")
        self.activation = DECODER_ACTIVATIONS[act_name]
        self.windows = _layer_windows(config, spec, self.num_layers, self.bidirectional)
        # GPT-2's attention scale: 1 / sqrt(d), or 1 (scale_attn_weights false), divided by the layer's
        # number with scale_attn_by_inverse_layer_idx; Gemma's: query_pre_attn_scalar^-1/2
        scalar = float(spec.optional_value(config, "attn_scalar") or self.head_dim)
        d_scale = scalar ** -0.5 if config.get("scale_attn_weights", True) else 1.0
        self.scales = [d_scale / (i + 1 if config.get("scale_attn_by_inverse_layer_idx") else 1)
                       for i in range(self.num_layers)]
        # generation_config.json's eos ids too: chat models keep their end of turn there
        # (Llama-3-Instruct's <|eot_id|>, Qwen2.5-Instruct's <|im_end|>)
        gen_cfg = self.model_dir / "generation_config.json"
        self.eos_token_ids = sorted(set(_token_ids(config.get("eos_token_id"))) | set(
            _token_ids(read_json(gen_cfg).get("eos_token_id")) if gen_cfg.is_file() else ()))

        e = spec.emb_names
        dev = self.device
        self.word_emb = view.get(e["word"] + ".weight", (self.vocab_size, self.hidden))
        self.pos_emb = view.get(e["pos"] + ".weight", (self.max_positions, self.hidden)).to(dev) if "pos" in e else None
        self.emb_norm = self._norm(view, e["emb_norm"]) if "emb_norm" in e else None
        # Gemma: embeddings times sqrt(hidden), rounded to the weights' dtype as transformers does
        self.embed_scale = float(torch.tensor(self.hidden ** 0.5, dtype=self.act_dtype)) if spec.embed_scale else None
        self.final_norm = self._norm(view, e["final_norm"])
        self.layers = [self._load_layer(view, i) for i in range(self.num_layers)]
        self.extra = None if extra_weights is None else extra_weights(view, config)
        head = None if spec.config_value(config, "tie") or not with_lm_head else view.get(
            "lm_head.weight", (self.vocab_size, self.hidden), required=False)
        self.word_emb = self.word_emb.to(dev, self.act_dtype).contiguous()
        self.lm_head = self.word_emb if head is None else head.to(dev, self.act_dtype).contiguous()   # tied: one copy
        # int8: the LM head too (at 64 sampled rows it was 30% of GPT-2's decode FLOPs); fp32 / bf16
        # multiply by the (possibly tied) weight as stored, with no transposed copy
        self.lm_head_int8 = None
        if not with_lm_head:
            self.lm_head = None
        elif dtype == "int8":
            self.lm_head_int8, self.lm_head = self.ops.make_decoder_linear(self.lm_head, None, "int8"), None
        if spec.rope:       # one (cos, sin) table per RoPE kind; rope_kind[i]: layer i's
            kinds = [json.dumps(p, sort_keys=True) for p in _layer_rope(config, spec, self.windows)]
            distinct = list(dict.fromkeys(kinds))
            self.rope_kind = [distinct.index(k) for k in kinds]
            self.rope_tables = [tuple(t.to(dev) for t in rope_tables(config, spec, self.head_dim, self.max_positions,
                                                                       json.loads(k))) for k in distinct]
        self.tp = None           # a parallel.TPGroup when this model is one shard of a tensor-parallel one

    # ------------------------------------------------------------------ loading
    def _norm(self, view: CheckpointView, key: str, width: int | None = None) -> tuple:
        width = width or self.hidden
        bias = view.get(key + ".bias", (width,), required=False)
        # Gemma's gains are stored as w - 1 and applied in fp32 (1 + w in bf16 would round them by 0.4%)
        dev, dt = self.device, torch.float32 if self.spec.norm_offset else self.act_dtype
        weight = view.get(key + ".weight", (width,)) + self.spec.norm_offset
        return weight.to(dev, dt), None if bias is None else bias.to(dev, dt)

    def _raw_linear(self, view: CheckpointView, keys: list[str], outs: list[int], in_features: int):
        """(weight [out, in], bias or None) of one linear made of one or more checkpoint linears stacked
        along the output (fused QKV / gate|up); checkpoint linear k is [outs[k], in_features] (stored
        transposed with Conv1D)."""
        ws, bs = [], []
        for k, out in zip(keys, outs, strict=True):
            w = view.get(k + ".weight", (in_features, out) if self.spec.conv1d else (out, in_features))
            ws.append(w.t() if self.spec.conv1d else w)
            bs.append(view.get(k + ".bias", (out,), required=False))
        weight = torch.cat(ws)
        bias = None if all(b is None for b in bs) else torch.cat(
            [b if b is not None else torch.zeros(w.shape[0]) for b, w in zip(bs, ws)])
        return weight, bias

    def raw_linears(self, view: CheckpointView, i: int) -> dict[str, tuple]:
        """Layer i's linears as checkpoint weights, {"qkv" | "o" | "up" | "down": (weight, bias)}: up is
        fc1, or gate|up fused."""
        n = self.spec.layer_names
        p = f"{self.spec.layer_prefix}.{i}."
        H, I = self.hidden, self.intermediate
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        raw = {}
        if "qkv" in n:                   # one fused projection in the checkpoint (GPT-2, ModernBERT)
            raw["qkv"] = self._raw_linear(view, [p + n["qkv"]], [q + 2 * kv], H)
        else:
            raw["qkv"] = self._raw_linear(view, [p + n["q"], p + n["k"], p + n["v"]], [q, kv, kv], H)
        raw["o"] = self._raw_linear(view, [p + n["o"]], [H], q)
        if self.spec.gated_mlp:
            raw["up"] = self._raw_linear(view, [p + n["gate_up"]] if "gate_up" in n else [p + n["gate"], p + n["up"]],
                                         [2 * I] if "gate_up" in n else [I, I], H)
            raw["down"] = self._raw_linear(view, [p + n["down"]], [H], I)
        else:
            raw["up"] = self._raw_linear(view, [p + n["fc1"]], [I], H)
            raw["down"] = self._raw_linear(view, [p + n["fc2"]], [H], I)
        return raw

    def _load_layer(self, view: CheckpointView, i: int) -> DecoderLayer:
        n = self.spec.layer_names
        p = f"{self.spec.layer_prefix}.{i}."
        lin = {k: self.ops.make_decoder_linear(w, b, self.dtype_name)
               for k, (w, b) in self.raw_linears(view, i).items()}
        qk_norms = ({k: self._norm(view, p + n[k], self.head_dim) for k in ("q_norm", "k_norm")}
                    if self.spec.qk_norm else {})
        norm1 = self._norm(view, p + n["norm1"]) if i > 0 or self.spec.first_norm1 else None   # ModernBERT: none
        post = {k: self._norm(view, p + n[k]) for k in ("post_attn_norm", "post_mlp_norm") if k in n}
        return DecoderLayer(norm1, lin["qkv"], lin["o"], self._norm(view, p + n["norm2"]), lin["up"], lin["down"],
                            **qk_norms, **post)

    def tune_kernels(self) -> None:
        """The CPU's int8 linears (an int8 model's, or a layer-wise plan's): which GEMM kernel each takes
        at which row count, as measured on this machine (ops/cpu.py tune_int8_rows, cached on disk).
        Called once the model (or a tensor-parallel rank's shard) has its final linears."""
        tune = getattr(self.ops, "tune_int8_rows", None)
        if tune is not None:
            tune([lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.up, layer.down)]
                 + [self.lm_head_int8])

    # ------------------------------------------------------------------ cache
    def heads(self) -> tuple[int, int]:
        """(query heads, KV heads) this model computes: all of them, or a tensor-parallel shard's."""
        if self.tp is None:
            return self.num_heads, self.num_kv_heads
        return self.tp.local_heads(self.num_heads, self.num_kv_heads)

    def kv_bytes_per_token(self) -> int:
        return self.ops.kv_bytes_per_token(self.num_layers, self.heads()[1], self.head_dim, self.kv_dtype)

    def allocate_cache(self, num_blocks: int, block_size: int) -> list:
        """Per layer, the backend's paged KV cache (ops/cpu.py PagedKV: blocks of `block_size` tokens
        of this model's KV heads, in `kv_dtype`)."""
        return self.ops.allocate_kv_cache(self.num_layers, num_blocks, self.heads()[1], block_size, self.head_dim,
                                          self.kv_dtype)

    @property
    def weight_bytes(self) -> int:
        lin = sum(x.nbytes for layer in self.layers for x in (layer.qkv, layer.o, layer.up, layer.down))
        emb = self.word_emb.numel() * self.word_emb.element_size()
        if self.lm_head_int8 is not None:
            head = self.lm_head_int8.nbytes
        elif self.lm_head is None or self.lm_head.data_ptr() == self.word_emb.data_ptr():
            head = 0                                   # none, or tied to the embedding
        else:
            head = self.lm_head.numel() * self.lm_head.element_size()
        return lin + emb + head

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, step: StepBatch, cache) -> torch.Tensor:
        """fp32 logits [len(step.logit_rows), vocab], on the model's device."""
        step = step.to(self.device)
        x = self._layers(step, cache)
        h = self.ops.norm(x[step.logit_rows], *self.final_norm, self.eps, self.spec.norm,
                          quant_for=_int8_consumer(self.lm_head_int8), out_dtype=self.act_dtype)
        if self.lm_head_int8 is not None:
            logits = self.ops.linear(self.lm_head_int8, h).float()     # bf16 on the GPU's W8A16 path
        else:
            logits = self.ops.lm_head(h, self.lm_head).float()
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)
        if self.final_softcap:
            logits.div_(self.final_softcap).tanh_().mul_(self.final_softcap)
        return logits

    @torch.inference_mode()
    def hidden_states(self, step: StepBatch, cache) -> torch.Tensor:
        """The final norm's output at every row of the step, fp32 [T, hidden], on the model's device
        (what an embedding model pools)."""
        step = step.to(self.device)
        x = self._layers(step, cache)
        return self.ops.norm(x, *self.final_norm, self.eps, self.spec.norm, out_dtype=self.act_dtype).float()

    def _layers(self, step: StepBatch, cache) -> torch.Tensor:
        """Embeddings and every layer: the fp32 residual stream [T, hidden] after the last one."""
        ops, adt, tp = self.ops, self.act_dtype, self.tp
        (nh, kvh), d = self.heads(), self.head_dim
        # tensor parallel: a vocabulary-sharded lookup, and partial sums of O and down added over the ranks
        reduce = (lambda t: t) if tp is None else (lambda t: tp.all_reduce(t.float()))
        x = (torch.embedding(self.word_emb, step.input_ids) if tp is None else
             tp.embedding(self.word_emb, step.input_ids)).float()
        if self.embed_scale is not None:
            x *= self.embed_scale
        if self.pos_emb is not None:
            x += torch.embedding(self.pos_emb, step.positions)
        if self.emb_norm is not None:
            x = ops.norm(x, *self.emb_norm, self.eps, self.spec.norm)
        # each RoPE table's rows at this step's positions, looked up once
        rotations = [(c[step.positions], s[step.positions]) for c, s in self.rope_tables] if self.spec.rope else []
        bidirectional = _Bidirectional(step, nh, kvh) if self.bidirectional else None
        # int8 linears: a norm, or fc1 / gate|up and the activation, hand the next linear its int8 input
        # straight from their pass (the floats between are never written)
        qf = _int8_consumer
        for i, (layer, layer_cache, window, scale) in enumerate(zip(self.layers, cache, self.windows, self.scales)):
            if self.spec.rope:
                cos, sin = rotations[self.rope_kind[i]]
            h = x if layer.norm1 is None else ops.norm(x, *layer.norm1, self.eps, self.spec.norm,
                                                       quant_for=qf(layer.qkv), out_dtype=adt)
            qkv = ops.linear(layer.qkv, h).to(self.attn_dtype)
            q, k, v = qkv[:, :nh * d], qkv[:, nh * d:(nh + kvh) * d], qkv[:, (nh + kvh) * d:]
            if layer.q_norm is not None:             # per head, before RoPE; fresh q / k rows for the RoPE pass
                q = ops.norm(q.reshape(-1, d), *layer.q_norm, self.eps, "rmsnorm").view(-1, nh * d)
                k = ops.norm(k.reshape(-1, d), *layer.k_norm, self.eps, "rmsnorm").view(-1, kvh * d)
            if bidirectional is not None:
                a = bidirectional.attend(ops, None if layer.q_norm is not None else qkv, q, k, v, cos, sin,
                                         window, scale)
            else:
                ops.write_kv(layer_cache, k.view(-1, kvh, d), v.view(-1, kvh, d), step.slot_blocks, step.slot_offsets,
                             rope=(q, cos, sin) if self.spec.rope else None)      # RoPE on q and K, one pass
                a = ops.paged_attention(q, layer_cache, step.block_tables, step.cu_q, step.ctx_len, nh, window,
                                        scale, step.max_ctx, self.attn_softcap)
            o = reduce(ops.linear(layer.o, a.to(adt)))
            x += o if layer.post_attn_norm is None else ops.norm(o, *layer.post_attn_norm, self.eps, self.spec.norm)
            h = ops.norm(x, *layer.norm2, self.eps, self.spec.norm, quant_for=qf(layer.up), out_dtype=adt)
            if self.spec.gated_mlp and qf(layer.down) is not None:
                u = ops.linear(layer.up, h, act=f"{self.activation}_mul", quant_for=layer.down)
            elif self.spec.gated_mlp:
                u = ops.act_and_mul(ops.linear(layer.up, h), self.activation)
            else:
                u = ops.linear(layer.up, h, act=self.activation, quant_for=qf(layer.down))
            m = reduce(ops.linear(layer.down, u))
            x += m if layer.post_mlp_norm is None else ops.norm(m, *layer.post_mlp_norm, self.eps, self.spec.norm)
        return x


class _Bidirectional:
    """A bidirectional model's attention over one step (every sequence whole), with the sequences'
    work order made once for all layers."""

    def __init__(self, step: StepBatch, num_heads: int, kv_heads: int):
        self.step, self.num_heads, self.kv_heads = step, num_heads, kv_heads
        self.order = torch.argsort(step.ctx_len, descending=True)

    def attend(self, ops, qkv: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, window: int, scale: float) -> torch.Tensor:
        """q, k, v: [T, heads d], [T, kv_heads d] each, q and k not yet rotated; qkv: the projection
        they are views of, or None where they are fresh (after per-head norms). The varlen kernel takes
        Q | K | V rows of as many heads each: they are joined in one copy where qkv cannot serve, with
        grouped K / V heads repeated (EmbeddingGemma: 3 query heads over 1 KV head)."""
        nh, kvh, step = self.num_heads, self.kv_heads, self.step
        t, hd = q.shape[0], q.shape[1]
        d = hd // nh
        if kvh != nh:
            k, v = (x.reshape(t, kvh, 1, d).expand(t, kvh, nh // kvh, d).reshape(t, hd) for x in (k, v))
        if qkv is None or kvh != nh:
            qkv = torch.cat([q, k, v], 1)
        ops.rope_(qkv[:, :hd], cos, sin, nh)                 # q and k in place, inside qkv
        ops.rope_(qkv[:, hd:2 * hd], cos, sin, nh)
        if scale != d ** -0.5:          # the kernel scales by d^-1/2: q carries the rest (Gemma's scalar)
            qkv[:, :hd] *= scale * d ** 0.5
        out = torch.empty(qkv.shape[0], hd, dtype=qkv.dtype, device=qkv.device)
        return ops.varlen_attention(qkv, step.cu_q, nh, out, self.order, step.max_ctx, window=window)


def _layer_rope(config: dict, spec: DecoderSpec, windows: list[int]) -> list[dict | None]:
    """Each layer's RoPE: None (the config's own, which rope_tables reads), or for a model with RoPE
    per layer kind (ModernBERT, Gemma 3: global and local bases; Gemma's scaling on the global layers
    only) that kind's rope_theta and scaling keys, from transformers 5's rope_parameters per layer type
    or transformers 4's separate keys."""
    if "local_theta" not in spec.cfg_keys:
        return [None] * len(windows)
    params = config.get("rope_parameters") or {}

    def kind(layer_type: str, key: str, scaled: bool) -> dict:
        own = params.get(layer_type)
        if isinstance(own, dict) and "rope_theta" in own:
            return own
        scaling = spec.config_value(config, "rope_scaling") if scaled else None
        if spec.cfg_keys[key] in config and config[spec.cfg_keys[key]] is None:
            key = "rope_theta"          # a local base set to null: the global one (transformers' ModernBERT)
        return {**(scaling or {}), "rope_theta": float(spec.config_value(config, key))}
    full, sliding = kind("full_attention", "rope_theta", True), kind("sliding_attention", "local_theta", False)
    return [sliding if w else full for w in windows]


def _int8_consumer(linear):
    """The linear to quantize a pass's output for, if it takes int8 input (else None)."""
    return linear if getattr(linear, "takes_int8", False) else None


def _layer_windows(config: dict, spec, num_layers: int, bidirectional: bool) -> list[int]:
    """Each layer's sliding window (0: full attention), as transformers reads it: `layer_types` where
    the config has them; else one global layer in every `global_every` (ModernBERT: the first of each
    group, Gemma 2 and 3: the last), Qwen2's and Qwen3's use_sliding_window (default false) from layer
    max_window_layers on, or Mistral's sliding_window on every layer. A causal layer's window counts
    the keys up to the query; a bidirectional one's bounds |key - query| < window."""
    window = spec.optional_value(config, "window")
    if not window:
        return [0] * num_layers
    if bidirectional:
        # ModernBERT's local_attention, EmbeddingGemma's sliding_window: that many tokens centred on the
        # query, |j - i| < window // 2 + 1 as transformers (local_attention 1: the query alone)
        window = window // 2 + 1
    types = config.get("layer_types")
    if not types and spec.window_layers in ("first_of_every", "last_of_every"):
        # one global layer in every `global_every`: the first of each group (ModernBERT) or the last (Gemma)
        every = spec.config_value(config, "global_every")
        last = spec.window_layers == "last_of_every"
        types = ["full_attention" if (i + 1 if last else i) % every == 0 else "sliding_attention"
                 for i in range(num_layers)]
    if types:
        if len(types) != num_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ModelLoadError(f"layer_types {types!r} is not one of full_attention / sliding_attention per layer")
        return [int(window) if t == "sliding_attention" else 0 for t in types]
    if spec.window_layers == "from_max_window_layers":
        if not config.get("use_sliding_window", False):
            return [0] * num_layers
        first = config.get("max_window_layers") or 0
        return [int(window) if i >= first else 0 for i in range(num_layers)]
    return [int(window)] * num_layers


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
