"""Numerical parity with transformers' own forward, at mixed lengths, for every architecture."""
import pytest
import torch
import transformers

from turboserve import Encoder
from conftest import ARCHS, random_sequences, rel_err

# 1 up to the model's limit, odd lengths included (every test model accepts 128 tokens).
LENGTHS = [1, 2, 7, 16, 33, 64, 65, 100, 127, 128, 5, 5, 5]


def reference_hidden(model_dir, seqs, **kw):
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), **kw).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_fp32(model_dirs, arch):
    seqs = random_sequences(LENGTHS)
    enc = Encoder.load(model_dirs[arch])
    assert enc.model.max_tokens == 128
    ours = enc.hidden_states(seqs)
    for o, r in zip(ours, reference_hidden(model_dirs[arch], seqs)):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-4


def test_roberta_pad_token_inside_sequence_gets_pad_position(model_dirs):
    """transformers gives a pad token (id 1) position padding_idx even inside a sequence."""
    seq = [0, 5, 1, 7, 9, 2]
    ours = Encoder.load(model_dirs["roberta"]).hidden_states([seq])[0]
    ref = reference_hidden(model_dirs["roberta"], [seq])[0]
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.999), ("int8", 0.99)])
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "distilbert", "mpnet"])
def test_low_precision_within_bound(model_dirs, arch, dtype, bound):
    """Pooled embeddings of bf16 / int8 against fp32: minimum cosine over mixed lengths."""
    seqs = random_sequences([3, 17, 40, 77, 128, 9, 64], seed=1)
    ref = Encoder.load(model_dirs[arch]).embed(seqs)
    low = Encoder.load(model_dirs[arch], dtype=dtype).embed(seqs)
    assert torch.nn.functional.cosine_similarity(low, ref).min().item() >= bound


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_classification_logits(classifier_dirs, arch):
    seqs = random_sequences([4, 30, 128, 11], seed=2)
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        classifier_dirs[arch], attn_implementation="eager").eval()
    with torch.no_grad():
        ref = torch.cat([ref_model(input_ids=torch.tensor([s])).logits for s in seqs])
    ours = Encoder.load(classifier_dirs[arch]).classify(seqs)
    assert ours.shape == (4, 3)
    assert rel_err(ours, ref) < 1e-4


def test_rerank_matches_cross_encoder(tmp_path):
    from conftest import build_model
    d = build_model("bert", tmp_path / "ce", head="cls", num_labels=1, seed=3)
    enc = Encoder.load(d)
    docs = ["a cat sat on the mat", "stock markets fell sharply today", "cats are small felines"]
    scores = enc.rerank("where do cats sit?", docs)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        for doc, score in zip(docs, scores):
            inputs = tok("where do cats sit?", doc, return_tensors="pt")
            ref = torch.sigmoid(model(**inputs).logits[0, 0]).item()
            assert abs(score - ref) < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "int8", "bf16"])
def test_batch_invariance(model_dirs, dtype):
    """A text's result alone equals its result inside a batch of mixed lengths; bf16 up to its
    rounding (oneDNN picks its bf16 kernels by row count, docs/architecture.md Precision)."""
    enc = Encoder.load(model_dirs["bert"], dtype=dtype)
    seqs = random_sequences([50, 3, 128, 50, 17, 99, 1, 50, 64], seed=4)
    batched = enc.embed(seqs)
    for i, s in enumerate(seqs):
        alone = enc.embed([s])[0]
        if dtype == "bf16":
            assert torch.nn.functional.cosine_similarity(alone.double(), batched[i].double(), dim=0) >= 1 - 1e-5, i
        else:
            assert torch.allclose(alone, batched[i], rtol=0, atol=1e-6), i


