"""SPLADE sparse embeddings: a masked-LM checkpoint's vocabulary weights against transformers' own
masked-LM logits and sentence-transformers' SparseEncoder, batched equal to alone, every precision
inside its bound, TEI's /embed_sparse, and clear refusals."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import ARCHS, build_model, random_sequences
from turboserve import Encoder, model as model_mod
from turboserve.errors import InvalidInputError, ModelLoadError
from turboserve.server import ServerConfig, make_app
from serving import running

LENGTHS = [5, 17, 90, 3, 40, 126, 1, 64]     # mixed, past a chunk of SPLADE_CHUNK_TOKENS together
HF_NAMES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
            "mpnet": "MPNet"}


@pytest.fixture(scope="module")
def mlm_dirs(tmp_path_factory):
    return {arch: build_model(arch, tmp_path_factory.mktemp(arch + "-mlm"), head="mlm") for arch in ARCHS}


def reference(model_dir, arch, seqs, strategy="max", activation="relu") -> torch.Tensor:
    """transformers' masked-LM logits of each sequence alone, through SPLADE's activation and pooling."""
    import transformers as tf
    hf = getattr(tf, HF_NAMES[arch] + "ForMaskedLM").from_pretrained(model_dir, attn_implementation="eager").eval()
    rows = []
    with torch.no_grad():
        for s in seqs:
            w = torch.log1p(torch.relu(hf(input_ids=torch.tensor([s])).logits[0]))
            if activation == "log1p_relu":
                w = torch.log1p(w)
            rows.append(w.max(0).values if strategy == "max" else w.sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_splade_matches_transformers(mlm_dirs, arch, monkeypatch):
    """Every architecture's masked-LM head (BERT's transform with the config's activation, RoBERTa's
    and MPNet's exact GELU, DistilBERT's; tied decoders), at mixed lengths in one
    batch; then with chunks of 16 rows, so sequences longer than a chunk and chunks of several
    sequences both run."""
    seqs = random_sequences(LENGTHS, low=1000)
    ref = reference(mlm_dirs[arch], arch, seqs)
    enc = Encoder.load(mlm_dirs[arch], pooling="splade")
    assert enc.dimension == 30522
    ours = enc.embed(seqs)
    assert 0.001 < (ref > 0).float().mean() < 0.5            # sparse, and not empty
    assert (ours - ref).abs().max() < 1e-5                    # measured 2e-7
    monkeypatch.setattr(model_mod, "SPLADE_CHUNK_TOKENS", 16)
    assert (enc.embed(seqs) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("strategy,activation", [("max", "relu"), ("sum", "log1p_relu")])
def test_sparse_encoder_directory_matches_sentence_transformers(mlm_dirs, tmp_path, strategy, activation):
    """A sentence-transformers SparseEncoder saved to disk (MLMTransformer + SpladePooling) is read as
    SPLADE pooling with its strategy and activation, and gives what its encode() gives."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    st = SparseEncoder(modules=[MLMTransformer(str(mlm_dirs["bert"])),
                                SpladePooling(pooling_strategy=strategy, activation_function=activation)])
    st.save(str(tmp_path))
    texts = ["hello world", "sparse retrieval expands a query with related terms " * 3, "a"]
    ref = st.encode(texts, convert_to_tensor=True).to_dense()
    enc = Encoder.load(tmp_path)
    assert (enc.pooling.mode, enc.pooling.splade_strategy, enc.pooling.splade_activation) == ("splade", strategy,
                                                                                            activation)
    assert (enc.embed(texts) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_embed_sparse_entries_and_batch_invariance(mlm_dirs):
    """embed_sparse: exactly the entries above 0 of the dense vector, in token-id order; each input
    batched with others gets what it gets alone."""
    enc = Encoder.load(mlm_dirs["bert"], pooling="splade")
    seqs = random_sequences(LENGTHS, low=1000, seed=1)
    dense = enc.embed(seqs)
    sparse = enc.embed_sparse(seqs)
    for row, entries in zip(dense, sparse):
        index = list(entries)
        assert index == sorted(index) and index == row.nonzero().squeeze(1).tolist()
        assert all(v > 0 for v in entries.values())
        assert torch.equal(torch.tensor(list(entries.values())), row[index])
    for s, row in zip(seqs, dense):
        assert (enc.embed([s])[0] - row).abs().max() < 1e-6


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.995), ("int8", 0.99)])
def test_low_precision_splade_within_bound(mlm_dirs, dtype, bound):
    """bf16 runs the head in bf16 too; int8 runs the trunk's linears in int8 and the head's decoder
    in whichever of its candidates was fastest here, each checked. Min cosine of the sparse vectors
    against fp32."""
    seqs = random_sequences(LENGTHS, low=1000, seed=2)
    ref = Encoder.load(mlm_dirs["bert"], pooling="splade").embed(seqs)
    enc = Encoder.load(mlm_dirs["bert"], pooling="splade", dtype=dtype)
    assert torch.nn.functional.cosine_similarity(enc.embed(seqs), ref).min() > bound
    if dtype == "int8":
        assert enc.model.mlm.fast_decoder_name in ("int8", "int8 native", "bf16")
        for name in ("int8", "int8 native", "bf16"):
            enc.model.set_mlm_head(name)
            assert torch.nn.functional.cosine_similarity(enc.embed(seqs), ref).min() > bound, name


