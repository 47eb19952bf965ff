"""Generation: greedy parity with transformers' generate, batch invariance, joining mid-flight,
preemption, sampling, stop handling, and the paged attention kernel against its PyTorch version."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from tests.conftest import DECODER_ARCHS, random_sequences, rel_err
from turboserve.errors import InputTooLongError, InvalidInputError, ModelLoadError
from turboserve.llm import LLM, DecoderTokenizer
from turboserve.sampling import SamplingParams, StopChecker, apply_min_p, apply_top_k, apply_top_p

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def hf_greedy(path, prompt: list[int], n: int, use_cache: bool = True) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=0,
                             pad_token_id=0, use_cache=use_cache)
    return out[0, len(prompt):].tolist()


PROMPT_LENGTHS = [1, 7, 33, 64, 100]


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_greedy_matches_transformers_with_requests_joining_mid_flight(decoder_dirs, arch):
    prompts = random_sequences(PROMPT_LENGTHS, seed=3)
    ref = [hf_greedy(decoder_dirs[arch], p, GREEDY.max_tokens) for p in prompts]
    llm = LLM.load(decoder_dirs[arch], max_batch_tokens=64)      # long prompts prefill in chunks
    eng = llm.engine
    # two requests start; the others join while those are decoding
    seqs = {i: eng.add_request(f"r{i}", prompts[i], GREEDY)[0] for i in (0, 3)}
    for _ in range(3):
        eng.step()
    for i in (1, 2, 4):
        seqs[i] = eng.add_request(f"r{i}", prompts[i], GREEDY)[0]
        eng.step()
    while eng.has_work():
        eng.step()
    for i, p in enumerate(prompts):
        assert seqs[i].output_ids == ref[i], (arch, i)
    eng.blocks.check()
    assert eng.blocks.used_blocks == 0 or eng.blocks.prefix_caching      # finished requests freed theirs


@pytest.mark.parametrize("arch,overrides", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),          # per-layer attention scales
    ("gpt2", dict(scale_attn_weights=False)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),   # window on layer 1 only
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("llama", dict(sliding_window=8)),                             # a key LLaMA's attention ignores
])
def test_config_variants_match_transformers(tmp_path, arch, overrides):
    """Against transformers' forward (greedy without its KV cache: with sliding_window set on a
    LLaMA, its cache keeps a window its attention does not apply)."""
    from tests.conftest import build_decoder
    d = build_decoder(arch, tmp_path / arch, seed=5, **overrides)
    prompt = random_sequences([40], seed=12)[0]                      # past the window of 8
    ours = LLM.load(d).generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert ours == hf_greedy(d, prompt, GREEDY.max_tokens, use_cache=False)


def test_generation_config_eos_ids_end_generation(tmp_path, decoder_dirs):
    """Chat models keep their end-of-turn id in generation_config.json (config.json: only eos)."""
    import json
    import shutil
    d = tmp_path / "eot"
    shutil.copytree(decoder_dirs["llama"], d)
    prompt = random_sequences([9], seed=13)[0]
    full = hf_greedy(d, prompt, 8)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [102, full[3]]}))
    out = LLM.load(d).generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0]
    assert out.token_ids == full[:4] and out.finish_reason == "stop"


def test_gelu_gated_mlp_matches_transformers_and_other_gates_are_refused(tmp_path):
    """LLaMA's MLP with hidden_act gelu is GeGLU, act(gate) * up (ModernBERT's gate too)."""
    from tests.conftest import build_decoder
    d = build_decoder("llama", tmp_path / "geglu", hidden_act="gelu")
    prompt = random_sequences([21], seed=14)[0]
    assert LLM.load(d).generate([prompt], GREEDY)[0].outputs[0].token_ids == hf_greedy(d, prompt, GREEDY.max_tokens)
    with pytest.raises(ModelLoadError, match="gated MLP activation"):
        LLM.load(build_decoder("llama", tmp_path / "reglu", hidden_act="relu"))


def test_chat_template_renders_as_transformers_does(tmp_path, decoder_dirs):
    """Loop controls, tojson as transformers' (unsorted, not ASCII-escaped), tools / documents None,
    every special token."""
    import json
    import shutil
    d = tmp_path / "tmpl"
    shutil.copytree(decoder_dirs["llama"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                            "{{ m | tojson }}{% endfor %}{% if tools is not none %}TOOLS{% endif %}{{ unk_token }}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = DecoderTokenizer(d)
    ids = tok.apply_chat_template([{"role": "user", "content": "b <a>"}, {"role": "user", "content": "x"}])
    ref = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
        [{"role": "user", "content": "b <a>"}, {"role": "user", "content": "x"}], add_generation_prompt=True,
        tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == tok.decode(tok.encode(ref, add_special_tokens=False),
                                                                   skip_special_tokens=False)
    assert "TOOLS" not in ref and '"role": "user"' in ref


def test_batch_invariance_fp32(decoder_dirs):
    """A request's tokens do not depend on what runs beside it."""
    llm = LLM.load(decoder_dirs["llama"])
    prompts = random_sequences([5, 40, 17, 90, 2], seed=9)
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    together = [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)]
    assert alone == together


