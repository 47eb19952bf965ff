"""Generation throughput and latency: turboserve against transformers and CTranslate2, same run.

    .venv/bin/python benchmarks/generate.py [--models gpt2,llama] [--systems ...] [--rates 0.5,1,2]

Models: the GPT-2 small shape and a small LLaMA shape with grouped-query attention (and `gemma2`, the
same size in Gemma 2's layer with its soft-caps; `llama-1b` for GPUs), random weights,
saved with transformers' save_pretrained into .bench/gen-models (built once) with a word-level
tokenizer ("t0" ... "tN"), so every system sees the same token ids.

Offline (DESIGN.md section 5): 64 requests, prompt and output lengths uniform in [16, 256] (seed 7),
greedy, EOS ignored, all submitted at once. Reported: generated tokens/s (only the tokens each
request asked for), and for turboserve the time to first token and time per output token.
  - transformers static: batches of 16 in arrival order, left-padded, each batch generating up to its
    longest request (the extra tokens are not counted).
  - transformers one at a time: the first 8 requests alone (the whole set takes over 10 minutes).
  - CTranslate2 Generator (fp32, int8): its rebatching (sorted by prompt length, batches of 16),
    each request stopped at its own length through the per-token callback.
Online: the same requests as a Poisson process (seed 7), per rate: turboserve's AsyncLLM in-process
(no HTTP) and CTranslate2 as a static batcher (whenever it is free, everything that has arrived, up
to 16, is one generate_batch, streamed per token through its callback). Throughput, whether the system
kept up with the offered load, TTFT and TPOT p50 / p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from turboserve import LLM, SamplingParams  # noqa: E402
from turboserve.llm import AsyncLLM  # noqa: E402
from turboserve.workloads import decoder_offline  # noqa: E402

CACHE = ROOT / ".bench" / "gen-models"


def build(name: str) -> Path:
    """The random-weight model (built once) and a word-level tokenizer "t0" ... "tN" beside it."""
    import transformers as tf
    from tokenizers import Tokenizer, models
    d = CACHE / name
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        _random_model(name).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.save(str(d / "tokenizer.json"))
    eos = f"t{config.get('eos_token_id') or 0}"      # CTranslate2's converter needs the special tokens
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=eos, eos_token=eos).save_pretrained(d)
    return d


def _random_model(name: str):
    import transformers as tf
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=768, n_head=12, n_layer=12, n_positions=1024,
                                                 vocab_size=50257))
    elif name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                                                   num_hidden_layers=8, intermediate_size=2816, vocab_size=32000,
                                                   max_position_embeddings=1024))
    elif name == "llama-1b":
        # TinyLlama-1.1B's shape, for GPUs (benchmarks/gpu.py), where the small LLaMA is launch-bound
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                                                   num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
                                                   max_position_embeddings=2048))
    elif name == "gemma2":
        # the small LLaMA's size in Gemma 2's layer (sandwich norms, tanh GeGLU, head_dim 128, every other
        # layer over a 4,096 window) with its soft-caps (scores 50, logits 30) and a 32k vocabulary
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4,
                                                     head_dim=128, num_hidden_layers=8, intermediate_size=2816,
                                                     vocab_size=32000, max_position_embeddings=1024,
                                                     query_pre_attn_scalar=128))
    else:
        raise ValueError(f"unknown model {name!r}: gpt2, llama, llama-1b, gemma2")
    return model


def machine() -> str:
    name = platform.processor()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---------------------------------------------------------------------- systems
def run_turboserve(path, prompts, outs, dtype):
    llm = LLM.load(path, dtype=dtype, threads=2)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))       # warm-up
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
    t = time.perf_counter()
    res = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    assert [len(r.outputs[0].token_ids) for r in res] == outs
    seqs = llm.last_sequences
    ttft = [s.first_token_time - s.arrival for s in seqs]
    tpot = [(s.finish_time - s.first_token_time) / (len(s.output_ids) - 1) for s in seqs]
    return sum(outs) / wall, ttft, tpot


def run_transformers(path, prompts, outs, batch):
    import transformers as tf
    torch.set_num_threads(2)
    model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    n = len(prompts) if batch > 1 else 8
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            group = prompts[i:i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            new = max(outs[i:i + batch])
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    return sum(outs[:n]) / (time.perf_counter() - t)


def ct2_generator(path, compute_type):
    import ctranslate2
    out_dir = CACHE / f"{path.name}-ct2-{compute_type}"
    ct2_type = {"fp32": "float32", "int8": "int8_float32"}[compute_type]
    if not out_dir.exists():
        ctranslate2.converters.TransformersConverter(str(path)).convert(str(out_dir), quantization=ct2_type)
    return ctranslate2.Generator(str(out_dir), device="cpu", intra_threads=2, inter_threads=1, compute_type=ct2_type)


def run_ctranslate2(path, prompts, outs, compute_type):
    """CTranslate2's own rebatching strategy (inputs sorted by prompt length, batches of 16, so little
    prompt padding), each request stopped at its own length by the per-token callback. (Passing all
    64 with max_batch_size=16 does the sorting inside CTranslate2, but its callback's batch ids then
    no longer name the inputs, so the per-request stop cannot be told apart.)"""
    gen = ct2_generator(path, compute_type)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    t = time.perf_counter()
    for i in range(0, len(order), 16):
        group = order[i:i + 16]
        gen.generate_batch([[f"t{x}" for x in prompts[j]] for j in group], max_length=max(outs[j] for j in group),
                           sampling_topk=1, include_prompt_in_result=False, end_token=[],
                           callback=lambda r, group=group: r.step + 1 >= outs[group[r.batch_id]])
    return sum(outs) / (time.perf_counter() - t)


def poisson_arrivals(n, rate):
    return np.cumsum(np.random.default_rng(7).exponential(1.0 / rate, size=n))


def online_ctranslate2(path, prompts, outs, rate, compute_type):
    """CTranslate2 as a static batcher would serve it: whenever the model is free, every request that
    has arrived (up to 16) forms one generate_batch; each request streams through the per-token
    callback and stops at its own length. Returns (tokens/s, TTFT list, TPOT list) like `online`."""
    gen = ct2_generator(path, compute_type)
    arrivals = poisson_arrivals(len(prompts), rate)
    ttft, tpot = [], []
    start = time.perf_counter()
    nxt = 0
    while nxt < len(prompts):
        wait = start + arrivals[nxt] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter() - start
        group = [i for i in range(nxt, len(prompts)) if arrivals[i] <= now][:16]
        nxt += len(group)
        first, last = {}, {}

        def step(r, group=group, first=first, last=last):
            t = time.perf_counter()
            first.setdefault(r.batch_id, t)
            if r.step + 1 >= outs[group[r.batch_id]]:
                last[r.batch_id] = t
                return True           # this request is done; the rest of the batch goes on
            return False
        gen.generate_batch([[f"t{x}" for x in prompts[j]] for j in group], max_length=max(outs[j] for j in group),
                           sampling_topk=1, include_prompt_in_result=False, end_token=[], callback=step)
        for b, j in enumerate(group):
            ttft.append(first[b] - (start + arrivals[j]))
            tpot.append((last[b] - first[b]) / max(1, outs[j] - 1))
    return sum(outs) / (time.perf_counter() - start), ttft, tpot


async def online(path, prompts, outs, rate, dtype="fp32"):
    llm = LLM.load(path, dtype=dtype, threads=2)
    engine = AsyncLLM(llm.engine)
    arrivals = poisson_arrivals(len(prompts), rate)
    ttft, tpot = [], []
    start = time.perf_counter()

    async def one(i):
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        t0 = time.perf_counter()
        q = engine.submit(f"r{i}", prompts[i], SamplingParams(temperature=0.0, max_tokens=outs[i], ignore_eos=True))
        first = None
        while True:
            ev = await q.get()
            if first is None:
                first = time.perf_counter()
                ttft.append(first - t0)
            if ev.finished:
                tpot.append((time.perf_counter() - first) / max(1, ev.num_tokens - 1))
                return
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = time.perf_counter() - start
    engine.stop()
    return sum(outs) / wall, ttft, tpot


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--systems", default="turboserve fp32,turboserve int8,transformers static/16,"
                                         "transformers one at a time,ctranslate2 fp32,ctranslate2 int8")
    ap.add_argument("--rates", default="0.5,1", help="online: requests/s (empty: offline only)")
    ap.add_argument("--online-systems", default="turboserve fp32,turboserve int8,ctranslate2 fp32,ctranslate2 int8")
    args = ap.parse_args()
    print(f"# machine: {machine()}; 2 threads per system")
    for name in args.models.split(","):
        path = build(name)
        cfg = json.loads((path / "config.json").read_text())
        prompts, outs = decoder_offline(cfg["vocab_size"])
        print(f"\n## {name} (random weights), offline: {len(prompts)} requests, {sum(outs)} tokens to generate")
        print("| system | generated tokens/s | vs turboserve fp32 | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
        print("|---|---:|---:|---:|---:|")
        base = None
        for system in args.systems.split(","):
            try:
                lat = ""
                if system.startswith("turboserve"):
                    tps, ttft, tpot = run_turboserve(path, prompts, outs, system.split()[1])
                    lat = f"{pct(ttft, 50):.0f} / {pct(ttft, 99):.0f} | {pct(tpot, 50):.1f} / {pct(tpot, 99):.1f}"
                    base = base or tps
                elif system == "transformers static/16":
                    tps = run_transformers(path, prompts, outs, 16)
                elif system == "transformers one at a time":
                    tps = run_transformers(path, prompts, outs, 1)
                else:
                    tps = run_ctranslate2(path, prompts, outs, system.split()[1])
            except Exception as exc:  # a peer that is not installed or fails is reported, not fatal
                print(f"| {system} | failed: {str(exc)[:120]} | | | |", flush=True)
                continue
            ratio = f"{base / tps:.2f}x" if base and not system.startswith("turboserve") else ""
            print(f"| {system} | {tps:,.0f} | {ratio} | {lat or ' | '} |", flush=True)
        rates = [float(r) for r in args.rates.split(",") if r]
        if not rates:
            continue
        print(f"\n## {name}, online: the same requests arriving as a Poisson process (turboserve: AsyncLLM "
              "in-process; CTranslate2: static batches of whatever has arrived, streamed per token)")
        print("| rate req/s | system | generated tokens/s | sustained | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
        print("|---:|---|---:|---|---:|---:|")
        for rate in rates:
            for system in args.online_systems.split(","):
                kind, dtype = system.split()
                try:
                    if kind == "turboserve":
                        tps, ttft, tpot = asyncio.run(online(path, prompts, outs, rate, dtype))
                    else:
                        tps, ttft, tpot = online_ctranslate2(path, prompts, outs, rate, dtype)
                except Exception as exc:
                    print(f"| {rate:g} | {system} | failed: {str(exc)[:120]} | | | |", flush=True)
                    continue
                # sustained: it kept up with arrivals (the offered load over the arrival span)
                offered = sum(outs) / poisson_arrivals(len(outs), rate)[-1]
                ok = "yes" if tps >= 0.9 * offered else f"no (offered {offered:,.0f})"
                print(f"| {rate:g} | {system} | {tps:,.0f} | {ok} | {pct(ttft, 50):.0f} / {pct(ttft, 99):.0f} | "
                      f"{pct(tpot, 50):.1f} / {pct(tpot, 99):.1f} |", flush=True)


if __name__ == "__main__":
    main()