def test_auto_precision_bounds_the_sparse_vectors_and_plans_the_head(mlm_dirs, tmp_path, monkeypatch):
    """dtype auto on a SPLADE model bounds the sparse vectors' cosine, with the masked-LM decoder as
    one more move: taken (in its fastest candidate inside the bound) where it is faster, kept in the
    plan file and applied again on the next load; a bound of 1.0 leaves it fp32. The head's timings
    are fixed here (bf16 fastest), so which move is open does not depend on this machine."""
    import shutil
    from turboserve.model import EncoderModel
    from turboserve.precision import PrecisionPlan
    model_dir = tmp_path / "m"
    shutil.copytree(mlm_dirs["bert"], model_dir)
    seqs = random_sequences(LENGTHS, low=1000, seed=3)
    ref = Encoder.load(model_dir, pooling="splade").embed(seqs)
    monkeypatch.setattr(EncoderModel, "mlm_head_timings",
                        lambda self: {"fp32": 4.0, "bf16": 1.0, "int8": 2.0, "int8 native": 3.0})
    # and the plan faster end to end than the whole model in bf16, which would replace it
    monkeypatch.setattr(Encoder, "_forward_seconds", lambda self, model, batches: 2.0 if model.dtype_name == "bf16"
                        else 1.0)
    enc = Encoder.load(model_dir, pooling="splade", dtype="auto", quality_bound=0.99)
    plan = enc.precision_plan
    assert plan.settings["pooling"] == "splade/max/relu"
    assert plan.head == "bf16" == enc.model.mlm.fast_decoder_name and "masked-LM head: bf16" in plan.summary()
    got = enc.embed(seqs)
    assert torch.nn.functional.cosine_similarity(got, ref).min() >= 0.99
    again = Encoder.load(model_dir, pooling="splade", dtype="auto", quality_bound=0.99)
    assert again.precision_plan.head == "bf16" and torch.equal(again.embed(seqs), got)
    exact = Encoder.load(model_dir, pooling="splade", dtype="auto", quality_bound=1.0)
    assert exact.precision_plan.head == "fp32" and exact.model.mlm.fast_decoder is None
    assert torch.equal(exact.embed(seqs), ref)
    with pytest.raises(ValueError, match="unknown precisions"):
        PrecisionPlan.from_json({**plan.to_json(), "head": "fp8"})


