"""int8 as a transform on a built fp32 model (as gpt-fast does): calibrate, then swap the linears.

Naive dynamic int8 (per-tensor activation scale) wrecks all-MiniLM-L6-v2 (min cosine 0.75-0.98),
because a few hidden channels carry activations 10-100x larger than the rest. What keeps quality here:
  * per-output-channel weight scales and per-token activation scales (ops/cpu.py, Int8Linear);
  * SmoothQuant: per input channel, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves the outliers'
    range from the activations into the weights; max|X_j| comes from a calibration run;
  * linears listed in `keep` stay in fp32 (the sensitive ones). precision.py chooses per linear
    from measurements instead; figures in docs/precision.md.
"""
from __future__ import annotations

import random

import torch

from .errors import ModelLoadError
from .loader import CheckpointView
from .model import EncoderModel

LINEARS = ("qkv", "o", "fc1", "fc2")


CALIBRATION_MAX_WORDS = 512


def calibration_texts(tokenizer, count: int = 64, seed: int = 0) -> list[str]:
    """Pseudo-sentences of random whole words from the tokenizer's own vocabulary, of varied length:
    most of 4-120 words, every eighth one longer, up to the model's limit. Quantization error grows
    with length (attention spreads it over more tokens): a layer-wise plan checked only on texts of up
    to 120 words reached 0.9986 instead of its 0.999 on the longtail workload (lengths to 512). The
    longest are capped at 512 words: a long-context model's limit (Qwen3-Embedding: 32,768 positions)
    would make every calibration pass, and a precision plan's dozens of them, take minutes or hours;
    beyond that length a plan's bound is not checked."""
    tokens = tokenizer._tok.get_vocab()
    vocab = sorted(t for t in tokens if t.isalpha() and t.isascii() and len(t) > 1)
    if not vocab:       # no word-like tokens (a word-level test vocabulary "t0" ...): any plain printable one
        vocab = sorted(t for t in tokens if t.isprintable() and t.strip() == t and t and not t.startswith(("[", "<")))
    if not vocab:
        raise ModelLoadError("the tokenizer has no plain tokens to build the built-in calibration texts from")
    rng = random.Random(seed)
    longest = max(8, min(tokenizer.max_tokens, CALIBRATION_MAX_WORDS) - 2)
    short = min(120, longest)
    lengths = [rng.randint(short, longest) if i % 8 == 7 else rng.randint(4, short) for i in range(count)]
    return [" ".join(rng.choice(vocab) for _ in range(n)) for n in lengths]


@torch.inference_mode()
def input_absmax(model: EncoderModel, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Per-input-column max |x| of every linear, over the calibration batches (fp32 model)."""
    stats: dict[tuple[int, str], torch.Tensor] = {}
    originals = [{name: getattr(layer, name) for name in LINEARS} for layer in model.layers]

    def recorder(i, name, linear):
        def call(x, xq=None, **kw):
            m = x.detach().abs().amax(dim=0).float()
            stats[(i, name)] = m if (i, name) not in stats else torch.maximum(stats[(i, name)], m)
            return linear(x, xq, **kw)
        call.takes_int8 = False
        call.out_features = linear.out_features
        return call

    try:
        for i, layer in enumerate(model.layers):
            for name in LINEARS:
                setattr(layer, name, recorder(i, name, originals[i][name]))
        for batch in batches:
            model.forward(batch)
    finally:
        for layer, orig in zip(model.layers, originals):
            for name, linear in orig.items():
                setattr(layer, name, linear)
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    act_absmax = act_absmax.to(weight.device)   # statistics from a GPU forward, weights from the checkpoint
    w_absmax = weight.abs().amax(dim=0).clamp(min=1e-5)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


def quantize_(model: EncoderModel, view: CheckpointView, stats, alpha: float = 0.5,
              keep: frozenset = frozenset()) -> EncoderModel:
    """Swap `model`'s linears for int8 ones (in place). keep: names from LINEARS to leave in fp32."""
    for i, layer in enumerate(model.layers):
        raw = model.raw_linears(view, i)
        for name in LINEARS:
            weight, bias = raw[name]
            if name in keep:
                setattr(layer, name, model.ops.make_linear(weight, bias, "fp32"))
                continue
            smooth = smoothing_factors(stats[(i, name)], weight, alpha) if alpha > 0 else None
            setattr(layer, name, model.ops.make_linear(weight, bias, "int8", smooth=smooth))
    model.dtype_name = "int8"
    model._build_workspace()
    return model
