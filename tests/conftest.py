"""Shared fixtures: small random-weight Hugging Face models of every supported architecture, saved to
disk with transformers' own save_pretrained and loaded back by transformers as the reference."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from turboserve.loader import default_model_path

MINILM = default_model_path()
SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)



def copy_minilm_tokenizer(out: Path) -> None:
    """MiniLM's tokenizer files into a built model's directory (random-weight models borrow its vocabulary)."""
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(MINILM / f, out / f)

def _configs():
    import transformers as tf
    return {
        "bert": (tf.BertConfig, dict(SMALL, max_position_embeddings=128, hidden_act="gelu")),
        "roberta": (tf.RobertaConfig, dict(SMALL, max_position_embeddings=130, pad_token_id=1,
                                           type_vocab_size=1, hidden_act="gelu_new")),
        "xlm-roberta": (tf.XLMRobertaConfig, dict(SMALL, max_position_embeddings=130, pad_token_id=1,
                                                  type_vocab_size=1)),
        "distilbert": (tf.DistilBertConfig, dict(dim=64, n_heads=4, n_layers=2, hidden_dim=128,
                                                 max_position_embeddings=128, activation="gelu")),
        "mpnet": (tf.MPNetConfig, dict(SMALL, max_position_embeddings=130, pad_token_id=1, hidden_act="gelu")),
    }


ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet")


def build_model(arch: str, out: Path, head: str | None = None, num_labels: int = 3, seed: int = 0,
                **overrides) -> Path:
    """Save a random-weight model of `arch` (base model, head="cls" for sequence classification, or
    head="mlm" for a masked LM: SPLADE's shape) with MiniLM's tokenizer (a WordPiece vocabulary of
    30522 entries) beside it. overrides: config fields to change (e.g. a wider hidden size)."""
    import transformers as tf
    cls, kwargs = _configs()[arch]
    config = cls(vocab_size=30522, num_labels=num_labels, **dict(kwargs, **overrides))
    torch.manual_seed(seed)
    name = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
            "mpnet": "MPNet"}[arch]
    model_cls = getattr(tf, name + {"cls": "ForSequenceClassification", "mlm": "ForMaskedLM", None: "Model"}[head])
    model = model_cls(config).eval()
    with torch.no_grad():   # random LayerNorm affine and biases, so parity checks exercise them
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if "relative_attention_bias" in n:      # MPNet: a bias that moves the attention (init is 0.02)
                p.normal_(0.0, 1.0)
            if head == "mlm" and n.endswith("bias") and p.shape == (config.vocab_size,):
                p.sub_(0.5)     # most logits below 0, as a trained SPLADE model's: sparse vectors
    model.save_pretrained(out)
    copy_minilm_tokenizer(out)
    return out


def build_modernbert(out: Path, seed: int = 0, head: bool = False, **overrides) -> Path:
    """A random-weight ModernBERT (4 layers: global, sliding, sliding, global; a window of +-8 tokens,
    so mixed lengths cross it) with MiniLM's tokenizer; head: ModernBertForSequenceClassification
    (overrides: num_labels, classifier_pooling, ...)."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = dict(vocab_size=30522, hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=96,
               max_position_embeddings=256, local_attention=16, pad_token_id=0, bos_token_id=101, eos_token_id=102,
               cls_token_id=101, sep_token_id=102, initializer_range=0.2)
    cls = tf.ModernBertForSequenceClassification if head else tf.ModernBertModel
    model = cls(tf.ModernBertConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    copy_minilm_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def modernbert_dir(tmp_path_factory):
    return build_modernbert(tmp_path_factory.mktemp("modernbert"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> directory of a random-weight base model."""
    return {arch: build_model(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def classifier_dirs(tmp_path_factory):
    return {arch: build_model(arch, tmp_path_factory.mktemp(arch + "-cls"), head="cls") for arch in ARCHS}


def random_sequences(lengths, vocab=30522, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------- decoders
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


def _decoder_configs():
    import transformers as tf
    tiny = dict(vocab_size=30522, eos_token_id=102, bos_token_id=101)
    return {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(tiny, n_embd=64, n_head=4, n_layer=2, n_positions=256, initializer_range=0.2)),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM,
                  dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=128, max_position_embeddings=256, initializer_range=0.2,
                       rope_scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                  dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                       intermediate_size=128, max_position_embeddings=256, initializer_range=0.2,
                       tie_word_embeddings=True)),
        # head_dim 32 over a hidden size of 64 in 4 heads: q is wider than the residual stream, as in Qwen3-0.6B
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                  dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       num_hidden_layers=2, intermediate_size=128, max_position_embeddings=256,
                       initializer_range=0.2, tie_word_embeddings=True)),
        # sandwich norms, (1 + w) RMSNorms, scaled embeddings, a query scalar of 24 (not head_dim), tanh GeGLU,
        # two sliding layers of 8 and a global one whose RoPE is linearly scaled
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        num_hidden_layers=3, intermediate_size=96, max_position_embeddings=256, initializer_range=0.2,
                        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, pad_token_id=0,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
        # Gemma 2: sliding / full / sliding layers (window 8), soft-caps small enough to bite on these
        # weights (scores reach 10-20, logits 15-30: transformers' 50 / 30 would barely touch them)
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
                   dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_hidden_layers=3, intermediate_size=96, max_position_embeddings=256, initializer_range=0.2,
                        sliding_window=8, query_pre_attn_scalar=24, pad_token_id=0, attn_logit_softcapping=4.0,
                        final_logit_softcapping=8.0)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM,
                    dict(tiny, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, max_position_embeddings=256, initializer_range=0.2,
                         sliding_window=24)),
    }


DECODER_ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma3", "gemma2", "mistral")


def build_decoder(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight causal LM of `arch` with MiniLM's tokenizer and a small chat template. The
    init range is wide so next-token distributions are peaked (greedy parity has no near-ties).
    overrides: config fields to change."""
    import json
    cfg_cls, model_cls, kwargs = _decoder_configs()[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**kwargs, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    shutil.copy(MINILM / "tokenizer.json", out / "tokenizer.json")
    cfg = json.loads((MINILM / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory):
    return {arch: build_decoder(arch, tmp_path_factory.mktemp(arch)) for arch in DECODER_ARCHS}
