"""Decoder models as embedding models (prenorm_encoder.py): every decoder architecture's pooled states
against transformers' own forward at mixed lengths (across cache blocks and Mistral's window), batch
invariance, a Qwen3-Embedding-style sentence-transformers directory against SentenceTransformer.encode,
the low precisions' bounds, the server's routes for such a model and the refusals."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
import transformers

from conftest import DECODER_ARCHS, build_decoder, copy_minilm_tokenizer, random_sequences, rel_err
from serving import running
from turboserve import Encoder
from turboserve.errors import InputTooLongError, InvalidInputError
from turboserve.server import ServerConfig, make_app, serves_generation

# 16 and 17 sit on both sides of a cache block; 40 and 100 are past Mistral's window of 24
LENGTHS = [1, 7, 16, 17, 40, 100, 3]


def hf_pooled(path, seqs, mode: str) -> torch.Tensor:
    """transformers' base model (AutoModel: the decoder without its LM head), one sequence at a time."""
    model = transformers.AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            h = model(torch.tensor([s])).last_hidden_state[0]
            out.append(h[-1] if mode == "lasttoken" else h.mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_pooled_states_match_transformers(decoder_dirs, arch):
    """A plain decoder directory pools its last token by default; mean pooling on request."""
    seqs = random_sequences(LENGTHS, seed=21)
    enc = Encoder.load(decoder_dirs[arch], max_batch_tokens=96)      # a few batches, by length
    assert enc.pooling.mode == "lasttoken" and not enc.pooling.normalize
    assert rel_err(enc.embed(seqs), hf_pooled(decoder_dirs[arch], seqs, "lasttoken")) < 1e-4
    mean = Encoder.load(decoder_dirs[arch], pooling="mean")
    assert rel_err(mean.embed(seqs), hf_pooled(decoder_dirs[arch], seqs, "mean")) < 1e-4


def test_batch_invariance_and_per_token_states(decoder_dirs):
    """A sequence's result alone equals its result in a batch of mixed lengths, within the rounding of
    MKL's one-row GEMM path (a lone 1-token input is a 1-row GEMM: 1.3e-6 measured; anything that let
    sequences see each other would move results by far more)."""
    enc = Encoder.load(decoder_dirs["qwen3"])
    seqs = random_sequences([50, 3, 128, 50, 17, 99, 1, 64], seed=4)
    batched = enc.embed(seqs)
    for i, s in enumerate(seqs):
        assert torch.allclose(enc.embed([s])[0], batched[i], rtol=0, atol=1e-5), i
    states = enc.hidden_states(seqs[:3])
    assert [tuple(h.shape) for h in states] == [(50, 64), (3, 64), (128, 64)]
    assert torch.allclose(states[1][-1], batched[1], rtol=0, atol=1e-6)


def embedding_dir(tmp_path, arch="qwen3"):
    """A sentence-transformers directory laid out as Qwen3-Embedding's: last-token pooling,
    Normalize, and an instruction prompt for queries."""
    d = build_decoder(arch, tmp_path / f"{arch}-embedding", seed=3)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode": "lasttoken"}))
    (d / "2_Normalize").mkdir()
    (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "Instruct: find the passage that answers the question\nQuery: ", "document": ""},
         "default_prompt_name": None}))
    return d


TEXTS = ["what is the capital of france?", "The quick brown fox jumps over the lazy dog " * 6, "x",
         "Mixed CASE words and numbers 12345"]


