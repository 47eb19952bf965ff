"""Supported architectures, described as data: the post-LN encoders (ArchSpec, model.py's layers) and
the models on the pre-norm layers (DecoderSpec, below, decoder.py's layers: the decoders, ModernBERT).

Every ArchSpec model is a post-LayerNorm transformer encoder: embeddings (+ LayerNorm), then N layers
of [fused QKV projection -> attention -> output projection -> residual + LayerNorm -> FFN up + activation
-> FFN down -> residual + LayerNorm]. What differs between BERT, RoBERTa, XLM-RoBERTa, DistilBERT and
MPNet is only: the names of the weights in the checkpoint, the config keys, how position ids are
counted, whether token-type embeddings exist, whether attention adds a relative position bias (MPNet),
and the shape of the classification head. Those differences live here; the layer code in `model.py`
is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelLoadError, UnsupportedArchitectureError

# Canonical per-layer weight names -> checkpoint suffixes (after "<layer prefix>.{i}.").
_BERT_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "ln2": "output.LayerNorm",
}
_BERT_EMB = {
    "word": "embeddings.word_embeddings",
    "pos": "embeddings.position_embeddings",
    "type": "embeddings.token_type_embeddings",
    "ln": "embeddings.LayerNorm",
}
_BERT_CFG = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "layers": "num_hidden_layers",
    "intermediate": "intermediate_size",
    "act": "hidden_act",
    "eps": "layer_norm_eps",
    "max_pos": "max_position_embeddings",
    "vocab": "vocab_size",
}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    base_prefix: str                 # prefix of the base model's weights in a task checkpoint
    layer_prefix: str                # "encoder.layer" / "transformer.layer"
    emb_names: dict
    layer_names: dict
    cfg_keys: dict
    # RoBERTa counts positions from padding_idx + 1 and gives pad tokens position padding_idx.
    roberta_positions: bool = False
    # Classification head: "bert" (pooler dense+tanh on [CLS], then classifier),
    # "roberta" (dense+tanh on <s>, out_proj), "distilbert" (pre_classifier+relu, classifier).
    head: str = "bert"
    cfg_defaults: dict = field(default_factory=dict)
    # MPNet: the checkpoint name of an Embedding [buckets, heads] whose row for the bucket of a key's
    # offset from its query (T5's bidirectional log buckets) is added to every layer's attention scores
    position_bias: str | None = None

    def config_value(self, config: dict, key: str):
        name = self.cfg_keys[key]
        if name in config:
            return config[name]
        if key in self.cfg_defaults:
            return self.cfg_defaults[key]
        raise KeyError(name)


BERT = ArchSpec("bert", "bert.", "encoder.layer", _BERT_EMB, _BERT_LAYER, _BERT_CFG,
                cfg_defaults={"eps": 1e-12, "act": "gelu"})
ROBERTA = ArchSpec("roberta", "roberta.", "encoder.layer", _BERT_EMB, _BERT_LAYER, _BERT_CFG,
                   roberta_positions=True, head="roberta", cfg_defaults={"eps": 1e-5, "act": "gelu"})
XLM_ROBERTA = ArchSpec("xlm-roberta", "roberta.", "encoder.layer", _BERT_EMB, _BERT_LAYER, _BERT_CFG,
                       roberta_positions=True, head="roberta", cfg_defaults={"eps": 1e-5, "act": "gelu"})
DISTILBERT = ArchSpec(
    "distilbert", "distilbert.", "transformer.layer",
    {"word": "embeddings.word_embeddings", "pos": "embeddings.position_embeddings",
     "ln": "embeddings.LayerNorm"},
    {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
     "ln1": "sa_layer_norm", "fc1": "ffn.lin1", "fc2": "ffn.lin2", "ln2": "output_layer_norm"},
    {"hidden": "dim", "heads": "n_heads", "layers": "n_layers", "intermediate": "hidden_dim",
     "act": "activation", "eps": "layer_norm_eps", "max_pos": "max_position_embeddings",
     "vocab": "vocab_size"},
    head="distilbert", cfg_defaults={"eps": 1e-12, "act": "gelu"},
)

MPNET = ArchSpec(
    "mpnet", "mpnet.", "encoder.layer", {k: v for k, v in _BERT_EMB.items() if k != "type"},
    {**_BERT_LAYER, "q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
     "o": "attention.attn.o", "ln1": "attention.LayerNorm"},
    {**_BERT_CFG, "buckets": "relative_attention_num_buckets"},
    roberta_positions=True, head="roberta", position_bias="encoder.relative_attention_bias",
    cfg_defaults={"eps": 1e-12, "act": "gelu", "buckets": 32},
)

ARCHITECTURES = {spec.model_type: spec for spec in (BERT, ROBERTA, XLM_ROBERTA, DISTILBERT, MPNET)}
# Activation names in HF configs -> the op the runtime applies after FFN up.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}


def spec_for(config: dict) -> ArchSpec:
    """The encoder architecture of `config` (decoders, which Encoder runs as embedding models, are
    decoder_spec_for's)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({', '.join(config.get('architectures') or [])});"
            f" supported: encoders {', '.join(sorted([*ARCHITECTURES, *PRENORM_ENCODERS]))};"
            f" decoders {', '.join(sorted(DECODERS))}")
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------------- decoders
@dataclass(frozen=True)
class DecoderSpec:
    """A pre-norm layer stack: embeddings (+ learned positions), N layers of
    [norm -> QKV -> (RoPE) -> attention -> O -> + residual -> norm -> MLP -> + residual], final norm,
    LM head. The decoders (GPT-2, LLaMA, Qwen2, Qwen3, Mistral, Gemma 3: causal attention over a KV
    cache) and the bidirectional encoders on the same layer library (ModernBERT; Gemma 3 with
    use_bidirectional_attention: EmbeddingGemma) differ only in the fields below."""
    model_type: str
    base_prefix: str                 # "transformer." / "model."
    layer_prefix: str
    emb_names: dict                  # word (+ pos), final norm
    layer_names: dict                # canonical -> checkpoint suffix
    cfg_keys: dict
    norm: str                        # "layernorm" | "rmsnorm"
    rope: bool                       # rotary positions (else learned absolute positions)
    gated_mlp: bool                  # act(gate(x)) * up(x) -> down, else fc1 -> act -> fc2
    conv1d: bool = False             # all linears stored [in, out] (GPT-2's Conv1D)
    qk_norm: bool = False            # Qwen3: RMSNorm over each head of q and k (weights [head_dim]), before RoPE
    # which layers a config's sliding_window bounds: "all" (Mistral); with use_sliding_window, those
    # from max_window_layers on (Qwen); all but one in every cfg "global_every", the global one first
    # (ModernBERT) or last (Gemma 3). A config's layer_types, where present, overrides them all.
    window_layers: str = "all"
    # ModernBERT: attention over the whole sequence (no cache; a window bounds |key - query| on the
    # sliding layers), the first layer without its attention norm, and a RoPE base of its own for the
    # sliding layers (cfg key "local_theta")
    bidirectional: bool = False
    first_norm1: bool = True
    # Gemma 3: RMSNorm weights stored as offsets from 1 (the norm multiplies by 1 + w), embeddings
    # scaled by sqrt(hidden), and a norm after attention and after the MLP too (names "post_attn_norm"
    # and "post_mlp_norm" in layer_names); the cfg key "bidirectional" turns on bidirectional
    # attention (an embedding model), "attn_scalar" sets the attention scale to its -1/2 power
    norm_offset: float = 0.0
    embed_scale: bool = False
    cfg_defaults: dict = field(default_factory=dict)

    def config_value(self, config: dict, key: str):
        name = self.cfg_keys[key]
        if name in config and config[name] is not None:
            return config[name]
        if key in self.cfg_defaults:
            return self.cfg_defaults[key]
        raise KeyError(name)

    def optional_value(self, config: dict, key: str):
        """config_value for a key only some architectures read (window, attn_scalar, ...); None for the others."""
        return self.config_value(config, key) if key in self.cfg_keys else None