def test_pytorch_bin_weights_and_vocab_txt_tokenizer(tmp_path, model_dirs):
    """A directory with pytorch_model.bin and only vocab.txt (no tokenizer.json) loads and matches."""
    d = tmp_path / "bin"
    d.mkdir()
    # Written by hand: transformers 5 always saves safetensors, whatever safe_serialization says.
    model = transformers.AutoModel.from_pretrained(model_dirs["bert"])
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    for f in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (d / f).write_bytes((model_dirs["bert"] / f).read_bytes())
    texts = ["Hello World, this is turboserve!", "short"]
    ours = Encoder.load(d).hidden_states(texts)
    ref = Encoder.load(model_dirs["bert"]).hidden_states(texts)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-6


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_native_kernels_match_pytorch_fallback(model_dirs, monkeypatch, dtype):
    """The native kernels and the PyTorch versions (used without a C compiler) agree. bf16: the native
    attention runs in fp32 on the widened rows, torch's SDPA in bf16, so they differ by bf16 roundings."""
    from turboserve import native
    seqs = random_sequences([1, 9, 64, 128, 33, 33], seed=5)
    with_native = Encoder.load(model_dirs["bert"], dtype=dtype).hidden_states(seqs)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)
    fallback = Encoder.load(model_dirs["bert"], dtype=dtype).hidden_states(seqs)
    for a, b in zip(with_native, fallback):
        # int8: a rounding tie may land on the other side in one of the two; both are valid
        assert rel_err(a, b) < (1e-5 if dtype == "fp32" else 2e-2)


@pytest.mark.parametrize("extra", ["none", "bias", "window", "bias_window"])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
def test_native_varlen_attention_matches_sdpa(head_dim, extra):
    """The native kernel's tiles (8 query rows, 32 keys, 16 x 16 key transposes) against SDPA, at head
    dims that are and are not multiples of 16 and lengths around every tile edge; with a relative
    position bias (MPNet) and / or a window |j - i| < w (ModernBERT's sliding layers: the kernel reads
    only the keys of each row block's windows; w = 1 the query alone, 5 inside one tile, 17 and 40
    across key tiles, wider than the short sequences), both the native kernel and the PyTorch version
    against explicit softmax(q k^T / sqrt(d) + bias[h, j - i], keys outside the window dropped) v."""
    from turboserve import native
    from turboserve.ops.cpu import sdpa_varlen, varlen_attention, window_bias
    from turboserve.packing import pack_tokens
    if native.lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    lengths = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 129]
    batch = pack_tokens([[1] * n for n in lengths])
    heads = 3
    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(batch.num_tokens, 3 * heads * head_dim, generator=g) * 2
    bias = torch.randn(heads, 2 * batch.max_len - 1, generator=g) * 3 if "bias" in extra else None
    for window in [1, 5, 17, 40] if "window" in extra else [0]:
        out = torch.full((batch.num_tokens, heads * head_dim), float("nan"))
        varlen_attention(qkv, batch.cu_tensor, heads, out, batch.longest_first, batch.max_len, bias, window)
        table = window_bias(window, batch.max_len, heads, "cpu", bias) if window else bias
        torch_out = sdpa_varlen(qkv, batch.cu_seqlens, heads, torch.empty_like(out), table)
        if extra == "none":
            assert rel_err(out, torch_out) < 1e-5
            continue
        ref = torch.empty_like(out)
        center = batch.max_len - 1
        for a, b in zip(batch.cu_seqlens, batch.cu_seqlens[1:]):
            q, k, v = qkv[a:b].view(b - a, 3, heads, head_dim).permute(1, 2, 0, 3)      # [heads, L, d] each
            rel = torch.arange(b - a)[None, :] - torch.arange(b - a)[:, None]         # j - i
            s = q @ k.transpose(1, 2) / head_dim ** 0.5
            if bias is not None:
                s = s + bias[:, center + rel]
            if window:
                s = s.masked_fill(rel.abs() >= window, float("-inf"))
            ref[a:b] = (torch.softmax(s, dim=-1) @ v).transpose(0, 1).reshape(b - a, -1)
        assert rel_err(out, ref) < 1e-5 and rel_err(torch_out, ref) < 1e-5, window
        # a bf16 model's rows: the same kernel on the widened rows, each output rounded once
        out16 = torch.full_like(out, float("nan"), dtype=torch.bfloat16)
        varlen_attention(qkv.bfloat16(), batch.cu_tensor, heads, out16, batch.longest_first, batch.max_len,
                         None if bias is None else bias.bfloat16(), window)
        wide = torch.empty_like(out)
        varlen_attention(qkv.bfloat16().float(), batch.cu_tensor, heads, wide, batch.longest_first, batch.max_len,
                         None if bias is None else bias.bfloat16().float(), window)
        assert torch.equal(out16, wide.bfloat16()), window


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu", "silu_mul", "gelu_mul", "gelu_tanh_mul"])
def test_native_epilogue_equals_torch(act):
    """The native pass between two GEMMs (dequantize, activation or SiLU-and-multiply, residual,
    LayerNorm with or without bias or RMSNorm, int8 for the next GEMM) gives the PyTorch version's
    numbers: outputs within 1e-5 of their scale, int8 values within one step (a value on a rounding
    boundary), row scales within 1e-5."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(3)
    rows, cols = 7, 200                       # not a multiple of 16: the scalar tails run too
    lin = cpu.Int8Linear(torch.randn(cols, 64, generator=g), torch.randn(cols, generator=g))
    src = cpu.IntAccumulator(torch.randint(-40000, 40000, (rows, cols), dtype=torch.int32, generator=g),
                             torch.rand(rows, 1, generator=g) * 1e-4, torch.rand(cols, generator=g), torch.randn(cols, generator=g))
    oc = cols // 2 if act is not None and act.endswith("_mul") else cols
    residual = torch.randn(rows, oc, generator=g)
    ln = (torch.rand(oc, generator=g) + 0.5, torch.randn(oc, generator=g), 1e-5)
    nxt = cpu.Int8Linear(torch.randn(16, oc, generator=g), None)
    for kw in ({}, {"residual": residual, "ln": ln}, {"ln": (ln[0], None, ln[2])},
               {"residual": residual, "ln": (ln[0], None, ln[2]), "rms": True}):
        out, q = cpu.epilogue(src, out=torch.empty(rows, oc), act=act, quant_for=nxt, **kw)
        ref, ref_q, ref_scale = cpu._epilogue_torch(src, torch.empty(rows, oc), act, kw.get("residual"), kw.get("ln"),
                                                    nxt.inv_smooth, kw.get("rms", False))
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (q.q.int() - ref_q.int()).abs().max() <= 1
        assert torch.allclose(q.scale, ref_scale, rtol=1e-5)


@pytest.mark.parametrize("act", [None, "gelu", "silu_mul"])
def test_native_epilogue_of_bf16_rows_equals_torch(act, monkeypatch):
    """A bf16 model's epilogue (activation, residual, LayerNorm or RMSNorm, all rows and weights bf16)
    runs natively and gives the PyTorch version's numbers up to the final rounding: within one bf16
    step (or 1e-5, the native erf's error on GELU's tiny negative outputs), equal in nearly every
    element (95% with GELU alone, 99.9% after a norm)."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    calls = []
    monkeypatch.setattr(native, "row_epilogue", lambda *a, _f=native.row_epilogue, **k: calls.append(1) or _f(*a, **k))
    g = torch.Generator().manual_seed(4)
    rows, cols = 9, 200
    oc = cols // 2 if act == "silu_mul" else cols
    src = (torch.randn(rows, cols, generator=g) * 3).bfloat16()
    residual = torch.randn(rows, oc, generator=g).bfloat16()
    gamma, beta = (torch.rand(oc, generator=g) + 0.5).bfloat16(), torch.randn(oc, generator=g).bfloat16()
    for kw in ({}, {"residual": residual, "ln": (gamma, beta, 1e-5)},
               {"residual": residual, "ln": (gamma, None, 1e-6), "rms": True}):
        out, _ = cpu.epilogue(src, out=torch.empty(rows, oc, dtype=torch.bfloat16), act=act, **kw)
        ref, _, _ = cpu._epilogue_torch(src, torch.empty(rows, oc, dtype=torch.bfloat16), act, kw.get("residual"),
                                        kw.get("ln"), None, kw.get("rms", False))
        assert out.dtype == torch.bfloat16 and len(calls) == 1
        calls.clear()
        diff = (out.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2 ** -7 + 1e-5).all()
        assert (diff == 0).float().mean() > 0.9