def test_preemption_recomputes_to_the_same_tokens(decoder_dirs):
    """A KV cache too small for all requests at once preempts the newest and recomputes it later."""
    prompts = random_sequences([60, 61, 59, 63], seed=4)       # 4 x ~6 blocks; the cache holds 16
    params = SamplingParams(temperature=0.0, max_tokens=30)
    roomy = LLM.load(decoder_dirs["gpt2"]).generate(prompts, params)
    block_bytes = 16 * LLM.load(decoder_dirs["gpt2"]).model.kv_bytes_per_token()
    tight = LLM.load(decoder_dirs["gpt2"], kv_cache_bytes=16 * block_bytes, prefix_caching=False)
    out = tight.generate(prompts, params)
    assert tight.engine.stats.preemptions > 0
    assert [r.outputs[0].token_ids for r in out] == [r.outputs[0].token_ids for r in roomy]
    tight.engine.blocks.check()
    assert tight.engine.blocks.used_blocks == 0


def test_prefix_caching_reuses_blocks_and_keeps_outputs(decoder_dirs):
    shared = random_sequences([48], seed=5)[0]
    prompts = [shared + [1000 + i] for i in range(3)]
    llm = LLM.load(decoder_dirs["llama"])
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert llm.engine.blocks.prefix_hits >= 2 * (48 // 16)
    fresh = LLM.load(decoder_dirs["llama"], prefix_caching=False).generate(prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in first + rest] == [r.outputs[0].token_ids for r in fresh]


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(decoder_dirs):
    llm = LLM.load(decoder_dirs["gpt2"])
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    prompt = random_sequences([12], seed=1)[0]
    a = llm.generate([prompt], p)[0].outputs[0].token_ids
    others = random_sequences([5, 60], seed=2)
    b = llm.generate([others[0], prompt, others[1]], [SamplingParams(temperature=1.0, max_tokens=9), p,
                                                      SamplingParams(temperature=0.0, max_tokens=20)])[1]
    assert b.outputs[0].token_ids == a
    c = llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16))
    assert c[0].outputs[0].token_ids != a


def test_prompt_logprobs_match_transformers(decoder_dirs):
    """Each prompt token's log-probability given the tokens before it (and the top alternatives), as
    transformers' forward gives them, over a prompt prefilled in several chunks (a 64-token step
    budget); the same again when the prompt's blocks are in the prefix cache (a request that scores
    its prompt does not take them from there)."""
    llm = LLM.load(decoder_dirs["llama"], max_batch_tokens=64)
    prompt = random_sequences([150], seed=3)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(decoder_dirs["llama"]).eval()
    with torch.no_grad():
        lp = ref(input_ids=torch.tensor([prompt])).logits[0].log_softmax(-1)
    llm.generate([prompt], GREEDY)                                  # the prompt's blocks now cached
    for _ in range(2):
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2))[0]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i, draw in enumerate(out.prompt_logprobs[1:]):
            assert draw.token == prompt[i + 1] and draw.logprob == pytest.approx(float(lp[i, prompt[i + 1]]), abs=1e-4)
            assert [t for t, _ in draw.top] == lp[i].topk(2).indices.tolist()
    assert llm.generate([prompt], GREEDY)[0].prompt_logprobs is None


def test_n_continuations_and_logprobs(decoder_dirs):
    llm = LLM.load(decoder_dirs["qwen2"])
    out = llm.generate([random_sequences([10], seed=6)[0]],
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=3))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tok, draw in zip(o.token_ids, o.logprobs):
            assert draw.token == tok and draw.logprob <= 0 and len(draw.top) == 3
            assert draw.top[0][1] >= draw.logprob - 1e-6


def test_masks_on_constructed_logits():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[True, True, False, False, False]]
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False, False]]
    # min_p 0.3: keep p >= 0.15
    assert torch.isfinite(apply_min_p(logits, 0.3)).tolist() == [[True, True, True, False, False]]