GPT2 = DecoderSpec(
    "gpt2", "transformer.", "h",
    {"word": "wte", "pos": "wpe", "final_norm": "ln_f"},
    {"norm1": "ln_1", "qkv": "attn.c_attn", "o": "attn.c_proj", "norm2": "ln_2", "fc1": "mlp.c_fc",
     "fc2": "mlp.c_proj"},
    {"hidden": "n_embd", "heads": "n_head", "layers": "n_layer", "intermediate": "n_inner",
     "act": "activation_function", "eps": "layer_norm_epsilon", "max_pos": "n_positions", "vocab": "vocab_size",
     "tie": "tie_word_embeddings"},
    norm="layernorm", rope=False, gated_mlp=False, conv1d=True,
    cfg_defaults={"act": "gelu_new", "eps": 1e-5, "tie": True},
)
_LLAMA_LAYER = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                "v": "self_attn.v_proj", "o": "self_attn.o_proj", "norm2": "post_attention_layernorm",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_LLAMA_CFG = {"hidden": "hidden_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
              "head_dim": "head_dim", "layers": "num_hidden_layers", "intermediate": "intermediate_size",
              "act": "hidden_act", "eps": "rms_norm_eps", "max_pos": "max_position_embeddings",
              "vocab": "vocab_size", "tie": "tie_word_embeddings", "rope_theta": "rope_theta",
              "rope_scaling": "rope_scaling"}