def test_qwen3_embedding_layout_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    d = embedding_dir(tmp_path)
    st = SentenceTransformer(str(d), device="cpu")
    enc = Encoder.load(d)
    assert enc.pooling.mode == "lasttoken" and enc.pooling.normalize and enc.dimension == 64
    for prompt in (None, "query"):
        ref = torch.tensor(st.encode(TEXTS, prompt_name=prompt))
        ours = enc.embed(TEXTS, prompt_name=prompt)
        assert rel_err(ours, ref) < 1e-4, prompt
    assert not torch.allclose(enc.embed(TEXTS[:1]), enc.embed(TEXTS[:1], prompt_name="query"), atol=1e-3)


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.999), ("int8", 0.99)])
def test_low_precision_within_bound(decoder_dirs, dtype, bound):
    """Minimum cosine of pooled states against fp32 (random weights; measured bf16 0.9998, int8 0.997)."""
    seqs = random_sequences(LENGTHS, seed=5)
    for arch in ("llama", "qwen3", "gemma3"):
        ref = Encoder.load(decoder_dirs[arch]).embed(seqs)
        got = Encoder.load(decoder_dirs[arch], dtype=dtype).embed(seqs)
        assert torch.nn.functional.cosine_similarity(got, ref).min() > bound, arch


def test_scratch_cache_is_one_layer_grown_to_the_largest_batch(decoder_dirs):
    enc = Encoder.load(decoder_dirs["llama"])
    model = enc.model
    enc.embed(random_sequences([5, 20], seed=1))
    assert model._cache_blocks == 1 + 2                  # a block per 16 tokens, each sequence from a block's start
    enc.embed(random_sequences([3], seed=2))
    assert model._cache_blocks == 3                      # kept, not shrunk
    # the worst case it reports: every sequence one token, a block each; one sequence: a block per 16 tokens
    assert model.activation_bytes(64) > model._cache_bytes(64)
    assert model.activation_bytes(64) - model.activation_bytes(64, sequences=1) == model._cache_bytes(64 - 5)


def test_an_input_limit_past_the_batch_budget_must_fit_in_memory_too(decoder_dirs, monkeypatch):
    """An input longer than max_batch_tokens runs as a batch of its own: the load-time memory check
    takes the larger of the two and names the one to lower."""
    import turboserve.encoder as encoder_mod
    model = Encoder.load(decoder_dirs["llama"]).model
    free = (model.activation_bytes(64) + model.activation_bytes(256, sequences=1)) // 2
    monkeypatch.setattr(encoder_mod, "available_memory", lambda device: free)
    with pytest.raises(InvalidInputError, match=r"max_input_length 256 needs .* GiB of activations, but .*lower "
                                                r"max_input_length"):
        Encoder.load(decoder_dirs["llama"], max_batch_tokens=64, max_input_length=256)
    assert Encoder.load(decoder_dirs["llama"], max_batch_tokens=64, max_input_length=64).embed(["fits"]).shape == (1, 64)


def test_refusals(decoder_dirs):
    enc = Encoder.load(decoder_dirs["llama"])
    with pytest.raises(Exception, match="classification head"):
        enc.classify(["a"])


def test_server_routes_and_which_server_a_model_gets(tmp_path, decoder_dirs, model_dirs):
    d = embedding_dir(tmp_path)
    assert not serves_generation(ServerConfig(model=str(d)))                  # modules.json: embeddings
    assert serves_generation(ServerConfig(model=str(d), task="generate"))
    assert serves_generation(ServerConfig(model=str(decoder_dirs["llama"])))
    assert not serves_generation(ServerConfig(model=str(decoder_dirs["llama"]), task="embed"))
    assert not serves_generation(ServerConfig(model=str(model_dirs["bert"])))
    with pytest.raises(InvalidInputError, match="needs a decoder"):
        serves_generation(ServerConfig(model=str(model_dirs["bert"]), task="generate"))
    with pytest.raises(InvalidInputError, match="task must be"):
        ServerConfig(task="rerank")

    enc = Encoder.load(d)
    with running(make_app(ServerConfig(model=str(d)), encoder=enc)) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": TEXTS})
        assert r.status_code == 200
        got = torch.tensor([row["embedding"] for row in r.json()["data"]])
        assert torch.allclose(got, enc.embed(TEXTS), atol=1e-5)
        r = httpx.post(url + "/embed", json={"inputs": TEXTS[0], "prompt_name": "query"})
        assert r.status_code == 200
        assert torch.allclose(torch.tensor(r.json()[0]), enc.embed(TEXTS[:1], prompt_name="query")[0], atol=1e-5)
        info = httpx.get(url + "/info").json()
        assert info["model_type"] == {"embedding": {"pooling": "lasttoken"}}
        r = httpx.post(url + "/predict", json={"inputs": "a"})
        assert r.status_code == 424