def test_penalties_change_greedy_choice():
    from turboserve.sampling import apply_penalties
    logits = torch.tensor([2.0, 1.9, -1.0])
    rep = apply_penalties(logits.clone(), [0], [], SamplingParams(repetition_penalty=2.0))
    assert torch.allclose(rep, torch.tensor([1.0, 1.9, -1.0])) and rep.argmax() == 1
    freq = apply_penalties(logits.clone(), [], [0, 0, 2], SamplingParams(frequency_penalty=0.5, presence_penalty=0.1))
    assert torch.allclose(freq, torch.tensor([2.0 - 1.0 - 0.1, 1.9, -1.0 - 0.5 - 0.1]))


def test_logit_bias_and_min_tokens_on_constructed_logits():
    """logit_bias adds to the logits after the penalties; while fewer than min_tokens tokens are out,
    the model's end ids (unless ignore_eos) and stop_token_ids are masked."""
    from turboserve.sampling import apply_penalties
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    p = SamplingParams(logit_bias={2: 5.0, 0: -0.5}, min_tokens=2, stop_token_ids=[1])
    early = apply_penalties(logits.clone(), [], [7], p, end_ids=[3])
    assert torch.equal(early, torch.tensor([1.5, float("-inf"), 4.0, float("-inf")]))
    assert torch.equal(apply_penalties(logits.clone(), [], [7, 7], p, end_ids=[3]), torch.tensor([1.5, 1.9, 4.0, 0.5]))
    ignoring = SamplingParams(min_tokens=2, ignore_eos=True)
    assert torch.equal(apply_penalties(logits.clone(), [], [], ignoring, end_ids=[3]), logits)


def test_logit_bias_and_min_tokens_steer_generation(decoder_dirs):
    """End to end: a +100 bias makes greedy emit that token at every step, -100 on greedy's first token
    makes the first token the runner-up; min_tokens keeps a stop token id from ending the output
    before min_tokens tokens (without it the same request stops at once); bad values are refused."""
    llm = LLM.load(decoder_dirs["gpt2"])
    prompt = random_sequences([9], seed=3)[0]
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2))[0].outputs[0]
    forced = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logit_bias={77: 100}))[0]
    assert forced.outputs[0].token_ids == [77] * 5
    first = plain.token_ids[0]
    banned = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100}))[0]
    assert banned.outputs[0].token_ids == [plain.logprobs[0].top[1][0]]
    stop = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first])
    assert llm.generate([prompt], stop)[0].outputs[0].token_ids == [first]
    held = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first],
                                                 min_tokens=3))[0].outputs[0].token_ids
    assert len(held) >= 3 and first not in held[:3]
    for bad in (dict(logit_bias={5: 101}), dict(logit_bias={-1: 1}), dict(logit_bias=[5]), dict(logit_bias={5: "x"}),
                dict(min_tokens=-1), dict(min_tokens=7, max_tokens=6), dict(min_tokens=True)):
        with pytest.raises(InvalidInputError):
            SamplingParams(**bad)
    with pytest.raises(InvalidInputError, match="logit_bias"):
        llm.generate([prompt], SamplingParams(logit_bias={10**6: 1}))
    assert not llm.engine.has_work()


def test_stop_strings_cut_where_they_start(decoder_dirs):
    tok = DecoderTokenizer(decoder_dirs["gpt2"])
    ids = tok.encode("the cat sat on the mat today", add_special_tokens=False)
    checker = StopChecker(tok, ["on the"])
    shown = ""
    for i in range(1, len(ids) + 1):
        shown = checker.update(ids[:i])
        assert "on" not in shown[len("the cat sat"):]          # never shows a stop string's start
        if checker.stopped:
            break
    assert checker.stopped and checker.text == "the cat sat "
    # end to end: a stop string that the model will produce is cut from the output
    llm = LLM.load(decoder_dirs["gpt2"])
    prompt = random_sequences([8], seed=11)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0].text
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]


def test_stop_string_start_is_held_back_before_half_a_character():
    """The hold-back counts real characters: "xy a" followed by half of "é" must not show the "a" that
    may start the stop string "aé" (a trailing U+FFFD once used up the hold-back)."""
    texts = {1: "xy ", 2: "xy a", 3: "xy a\ufffd", 4: "xy aé"}     # the third token is half of "é"
    tok = type("Tok", (), {"decode": lambda self, ids, skip_special_tokens=True: texts[len(ids)]})()
    checker = StopChecker(tok, ["aé"])
    shown = [checker.update(list(range(i))) for i in range(1, 5)]
    assert shown == ["xy", "xy ", "xy ", "xy "] and checker.stopped and checker.text == "xy "