@pytest.mark.parametrize("k,n", [(64, 48), (30, 37), (200, 130), (7, 5)])
def test_native_fp32_gemm_equals_torch(k, n):
    """fp32 linears on the native GEMM (AVX2 CPUs without AVX-512): every tile height (1-6 rows and
    uneven tails), N not a multiple of 16 (a partial last panel), with and without bias, a fused
    activation, output into a wider row-strided view (a workspace slice) that stays untouched past
    its columns; results within 1e-5 of torch's (summation order differs), weight_t read back exact."""
    from turboserve import native
    from turboserve.ops import cpu
    if not native.f32_gemm_native():
        pytest.skip("fp32 linears take torch's GEMM on this CPU")
    g = torch.Generator().manual_seed(k * n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (b, None):
        lin = cpu.DenseLinear(w, bias, torch.float32)
        assert lin.packed is not None and torch.equal(lin.weight_t, w.t())
        for m in (1, 2, 3, 4, 5, 6, 7, 13, 37):
            x = torch.randn(m, k, generator=g)
            for act in (None, "gelu", "gelu_tanh", "relu", "silu"):
                wide = torch.full((m, n + 9), float("nan"))
                y, _ = lin(x, out=wide[:, :n], act=act)
                ref = torch.nn.functional.linear(x, w, bias)
                ref = ref if act is None else cpu.activation_(ref, act)
                assert (y - ref).abs().max() <= 1e-5 * ref.abs().max().clamp(min=1e-6), (m, act)
                assert wide[:, n:].isnan().all()
        xt = torch.randn(k, 5, generator=g).t()               # columns not contiguous: copied, not refused
        assert torch.allclose(lin(xt, out=None)[0], torch.nn.functional.linear(xt, w, bias), rtol=1e-4, atol=1e-5)


def test_native_lm_head_equals_torch():
    """A decoder's fp32 LM head as stored ([V, H], the tied embedding) on the native kernel: tiles of
    1-3 rows, V not a multiple of 4, H not a multiple of 8 (masked tail loads), within 1e-5 of torch."""
    from turboserve import native
    from turboserve.ops import cpu
    if not native.f32_gemm_native():
        pytest.skip("fp32 LM heads take torch's GEMM on this CPU")
    g = torch.Generator().manual_seed(11)
    for h, v in ((7, 5), (37, 1001), (768, 130), (16, 4)):
        w = torch.randn(v, h, generator=g)
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, h, generator=g)
            ref = x @ w.t()
            assert (cpu.lm_head(x, w) - ref).abs().max() <= 1e-5 * ref.abs().max(), (h, v, m)