# ---------------------------------------------------------------------- decoders as classifiers / rerankers
RERANK_TEMPLATE = "[system] judge: yes or no\n[user] query: {query}\ndocument: {document}\n[assistant] answer:"
DOCS = ["paris is the capital of france", "a cat sat on the mat all afternoon long", "france"]


def seq_cls_dir(tmp_path, arch: str, num_labels: int):
    """A ...ForSequenceClassification checkpoint of a tiny decoder (Qwen3-Reranker-seq-cls' kind)."""
    from conftest import _decoder_configs
    cfg_cls, _, kwargs = _decoder_configs()[arch]
    torch.manual_seed(13)
    cls = {"qwen3": transformers.Qwen3ForSequenceClassification,
           "llama": transformers.LlamaForSequenceClassification}[arch]
    model = cls(cfg_cls(**kwargs, num_labels=num_labels, pad_token_id=0)).eval()
    d = tmp_path / f"{arch}-cls{num_labels}"
    model.save_pretrained(d)
    copy_minilm_tokenizer(d)
    return d


@pytest.mark.parametrize("arch,labels", [("qwen3", 3), ("llama", 1)])
def test_decoder_sequence_classification_matches_transformers(tmp_path, arch, labels):
    """`score` over the last token's final state, against transformers' ...ForSequenceClassification
    one sequence at a time (mixed lengths, across cache blocks), batched equal to alone; one label
    reranks, with a pair template making each (query, document) one input."""
    d = seq_cls_dir(tmp_path, arch, labels)
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    seqs = random_sequences(LENGTHS, seed=31)
    with torch.no_grad():
        ref = torch.cat([ref_model(input_ids=torch.tensor([s])).logits for s in seqs])
    enc = Encoder.load(d, max_batch_tokens=96, pair_template=RERANK_TEMPLATE)
    assert enc.model.num_labels == labels
    got = enc.classify(seqs)
    assert rel_err(got, ref) < 1e-4
    for i, s in enumerate(seqs):
        assert torch.allclose(enc.classify([s])[0], got[i], rtol=0, atol=1e-5), i
    if labels == 1:
        scores = enc.rerank("what is the capital of france?", DOCS)
        ids = [enc.tokenizer.encode([RERANK_TEMPLATE.format(query="what is the capital of france?", document=x)])[0].ids
               for x in DOCS]
        with torch.no_grad():
            want = [torch.sigmoid(ref_model(input_ids=torch.tensor([i])).logits[0, 0]).item() for i in ids]
        assert scores == pytest.approx(want, abs=1e-5)
    assert not serves_generation(ServerConfig(model=str(d)))
    with pytest.raises(InvalidInputError, match="needs a decoder"):
        serves_generation(ServerConfig(model=str(d), task="generate"))