def test_tiny_temperatures_sample_like_greedy(decoder_dirs):
    """logits / 1e-40 overflow to inf (a NaN softmax raised in multinomial and killed the engine):
    temperatures under 1e-5 are greedy, and small ones above that subtract the max first."""
    llm = LLM.load(decoder_dirs["gpt2"])
    prompt = random_sequences([7], seed=2)[0]
    ref = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    for t in (1e-40, 1e-4):
        out = llm.generate([prompt], SamplingParams(temperature=t, max_tokens=GREEDY.max_tokens, seed=1))
        assert out[0].outputs[0].token_ids == ref, t


def test_engine_limits_that_could_never_schedule_are_refused(decoder_dirs):
    """0 tokens or sequences per step left every step empty (the engine spun forever); a KV budget
    under one full context is an error, not silently raised."""
    for bad in (dict(max_batch_tokens=0), dict(max_num_seqs=0), dict(max_batch_tokens=-5)):
        with pytest.raises(ValueError, match="positive integer"):
            LLM.load(decoder_dirs["gpt2"], **bad)
    with pytest.raises(ValueError, match="less than one sequence"):
        LLM.load(decoder_dirs["gpt2"], kv_cache_bytes=1)
    from turboserve.server import ServerConfig
    with pytest.raises(InvalidInputError, match="max_batch_tokens"):
        ServerConfig(max_batch_tokens=0)


