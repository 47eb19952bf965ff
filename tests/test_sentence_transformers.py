"""sentence-transformers' pipeline as saved by sentence-transformers itself: pooling modes (both its
`pooling_mode` string and the older boolean keys), Dense modules, Normalize, prompts, the input
length and lowercasing of sentence_bert_config.json, against SentenceTransformer.encode on tiny
random BERTs; and checkpoint variants that must load (legacy LayerNorm names) or be refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_model
from turboserve import Encoder
from turboserve.errors import InvalidInputError, ModelLoadError

TEXTS = ["a short one", "The quick brown fox jumps over the lazy dog " * 3, "x", "Mixed CASE Words here"]


def st_model(tmp_path, name, pooling="mean", dense=None, normalize=False, arch="bert", **st_kwargs):
    from sentence_transformers import SentenceTransformer
    try:                                           # sentence-transformers >= 6; models.* before
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    base = build_model(arch, tmp_path / (name + "-base"), seed=len(name))
    word = Transformer(str(base))
    width = word.auto_model.config.hidden_size
    mods = [word, Pooling(width, pooling_mode=pooling)]
    if dense:
        mods.append(Dense(width, dense, activation_function=torch.nn.Tanh()))
    if normalize:
        mods.append(Normalize())
    st = SentenceTransformer(modules=mods, device="cpu", **st_kwargs)
    st.save(str(tmp_path / name))
    return st, tmp_path / name


def cosines(st, enc, texts=TEXTS, **kw):
    ref = torch.tensor(st.encode(texts, **kw))
    ours = enc.embed(texts, prompt_name=kw.get("prompt_name"))
    assert ours.shape == ref.shape
    return torch.nn.functional.cosine_similarity(ours, ref).min().item(), (ours - ref).abs().max().item()


@pytest.mark.parametrize("mode", ["cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"])
def test_pooling_modes_as_sentence_transformers_saves_them(tmp_path, mode):
    st, d = st_model(tmp_path, mode, pooling=mode)
    assert "pooling_mode" in json.loads((d / "1_Pooling" / "config.json").read_text())
    cos, diff = cosines(st, Encoder.load(d))
    assert cos > 0.99999 and diff < 1e-4, (mode, cos, diff)


def test_all_mpnet_base_v2_layout(tmp_path):
    """sentence-transformers' all-mpnet-base-v2 layout: MPNet, mean pooling, Normalize."""
    st, d = st_model(tmp_path, "mpnet", normalize=True, arch="mpnet")
    cos, diff = cosines(st, Encoder.load(d))
    assert cos > 0.99999 and diff < 1e-5


def test_older_boolean_pooling_keys(tmp_path):
    st, d = st_model(tmp_path, "old", pooling="cls")
    cfg = d / "1_Pooling" / "config.json"
    dim = json.loads(cfg.read_text())["embedding_dimension"]
    cfg.write_text(json.dumps({"word_embedding_dimension": dim, "pooling_mode_cls_token": True,
                               "pooling_mode_mean_tokens": False}))
    assert Encoder.load(d).pooling.mode == "cls"
    assert cosines(st, Encoder.load(d))[0] > 0.99999


def test_dense_and_normalize_modules(tmp_path):
    st, d = st_model(tmp_path, "dense", dense=24, normalize=True)
    enc = Encoder.load(d)
    assert enc.dimension == 24
    cos, diff = cosines(st, enc)
    assert cos > 0.99999 and diff < 1e-5


def test_prompts_and_the_default_prompt(tmp_path):
    prompts = {"query": "query: ", "passage": "passage: "}
    st, d = st_model(tmp_path, "prompts", prompts=prompts, default_prompt_name="query")
    enc = Encoder.load(d)
    assert cosines(st, enc)[0] > 0.99999                               # the default prompt
    assert cosines(st, enc, prompt_name="passage")[0] > 0.99999
    with pytest.raises(InvalidInputError, match="unknown prompt_name"):
        enc.embed(["x"], prompt_name="nope")
    # per-token states get the prompt too, as /embed_all and sentence-transformers' token embeddings
    assert enc.hidden_states(["x"])[0].shape[0] == len(enc.tokenize(["query: x"])[0].ids)