def test_causal_lm_reranker_from_classifier_tokens(decoder_dirs):
    """Qwen3-Reranker's way: a causal LM answers "yes" or "no" after a chat prompt; the score is
    softmax(logits[no, yes])[yes] at the last position, here sigmoid of the head rows' difference.
    Against transformers' CausalLM logits; truncation keeps the template's tail (the prompt's end that
    the answer follows) and cuts the document; served on /rerank."""
    d = decoder_dirs["qwen3"]
    tokens = ["no", "yes"]
    enc = Encoder.load(d, classifier_tokens=tokens, pair_template=RERANK_TEMPLATE, max_input_length=40)
    assert enc.model.num_labels == 1
    no, yes = (enc.tokenizer._tok.token_to_id(t) for t in tokens)
    lm = transformers.AutoModelForCausalLM.from_pretrained(d).eval()

    def want(ids):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.softmax(logits[[no, yes]], 0)[1].item()
    query = "what is the capital of france?"
    texts = [RERANK_TEMPLATE.format(query=query, document=x) for x in DOCS]
    ids = [e.ids for e in enc.tokenizer.encode(texts)]
    assert enc.rerank(query, DOCS) == pytest.approx([want(i) for i in ids], abs=1e-5)
    # a document too long: refused unless truncated, which cuts it before the tail
    long_doc = " ".join(["paris"] * 60)
    with pytest.raises(Exception, match="tokens"):
        enc.rerank(query, [long_doc])
    full = enc.tokenizer._tok.encode(RERANK_TEMPLATE.format(query=query, document=long_doc)).ids
    # the template's tail and the tokenizer's closing [SEP] kept, the document cut before them
    tail = len(enc.tokenizer._tok.encode(RERANK_TEMPLATE.split("{document}")[1], add_special_tokens=False).ids) + 1
    cut = full[:40 - tail] + full[-tail:]
    assert enc.tokenize([query], [long_doc], truncate=True)[0].ids == cut
    # a text without a pair is truncated as without a template (its closing [SEP] kept)
    alone = enc.tokenize([long_doc, query], [None, DOCS[0]], truncate=True)[0].ids
    assert alone == enc.tokenizer.encode([long_doc], truncate=True)[0].ids and alone[-1] == 102
    assert enc.rerank(query, [long_doc], truncate=True) == pytest.approx([want(cut)], abs=1e-5)
    with running(make_app(ServerConfig(model=str(d)), encoder=enc)) as url:
        r = httpx.post(url + "/rerank", json={"query": query, "texts": DOCS, "raw_scores": False})
        assert r.status_code == 200
        assert {x["index"]: x["score"] for x in r.json()} == pytest.approx(dict(enumerate(enc.rerank(query, DOCS))))
    assert not serves_generation(ServerConfig(model=str(d), classifier_tokens=tokens))


