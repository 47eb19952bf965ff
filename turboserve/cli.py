"""The `turboserve` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import TurboServeError
from .loader import POOLING_MODES


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def port_number(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)              # argparse: "invalid port_number value"
    return port


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def token_list(text: str) -> list[str]:
    tokens = text.split(",")
    if not all(tokens):
        raise argparse.ArgumentTypeError(f"expected comma-separated tokens, not {text!r}")
    return tokens


def template_text(text: str) -> str:
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read the template file {text[1:]!r}: {exc}") from None


def env_name(action: argparse.Action) -> str:
    """--max-batch-tokens -> TURBOSERVE_MAX_BATCH_TOKENS, --no-pipeline -> TURBOSERVE_NO_PIPELINE."""
    return "TURBOSERVE_" + max(action.option_strings, key=len).lstrip("-").replace("-", "_").upper()


def apply_env(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Defaults from TURBOSERVE_<FLAG> for every flag not given on the command line, converted and
    checked as the flag itself would be (a bad value is a usage error naming the variable). Switches
    take 1/0, true/false, yes/no, on/off: TURBOSERVE_NO_PIPELINE=1 is --no-pipeline."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings):
            continue                                         # the command line wins
        name = env_name(action)
        raw = os.environ.get(name)
        if raw is None:
            continue
        if action.nargs == 0:                                # store_true / store_false
            if raw.lower() not in _TRUE + _FALSE:
                parser.error(f"{name}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)}")
            value = action.const if raw.lower() in _TRUE else action.default
        else:
            try:
                value = action.type(raw) if action.type else raw
            except argparse.ArgumentTypeError as exc:        # the type's own message
                parser.error(f"{name}={raw!r}: {exc}")
            except ValueError:
                parser.error(f"{name}={raw!r}: not a valid {action.type.__name__}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        parser.set_defaults(**{action.dest: value})


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8", "auto"],
                   help="auto: per layer, the fastest precision that keeps --quality-bound (docs/precision.md)")
    p.add_argument("--quality-bound", type=float, default=0.999,
                   help="with --dtype auto: minimum cosine of pooled embeddings against fp32")
    p.add_argument("--calibration", default=None,
                   help="with --dtype auto: a text file, one calibration input per line (default: built-in)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all available cores)")
    p.add_argument("--max-input-length", type=positive_int, default=None,
                   help="encoders: tokens per input (default: the sentence-transformers config's max_seq_length, "
                        "else the model's positions)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda for the Triton GPU backend (docs/gpu.md)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="shard the model over N ranks (spawned here, or started by torchrun); each gets threads / N")
    p.add_argument("--classifier-tokens", type=token_list, default=None, metavar="NO,YES",
                   help="a causal LM as classifier / reranker from its logits of these tokens (Qwen3-Reranker: no,yes)")
    p.add_argument("--pooling", default=None, choices=POOLING_MODES,
                   help="encoders: pool by this mode instead of the model's sentence-transformers config (default "
                        "mean); splade: a masked-LM checkpoint's sparse vocabulary weights (TEI's /embed_sparse)")
    p.add_argument("--pair-template", type=template_text, default=None, metavar="TEXT|@FILE",
                   help="one input from a text pair (rerank, /predict pairs): a format string with {query} and "
                        "{document}, or @FILE holding one (docs/architecture.md)")


def cmd_embed(args) -> int:
    from .encoder import Encoder
    enc = Encoder.load(args.model, dtype=args.dtype, threads=args.threads, quality_bound=args.quality_bound,
                       calibration=args.calibration, tensor_parallel=args.tensor_parallel, device=args.device,
                       max_input_length=args.max_input_length, classifier_tokens=args.classifier_tokens,
                       pair_template=args.pair_template, pooling=args.pooling)
    sparse = enc.pooling.mode == "splade"
    try:
        texts = []
        for number, raw in enumerate(sys.stdin.buffer, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")        # CRLF input too
            except UnicodeDecodeError as exc:
                raise TurboServeError(f"line {number} of the input is not UTF-8 ({exc.reason})") from None
            if line.strip():
                texts.append(line)
        if not texts:
            raise TurboServeError("no input: give one text per line on standard input")
        vectors = (enc.embed_sparse if sparse else enc.embed)(texts, truncate=args.truncate)
    finally:
        enc.close()
    out = sys.stdout
    try:
        for text, vec in zip(texts, vectors if sparse else vectors.tolist()):
            row = ({"indices": list(vec), "values": [round(v, 6) for v in vec.values()]} if sparse
                   else [round(v, 6) for v in vec])
            out.write(json.dumps({"text": text, "sparse_embedding" if sparse else "embedding": row}) + "\n")
        out.flush()
    except BrokenPipeError:             # `turboserve embed | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_serve(args) -> int:
    from .server import ServerConfig, serve
    return serve(ServerConfig(
        model=args.model, dtype=args.dtype, quality_bound=args.quality_bound, calibration=args.calibration,
        host=args.host, port=args.port, threads=args.threads,
        max_batch_tokens=args.max_batch_tokens, max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens, request_timeout=args.request_timeout,
        max_client_batch_size=args.max_client_batch_size, policy=args.batch_policy,
        lazy_timeout=args.lazy_timeout_ms / 1000.0, auto_truncate=args.auto_truncate,
        served_name=args.served_model_name, access_log=args.access_log, pipeline=args.pipeline,
        tensor_parallel=args.tensor_parallel, kv_dtype=args.kv_dtype, device=args.device,
        cuda_graphs=args.cuda_graphs, max_input_length=args.max_input_length, task=args.task,
        classifier_tokens=args.classifier_tokens, pair_template=args.pair_template, pooling=args.pooling))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboserve", description="Fast padding-free transformer inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="read texts (one per line) from stdin, print JSON-lines embeddings")
    add_model_args(p)
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's limit")
    p.set_defaults(func=cmd_embed, parser=p)

    s = sub.add_parser("serve", help="HTTP server: encoders OpenAI /v1/embeddings and TEI /embed /embed_sparse "
                            "/similarity /embed_all /rerank /predict "
                            "/tokenize /decode; decoders OpenAI /v1/completions /v1/chat/completions",
                       description="Every flag also reads TURBOSERVE_<FLAG> (e.g. TURBOSERVE_PORT=9000).")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--task", default="auto", choices=["auto", "embed", "generate"],
                   help="decoder models: generate (completions, chat) or embed (the embedding routes, pooled by the "
                        "model's sentence-transformers config, else its last token); auto: embed when the "
                        "directory has sentence-transformers' modules.json")
    s.add_argument("--kv-dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="decoder models: the KV cache's element type (default: the model's dtype)")
    s.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="token budget of one model batch")
    s.add_argument("--max-queued-requests", type=int, default=512,
                   help="requests queued or running before new ones get 429")
    s.add_argument("--max-queued-tokens", type=int, default=262144,
                   help="tokens queued or running before new requests get 429")
    s.add_argument("--max-client-batch-size", type=int, default=1024,
                   help="inputs accepted in one request (split across batches by the scheduler)")
    s.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds before a queued request is answered 504 (decoders: until its first token)")
    s.add_argument("--batch-policy", choices=["dp", "fifo"], default="fifo",
                   help="fifo (default): token-budget batches in arrival order; dp: TurboTransformers' DP over a "
                        "cost table measured at start-up (measured no better here: docs/benchmarks.md)")
    s.add_argument("--lazy-timeout-ms", type=float, default=0.0,
                   help="0: hungry (batch as soon as the model is idle); >0: wait up to this for a fuller batch")
    s.add_argument("--auto-truncate", action="store_true",
                   help="truncate over-long inputs instead of refusing them")
    s.add_argument("--served-model-name", default=None,
                   help="model name reported by the API (default: the model directory's name)")
    s.add_argument("--access-log", action="store_true",
                   help="log one line per request (off by default: it costs event-loop time under load)")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decoders on --device cuda: run every decode step eagerly (debugging; what graphs save)")
    s.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="run packing, the model and answering on one thread (the pipeline's baseline)")
    s.set_defaults(func=cmd_serve, parser=s)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_env(args.parser, argv)             # the chosen command's flags only
    args = parser.parse_args(argv)
    try:
        if args.tensor_parallel != 1:
            from . import parallel
            if parallel.torchrun_rank():         # torchrun's ranks > 0 only run rank 0's steps
                return parallel.run_worker_from_env(args.threads)
        return args.func(args)
    except TurboServeError as exc:
        print(f"turboserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