_LLAMA_EMB = {"word": "embed_tokens", "final_norm": "norm"}


def _llama_like(model_type: str, windowed: bool = False, qk_norm: bool = False, window_layers: str = "all",
                **defaults) -> DecoderSpec:
    """windowed: the architecture reads `sliding_window` (LLaMA's attention ignores that key)."""
    keys = {**_LLAMA_CFG, "window": "sliding_window"} if windowed else _LLAMA_CFG
    names = {**_LLAMA_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"} if qk_norm else _LLAMA_LAYER
    return DecoderSpec(model_type, "model.", "layers", _LLAMA_EMB, names, keys,
                       norm="rmsnorm", rope=True, gated_mlp=True, qk_norm=qk_norm, window_layers=window_layers,
                       cfg_defaults={"act": "silu", "eps": 1e-6, "tie": False, "rope_theta": 10000.0,
                                     "rope_scaling": None, "window": None, **defaults})


LLAMA = _llama_like("llama")
# Q, K, V biases (in the checkpoint); windows on the layers from max_window_layers on, if enabled
QWEN2 = _llama_like("qwen2", windowed=True, window_layers="from_max_window_layers")
# Qwen2 without the biases and with per-head q / k RMSNorm
QWEN3 = _llama_like("qwen3", windowed=True, qk_norm=True, window_layers="from_max_window_layers")
MISTRAL = _llama_like("mistral", windowed=True)   # sliding_window bounds attention when set

# Gemma 3's text model (gemma-3-1b and EmbeddingGemma): GQA, per-head q / k norms, sandwich norms,
# GeGLU with tanh GELU, one global layer in sliding_window_pattern (the others causal over
# sliding_window keys, or, bidirectional, over +-sliding_window / 2), RoPE 1M global / 10k local
GEMMA3 = DecoderSpec(
    "gemma3_text", "model.", "layers", _LLAMA_EMB,
    {**_LLAMA_LAYER, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "norm2": "pre_feedforward_layernorm",
     "post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    {**_LLAMA_CFG, "act": "hidden_activation", "window": "sliding_window", "local_theta": "rope_local_base_freq",
     "attn_scalar": "query_pre_attn_scalar", "bidirectional": "use_bidirectional_attention",
     "global_every": "sliding_window_pattern", "attn_softcap": "attn_logit_softcapping",
     "final_softcap": "final_logit_softcapping"},
    norm="rmsnorm", rope=True, gated_mlp=True, qk_norm=True, window_layers="last_of_every", norm_offset=1.0,
    embed_scale=True,
    cfg_defaults={"act": "gelu_pytorch_tanh", "eps": 1e-6, "tie": True, "rope_theta": 1000000.0,
                  "local_theta": 10000.0, "rope_scaling": None, "window": 4096, "attn_scalar": None,
                  "bidirectional": False, "global_every": 6, "attn_softcap": None, "final_softcap": None},
)
# Gemma 2 (gemma-2-2b / 9b / 27b, and embedding models on it such as bge-multilingual-gemma2): Gemma 3's
# layer without the q / k norms, one RoPE base, the first layer of each pair sliding (its configs before
# transformers 4.5x have no layer_types), and tanh soft-capping of the attention scores (50) and of the
# logits (30)
GEMMA2 = DecoderSpec(
    "gemma2", "model.", "layers", _LLAMA_EMB,
    {**_LLAMA_LAYER, "norm2": "pre_feedforward_layernorm", "post_attn_norm": "post_attention_layernorm",
     "post_mlp_norm": "post_feedforward_layernorm"},
    {**_LLAMA_CFG, "act": "hidden_activation", "window": "sliding_window", "attn_scalar": "query_pre_attn_scalar",
     "bidirectional": "use_bidirectional_attention", "global_every": "sliding_window_pattern",
     "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"},
    norm="rmsnorm", rope=True, gated_mlp=True, window_layers="last_of_every", norm_offset=1.0, embed_scale=True,
    cfg_defaults={"act": "gelu_pytorch_tanh", "eps": 1e-6, "tie": True, "rope_theta": 10000.0,
                  "rope_scaling": None, "window": 4096, "attn_scalar": None, "bidirectional": False,
                  "global_every": 2, "attn_softcap": 50.0, "final_softcap": 30.0},
)
DECODERS = {spec.model_type: spec for spec in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA3, GEMMA2)}
DECODER_ACTIVATIONS = {**ACTIVATIONS, "silu": "silu", "swish": "silu"}