def test_max_seq_length_and_lowercasing_of_sentence_bert_config(tmp_path):
    st, d = st_model(tmp_path, "limits")
    st.max_seq_length = 16
    st.save(str(d))
    cfg = d / "sentence_bert_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "do_lower_case": True}))
    st = type(st)(str(d), device="cpu")
    enc = Encoder.load(d)
    assert enc.tokenizer.max_tokens == 16
    with pytest.raises(InvalidInputError, match="at most 16"):
        enc.embed([TEXTS[1]])
    ref = torch.tensor(st.encode(TEXTS))                       # sentence-transformers truncates silently
    ours = enc.embed(TEXTS, truncate=True)
    assert torch.nn.functional.cosine_similarity(ours, ref).min().item() > 0.99999
    assert Encoder.load(d, max_input_length=64).tokenizer.max_tokens == 64    # raised by hand
    with pytest.raises(InvalidInputError, match="max_input_length"):
        Encoder.load(d, max_input_length=10**6)


def test_unsupported_modules_and_modes_are_refused(tmp_path):
    st, d = st_model(tmp_path, "refuse")
    modules = json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps(modules + [{"idx": 9, "name": "9", "path": "9_X",
                                                           "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(ModelLoadError, match="LayerNorm"):
        Encoder.load(d)
    (d / "modules.json").write_text(json.dumps(modules))
    cfg = d / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "pooling_mode": ["cls", "mean"]}))
    with pytest.raises(ModelLoadError, match="concatenated"):
        Encoder.load(d)
    with pytest.raises(InvalidInputError, match="pooling must be one of"):
        Encoder.load(d, pooling="mean_sqrt_len_tokens")


def test_legacy_layernorm_names_and_refused_position_types(tmp_path):
    d = build_model("bert", tmp_path / "legacy")
    ref = Encoder.load(d).hidden_states(TEXTS)
    state = load_file(str(d / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(d / "model.safetensors"))
    for o, r in zip(Encoder.load(d).hidden_states(TEXTS), ref):       # google-bert/bert-base-uncased's names
        assert torch.equal(o, r)
    cfg = d / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "position_embedding_type": "relative_key"}))
    with pytest.raises(ModelLoadError, match="position_embedding_type"):
        Encoder.load(d)


def test_token_classification_checkpoint_serves_hidden_states_and_one_type_models_refuse_pairs(tmp_path):
    import transformers
    d = build_model("bert", tmp_path / "tok", type_vocab_size=1)
    model = transformers.BertForTokenClassification.from_pretrained(d)
    model.save_pretrained(tmp_path / "tokcls")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / "tokcls" / f).write_bytes((d / f).read_bytes())
    enc = Encoder.load(tmp_path / "tokcls")
    assert enc.model.head is None
    for o, r in zip(enc.hidden_states(TEXTS), Encoder.load(d).hidden_states(TEXTS)):
        assert torch.allclose(o, r, atol=1e-6)
    with pytest.raises(InvalidInputError, match="1 token type"):
        enc.classify(["a"], ["b"])


def test_pooling_without_the_prompt_is_refused_when_the_model_has_prompts(tmp_path):
    st, d = st_model(tmp_path, "noprompt", prompts={"query": "query: "})
    cfg = d / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "include_prompt": False}))
    with pytest.raises(ModelLoadError, match="include_prompt"):
        Encoder.load(d)


def test_tokenize_route_applies_the_prompt_as_embed_does(tmp_path):
    """TEI's /tokenize shows the tokens /embed runs: the model's default prompt, or the named one,
    before the text (it tokenized the bare text); an unknown prompt_name is a 422."""
    import httpx
    from serving import running
    from turboserve.server import ServerConfig, make_app
    st, d = st_model(tmp_path, "tokprompts", prompts={"query": "query: ", "passage": "passage: "},
                     default_prompt_name="query")
    enc = Encoder.load(d)
    with running(make_app(ServerConfig(model=str(d)), encoder=enc)) as url:
        for body, text in (({}, "query: x y"), ({"prompt_name": "passage"}, "passage: x y")):
            (toks,) = httpx.post(url + "/tokenize", json={"inputs": "x y", **body}).json()
            assert [t["id"] for t in toks] == enc.tokenize([text])[0].ids
        r = httpx.post(url + "/tokenize", json={"inputs": "x", "prompt_name": "nope"})
        assert r.status_code == 422 and "unknown prompt_name" in r.text