def test_classifier_tokens_of_a_soft_capped_lm(decoder_dirs):
    """Gemma 2 caps its logits (tanh, 8 here): two classifier tokens give softmax of the two capped
    logits (not of the capped difference), three give the capped logits themselves; against
    transformers' CausalLM, mixed lengths, batched."""
    d = decoder_dirs["gemma2"]
    lm = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    seqs = random_sequences([3, 40, 17, 1], seed=8)
    with torch.no_grad():
        ref = torch.stack([lm(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs])
    tokens = ["no", "yes", "maybe"]
    enc = Encoder.load(d, classifier_tokens=tokens)
    ids = [enc.tokenizer._tok.token_to_id(t) for t in tokens]
    assert rel_err(enc.classify(seqs), ref[:, ids]) < 1e-5
    two = Encoder.load(d, classifier_tokens=tokens[:2]).classify(seqs)[:, 0]
    assert torch.allclose(torch.sigmoid(two), torch.softmax(ref[:, ids[:2]], 1)[:, 1], atol=1e-6)


def test_classifier_refusals(decoder_dirs, model_dirs):
    with pytest.raises(InvalidInputError, match="not in this model's vocabulary"):
        Encoder.load(decoder_dirs["qwen3"], classifier_tokens=["no", "not-a-token-here"])
    with pytest.raises(InvalidInputError, match="not a causal LM"):
        Encoder.load(model_dirs["bert"], classifier_tokens=["no", "yes"])
    for bad in ("no fields", "{query} only", "{query} {document} {other}", "{query} {document",
                "{query} {document}{query.foo}"):
        with pytest.raises(InvalidInputError, match="pair_template"):
            Encoder.load(decoder_dirs["qwen3"], pair_template=bad)
    for bad in ("yes", [], ["no", ""], ["no", 1]):       # a bare string is not a list of tokens
        with pytest.raises(InvalidInputError, match="classifier_tokens"):
            Encoder.load(decoder_dirs["qwen3"], classifier_tokens=bad)
    enc = Encoder.load(decoder_dirs["qwen3"], classifier_tokens=["no", "yes"], max_input_length=6,
                       pair_template="{query} {document} and then a tail longer than six tokens")
    with pytest.raises(InputTooLongError, match="template's end alone"):
        enc.rerank("a query", ["a document that is long enough to be cut"], truncate=True)


# ---------------------------------------------------------------------- ModernBERT
MB_LENGTHS = [1, 5, 8, 9, 17, 30, 100, 3]        # around and past the +-8 window of the sliding layers


def test_modernbert_hidden_states_match_transformers(modernbert_dir):
    seqs = random_sequences(MB_LENGTHS, seed=2)
    ref = transformers.AutoModel.from_pretrained(modernbert_dir, attn_implementation="eager").eval()
    enc = Encoder.load(modernbert_dir, max_batch_tokens=64)
    assert enc.pooling.mode == "mean" and enc.model.decoder.windows == [0, 9, 9, 0]
    with torch.no_grad():
        for s, ours in zip(seqs, enc.hidden_states(seqs)):
            assert rel_err(ours, ref(torch.tensor([s])).last_hidden_state[0]) < 1e-4, len(s)
    batched = enc.embed(seqs)
    for i, s in enumerate(seqs):
        assert torch.allclose(enc.embed([s])[0], batched[i], rtol=0, atol=1e-5), i


def test_modernbert_config_of_transformers_4_loads_the_same(tmp_path, modernbert_dir):
    """Checkpoints saved before transformers 5 carry global_rope_theta / local_rope_theta /
    global_attn_every_n_layers instead of rope_parameters and layer_types."""
    import shutil
    d = tmp_path / "mb4"
    shutil.copytree(modernbert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["layer_types"], cfg["rope_parameters"]
    cfg.update(global_rope_theta=160000.0, local_rope_theta=10000.0, global_attn_every_n_layers=3)
    (d / "config.json").write_text(json.dumps(cfg))
    seqs = random_sequences(MB_LENGTHS, seed=4)
    assert torch.equal(Encoder.load(d).embed(seqs), Encoder.load(modernbert_dir).embed(seqs))
    # local_rope_theta null: the sliding layers take the global base, as transformers reads it
    for local, same in ((None, True), (1000.0, False)):
        cfg.update(local_rope_theta=local)
        (d / "config.json").write_text(json.dumps(cfg))
        nulled = Encoder.load(d).embed(seqs)
        cfg.update(local_rope_theta=160000.0)
        (d / "config.json").write_text(json.dumps(cfg))
        assert torch.equal(nulled, Encoder.load(d).embed(seqs)) == same, local


def test_modernbert_sentence_transformers_layout_and_low_precision(tmp_path, modernbert_dir):
    """mean pooling + Normalize as sentence-transformers saves a ModernBERT embedder (gte-modernbert,
    modernbert-embed), against SentenceTransformer.encode; bf16 / int8 within their bounds."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    word = Transformer(str(modernbert_dir))
    st = SentenceTransformer(modules=[word, Pooling(64, pooling_mode="mean"), Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    enc = Encoder.load(tmp_path / "st")
    assert rel_err(enc.embed(TEXTS), torch.tensor(st.encode(TEXTS))) < 1e-4
    seqs = random_sequences(MB_LENGTHS, seed=5)
    ref = enc.embed(seqs)
    for dtype, bound in (("bf16", 0.999), ("int8", 0.99)):
        got = Encoder.load(tmp_path / "st", dtype=dtype).embed(seqs)
        assert torch.nn.functional.cosine_similarity(got, ref).min() > bound, dtype


def test_modernbert_is_served_for_embeddings_and_refused_for_generation(modernbert_dir):
    from turboserve import LLM
    from turboserve.errors import UnsupportedArchitectureError
    assert not serves_generation(ServerConfig(model=str(modernbert_dir)))
    with pytest.raises(InvalidInputError, match="needs a decoder"):
        serves_generation(ServerConfig(model=str(modernbert_dir), task="generate"))
    with pytest.raises(UnsupportedArchitectureError, match="is an encoder"):
        LLM.load(modernbert_dir)


@pytest.mark.parametrize("labels,pooling", [(1, "cls"), (3, "mean")])
def test_modernbert_classifier_and_reranker(tmp_path, labels, pooling):
    """ModernBertForSequenceClassification (gte-reranker-modernbert-base's kind): pooled state -> dense
    -> GELU -> LayerNorm -> classifier, against transformers' logits; one label serves /rerank."""
    from conftest import build_modernbert
    d = build_modernbert(tmp_path / "mbc", head=True, num_labels=labels, classifier_pooling=pooling, seed=7)
    seqs = random_sequences([3, 30, 9], seed=8)
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.no_grad():
        ref = torch.cat([ref_model(input_ids=torch.tensor([s])).logits for s in seqs])
    enc = Encoder.load(d)
    assert enc.model.num_labels == labels
    assert rel_err(enc.classify(seqs), ref) < 1e-4
    if labels == 1:
        scores = enc.rerank("what is the capital of france?", ["paris is the capital", "a cat sat"])
        pairs = enc.tokenize(["what is the capital of france?"] * 2, ["paris is the capital", "a cat sat"])
        with torch.no_grad():
            want = [torch.sigmoid(ref_model(input_ids=torch.tensor([p.ids])).logits[0, 0]).item() for p in pairs]
        assert scores == pytest.approx(want, abs=1e-5)
        with running(make_app(ServerConfig(model=str(d)), encoder=enc)) as url:
            r = httpx.post(url + "/rerank", json={"query": "what is the capital of france?",
                                                   "texts": ["paris is the capital", "a cat sat"]})
            assert r.status_code == 200 and len(r.json()) == 2
            assert httpx.get(url + "/info").json()["model_type"]["reranker"] is not None


# ---------------------------------------------------------------------- EmbeddingGemma
def embedding_gemma_dir(tmp_path, legacy_config: bool = False):
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma's layout): GQA, a query scalar of 24,
    two layers over +-4 tokens (sliding_window 8) and a global one; saved by sentence-transformers
    with mean pooling, two Dense modules and Normalize, as EmbeddingGemma is. legacy_config: the
    config keys transformers 4 wrote (rope_theta / rope_local_base_freq / rope_scaling,
    sliding_window_pattern) instead of rope_parameters and layer_types."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from conftest import _decoder_configs
    cfg_cls, _, kwargs = _decoder_configs()["gemma3"]
    torch.manual_seed(11)
    base = tmp_path / "gemma-base"
    model = transformers.Gemma3TextModel(cfg_cls(**kwargs, use_bidirectional_attention=True)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(base)
    copy_minilm_tokenizer(base)
    if legacy_config:
        cfg = json.loads((base / "config.json").read_text())
        for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
            cfg.pop(key, None)
        cfg.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                   sliding_window_pattern=3)
        (base / "config.json").write_text(json.dumps(cfg))
    word = Transformer(str(base))
    st = SentenceTransformer(modules=[word, Pooling(64, pooling_mode="mean"), Dense(64, 128, bias=False,
                             activation_function=torch.nn.Identity()), Dense(128, 64, bias=False,
                             activation_function=torch.nn.Identity()), Normalize()], device="cpu")
    st.save(str(tmp_path / "embeddinggemma"))
    return st, tmp_path / "embeddinggemma", base


@pytest.mark.parametrize("legacy_config", [False, True])
def test_embedding_gemma_matches_transformers_and_sentence_transformers(tmp_path, legacy_config):
    st, d, base = embedding_gemma_dir(tmp_path, legacy_config)
    enc = Encoder.load(d)
    assert enc.model.decoder.windows == [5, 5, 0] and enc.dimension == 64
    seqs = random_sequences([1, 4, 5, 9, 30, 60], seed=3)
    ref = transformers.AutoModel.from_pretrained(base, attn_implementation="eager").eval()
    with torch.no_grad():
        for s, ours in zip(seqs, enc.hidden_states(seqs)):
            assert rel_err(ours, ref(torch.tensor([s])).last_hidden_state[0]) < 1e-4, len(s)
    assert rel_err(enc.embed(TEXTS), torch.tensor(st.encode(TEXTS))) < 1e-4
    assert not serves_generation(ServerConfig(model=str(d)))
    from turboserve import LLM
    from turboserve.errors import UnsupportedArchitectureError
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional attention is an encoder"):
        LLM.load(base)
