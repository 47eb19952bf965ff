"""Layer-wise mixed precision (precision.py): the plan meets its bound on held-out inputs, a bound of
1.0 keeps everything in fp32, the greedy takes every move a loose bound allows, plans round-trip."""
import json

import pytest
import torch

from turboserve import Encoder
from turboserve.encoder import cpu_has_native_bf16
from turboserve.errors import InvalidInputError
from turboserve.loader import default_model_path
from turboserve.precision import PrecisionPlan, find_plan
from turboserve.workloads import encoder_lengths, token_sequences, word_token_ids

from conftest import build_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOSERVE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    """A random BERT wide enough (hidden 256) that int8 GEMMs measurably beat fp32 ones."""
    return build_model("bert", tmp_path_factory.mktemp("wide-bert"), seed=3, hidden_size=256,
                       num_attention_heads=4, intermediate_size=1024)


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "river", "stone", "quiet", "market", "seven", "window", "garden", "signal", "orange",
             "travel", "winter", "paper", "bright", "engine", "silver", "forest", "number", "letter", "cloud"]
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(k),), generator=g))
            for k in torch.randint(1, 60, (n,), generator=g)]


def _min_cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double()).min().item()


@pytest.mark.parametrize("arch,bound", [("bert", 0.9995), ("qwen3", 0.999)])
def test_plan_meets_bound_on_held_out_inputs_and_is_reused(request, arch, bound):
    """The BERT family, and the pre-norm layers (a decoder trunk here; ModernBERT and EmbeddingGemma
    alike), whose four linears a layer are qkv, o, gate|up and down."""
    wide = request.getfixturevalue("wide_bert" if arch == "bert" else "wide_qwen3")
    fp32 = Encoder.load(wide)
    auto = Encoder.load(wide, dtype="auto", quality_bound=bound)
    plan = auto.precision_plan
    names = {"qkv", "o", "fc1", "fc2"} if arch == "bert" else {"qkv", "o", "up", "down"}
    assert {key.split(".")[1] for key in plan.layers} == names
    assert plan.measured["heldout_min_cosine"] >= bound
    # unseen inputs of mixed lengths (1 word to 59), not the planner's own
    texts = _texts(40, seed=11)
    assert _min_cos(auto.embed(texts), fp32.embed(texts)) >= bound - 2e-4
    # the plan file was written beside the model and the next load reads it instead of planning
    saved = find_plan(wide, bound, plan.settings)
    assert saved is not None and saved.layers == plan.layers
    # a plan is not reused for another bound (however close) or other settings it was not measured under
    assert find_plan(wide, bound + 1e-9, plan.settings) is None
    assert find_plan(wide, bound, {**plan.settings, "pooling": "cls"}) is None
    assert plan.settings["pooling"] == auto.pooling.mode
    assert plan.settings["max_input_length"] == auto.tokenizer.max_tokens
    again = Encoder.load(wide, dtype="auto", quality_bound=bound)
    assert again.precision_plan.layers == plan.layers
    assert torch.equal(again.embed(texts), auto.embed(texts))
    # batch invariance holds for a mixed model too (the trunk's one-row GEMMs round apart by ~1e-6);
    # where the plan has bf16 linears, up to bf16's rounding: oneDNN picks its bf16 kernels by row
    # count (with AMX, 65-79 rows of K = 768 rounded one bf16 ulp apart from 200), and later layers
    # carry a flipped ulp on (measured: 0.2% of the largest value, cosine 1 - 1e-6, where the bound
    # allows 1e-3)
    alone = torch.cat([auto.embed([t]) for t in texts[:6]])
    if "bf16" in plan.layers.values() or plan.whole == "bf16":
        assert _min_cos(alone, auto.embed(texts[:6])) >= 1 - 1e-5
    else:
        assert torch.allclose(alone, auto.embed(texts[:6]), atol=1e-6 if arch == "bert" else 1e-5)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the whole-model bf16 alternative needs native bf16")