def test_bad_requests_raise_clear_errors(decoder_dirs):
    llm = LLM.load(decoder_dirs["gpt2"])
    with pytest.raises(InputTooLongError, match="context length of 256"):
        llm.generate([[5] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(InvalidInputError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidInputError, match="token ids"):
        llm.generate([[5, 10**9]], GREEDY)
    with pytest.raises(InvalidInputError, match="1 SamplingParams for 3 prompts"):     # not silently dropped
        llm.generate([[5], [6], [7]], [GREEDY])
    with pytest.raises(InvalidInputError, match="prompt"):
        llm.generate([[5, 6]] * 8 + [""], GREEDY)
    assert not llm.engine.has_work()                     # the 8 good ones were not left queued
    with pytest.raises(InvalidInputError):
        llm.generate(None)
    for bad in (dict(temperature="0.5"), dict(max_tokens=True), dict(temperature=-1), dict(top_p=0), dict(n=0),
                dict(logprobs=9), dict(max_tokens=0),
                dict(seed="abc"), dict(seed=2**70), dict(seed=1.5), dict(seed=True), dict(logprobs=True),
                dict(stop_token_ids=5), dict(stop_token_ids=[True]), dict(stop=5)):
        with pytest.raises(InvalidInputError):
            SamplingParams(**bad)
    assert not llm.engine.has_work()


def _paged_case(kv_dtype, window, bs=4, seed=0, d=64, heads=(8, 2)):
    """A cache of random K/V written through write_kv (blocks scattered), and its queries: decode, full
    prefill, decode and chunked prefill side by side, GQA (by default 8 heads over 2), page size 4 or 16
    (the engine's; int8 runs its VNNI kernel there, the scalar one at 4)."""
    from turboserve.ops import cpu
    g = torch.Generator().manual_seed(seed)
    (nh, kvh), nb = heads, 40
    cache = cpu.allocate_kv_cache(1, nb, kvh, bs, d, kv_dtype)[0]
    slots = torch.arange(nb * bs)
    cpu.write_kv(cache, torch.randn(nb * bs, kvh, d, generator=g), torch.randn(nb * bs, kvh, d, generator=g),
                 slots // bs, slots % bs)
    q_counts, ctx = [1, 7, 1, 12], [9, 7, 30, 20] if bs == 4 else [40, 7, 100, 53]
    cu = torch.tensor([0, *torch.tensor(q_counts).cumsum(0).tolist()])
    perm = torch.randperm(nb, generator=g).int()
    tables = torch.stack([perm[i * 8:(i + 1) * 8] for i in range(4)])
    q = torch.randn(int(cu[-1]), (nh + 2 * kvh) * d, generator=g)[:, :nh * d]      # strided rows
    return q, cache, (tables, cu, torch.tensor(ctx), nh, window, d ** -0.5), max(ctx)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("bs,d", [(4, 64), (16, 64), (16, 40)])
def test_paged_attention_native_matches_torch(kv_dtype, window, bs, d):
    """The native kernel against gather + SDPA over the same cache contents, in each KV dtype. The
    int8 VNNI kernel (block size 16) quantizes the query (two bytes an element) and the probabilities
    times the value scales (one byte, per 16 keys): within 4e-3 of the reference's largest output;
    the AVX2 one (block sizes of 8) the query only, to int16: within 2e-4.
    Head dim 40: the vector kernels' column tails (AVX2 passes of 16-64, AVX-512 masks of 8 lanes)."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    q, cache, args, max_ctx = _paged_case(kv_dtype, window, bs, d=d)
    fast = native.paged_attention(q, cache, *args, max_ctx, torch.empty(q.shape[0], q.shape[1]))
    ref = cpu._paged_attention_torch(q, cache, *args, torch.empty(q.shape[0], q.shape[1]))
    if kv_dtype == "int8" and bs == 16 and native.has_vnni():
        assert rel_err(fast, ref) < 4e-3
    elif kv_dtype == "int8" and bs == 16:
        assert rel_err(fast, ref) < 2e-4          # AVX2: the query in int16 (4e-5 measured); scalar: exact
    else:
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(3, 3), (6, 2)])
@pytest.mark.parametrize("d", [64, 40])
def test_paged_attention_native_row_tails(kv_dtype, heads, d):
    """Work items of 1, 2 and 3 rows as well as 4 (no GQA: one row per decode token; groups of 3):
    the vector kernels size their P.V passes by the row count (64 columns for one row), so every
    count and a head dim that is not a multiple of the pass (40) is checked against gather + SDPA."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    q, cache, args, max_ctx = _paged_case(kv_dtype, 0, 16, d=d, heads=heads)
    fast = native.paged_attention(q, cache, *args, max_ctx, torch.empty(q.shape[0], q.shape[1]))
    ref = cpu._paged_attention_torch(q, cache, *args, torch.empty(q.shape[0], q.shape[1]))
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("seqs", [5, 16])
def test_paged_attention_reads_a_blocks_heads_together(kv_dtype, seqs):
    """A decode step of many sequences: each work item takes a group of KV heads and reads every block's
    parts for the group in one run (AVX-512), groups of all 3 heads (16 sequences) or of 2 and then 1
    (5 sequences, 2 threads), GQA 2 query heads per KV head, against gather + SDPA."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(seqs)
    nh, kvh, d, bs, nb = 6, 3, 64, 16, 8 * seqs
    cache = cpu.allocate_kv_cache(1, nb, kvh, bs, d, kv_dtype)[0]
    slots = torch.arange(nb * bs)
    cpu.write_kv(cache, torch.randn(nb * bs, kvh, d, generator=g), torch.randn(nb * bs, kvh, d, generator=g),
                 slots // bs, slots % bs)
    tables = torch.randperm(nb, generator=g).int().view(seqs, 8)
    ctx = torch.randint(1, 8 * bs + 1, (seqs,), generator=g)
    cu = torch.arange(seqs + 1)
    q = torch.randn(seqs, nh * d, generator=g)
    args = (tables, cu, ctx, nh, 0, d ** -0.5)
    fast = native.paged_attention(q, cache, *args, int(ctx.max()), torch.empty(seqs, nh * d))
    ref = cpu._paged_attention_torch(q, cache, *args, torch.empty(seqs, nh * d))
    if kv_dtype == "int8" and native.has_vnni():
        assert rel_err(fast, ref) < 4e-3
    elif kv_dtype == "int8":
        assert rel_err(fast, ref) < 2e-4
    else:
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("bs,heads", [(4, (8, 2)), (16, (6, 2))])
@pytest.mark.parametrize("q_scale", [4.0, 300.0])
def test_paged_attention_native_softcap_matches_torch(kv_dtype, bs, heads, q_scale):
    """Gemma 2's soft-capped scores (softcap tanh(s / softcap), softcap 5) in every kernel, with a
    window, 2 and 3 rows per group, queries scaled so the scores reach 10-30 (the cap bends them) or
    hundreds (tanh saturates: the vector tanh's exp at its clamps), against explicit scores in torch."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    q, cache, args, max_ctx = _paged_case(kv_dtype, 5, bs, d=64, heads=heads, seed=2)
    q = q * q_scale
    fast = native.paged_attention(q, cache, *args, max_ctx, torch.empty(q.shape[0], q.shape[1]), softcap=5.0)
    ref = cpu._paged_attention_torch(q, cache, *args, torch.empty(q.shape[0], q.shape[1]), softcap=5.0)
    uncapped = cpu._paged_attention_torch(q, cache, *args, torch.empty(q.shape[0], q.shape[1]))
    assert rel_err(uncapped, ref) > 0.1                     # the cap changes the result
    if kv_dtype == "int8" and bs == 16:
        assert rel_err(fast, ref) < 4e-3                    # the query quantized, as above
    else:
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seqs,kvh,g", [(1, 3, 1), (12, 4, 1), (12, 2, 4)])
def test_int8_decode_attention_over_head_groups(seqs, kvh, g):
    """Decode steps over an int8 cache (block size 16): the VNNI kernel reads a block's KV heads
    together when there are enough sequences to share the threads (one sequence: heads split over
    the threads), against gather + SDPA; mixed contexts, one of them a block boundary, GQA."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(seqs + kvh)
    d, bs, nb = 64, 16, 128
    cache = cpu.allocate_kv_cache(1, nb, kvh, bs, d, "int8")[0]
    slots = torch.arange(nb * bs)
    cpu.write_kv(cache, torch.randn(nb * bs, kvh, d, generator=gen), torch.randn(nb * bs, kvh, d, generator=gen),
                 slots // bs, slots % bs)
    ctx = torch.tensor([16, 1, 37, 100, 5, 64, 17, 90, 33, 2, 48, 71][:seqs])
    tables = torch.randperm(nb, generator=gen).int()[:seqs * 8].view(seqs, 8)
    q = torch.randn(seqs, kvh * g * d, generator=gen)
    args = (tables, torch.arange(seqs + 1), ctx, kvh * g, 0, d ** -0.5)
    fast = native.paged_attention(q, cache, *args, int(ctx.max()), torch.empty(seqs, kvh * g * d))
    ref = cpu._paged_attention_torch(q, cache, *args, torch.empty(seqs, kvh * g * d))
    assert rel_err(fast, ref) < 4e-3


@pytest.mark.parametrize("kv_dtype,bound", [("bf16", 1e-2), ("int8", 2e-2)])
@pytest.mark.parametrize("bs", [4, 16])
def test_low_precision_kv_cache_stays_close_to_fp32(kv_dtype, bound, bs):
    """bf16 and int8 (per token and head) caches of the same K/V: attention output within its bound
    (max |error| over max |output|) of the fp32 cache's."""
    from turboserve.ops import cpu
    q, cache, args, max_ctx = _paged_case(kv_dtype, 0, bs)
    _, ref_cache, _, _ = _paged_case("fp32", 0, bs)
    got = cpu.paged_attention(q, cache, *args, max_ctx)
    ref = cpu.paged_attention(q, ref_cache, *args, max_ctx)
    assert rel_err(got, ref) < bound


def next_token_logits(llm, prompt) -> torch.Tensor:
    eng = llm.engine
    eng.add_request("probe", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    step = eng._batch(eng.schedule())[0]
    return eng.model.forward(step, eng.cache)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype,bound", [("int8", 0.02), ("bf16", 0.01)])
def test_int8_and_bf16_next_token_distributions_stay_close_to_fp32(decoder_dirs, dtype, bound, arch):
    """int8 (W8A8: per-channel weights, per-token activations) and bf16 against fp32: KL divergence of next-token
    distributions over mixed prompt lengths below the stated bound, and the same greedy token, or, at a near-tie,
    one whose fp32 logit is within 0.1 of the best (Qwen3 at 17 tokens has its top two 0.07 apart, and the AVX2
    tier's int8 picks the second)."""
    for n in (1, 17, 90):
        prompt = random_sequences([n], seed=n)[0]
        ref = next_token_logits(LLM.load(decoder_dirs[arch]), prompt)
        got = next_token_logits(LLM.load(decoder_dirs[arch], dtype=dtype), prompt)
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                        reduction="sum")
        assert kl < bound, (n, float(kl))
        assert ref[got.argmax()] >= ref.max() - 0.1, n


def _edit_config(src, dst, **changes):
    """A copy of model directory src with config.json keys changed (None: removed)."""
    import json
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gemma2_logits_match_transformers(decoder_dirs, tmp_path):
    """Gemma 2's soft-capped attention (cap 4) and logits (cap 8), its window of 8 on the sliding
    layers and the layer pattern of checkpoints saved before transformers wrote layer_types (the first
    of each pair sliding): next-token logits against transformers' at prompt lengths on both sides of
    the window, within 1e-5 of the largest (7e-7 measured); a null cap is no cap. A mutation check: without
    either cap the error is 0.19 / 0.34."""
    d = decoder_dirs["gemma2"]
    old = _edit_config(d, tmp_path / "old", layer_types=None)
    uncapped = _edit_config(d, tmp_path / "uncapped", attn_logit_softcapping=None, final_logit_softcapping=None)
    for path in (d, old, uncapped):
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(d if path is old else path).eval()
        llm = LLM.load(path)
        for i, n in enumerate((1, 7, 30, 90)):
            prompt = random_sequences([n], seed=n)[0]
            with torch.no_grad():
                ref = ref_model(torch.tensor([prompt])).logits[0, -1]
            assert rel_err(next_token_logits(llm, prompt), ref) < 1e-5, (path.name, n)
            llm.engine.abort("probe")


@pytest.mark.parametrize("changes,match", [
    (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping must be a positive number"),
    (dict(final_logit_softcapping="30"), "final_logit_softcapping must be a positive number"),
    (dict(use_bidirectional_attention=True), "with bidirectional attention is not supported"),
])
def test_gemma2_bad_softcaps_are_refused(decoder_dirs, tmp_path, changes, match):
    from turboserve.encoder import Encoder
    bad = _edit_config(decoder_dirs["gemma2"], tmp_path / "bad", **changes)
    with pytest.raises(ModelLoadError, match=match):
        (Encoder.load if "use_bidirectional_attention" in changes else LLM.load)(bad)


def test_waiting_queue_is_bounded(decoder_dirs):
    from turboserve.llm import QueueFull
    llm = LLM.load(decoder_dirs["gpt2"], max_waiting=4)
    for i in range(4):
        llm.engine.add_request(f"r{i}", [5, 6, 7], GREEDY)
    with pytest.raises(QueueFull, match="bound 4"):
        llm.engine.add_request("r4", [5, 6, 7], GREEDY)
    llm.engine.add_request("probe", [5], GREEDY, admit=False)      # health probes skip the bound
    while llm.engine.has_work():
        llm.engine.step()
    llm.engine.add_request("r5", [5, 6, 7], GREEDY)                  # room again once they ran


@pytest.mark.parametrize("k,n", [(64, 48), (30, 37), (36, 70), (200, 130)])
def test_packed_int8_gemm_equals_int_mm(k, n):
    """The decoder GEMM (VNNI on packed weights) gives torch._int_mm's exact int32 results at every
    tile size (1-6 rows, and rows split unevenly into tiles), up to and past Int8Linear.PACKED_ROWS,
    at K, N that are not multiples of 4 / 16, and with an odd number of 4-k groups (the two-set
    tiles of 1-2 rows)."""
    from turboserve import native
    from turboserve.ops.cpu import Int8Linear, pack_vnni
    if native.lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(k + n)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    packed, colsum = pack_vnni(w)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 13, 37, Int8Linear.PACKED_ROWS, Int8Linear.PACKED_ROWS + 1):
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        out = native.int8_gemm_packed(x, packed, colsum, n, torch.empty(m, n, dtype=torch.int32))
        assert torch.equal(out, torch._int_mm(x, w)), m


def test_int8_kernel_limit_is_the_largest_probe_the_native_kernel_wins_throughout(monkeypatch):
    """measure_native_limit: the native kernel up to the last probe row count before oneDNN first wins
    (scripted timings: the real ones depend on the CPU), inf when it never does, 0 when it loses at
    one row; probing stops at the first loss, and with inf after a probe slower than
    INT8_PROBE_SECONDS."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None or native.int8_gemm_everywhere():
        pytest.skip("no VNNI native kernel beside oneDNN's")
    lin = cpu.Int8Linear(torch.randn(48, 40), None, small_rows=True)
    for oneDNN_from, expected in ((128, 64), (None, math.inf), (1, 0)):
        calls = []

        def scripted(fn, repeat=3, _from=oneDNN_from):
            native_turn = len(calls) % 2 == 0          # the native kernel is timed first at each probe
            m = cpu.INT8_PROBE_ROWS[len(calls) // 2]
            calls.append(m)
            return 2e-3 if native_turn == (_from is not None and m >= _from) else 1e-3
        monkeypatch.setattr(cpu, "best_seconds", scripted)
        assert cpu.measure_native_limit(lin) == expected
        assert max(calls) == (oneDNN_from or cpu.INT8_PROBE_ROWS[-1])
    calls = []
    monkeypatch.setattr(cpu, "best_seconds", lambda fn, repeat=3: calls.append(1) or 1.0)    # a slow GEMM
    assert cpu.measure_native_limit(lin) == math.inf and len(calls) == 2


def test_tuned_int8_limits_are_cached_per_shape_and_pick_the_kernel(monkeypatch, tmp_path):
    """tune_int8_rows sets each decoder linear's limit by its weight shape, measures each shape once
    and then reads the cache file; a GEMM takes the native kernel up to the limit and oneDNN above it,
    with the same exact int32 results either way. A real measurement gives a limit of 0, a probe or
    inf."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None or native.int8_gemm_everywhere():
        pytest.skip("no VNNI native kernel beside oneDNN's")
    monkeypatch.setenv("TURBOSERVE_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    a, b, c = (cpu.Int8Linear(torch.randn(n, k, generator=g), None, small_rows=True)
               for n, k in ((40, 48), (40, 48), (24, 64)))
    measured = []
    monkeypatch.setattr(cpu, "measure_native_limit", lambda lin: measured.append(lin) or (16 if lin.in_features == 48
                                                                                       else math.inf))
    assert cpu.tune_int8_rows([a, b, c, None]) == {"48x40": 16.0, "64x24": math.inf}
    assert (a.native_limit, b.native_limit, c.native_limit) == (16, 16, math.inf) and len(measured) == 2
    d = cpu.Int8Linear(torch.randn(40, 48, generator=g), None, small_rows=True)
    cpu.tune_int8_rows([d])
    assert d.native_limit == 16 and len(measured) == 2              # from the file
    used = []
    monkeypatch.setattr(native, "int8_gemm_packed",
                        lambda *args, _f=native.int8_gemm_packed: used.append(1) or _f(*args))
    for m, native_expected in ((16, True), (17, False)):
        x = torch.randn(m, 48, generator=g)
        used.clear()
        out, _ = d(x, out=torch.empty(m, 40))
        assert bool(used) == native_expected
        d.native_limit = math.inf if native_expected else 0        # the other kernel: the same numbers
        assert torch.equal(out, d(x, out=torch.empty(m, 40))[0])
        d.native_limit = 16
    monkeypatch.undo()
    monkeypatch.setenv("TURBOSERVE_CACHE", str(tmp_path / "real"))
    limit = cpu.tune_int8_rows([cpu.Int8Linear(torch.randn(24, 32), None, small_rows=True)])["32x24"]
    assert limit in (0, math.inf, *cpu.INT8_PROBE_ROWS)


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
def test_native_kv_write_equals_torch(kv_dtype):
    """The native cache writer stores the same bytes (and int8 scales) as the torch version, from
    strided K/V views as the decoder passes them; also where x / scale is an exact .5 tie (x =
    scale * (j + 0.5) for random scales: ties in ~90% of the elements), where a reciprocal multiply
    x * (1 / scale) once rounded 562 of 4992 elements differently."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    nb, kvh, d, bs, n = 6, 2, 40, 4, 11
    qkv = torch.randn(n, (4 + 2 * kvh) * d, generator=g) * 3
    qkv[0, 4 * d] = 0.0
    for row in range(1, n):                              # heads of exact ties, in vector lanes and the tail
        for part in (4, 4 + kvh):
            amax = float(torch.rand(1, generator=g)) * 50 + 1
            scale = torch.tensor(amax) / 127.0
            head = scale * (torch.randint(-120, 120, (d,), generator=g).float() + 0.5)
            head[0] = amax
            qkv[row, part * d:(part + 1) * d] = head
    k, v = qkv[:, 4 * d:(4 + kvh) * d].view(-1, kvh, d), qkv[:, (4 + kvh) * d:].view(-1, kvh, d)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    a, b = (cpu.allocate_kv_cache(1, nb, kvh, bs, d, kv_dtype)[0] for _ in range(2))
    native.kv_write(a, k, v, slots // bs, slots % bs)
    cpu._write_kv_torch(b, k, v, slots // bs, slots % bs)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_native_rope_equals_rotate_half():
    """The native rotary embedding (in place on strided q / k views of the QKV rows) against HF's
    rotate-half formula, at a head dim whose half is not a multiple of 16 (the scalar tail) and one
    that is."""
    from turboserve import native
    from turboserve.ops import cpu
    if native.lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(5)
    for d in (40, 64):
        heads, T = 3, 9
        qkv = torch.randn(T, 3 * heads * d, generator=g)
        ang = torch.rand(T, d // 2, generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
        x = qkv[:, heads * d:2 * heads * d]
        xh = x.clone().view(T, heads, d)
        c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        ref = xh * c + torch.cat([-xh[..., d // 2:], xh[..., :d // 2]], -1) * s
        before = qkv.clone()
        cpu.rope_(x, cos, sin, heads)
        assert torch.allclose(x.reshape(T, heads, d), ref, atol=1e-5)
        assert torch.equal(qkv[:, :heads * d], before[:, :heads * d])        # neighbours untouched
        assert torch.equal(qkv[:, 2 * heads * d:], before[:, 2 * heads * d:])