def test_splade_refusals(mlm_dirs, model_dirs, modernbert_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="masked-LM head"):
        Encoder.load(model_dirs["bert"], pooling="splade")          # a BertModel: no head
    with pytest.raises(ModelLoadError, match="masked-LM head"):
        Encoder.load(modernbert_dir, pooling="splade")
    with pytest.raises(InvalidInputError, match="SPLADE model"):
        Encoder.load(mlm_dirs["bert"]).embed_sparse(["x"])          # pooled by the mean: dense
    with pytest.raises(InvalidInputError, match="pooling must be one of"):
        Encoder.load(mlm_dirs["bert"], pooling="sparse")
    import shutil
    st = tmp_path / "st"
    shutil.copytree(mlm_dirs["bert"], st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.modules.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": "sentence_transformers.sparse_encoder.modules."
                                                                  "SpladePooling"}]))
    (st / "1_SpladePooling").mkdir()
    (st / "1_SpladePooling" / "config.json").write_text(json.dumps({"pooling_strategy": "mean"}))
    with pytest.raises(ModelLoadError, match="pooling_strategy 'mean'"):
        Encoder.load(st)


def test_tei_embed_sparse(mlm_dirs):
    """/embed_sparse answers TEI's shape ({index, value} lists) equal to embed_sparse, with the same
    input checks as /embed; a model that is not SPLADE answers 424."""
    enc = Encoder.load(mlm_dirs["bert"], pooling="splade")
    texts = ["hello world", "padding-free batches of mixed lengths", "a"]
    with running(make_app(ServerConfig(max_client_batch_size=8), encoder=enc)) as url:
        r = httpx.post(url + "/embed_sparse", json={"inputs": texts})
        assert r.status_code == 200
        want = enc.embed_sparse(texts)
        got = r.json()
        assert len(got) == 3 and all(list(w) == [e["index"] for e in g] for g, w in zip(got, want))
        assert all(abs(e["value"] - w[e["index"]]) < 1e-6 for g, w in zip(got, want) for e in g)
        one = httpx.post(url + "/embed_sparse", json={"inputs": "hello world"}).json()
        assert [e["index"] for e in one[0]] == [e["index"] for e in got[0]]
        assert httpx.post(url + "/embed_sparse", json={"inputs": []}).status_code in (400, 422)
        assert httpx.post(url + "/embed_sparse", json={"text": "x"}).status_code == 422
        assert httpx.post(url + "/embed_sparse", json={"inputs": ["x"] * 9}).status_code == 413
        dense = httpx.post(url + "/embed", json={"inputs": texts[:1], "normalize": False}).json()
        assert torch.allclose(torch.tensor(dense), enc.embed(texts[:1]), atol=1e-6)
    # the DP batch policy's cost table times batches with the head (its pooling failed on "splade")
    with running(make_app(ServerConfig(max_batch_tokens=256, policy="dp"), encoder=enc)) as url:
        r = httpx.post(url + "/embed_sparse", json={"inputs": texts})
        assert r.status_code == 200 and [[e["index"] for e in g] for g in r.json()] == [list(w) for w in want]
    with running(make_app(ServerConfig(), encoder=Encoder.load(mlm_dirs["bert"]))) as url:
        r = httpx.post(url + "/embed_sparse", json={"inputs": "x"})
        assert r.status_code == 424 and "SPLADE" in r.json()["error"]


def test_cli_embed_prints_sparse_vectors(mlm_dirs):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "turboserve", "embed", "--model", str(mlm_dirs["bert"]),
                          "--pooling", "splade"], input="hello world\nsparse\n", capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    want = Encoder.load(mlm_dirs["bert"], pooling="splade").embed_sparse(["hello world", "sparse"])
    for line, w in zip(out, want, strict=True):
        row = json.loads(line)["sparse_embedding"]
        assert row["indices"] == list(w) and max(abs(a - b) for a, b in zip(row["values"], w.values())) < 1e-5


def test_untied_decoder(tmp_path):
    """A checkpoint with its own decoder weight (tie_word_embeddings false) scores with that one."""
    model_dir = build_model("bert", tmp_path, head="mlm", tie_word_embeddings=False)
    seqs = random_sequences([7, 30], low=1000)
    got = Encoder.load(model_dir, pooling="splade").embed(seqs)
    assert (got - reference(model_dir, "bert", seqs)).abs().max() < 1e-5