# Encoders on the pre-norm layer library. ModernBERT: fused Wqkv and Wi (GeGLU: gelu(input) * gate),
# LayerNorms without bias, RoPE (160k base on the global layers, 10k on the sliding ones), every third
# layer global and the others over +-local_attention / 2 tokens, no biases in its linears.
MODERNBERT = DecoderSpec(
    "modernbert", "model.", "layers",
    {"word": "embeddings.tok_embeddings", "emb_norm": "embeddings.norm", "final_norm": "final_norm"},
    {"norm1": "attn_norm", "qkv": "attn.Wqkv", "o": "attn.Wo", "norm2": "mlp_norm", "gate_up": "mlp.Wi",
     "down": "mlp.Wo"},
    {"hidden": "hidden_size", "heads": "num_attention_heads", "layers": "num_hidden_layers",
     "intermediate": "intermediate_size", "act": "hidden_activation", "eps": "norm_eps",
     "max_pos": "max_position_embeddings", "vocab": "vocab_size", "tie": "tie_word_embeddings",
     "rope_theta": "global_rope_theta", "local_theta": "local_rope_theta", "rope_scaling": "rope_scaling",
     "window": "local_attention", "global_every": "global_attn_every_n_layers"},
    norm="layernorm", rope=True, gated_mlp=True, bidirectional=True, first_norm1=False, window_layers="first_of_every",
    cfg_defaults={"act": "gelu", "eps": 1e-5, "tie": True, "rope_theta": 160000.0, "local_theta": 10000.0,
                  "rope_scaling": None, "window": 128, "global_every": 3},
)
PRENORM_ENCODERS = {spec.model_type: spec for spec in (MODERNBERT,)}


def is_sequence_classifier(config: dict) -> bool:
    """A ...ForSequenceClassification checkpoint (its head is loaded, and it is served as a classifier)."""
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def softcaps(spec: DecoderSpec, config: dict) -> tuple[float, float]:
    """(attention scores', final logits') tanh soft-cap, 0.0 for none: the config's values, where a
    null means none (Gemma 2's configs say 50 / 30; a key it lacks takes transformers' default)."""
    def cap(key: str) -> float:
        name = spec.cfg_keys.get(key)
        if name is None:
            return 0.0
        value = config[name] if name in config else spec.cfg_defaults.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ModelLoadError(f"{name} must be a positive number or null, not {value!r}")
        return float(value or 0.0)
    return cap("attn_softcap"), cap("final_softcap")


def is_bidirectional(spec: DecoderSpec, config: dict) -> bool:
    return spec.bidirectional or bool(spec.optional_value(config, "bidirectional"))


def is_decoder(config: dict) -> bool:
    """A model that generates: a causal decoder (its server is the generation one)."""
    spec = DECODERS.get(config.get("model_type"))
    return spec is not None and not is_bidirectional(spec, config)


def on_prenorm_layers(config: dict) -> bool:
    """A model that runs on decoder.py's pre-norm layer library: the decoders (and EmbeddingGemma), ModernBERT."""
    return config.get("model_type") in DECODERS or config.get("model_type") in PRENORM_ENCODERS


def decoder_spec_for(config: dict, generation: bool = True) -> DecoderSpec:
    """The spec of a model on the pre-norm layers; with generation, one that can generate (causal)."""
    model_type = config.get("model_type")
    spec = DECODERS.get(model_type) or PRENORM_ENCODERS.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported decoder architecture {model_type!r} ({', '.join(config.get('architectures') or [])});"
            f" supported: {', '.join(sorted(DECODERS))}; encoders on the same layers: {', '.join(PRENORM_ENCODERS)}")
    if generation and is_bidirectional(spec, config):
        raise UnsupportedArchitectureError(
            f"{model_type!r} with bidirectional attention is an encoder, not a text generator: load it with "
            "turboserve.Encoder, or serve it for embeddings")
    return spec
