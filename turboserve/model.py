"""The packed-token encoder: one layer library for every supported architecture (see arch.py).

forward() runs on a PackedBatch: embeddings + LayerNorm, then per layer
    op0 qkv   = x @ Wqkv + b                      (Q, K and V as one GEMM)
    op1 ctx   = varlen attention(qkv)              (each sequence over exactly its own tokens)
    op2 h1    = LayerNorm(ctx @ Wo + b + x)        (GEMM, then one epilogue pass)
    op3 inter = act(h1 @ W1 + b)                   (GEMM, then activation in the epilogue)
    op4 y     = LayerNorm(inter @ W2 + b + h1)
Each epilogue also quantizes its output for the next GEMM when that one is int8, so an int8 model's
[T, intermediate] activation exists only in int8. Activations live in the memory planner's workspace;
the op numbers above are their lifetimes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arch import ACTIVATIONS, ArchSpec
from .errors import InvalidInputError, ModelLoadError
from .loader import CheckpointView
from .ops import backend_for, check_device
from .packing import PackedBatch
from .timing import best_seconds
from .workspace import NoWorkspace, Workspace

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


@dataclass
class MaskedLMHead:
    dense_weight: torch.Tensor
    dense_bias: torch.Tensor
    act: str                    # an ACTIVATIONS op name
    ln: tuple
    eps: float
    decoder: torch.Tensor       # [vocab, hidden]
    bias: torch.Tensor          # [vocab]
    # the decoder GEMM in another precision (EncoderModel.set_mlm_head: dtype int8 takes the fastest,
    # a dtype auto plan may move it), a callable [T, hidden] -> [T, vocab]; None: on `decoder` as
    # stored, in the model's dtype
    fast_decoder: object = None
    fast_decoder_name: str = "fp32"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.linear(hidden, self.dense_weight, self.dense_bias)
        x = _TORCH_ACTS[self.act](x)
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], *self.ln, self.eps)
        if self.fast_decoder is not None:
            return self.fast_decoder(x)
        return torch.nn.functional.linear(x, self.decoder, self.bias)


# activations of the heads after the layers (masked-LM transform, sentence-transformers Dense modules)
_TORCH_ACTS = {None: lambda x: x, "tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
               "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
# the masked-LM decoder's candidates: "int8" oneDNN's _int_mm, "int8 native" the native VNNI kernel
MLM_HEAD_PRECISIONS = ("fp32", "bf16", "int8", "int8 native")
SPLADE_CHUNK_TOKENS = 256   # rows of vocabulary logits alive at once: 256 x 30522 fp32 is 31 MB


@dataclass
class LayerWeights:
    qkv: object
    o: object
    fc1: object
    fc2: object
    ln1: tuple
    ln2: tuple


def _ln(view: CheckpointView, key: str, width: int, dtype, device) -> tuple:
    return (view.get(key + ".weight", (width,)).to(device, dtype),
            view.get(key + ".bias", (width,)).to(device, dtype))


class EncoderModel:
    def __init__(self, config: dict, spec: ArchSpec, view: CheckpointView, dtype: str = "fp32",
                 device: str = "cpu", use_planner: bool = True):
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.spec, self.dtype_name = spec, dtype
        check_device(device)
        self.ops = backend_for(device)
        self.device = torch.device(device)
        self.act_dtype = DTYPES[dtype]
        try:
            self.hidden = spec.config_value(config, "hidden")
            self.num_heads = spec.config_value(config, "heads")
            self.num_layers = spec.config_value(config, "layers")
            self.intermediate = spec.config_value(config, "intermediate")
            self.eps = float(spec.config_value(config, "eps"))
            self.max_positions = spec.config_value(config, "max_pos")
            self.vocab_size = spec.config_value(config, "vocab")
            act_name = spec.config_value(config, "act")
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from exc
        if act_name not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {act_name!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.num_heads < 1 or self.hidden % self.num_heads:
            raise ModelLoadError(f"hidden size {self.hidden} does not divide into {self.num_heads} attention heads")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"position_embedding_type {config['position_embedding_type']!r} is not supported "
                                 "(absolute positions only)")
        self.activation = ACTIVATIONS[act_name]
        self.pad_token_id = config.get("pad_token_id", 1 if spec.roberta_positions else 0)
        # RoBERTa reserves positions 0..pad_id for padding, so max_position_embeddings - pad_id - 1 remain.
        self.position_offset = self.pad_token_id if spec.roberta_positions else None
        self.max_tokens = self.max_positions - (self.pad_token_id + 1 if spec.roberta_positions else 0)

        e = spec.emb_names
        adt, dev = self.act_dtype, self.device
        H = self.hidden
        self.word_emb = view.get(e["word"] + ".weight", (self.vocab_size, H)).to(dev, adt)
        self.pos_emb = view.get(e["pos"] + ".weight", (self.max_positions, H)).to(dev, adt)
        self.type_emb = (view.get(e["type"] + ".weight", (None, H)).to(dev, adt)
                         if "type" in e and view.has(e["type"] + ".weight") else None)
        self.emb_ln = _ln(view, e["ln"], H, adt, dev)
        self.position_bias_weight = None
        if spec.position_bias is not None:
            buckets = spec.config_value(config, "buckets")
            self.position_bias_weight = view.get(spec.position_bias + ".weight", (buckets, self.num_heads)).to(dev)
        self.layers = [self._load_layer(view, i) for i in range(self.num_layers)]
        self.head = self._load_head(view, config)
        self.mlm = self._load_mlm_head(view, config)

        self.use_planner = use_planner
        self.tp = None           # a parallel.TPGroup when this model is one shard of a tensor-parallel one
        self._build_workspace()

    def _build_workspace(self) -> None:
        """Plan one layer's activations (call again after swapping linears, e.g. quantization)."""
        H, I, adt = self.hidden, self.intermediate, self.act_dtype
        n = 1 if self.tp is None else self.tp.world        # a shard holds 1/n of the heads and FFN columns
        specs = [("hidden_a", 0, 4, H, adt), ("hidden_b", 0, 4, H, adt), ("qkv", 0, 1, 3 * H // n, adt),
                 ("ctx", 1, 2, H // n, adt), ("h1", 2, 4, H, adt), ("inter", 3, 4, I // n, adt)]
        if any(lin.takes_int8 for layer in self.layers for lin in (layer.qkv, layer.o, layer.fc1, layer.fc2)):
            # int32 accumulator of each int8 GEMM, reused by all four of them: a shard's QKV and fc1
            # write their column slices, O and fc2 all H columns (their inputs are what is split)
            specs.append(("acc", 0, 4, max(3 * H // n, I // n, H), torch.int32))
        self.workspace = Workspace(specs, device=self.device) if self.use_planner else NoWorkspace(specs, self.device)

    # what precision.py's layer-wise plans use: each layer's linears by name, built in a precision
    linear_names = ("qkv", "o", "fc1", "fc2")
    smooth_quant = True      # int8 candidates take SmoothQuant factors from calibration statistics

    def planned_linear(self, weight: torch.Tensor, bias: torch.Tensor, dtype: str, smooth=None):
        return self.ops.make_linear(weight, bias, dtype, smooth=smooth)

    def linears_changed(self) -> None:
        self._build_workspace()

    def raw_linears(self, view: CheckpointView, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer i's fp32 (weight, bias) pairs, with Q, K and V concatenated into one projection."""
        names = self.spec.layer_names
        p = f"{self.spec.layer_prefix}.{i}."
        H, I = self.hidden, self.intermediate
        shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "fc1": (I, H), "fc2": (H, I)}
        w = {k: (view.get(p + names[k] + ".weight", shape), view.get(p + names[k] + ".bias", shape[:1]))
             for k, shape in shapes.items()}
        qkv = (torch.cat([w["q"][0], w["k"][0], w["v"][0]]), torch.cat([w["q"][1], w["k"][1], w["v"][1]]))
        return {"qkv": qkv, "o": w["o"], "fc1": w["fc1"], "fc2": w["fc2"]}

    def _load_layer(self, view: CheckpointView, i: int) -> LayerWeights:
        raw = self.raw_linears(view, i)
        names = self.spec.layer_names
        p = f"{self.spec.layer_prefix}.{i}."
        lin = {k: self.ops.make_linear(*wb, self.dtype_name) for k, wb in raw.items()}
        return LayerWeights(**lin, ln1=_ln(view, p + names["ln1"], self.hidden, self.act_dtype, self.device),
                            ln2=_ln(view, p + names["ln2"], self.hidden, self.act_dtype, self.device))

    def _load_head(self, view: CheckpointView, config: dict):
        """Sequence-classification head, if the checkpoint is one (config `architectures`; without
        them, if its weights are there): list of (dense, activation). Other task heads (token
        classification, multiple choice, masked LM) are not loaded: the model serves its hidden
        states and embeddings."""
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            return None
        kinds = {"bert": [("bert.pooler.dense", "tanh"), ("classifier", None)],
                 "roberta": [("classifier.dense", "tanh"), ("classifier.out_proj", None)],
                 "distilbert": [("pre_classifier", "relu"), ("classifier", None)]}[self.spec.head]
        if not archs and not any(view.state.get(name + ".weight") is not None for name, _ in kinds[-1:]):
            return None
        layers = []
        for name, act in kinds:
            key = name + ".weight"
            alt = name.replace("bert.", "", 1)
            src = key if key in view.state else alt + ".weight"
            if src not in view.state:
                raise ModelLoadError(f"classification head weight {key!r} is missing")
            out = None if act is None else self.hidden          # the last layer's width is the label count
            layers.append((view.get(src, (out, self.hidden)).to(self.device),
                           view.get(src[:-len("weight")] + "bias", (out,)).to(self.device), act))
        return layers

    def _load_mlm_head(self, view: CheckpointView, config: dict) -> MaskedLMHead | None:
        """The masked-LM head of a ...ForMaskedLM checkpoint (SPLADE models are ones), or None: dense,
        activation, LayerNorm, then the decoder to vocabulary logits, whose weight is the word
        embeddings' unless the checkpoint stores its own."""
        archs = config.get("architectures") or []
        names = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                          "cls.predictions.decoder", "cls.predictions.bias"),
                 "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
                 "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias")}
        dense, norm, decoder, bias = names[self.spec.head]
        if not any(a.endswith("ForMaskedLM") for a in archs) and (archs or not view.has(dense + ".weight")):
            return None
        # the transform's activation: BERT's is the config's hidden_act, DistilBERT's its `activation`,
        # RoBERTa's and MPNet's always the exact GELU
        act = ACTIVATIONS.get(self.spec.config_value(config, "act") if self.spec.head != "roberta" else "gelu")
        if act is None:
            raise ModelLoadError(f"unsupported masked-LM head activation {self.spec.config_value(config, 'act')!r}")
        H, V, adt, dev = self.hidden, self.vocab_size, self.act_dtype, self.device
        weight = (view.get(decoder + ".weight", (V, H)).to(dev, adt) if view.has(decoder + ".weight")
                  else self.word_emb)
        # the decoder's own bias where stored (transformers 5 keeps it apart from the head's `bias`
        # when the embeddings are not tied, and the forward adds the decoder's), else the head's
        b = view.get(decoder + ".bias", (V,), required=False)
        if b is None:
            b = view.get(bias, (V,))
        return MaskedLMHead(view.get(dense + ".weight", (H, H)).to(dev, adt),
                            view.get(dense + ".bias", (H,)).to(dev, adt), act, _ln(view, norm, H, adt, dev),
                            self.eps, weight, b.to(dev, adt))

    def _mlm_decoder(self, name: str):
        """The masked-LM decoder GEMM in one precision, a callable [T, hidden] -> [T, vocab] ("fp32":
        on the weight as stored, in the model's dtype)."""
        if name == "fp32":
            return lambda x: torch.nn.functional.linear(x.to(self.act_dtype), self.mlm.decoder, self.mlm.bias)
        weight, bias, ops = self.mlm.decoder.float(), self.mlm.bias.float(), self.ops
        if name == "bf16":
            w16, b16 = weight.bfloat16(), bias.bfloat16()
            return lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), w16, b16).float()
        lin = ops.make_linear(weight, bias, "int8") if name == "int8" else ops.make_decoder_linear(weight, bias, "int8")
        return lambda x: ops.linear(lin, x)

    def set_mlm_head(self, name: str) -> None:
        """Run the masked-LM decoder in `name` (one of MLM_HEAD_PRECISIONS; the transform before it
        stays in floating point)."""
        if name not in MLM_HEAD_PRECISIONS:
            raise ValueError(f"masked-LM head precision {name!r}; one of {', '.join(MLM_HEAD_PRECISIONS)}")
        self.mlm.fast_decoder = None if name == "fp32" else self._mlm_decoder(name)
        self.mlm.fast_decoder_name = name

    def mlm_head_timings(self) -> dict[str, float]:
        """Seconds the decoder GEMM takes in each precision at SPLADE_CHUNK_TOKENS rows (best of 3),
        one candidate's weights alive at a time. Which wins depends on the CPU: with AMX, 256 x 768 x
        30,522 took 11.6 ms in bf16, 13.1 in oneDNN int8, 15.5 in the native kernel and 50 in fp32
        (benchmarks/sparse.py --head); without AMX bf16 runs at half fp32's rate."""
        x = torch.randn(SPLADE_CHUNK_TOKENS, self.hidden, generator=torch.Generator().manual_seed(0))
        x = x.to(self.device)
        sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else None
        return {name: best_seconds(lambda f=self._mlm_decoder(name): f(x), sync=sync) for name in MLM_HEAD_PRECISIONS}

    def fast_mlm_head(self) -> None:
        """dtype int8: the decoder in the fastest of its low precisions as measured here (bf16 is the
        more accurate of int8 and bf16, so taking it when it is faster costs nothing)."""
        if self.mlm is not None:
            times = self.mlm_head_timings()
            self.set_mlm_head(min((n for n in times if n != "fp32"), key=times.get))

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Hidden states [T, H] of the last layer, on the model's device. The result is a view into the
        workspace, valid until the next forward call: pool or copy it first."""
        batch = batch.to(self.device)
        T = batch.num_tokens
        ops = self.ops
        v = self.workspace.views(T)
        acc = v.get("acc")
        tp = self.tp
        emb = torch.embedding(self.word_emb, batch.input_ids) if tp is None else tp.embedding(self.word_emb,
                                                                                               batch.input_ids)
        emb.add_(torch.embedding(self.pos_emb, batch.positions))
        if self.type_emb is not None:
            emb.add_(torch.embedding(self.type_emb, batch.token_types))
        layers = self.layers
        heads = self.num_heads // (tp.world if tp else 1)
        bias = None if self.position_bias_weight is None else relative_position_bias(
            self.position_bias_weight, batch.max_len, tp.rank * heads if tp else 0, heads)
        x, y = v["hidden_a"], v["hidden_b"]
        x, xq = ops.epilogue(emb, out=x, ln=(*self.emb_ln, self.eps), quant_for=self._int8(layers[0].qkv))
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].qkv if i + 1 < len(layers) else None
            kw = self._acc(acc, layer.qkv, T)
            layer.qkv(x, xq, out=v["qkv"], **kw)
            ops.varlen_attention(v["qkv"], batch.cu_tensor, heads, v["ctx"], batch.longest_first, batch.max_len,
                                 position_bias=bias)
            kw = self._acc(acc, layer.o, T)
            h1, h1q = self._reduced(layer.o, v["ctx"], None, v["h1"], kw, residual=x, ln=(*layer.ln1, self.eps),
                                    quant_for=self._int8(layer.fc1))
            # fc1's fp32 output is only needed when fc2 does not take int8
            kw = self._acc(acc, layer.fc1, T)
            inter, interq = layer.fc1(h1, h1q, out=None if layer.fc2.takes_int8 else v["inter"],
                                      act=self.activation, quant_for=self._int8(layer.fc2), **kw)
            kw = self._acc(acc, layer.fc2, T)
            y, yq = self._reduced(layer.fc2, inter, interq, y, kw, residual=h1, ln=(*layer.ln2, self.eps),
                                  quant_for=self._int8(nxt))
            x, xq, y = y, yq, x
        return x

    def _reduced(self, linear, x, xq, out, acc_kw: dict, **epilogue):
        """A linear and its epilogue. In a tensor-parallel shard the linear is row-parallel: its
        partial sums are added over the ranks first, then the epilogue runs on the whole."""
        if self.tp is None:
            return linear(x, xq, out=out, **acc_kw, **epilogue)
        out, _ = linear(x, xq, out=out, **acc_kw)
        return self.ops.epilogue(self.tp.all_reduce(out), out=out, **epilogue)

    def activation_bytes(self, tokens: int, sequences: int | None = None) -> int:
        """What the workspace takes for a batch of `tokens` tokens (in any number of sequences)."""
        return self.workspace.bytes_for(tokens)

    @property
    def num_labels(self) -> int | None:
        """The classification head's outputs (1: a reranker), or None without a head."""
        return None if self.head is None else self.head[-1][0].shape[0]

    @property
    def weight_bytes(self) -> int:
        emb = sum(t.numel() * t.element_size() for t in (self.word_emb, self.pos_emb, self.type_emb) if t is not None)
        return emb + sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.fc1, layer.fc2))

    @staticmethod
    def _acc(acc, linear, tokens: int) -> dict:
        """A contiguous [T, N] int32 view of the shared accumulator, for an int8 linear."""
        if not linear.takes_int8:
            return {}
        return {"acc": acc.view(-1)[: tokens * linear.out_features].view(tokens, linear.out_features)}

    @staticmethod
    def _int8(linear):
        """The consumer to quantize for, if it takes int8 input."""
        return linear if linear is not None and linear.takes_int8 else None

    @torch.inference_mode()
    def classify(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.head is None:
            raise ModelLoadError("this model has no sequence-classification head")
        h = hidden[torch.tensor(batch.cu_seqlens[:-1], device=hidden.device)].float()
        for weight, bias, act in self.head:
            h = torch.nn.functional.linear(h, weight, bias)
            if act == "tanh":
                h = torch.tanh(h)
            elif act == "relu":
                h = torch.relu(h)
        return h

    @torch.inference_mode()
    def splade(self, hidden: torch.Tensor, batch: PackedBatch, strategy: str = "max",
               activation: str = "relu") -> torch.Tensor:
        """SPLADE's sparse embedding [B, vocab] fp32: per token, log(1 + relu(masked-LM logit)) (with
        activation "log1p_relu", log(1 + that) again) for every vocabulary entry, then the max (or sum)
        over the sequence's tokens. Logits exist for SPLADE_CHUNK_TOKENS rows at a time (a sequence
        longer than that is one chunk). Both activations are increasing, so with "max" they run on
        the [B, vocab] maxima instead of every token's logits."""
        if self.mlm is None:
            raise ModelLoadError("this model has no masked-LM head: SPLADE pooling needs a ...ForMaskedLM checkpoint")
        cu, out = batch.cu_seqlens, []

        def activate(x):
            x = x.relu_().log1p_()
            return x.log1p_() if activation == "log1p_relu" else x
        first = 0
        while first < batch.num_seqs:
            last = first + 1                     # sequences first .. last - 1 form this chunk
            while last < batch.num_seqs and cu[last + 1] - cu[first] <= SPLADE_CHUNK_TOKENS:
                last += 1
            logits = self.mlm.logits(hidden[cu[first]:cu[last]]).float()
            # per-sequence reductions over views: segment_reduce took 8x as long at vocabulary width
            seqs = logits.split([cu[i + 1] - cu[i] for i in range(first, last)])
            out += [x.amax(0) for x in seqs] if strategy == "max" else [activate(x).sum(0) for x in seqs]
            first = last
        pooled = torch.stack(out)
        return activate(pooled) if strategy == "max" else pooled


def relative_position_bias(weight: torch.Tensor, max_len: int, head0: int = 0, heads: int | None = None,
                           max_distance: int = 128) -> torch.Tensor:
    """MPNet's (T5's bidirectional) relative position bias as a table: fp32 [heads, 2 * max_len - 1],
    entry [h, max_len - 1 + j - i] the bias of key j for query i, for heads head0 .. head0 + heads - 1
    of `weight` [buckets, all heads]. Half the buckets are for keys after the query; within each half,
    offsets below a quarter of the buckets get one bucket each and longer ones share log-spaced
    buckets up to max_distance (transformers' MPNetEncoder.relative_position_bucket)."""
    buckets = weight.shape[0] // 2
    offset = torch.arange(-(max_len - 1), max_len, device=weight.device)      # j - i
    bucket = (offset > 0).long() * buckets
    n = offset.abs()
    exact = buckets // 2
    large = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    bucket += torch.where(n < exact, n, large.clamp(max=buckets - 1))
    heads = weight.shape[1] - head0 if heads is None else heads
    return weight[bucket, head0:head0 + heads].t().float().contiguous()


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """Per-sequence pooling over packed hidden states -> [B, H] fp32, on hidden's device."""
    hidden = hidden.float()
    dev = hidden.device
    if mode == "cls":
        return hidden[torch.tensor(batch.cu_seqlens[:-1], device=dev)]
    if mode == "lasttoken":
        return hidden[torch.tensor(batch.cu_seqlens[1:], device=dev) - 1]
    lengths = batch.lengths().to(dev)
    if mode == "max":
        return torch.segment_reduce(hidden, "max", lengths=lengths)
    if mode == "weightedmean":           # sentence-transformers': token i of a sequence weighs i + 1
        starts = torch.repeat_interleave(torch.tensor(batch.cu_seqlens[:-1], device=dev), lengths)
        w = (torch.arange(hidden.shape[0], device=dev) - starts + 1).float()
        return (torch.segment_reduce(hidden * w[:, None], "sum", lengths=lengths)
                / torch.segment_reduce(w, "sum", lengths=lengths)[:, None])
    sums = torch.segment_reduce(hidden, "sum", lengths=lengths)
    if mode == "mean":
        return sums / lengths[:, None].float()
    if mode == "mean_sqrt_len":
        return sums / lengths[:, None].float().sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")


def sentence_embedding(hidden: torch.Tensor, batch: PackedBatch, pooling, model) -> torch.Tensor:
    """The sentence-transformers pipeline after the transformer: pooling (a PoolingConfig's mode;
    "splade" is `model`'s masked-LM head), then its Dense modules in order -> [B, D] fp32
    (normalizing is the caller's: it may be turned off)."""
    if pooling.mode == "splade":
        out = model.splade(hidden, batch, pooling.splade_strategy, pooling.splade_activation)
    else:
        out = pool(hidden, batch, pooling.mode)
    for weight, bias, act in pooling.dense:
        out = _TORCH_ACTS[act](torch.nn.functional.linear(out, weight.to(out.device),
                                                          None if bias is None else bias.to(out.device)))
    return out
