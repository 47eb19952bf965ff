"""The `turboserve` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import TurboServeError


def _env(name: str, default=None):
    return os.environ.get(f"TURBOSERVE_{name}", default)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_env("MODEL"), help="Hugging Face model directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--dtype", default=_env("DTYPE", "fp32"), choices=["fp32", "bf16", "int8"])
    p.add_argument("--threads", type=int, default=int(_env("THREADS", 0)) or None, help="torch threads (default: all available cores)")


def cmd_embed(args) -> int:
    from .encoder import Encoder
    enc = Encoder.load(args.model, dtype=args.dtype, threads=args.threads)
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise TurboServeError("no input: give one text per line on standard input")
    vectors = enc.embed(texts, truncate=args.truncate)
    out = sys.stdout
    for text, vec in zip(texts, vectors.tolist()):
        out.write(json.dumps({"text": text, "embedding": [round(v, 6) for v in vec]}) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboserve", description="Fast padding-free transformer inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="read texts (one per line) from stdin, print JSON-lines embeddings")
    add_model_args(p)
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's limit")
    p.set_defaults(func=cmd_embed)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TurboServeError as exc:
        print(f"turboserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