def test_native_quantization_of_a_non_finite_row_is_nan_not_minus_127():
    """A NaN or inf in a row that is quantized for the next int8 GEMM gives a NaN row scale, as the
    PyTorch version does (max ignores NaN: it was a finite scale and the NaN a silent -127)."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    x = torch.randn(3, 40)
    x[0, 5], x[1, 33] = float("nan"), float("inf")
    nxt = cpu.Int8Linear(torch.randn(8, 40), None)
    _, q = cpu.epilogue(x, out=torch.empty(3, 40), quant_for=nxt)
    assert q.scale[:2].isnan().all() and q.scale[2].isfinite()


def test_native_bindings_refuse_what_would_read_or_write_out_of_bounds():
    """The C kernels trust shapes and indices: each mismatch is a ValueError before the call."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    cache = cpu.allocate_kv_cache(1, 2, 1, 4, 16, "fp32")[0]
    blocks, offsets = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="head size"):
        native.kv_write(cache, torch.randn(1, 1, 32), torch.randn(1, 1, 32), blocks, offsets)
    with pytest.raises(ValueError, match="outside the cache"):
        native.kv_write(cache, torch.randn(1, 1, 16), torch.randn(1, 1, 16), blocks + 2, offsets)
    packed, colsum = cpu.pack_vnni(torch.randint(-127, 128, (16, 8), dtype=torch.int8))
    x = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    with pytest.raises(ValueError, match="disagree"):
        native.int8_gemm_packed(x, packed, colsum, 8, torch.empty(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        native.int8_gemm_packed(x[:, :16].contiguous(), packed, colsum, 8, torch.empty(1, 8, dtype=torch.int32))
    if native.f32_gemm_native():
        panels = cpu.pack_panels(torch.randn(64, 20))
        with pytest.raises(ValueError, match="disagree"):
            native.f32_gemm_packed(torch.randn(3, 32), panels, None, 20, torch.empty(3, 20))
        with pytest.raises(ValueError, match="disagree"):
            native.f32_gemm_packed(torch.randn(3, 64), panels, torch.zeros(16), 20, torch.empty(3, 20))
        with pytest.raises(ValueError, match="contiguous rows"):
            native.f32_gemm_packed(torch.randn(64, 3).t(), panels, None, 20, torch.empty(3, 20))
        with pytest.raises(ValueError, match="disagree"):
            native.f32_gemm_nt(torch.randn(3, 32), torch.randn(20, 64), torch.empty(3, 20))
    qkv = torch.randn(5, 3 * 32)
    with pytest.raises(ValueError, match="int64"):
        native.varlen_attention(qkv, torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0]), 2, 5,
                                torch.empty(5, 32))
    with pytest.raises(ValueError, match="disagree"):
        native.rope_(torch.randn(3, 32), torch.randn(3, 8), torch.randn(3, 8), 4)
