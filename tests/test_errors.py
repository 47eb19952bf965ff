"""Every bad input gets a clear one-line error of the right class, and the model keeps working."""
import json
import shutil
import subprocess
import sys

import pytest

from turboserve import (Encoder, InputTooLongError, InvalidInputError, ModelLoadError,
                        UnsupportedArchitectureError)


@pytest.fixture(scope="module")
def enc(model_dirs):
    return Encoder.load(model_dirs["bert"])


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        Encoder.load(tmp_path)


def test_unreadable_weights(tmp_path, model_dirs):
    d = tmp_path / "broken"
    shutil.copytree(model_dirs["bert"], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        Encoder.load(d)


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        Encoder.load(tmp_path)
    msg = str(err.value)
    assert "'t5'" in msg and "bert" in msg and "distilbert" in msg and "xlm-roberta" in msg and "qwen3" in msg
    assert "\n" not in msg


def test_too_long_input_says_the_limit_and_truncates_when_asked(enc):
    text = "word " * 300
    with pytest.raises(InputTooLongError, match="at most 128"):
        enc.embed([text])
    with pytest.raises(InputTooLongError, match="at most 128"):
        enc.embed([[5] * 129])
    assert enc.embed([text], truncate=True).shape == (1, 64)
    assert enc.hidden_states([[5] * 200], truncate=True)[0].shape == (128, 64)


@pytest.mark.parametrize("bad,match", [
    ([], "empty"),
    ([""], "empty string"),
    ([3.5], "expected a string or a list of token ids"),
    (["ok", None], "input 1"),
    ([[1, "a"]], "integers"),
    ([[]], "empty token list"),
    ([[1, 99999999]], r"\[0, 30522\)"),
    ([[-1]], r"\[0, 30522\)"),
    (42, "must be a string or a list"),
])
def test_bad_inputs(enc, bad, match):
    with pytest.raises(InvalidInputError, match=match):
        enc.embed(bad)
    assert enc.embed(["still works"]).shape == (1, 64)


def test_rerank_bad_inputs(enc):
    with pytest.raises(InvalidInputError):
        enc.rerank("", ["doc"])
    with pytest.raises(InvalidInputError):
        enc.rerank("q", [])
    with pytest.raises(InvalidInputError):
        enc.rerank("q", ["ok", 3])


def test_classify_without_head(enc):
    with pytest.raises(ModelLoadError, match="no sequence-classification head"):
        enc.classify(["text"])


def test_cli_prints_one_line_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "turboserve", "embed", "--model", str(tmp_path / "missing")],
                       input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_unencodable_text_broken_config_and_bad_flags_are_clear_errors(tmp_path, capsys):
    from turboserve import Encoder, cli
    from turboserve.errors import InvalidInputError, ModelLoadError
    with pytest.raises(InvalidInputError, match="cannot be tokenized"):
        Encoder.load().embed(["\ud800"])                     # a lone surrogate has no UTF-8
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        Encoder.load(tmp_path)
    with pytest.raises(InvalidInputError, match="threads"):
        Encoder.load(threads=-1)
    for argv in (["serve", "--port", "99999"], ["embed", "--threads", "-1"], ["embed", "--max-input-length", "0"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "invalid" in capsys.readouterr().err


def test_cli_flags_read_turboserve_environment_variables(monkeypatch, capsys, tmp_path):
    """TURBOSERVE_<FLAG> for every flag: converted and checked as the flag is, switches by 1/0 or
    true/false (TURBOSERVE_NO_PIPELINE=1 is --no-pipeline), the command line first, a bad value a
    usage error naming the variable; another command's variables are not read."""
    from turboserve import cli
    seen = {}
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setenv("TURBOSERVE_NO_PIPELINE", "1")
    monkeypatch.setenv("TURBOSERVE_AUTO_TRUNCATE", "true")
    monkeypatch.setenv("TURBOSERVE_MAX_BATCH_TOKENS", "512")
    monkeypatch.setenv("TURBOSERVE_PORT", "9001")
    assert cli.main(["serve", "--port", "9002"]) == 0
    assert (seen["pipeline"], seen["auto_truncate"], seen["max_batch_tokens"], seen["port"]) == (False, True, 512, 9002)
    template = tmp_path / "t.txt"
    template.write_text("q: {query}\nd: {document}\n")
    monkeypatch.setenv("TURBOSERVE_CLASSIFIER_TOKENS", "no,yes")
    assert cli.main(["serve", "--pair-template", f"@{template}"]) == 0
    assert seen["classifier_tokens"] == ["no", "yes"] and seen["pair_template"] == "q: {query}\nd: {document}\n"
    monkeypatch.delenv("TURBOSERVE_CLASSIFIER_TOKENS")
    for name, value, needle in (("TURBOSERVE_BATCH_POLICY", "DP", "choose from"),
                                ("TURBOSERVE_PORT", "abc", "not a valid port_number"),
                                ("TURBOSERVE_ACCESS_LOG", "maybe", "expected one of"),
                                ("TURBOSERVE_CLASSIFIER_TOKENS", "no,", "comma-separated tokens"),
                                ("TURBOSERVE_PAIR_TEMPLATE", f"@{tmp_path / 'missing.txt'}", "cannot read the template")):
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit):
            cli.main(["serve"])
        err = capsys.readouterr().err
        assert name in err and needle in err, err
        monkeypatch.delenv(name)
    monkeypatch.setenv("TURBOSERVE_PORT", "abc")                # serve's variable: embed does not read it
    monkeypatch.setattr(cli, "cmd_embed", lambda args: 0)
    assert cli.main(["embed"]) == 0


def test_cli_embed_reads_crlf_and_refuses_non_utf8_lines(tmp_path):
    import subprocess
    import sys
    run = lambda data: subprocess.run([sys.executable, "-m", "turboserve", "embed"], input=data,   # noqa: E731
                                      capture_output=True, timeout=300)
    ok = run(b"hello\r\nworld\r\n")
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["hello", "world"] and len(rows[0]["embedding"]) == 384
    bad = run(b"ok\n\xff\xfe bad\n")
    assert bad.returncode == 2 and b"line 2 of the input is not UTF-8" in bad.stderr and b"Traceback" not in bad.stderr


@pytest.mark.parametrize("arch,field,value,weight", [
    ("bert", "intermediate_size", 96, "intermediate.dense.weight"),
    ("distilbert", "hidden_dim", 96, "ffn.lin1.weight"),
    ("roberta", "vocab_size", 1000, "word_embeddings.weight"),
    ("gpt2", "n_inner", 96, "mlp.c_fc.weight"),
    ("llama", "num_key_value_heads", 4, "self_attn.k_proj.weight"),
    ("qwen2", "head_dim", 8, "self_attn.q_proj.weight"),
])
def test_weights_that_disagree_with_config_fail_at_load(tmp_path, model_dirs, decoder_dirs, arch, field, value, weight):
    """A checkpoint whose weights do not have the shapes its config.json implies is refused at load,
    naming the weight and both shapes (before, it loaded and failed inside the first request)."""
    from turboserve.llm import LLM
    d = tmp_path / arch
    shutil.copytree({**model_dirs, **decoder_dirs}[arch], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ModelLoadError, match=f"{weight}' is .* but config.json implies"):
        (LLM if arch in decoder_dirs else Encoder).load(d)


def test_batch_budget_that_cannot_fit_in_memory_is_refused_at_load(model_dirs):
    """max_batch_tokens whose planned activations exceed the memory available is an error at load that
    gives both figures (it was accepted, and a large batch would have been killed); 0 is refused too."""
    with pytest.raises(InvalidInputError, match=r"max_batch_tokens 1000000000 needs .* GiB of activations, but .* "
                                                r"GiB of memory is available"):
        Encoder.load(model_dirs["bert"], max_batch_tokens=10**9)
    with pytest.raises(InvalidInputError, match="positive integer"):
        Encoder.load(model_dirs["bert"], max_batch_tokens=0)
    assert Encoder.load(model_dirs["bert"], max_batch_tokens=8192).embed(["fits"]).shape == (1, 64)