def test_whole_model_bf16_replaces_the_plan_when_inside_the_bounds_and_faster(wide_bert, tmp_path, monkeypatch):
    """With AMX a bf16 model (bf16 activations, no casts around each linear) outran the 0.999 plan
    that per-linear timings made: the plan's alternative is the whole model in bf16, taken when it
    keeps both bounds and its forward passes are faster. The end-to-end timings are fixed here, each
    way round."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(wide_bert, d)
    texts = _texts(12, seed=8)
    monkeypatch.setattr(Encoder, "_forward_seconds",
                        lambda self, model, batches: 1.0 if model.dtype_name == "bf16" else 2.0)
    enc = Encoder.load(d, dtype="auto", quality_bound=0.999)
    plan = enc.precision_plan
    assert plan.whole == "bf16" and enc.dtype == "bf16" and plan.summary().startswith("the whole model in bf16")
    assert plan.measured["whole_bf16"]["heldout_min_cosine"] >= 0.999
    bf16 = Encoder.load(d, dtype="bf16").embed(texts)
    assert torch.equal(enc.embed(texts), bf16)
    again = Encoder.load(d, dtype="auto", quality_bound=0.999)            # the saved plan says bf16
    assert again.precision_plan.whole == "bf16" and torch.equal(again.embed(texts), bf16)
    monkeypatch.setattr(Encoder, "_forward_seconds",
                        lambda self, model, batches: 2.0 if model.dtype_name == "bf16" else 1.0)
    slower = Encoder.load(d, dtype="auto", quality_bound=0.999, replan=True)
    assert slower.precision_plan.whole is None and slower.dtype != "bf16"
    exact = Encoder.load(d, dtype="auto", quality_bound=1.0, replan=True)    # bf16 is not inside 1.0
    assert exact.precision_plan.whole is None and exact.dtype == "fp32"


def test_bound_one_keeps_everything_in_fp32(wide_bert):
    enc = Encoder.load(wide_bert, dtype="auto", quality_bound=1.0, replan=True)
    assert set(enc.precision_plan.layers.values()) == {"fp32"}
    assert enc.dtype == "fp32"
    texts = _texts(8, seed=2)
    assert torch.equal(enc.embed(texts), Encoder.load(wide_bert).embed(texts))


def test_loose_bound_takes_every_faster_precision(wide_bert):
    """With a bound nothing can break, the greedy must accept every move that the planner measured as
    faster: each linear ends in its fastest measured precision."""
    plan = Encoder.load(wide_bert, dtype="auto", quality_bound=0.01, replan=True).precision_plan
    for key, times in plan.measured["linear_ms_at_tokens"].items():
        fastest = min(times, key=times.get)
        if times[fastest] < times["fp32"]:
            assert plan.layers[key] == fastest, (key, times)
        else:
            assert plan.layers[key] == "fp32", (key, times)


def test_plan_file_round_trips_and_rejects_bad_files(tmp_path):
    plan = PrecisionPlan(0.999, {"0.qkv": "int8", "0.o": "fp32", "1.fc2": "bf16"}, 0.5, "abc",
                         {"heldout_min_cosine": 0.9993}, {"pooling": "mean", "calibration": None})
    path = tmp_path / "plan.json"
    plan.save(path)
    back = PrecisionPlan.load(path)
    assert back == plan
    data = json.loads(path.read_text())
    data["layers"]["0.o"] = "fp8"
    with pytest.raises(ValueError, match="fp8"):
        PrecisionPlan.from_json(data)
    with pytest.raises(ValueError, match="version"):
        PrecisionPlan.from_json(dict(data, version=99))


def test_bad_bound_and_calibration_file(wide_bert, tmp_path):
    with pytest.raises(InvalidInputError, match="quality_bound"):
        Encoder.load(wide_bert, dtype="auto", quality_bound=1.5)
    short = tmp_path / "calib.txt"
    short.write_text("one\ntwo\n")
    with pytest.raises(InvalidInputError, match="at least 4"):
        Encoder.load(wide_bert, dtype="auto", calibration=short)
    with pytest.raises(InvalidInputError, match="cannot read"):
        Encoder.load(wide_bert, dtype="auto", calibration=tmp_path / "missing.txt")


def test_real_minilm_plan_meets_bound_on_public_workload(tmp_path):
    """all-MiniLM-L6-v2, planned on the user's calibration file, checked on the public `short`
    workload (unseen inputs): min cosine >= 0.999, with some linears in int8."""
    src = default_model_path()
    model = tmp_path / "minilm"
    model.mkdir()
    for f in src.iterdir():
        (model / f.name).symlink_to(f)          # the plan is written here, not into site-packages
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(_texts(48, seed=5)))
    fp32 = Encoder.load(model)
    auto = Encoder.load(model, dtype="auto", quality_bound=0.999, calibration=calib)
    assert "int8" in auto.precision_plan.layers.values()
    vocab = fp32.tokenizer._tok.get_vocab()
    seqs = token_sequences(encoder_lengths("short")[:128], word_token_ids(vocab), vocab["[CLS]"], vocab["[SEP]"])
    assert _min_cos(auto.embed(seqs), fp32.embed(seqs)) >= 0.999
    from turboserve.precision import plan_paths
    assert plan_paths(model, 0.999, auto.precision_plan.settings)[0].exists()     # saved beside the model


# ---------------------------------------------------------------------- pre-norm layers (decoder trunks)
@pytest.fixture(scope="module")
def wide_qwen3(tmp_path_factory):
    """A random Qwen3 trunk (hidden 256, GQA, q / k norms) served as an embedding model."""
    from conftest import build_decoder
    return build_decoder("qwen3", tmp_path_factory.mktemp("wide-qwen3"), seed=3, hidden_size=256,
                         intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def test_prenorm_mixed_plans_run_every_pairing_of_precisions(tmp_path):
    """A plan may put any precision next to any other (an int8 gate|up feeding a bf16 down, a bf16 one
    feeding int8 through the gated activation's quantizing pass, ...): nine layers give every pairing;
    the mixed model stays close to fp32 without being it, and an all-int8 plan is exactly dtype int8."""
    from conftest import build_decoder
    from turboserve.precision import save_plan
    d = build_decoder("qwen3", tmp_path / "q", num_hidden_layers=9)
    first = Encoder.load(d, dtype="auto", quality_bound=0.5).precision_plan
    kinds = ("fp32", "bf16", "int8")
    layers = {}
    for i in range(9):
        layers[f"{i}.up"], layers[f"{i}.down"] = kinds[i // 3], kinds[i % 3]
        layers[f"{i}.qkv"], layers[f"{i}.o"] = kinds[i % 3], kinds[(i + 1) % 3]

    def load_with(assignment):
        save_plan(PrecisionPlan(first.bound, assignment, first.alpha, first.fingerprint, {}, first.settings), d)
        enc = Encoder.load(d, dtype="auto", quality_bound=0.5)
        assert enc.precision_plan.layers == assignment
        return enc
    texts = _texts(12, seed=5)
    ref = Encoder.load(d).embed(texts)
    got = load_with(layers).embed(texts)
    assert _min_cos(got, ref) > 0.99 and not torch.allclose(got, ref, atol=1e-5)
    int8 = load_with({k: "int8" for k in layers}).embed(texts)
    assert torch.equal(int8, Encoder.load(d, dtype="int8").embed(texts))


@pytest.mark.parametrize("arch", ["minilm", "qwen3"])       # the random wide BERT's all-fastest plan is inside
def test_prefix_search_for_large_models_meets_bound(wide_qwen3, monkeypatch, tmp_path, arch):
    """Where the end-to-end search would take too long (forced here with a budget of 0 s), moves are
    ordered by each linear's own output error, measured in one instrumented pass, and the plan is the
    longest prefix inside the bound (bisection): it still holds the bound on held-out and unseen
    inputs, in a few forward passes."""
    from turboserve import precision
    monkeypatch.setattr(precision, "SEARCH_BUDGET_S", 0.0)
    path, bound = (tmp_path / "minilm", 0.999) if arch == "minilm" else (wide_qwen3, 0.9995)
    if arch == "minilm":
        path.mkdir()
        for f in default_model_path().iterdir():
            (path / f.name).symlink_to(f)          # the plan is written here, not into site-packages
    auto = Encoder.load(path, dtype="auto", quality_bound=bound, replan=True)
    plan = auto.precision_plan
    assert plan.measured["search"].startswith("the first") and plan.measured["heldout_min_cosine"] >= bound
    assert set(plan.layers.values()) != {"fp32"}                   # it moved some
    texts = _texts(40, seed=13)
    assert _min_cos(auto.embed(texts), Encoder.load(path).embed(texts)) >= bound - 2e-4
