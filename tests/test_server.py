"""The HTTP server against the official openai client and httpx: answers equal the Python API's,
every error has its status and its API's shape, overload gives 429 without harming accepted work."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import torch

from turboserve import Encoder
from turboserve.server import ServerConfig, make_app
from serving import running

TEXTS = ["hello world", "turboserve packs tokens without padding", "a", "The quick brown fox " * 20]


@pytest.fixture(scope="module")
def minilm():
    return Encoder.load()


@pytest.fixture(scope="module")
def url(minilm):
    with running(make_app(ServerConfig(max_client_batch_size=64), encoder=minilm)) as u:
        yield u


def test_openai_client_float_and_base64(url, minilm):
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    ref = minilm.embed(TEXTS)
    res = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    got = torch.tensor([d.embedding for d in sorted(res.data, key=lambda d: d.index)])
    assert torch.allclose(got, ref, atol=1e-6)
    assert res.usage.prompt_tokens == sum(len(e.ids) for e in minilm.tokenize(TEXTS))
    # the client asks for base64 by default when numpy is around; ask explicitly too
    raw = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, ref[1].numpy(), atol=1e-6)


def test_openai_token_ids_and_dimensions(url, minilm):
    ids = [e.ids for e in minilm.tokenize(TEXTS[:2])]
    r = httpx.post(url + "/v1/embeddings", json={"input": ids, "dimensions": 32}).json()
    ref = torch.nn.functional.normalize(minilm.embed(ids)[:, :32], dim=-1)
    got = torch.tensor([d["embedding"] for d in r["data"]])
    assert got.shape == (2, 32) and torch.allclose(got, ref, atol=1e-6)
    one = httpx.post(url + "/v1/embeddings", json={"input": ids[0]}).json()
    assert len(one["data"]) == 1


def test_tei_embed_and_headers(url, minilm):
    r = httpx.post(url + "/embed", json={"inputs": TEXTS, "normalize": False})
    assert r.status_code == 200
    assert torch.allclose(torch.tensor(r.json()), minilm.embed(TEXTS, normalize=False), atol=1e-5)
    for h in ("x-compute-time", "x-queue-time", "x-inference-time", "x-tokenization-time", "x-compute-tokens"):
        assert float(r.headers[h]) >= 0
    assert int(r.headers["x-compute-tokens"]) == sum(len(e.ids) for e in minilm.tokenize(TEXTS))
    single = httpx.post(url + "/embed", json={"inputs": "hello world"}).json()
    assert len(single) == 1 and abs(np.linalg.norm(single[0]) - 1) < 1e-5


def test_info_models_health_metrics_tokenize(url):
    assert httpx.get(url + "/health").status_code == 200
    info = httpx.get(url + "/info").json()
    assert info["max_input_length"] == 256 and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert httpx.get(url + "/v1/models").json()["data"][0]["object"] == "model"
    (toks,) = httpx.post(url + "/tokenize", json={"inputs": "Hello world"}).json()     # [[...]], as TEI
    assert [t["text"] for t in toks] == ["[CLS]", "Hello", "world", "[SEP]"]
    assert toks[1]["start"] == 0 and toks[1]["stop"] == 5 and toks[0]["special"]
    m = httpx.get(url + "/metrics").text
    for name in ("turboserve_requests_total", "turboserve_queue_requests", "turboserve_batch_tokens_bucket",
                 'turboserve_request_stage_seconds_bucket{le="0.001",stage="inference"}'):
        assert name in m


@pytest.mark.parametrize("route,body,status,needle", [
    ("/v1/embeddings", b"{not json", 400, "malformed JSON"),
    ("/embed", b"{not json", 400, "malformed JSON"),
    ("/v1/embeddings", {"input": 5}, 400, "must be a string"),
    ("/embed", {"inputs": {"a": 1}}, 422, "must be a string"),
    ("/v1/embeddings", {"input": []}, 400, "empty"),
    ("/embed", {"inputs": ""}, 400, "empty string"),
    ("/embed", {"inputs": ["x"] * 65}, 413, "at most 64"),            # TEI: batch size is 413 Validation
    ("/v1/embeddings", {"input": "word " * 600}, 400, "at most 256"),
    ("/embed", {"inputs": "word " * 600}, 413, "at most 256"),        # and so is a too-long input
    ("/embed", {"inputs": [[1, 2, 99999999]]}, 422, "token ids must be in"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("/embed", {"inputs": "x", "dimensions": 1000}, 422, "dimensions"),
    ("/rerank", {"query": "q", "texts": ["a"]}, 424, "no classification head"),
    ("/similarity", {"inputs": "x"}, 422, "source_sentence"),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": []}}, 400, "non-empty list"),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["a", 3]}}, 422, "non-empty string"),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["a"] * 64}}, 413, "at most 63"),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["a"]}, "parameters": {"prompt_name": "q"}},
     422, "unknown prompt_name"),
    ("/v1/embeddings", ["a list"], 400, "JSON object"),
])
def test_errors_have_status_and_shape_and_do_not_harm_the_next_request(url, route, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + route, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()
    if route.startswith("/v1"):
        assert needle in err["error"]["message"] and err["error"]["code"] == status and err["error"]["type"]
    else:
        assert needle in err["error"] and err["error_type"]
    ok = httpx.post(url + "/embed", json={"inputs": ["still fine"]})
    assert ok.status_code == 200 and len(ok.json()[0]) == 384


def test_tei_similarity_is_the_cosine_of_the_embeddings(url, minilm):
    """/similarity (TEI's sentence-similarity task): each sentence's cosine to the source sentence,
    as the embeddings give it; `parameters.truncate` cuts a long input instead of refusing it."""
    source, sentences = "a cat sits on the mat", ["a cat is on the mat", "stock prices fell", "the mat"]
    r = httpx.post(url + "/similarity", json={"inputs": {"source_sentence": source, "sentences": sentences}})
    assert r.status_code == 200
    e = minilm.embed([source, *sentences])
    want = torch.nn.functional.cosine_similarity(e[1:], e[:1])
    assert torch.allclose(torch.tensor(r.json()), want, atol=1e-5)
    assert r.json()[0] > r.json()[1]
    long = {"source_sentence": source, "sentences": ["word " * 600]}
    assert httpx.post(url + "/similarity", json={"inputs": long}).status_code == 413
    assert httpx.post(url + "/similarity", json={"inputs": long, "parameters": {"truncate": True}}).status_code == 200


def test_oversized_body_is_413(url):
    r = httpx.post(url + "/embed", content=b'{"inputs": "' + b"a" * (3 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "PayloadTooLarge"


def test_truncate_flag(url, minilm):
    r = httpx.post(url + "/embed", json={"inputs": "word " * 600, "truncate": True})
    assert r.status_code == 200
    assert torch.allclose(torch.tensor(r.json()), minilm.embed(["word " * 600], truncate=True), atol=1e-5)


def test_overload_gives_429_and_every_accepted_answer_is_right(minilm):
    app = make_app(ServerConfig(max_queued_requests=3, max_queued_tokens=100000, policy="fifo"), encoder=minilm)
    texts = [f"request number {i} " + "word " * (i % 50) for i in range(40)]
    ref = minilm.embed(texts)

    async def fire(base):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))

    with running(app) as base:
        responses = asyncio.run(fire(base))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        for i, r in enumerate(responses):
            if r.status_code == 200:
                assert torch.allclose(torch.tensor(r.json()[0]), ref[i], atol=1e-5)
            else:
                assert r.json()["error_type"] == "Overloaded"
        assert httpx.get(base + "/health").status_code == 200


def test_embed_all_and_decode(url, minilm):
    """TEI /embed_all: each input's per-token last hidden states (mixed lengths in one request, the
    same as the Python API's); /decode: ids back to text, one list or several."""
    got = httpx.post(url + "/embed_all", json={"inputs": TEXTS}).json()
    ref = minilm.hidden_states(TEXTS)
    assert [len(g) for g in got] == [r.shape[0] for r in ref]
    for g, r in zip(got, ref):
        assert torch.allclose(torch.tensor(g), r, atol=1e-5)
    ids = [e.ids for e in minilm.tokenize(TEXTS[:2])]
    assert httpx.post(url + "/decode", json={"ids": ids[0]}).json() == [minilm.tokenizer.decode(ids[0])]
    texts = httpx.post(url + "/decode", json={"ids": ids, "skip_special_tokens": False}).json()
    assert texts[0].startswith("[CLS] hello world") and len(texts) == 2
    bad = httpx.post(url + "/decode", json={"ids": [1, 10**9]})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Tokenizer"


def test_overload_is_answered_before_tokenizing(minilm):
    """A full queue, or as many requests in the tokenizer as the queue holds: 429 at once, nothing
    tokenized (the tokenizer here raises if called)."""
    app = make_app(ServerConfig(max_queued_requests=2), encoder=minilm)
    with running(app) as base:
        state = app.state.turboserve
        real = state.encoder.tokenizer
        state.encoder.tokenizer = None                     # any tokenizing would fail with a 500
        try:
            state.tokenizing = 2
            r = httpx.post(base + "/embed", json={"inputs": "hello"})
            assert r.status_code == 429 and "tokenized" in r.json()["error"]
            state.tokenizing = 0
            state.engine.max_queued_requests = 0           # the queue itself is full
            r = httpx.post(base + "/v1/embeddings", json={"input": "hello"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        finally:
            state.encoder.tokenizer, state.engine.max_queued_requests, state.tokenizing = real, 2, 0
        assert httpx.post(base + "/embed", json={"inputs": "hello"}).status_code == 200


def test_many_inputs_in_one_request_are_split_across_batches(minilm):
    app = make_app(ServerConfig(max_batch_tokens=256, policy="dp"), encoder=minilm)
    texts = [f"sentence {i} " + "token " * (i % 40) for i in range(200)]
    with running(app) as base:
        r = httpx.post(base + "/embed", json={"inputs": texts}, timeout=120)
        assert r.status_code == 200
        assert torch.allclose(torch.tensor(r.json()), minilm.embed(texts), atol=1e-5)
        engine = app.state.turboserve.engine
        assert engine.batches_run > 1
        ran = engine.batches_run
        assert httpx.get(base + "/health").status_code == 200       # an idle engine answers a probe...
        assert engine.batches_run == ran                              # ...which the batch counts leave out


def test_deadline_gives_504(minilm):
    app = make_app(ServerConfig(request_timeout=1e-6, policy="fifo"), encoder=minilm)
    with running(app) as base:
        r = httpx.post(base + "/v1/embeddings", json={"input": ["x"] * 50})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_health_503_when_the_model_fails_to_load(tmp_path):
    app = make_app(ServerConfig(model=str(tmp_path / "missing")))
    with running(app) as base:
        for _ in range(100):
            r = httpx.get(base + "/health")
            if "does not exist" in r.text:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
        assert httpx.post(base + "/embed", json={"inputs": "x"}).status_code == 503


@pytest.fixture(scope="module")
def classifier_url(tmp_path_factory):
    from conftest import build_model
    ce = build_model("bert", tmp_path_factory.mktemp("ce"), head="cls", num_labels=1, seed=3)
    cls = build_model("bert", tmp_path_factory.mktemp("cls3"), head="cls", num_labels=3, seed=4)
    with running(make_app(ServerConfig(), encoder=Encoder.load(ce))) as u1, \
         running(make_app(ServerConfig(), encoder=Encoder.load(cls))) as u2:
        yield u1, Encoder.load(ce), u2, Encoder.load(cls)


def test_rerank_sorted_and_equal_to_api(classifier_url):
    url, enc, _, _ = classifier_url
    docs = ["cats sit on mats", "the stock market", "felines rest"]
    r = httpx.post(url + "/rerank", json={"query": "where do cats sit", "texts": docs, "return_text": True}).json()
    ref = enc.rerank("where do cats sit", docs)
    assert [x["index"] for x in r] == sorted(range(3), key=lambda i: -ref[i])
    for x in r:
        assert abs(x["score"] - ref[x["index"]]) < 1e-5 and x["text"] == docs[x["index"]]
    assert httpx.post(url + "/rerank", json={"query": "q", "texts": []}).status_code == 400


def test_cohere_format_rerank(classifier_url):
    """/v1/rerank and /v2/rerank (Cohere / Jina format): relevance scores equal Encoder.rerank's,
    sorted, cut to top_n, documents as strings or {"text"} objects and returned unless
    return_documents is false; bad requests are 400s in OpenAI's error shape, a model that is not a
    reranker a 424."""
    url, enc, cls_url, _ = classifier_url
    docs = ["cats sit on mats", "the stock market", "felines rest"]
    ref = enc.rerank("where do cats sit", docs)
    want = sorted(range(3), key=lambda i: -ref[i])
    for route in ("/v1/rerank", "/v2/rerank"):
        r = httpx.post(url + route, json={"model": "x", "query": "where do cats sit",
                                          "documents": [docs[0], {"text": docs[1]}, docs[2]], "top_n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == want[:2] and body["usage"]["total_tokens"] > 0
        for x in body["results"]:
            assert abs(x["relevance_score"] - ref[x["index"]]) < 1e-5 and x["document"]["text"] == docs[x["index"]]
    bare = httpx.post(url + "/v1/rerank", json={"query": "where do cats sit", "documents": docs,
                                                "return_documents": False}).json()["results"]
    assert [x["index"] for x in bare] == want and all("document" not in x for x in bare)
    for bad, needle in (({"documents": docs}, "query"), ({"query": "q", "documents": []}, "documents"),
                        ({"query": "q", "documents": [{"txt": "a"}]}, "document"),
                        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
                        ({"query": "q", "documents": ["a"] * (ServerConfig().max_client_batch_size + 1)}, "at most")):
        r = httpx.post(url + "/v1/rerank", json=bad)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert httpx.post(cls_url + "/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 424


def test_predict_single_pair_and_batch(classifier_url):
    _, _, url, enc = classifier_url
    one = httpx.post(url + "/predict", json={"inputs": "I like you."}).json()
    probs = torch.softmax(enc.classify(["I like you."])[0], -1)
    assert [x["label"] for x in one] == [enc.id2label[i] for i in probs.argsort(descending=True).tolist()]
    assert abs(sum(x["score"] for x in one) - 1) < 1e-5
    pair = httpx.post(url + "/predict", json={"inputs": ["first", "second"]}).json()
    ref = torch.softmax(enc.classify(["first"], ["second"])[0], -1)
    assert abs(pair[0]["score"] - ref.max().item()) < 1e-5
    batch = httpx.post(url + "/predict", json={"inputs": [["a"], ["b"]], "raw_scores": True}).json()
    assert len(batch) == 2 and len(batch[0]) == 3
    mixed = httpx.post(url + "/predict", json={"inputs": [["a"], ["b", "c"]], "raw_scores": True}).json()
    logits = [enc.classify(["a"])[0], enc.classify(["b"], ["c"])[0]]      # a text and a pair, as TEI takes
    for got, ref in zip(mixed, logits):
        assert max(x["score"] for x in got) == pytest.approx(ref.max().item(), abs=1e-5)
