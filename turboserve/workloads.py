"""The public benchmark workloads (shared/DESIGN.md section 5), shared by benchmarks and tests."""
from __future__ import annotations

import numpy as np

ENCODER_WORKLOADS = ("short", "longtail", "longdoc")
# `longtail` reaches 512 tokens, the positions of the encoders it is run on; all-MiniLM-L6-v2's own
# sentence-transformers limit is 256, so benchmarks and tests on these workloads raise it to this
# (Encoder.load(max_input_length=...), serve --max-input-length), as the peers run at 512
WORKLOAD_MAX_LENGTH = 512


def encoder_lengths(name: str, count: int = 512) -> list[int]:
    """Token lengths, [CLS] and [SEP] included."""
    if name == "short":
        return [int(n) for n in np.random.default_rng(4321).integers(8, 128, size=count, endpoint=True)]
    if name == "longtail":
        raw = np.random.default_rng(1234).lognormal(np.log(60), 0.8, size=count)
        return [int(n) for n in np.clip(np.round(raw), 8, 512)]
    if name == "longdoc":
        # not in DESIGN.md: whole documents for the long-context encoders (ModernBERT: 8,192 positions,
        # EmbeddingGemma 2,048), 1k-8k tokens; callers clip to the model's limit
        return [int(n) for n in np.random.default_rng(2468).integers(1024, 8192, size=count, endpoint=True)]
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(ENCODER_WORKLOADS)}")


def word_token_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of whole alphabetic words in a vocabulary: the material for text-like token sequences."""
    return sorted(i for t, i in vocab.items() if t.isalpha() and t.isascii() and len(t) > 1)


def token_sequences(lengths: list[int], words: list[int], cls_id: int, sep_id: int, seed: int = 0) -> list[list[int]]:
    """[CLS] w1 ... w(n-2) [SEP] for each length n, words drawn uniformly from `words`."""
    rng = np.random.default_rng(seed)
    return [[cls_id] + [int(w) for w in rng.choice(words, size=n - 2)] + [sep_id] for n in lengths]


def decoder_offline(vocab_size: int, count: int = 64) -> tuple[list[list[int]], list[int]]:
    """The decoder workload: prompts (random token ids) and output lengths, both uniform in [16, 256]."""
    rng = np.random.default_rng(7)
    prompt_lens = rng.integers(16, 256, size=count, endpoint=True)
    out_lens = [int(n) for n in rng.integers(16, 256, size=count, endpoint=True)]
    prompts = [[int(t) for t in rng.integers(3, vocab_size, size=n)] for n in prompt_lens]
    return prompts, out_lens
