"""Tokenization with the model's own tokenizer.json (or vocab.txt for WordPiece models), returning
plain token-id lists. Truncation and the length limit are handled here, so everything after this
point sees valid inputs only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputTooLongError, InvalidInputError, ModelLoadError
from .loader import read_json


@dataclass
class Encoded:
    ids: list[int]
    type_ids: list[int]


def token_ids(model_dir: Path, tokens: list[str]) -> list[int]:
    """The vocabulary ids of whole tokens, spelled as the tokenizer stores them (Qwen's "yes", GPT-2's
    "\u0120yes" for " yes")."""
    tok = TextTokenizer._load(model_dir)
    ids = [tok.token_to_id(t) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None]
    if missing:
        raise InvalidInputError(f"not in this model's vocabulary: {', '.join(map(repr, missing))}")
    return ids


class TextTokenizer:
    def __init__(self, model_dir: Path, max_tokens: int, vocab_size: int, lowercase: bool = False):
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.lowercase = lowercase       # sentence-transformers' do_lower_case: texts lowercased first
        # Batching and length policy are ours: the file's own padding/truncation settings would pad
        # every text to a fixed length, which is exactly the waste this runtime exists to avoid.
        # Two instances, because truncation is tokenizer state and encode() may run on many threads.
        self._tok = self._load(model_dir)
        self._tok.no_truncation()
        self._truncating = self._load(model_dir)
        self._truncating.enable_truncation(max_tokens)
        # the special tokens appended after every input (BERT's [SEP]; none for Qwen's)
        mask = self._tok.encode("a").special_tokens_mask
        self._trailing_specials = len(mask) - 1 - max(i for i, special in enumerate(mask) if not special)

    @staticmethod
    def _load(model_dir: Path):
        from tokenizers import Tokenizer
        if (model_dir / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            except Exception as exc:          # the tokenizers library raises a bare Exception
                raise ModelLoadError(f"cannot read {model_dir / 'tokenizer.json'}: {exc}") from None
        elif (model_dir / "vocab.txt").is_file():
            from tokenizers import BertWordPieceTokenizer
            cfg_file = model_dir / "tokenizer_config.json"
            cfg = read_json(cfg_file) if cfg_file.is_file() else {}
            tok = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=cfg.get("do_lower_case", True),
                                         strip_accents=cfg.get("strip_accents"),
                                         handle_chinese_chars=cfg.get("tokenize_chinese_chars", True))
        else:
            raise ModelLoadError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
        tok.no_padding()
        return tok

    def encode(self, texts: list, pairs: list | None = None, truncate: bool = False,
               keep_last: list[int] | None = None) -> list[Encoded]:
        """Encode strings (or token-id lists, taken as complete model inputs) to token ids; with
        `pairs`, text i is encoded with pairs[i] as its second segment (None: text i alone). keep_last:
        per string, tokens at its end that truncation keeps (it cuts before them: a template's tail)."""
        out: list[Encoded | None] = [None] * len(texts)
        str_idx = []
        for i, item in enumerate(texts):
            if isinstance(item, str):
                str_idx.append(i)
            elif isinstance(item, (list, tuple)) and pairs is None:
                out[i] = Encoded(self._check_ids(item, i, truncate), [0] * min(len(item), self.max_tokens))
            else:
                raise InvalidInputError(
                    f"input {i} is a {type(item).__name__}; expected a string or a list of token ids")
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidInputError("texts and pairs differ in length")
        for i in str_idx:
            if not texts[i] and pairs is None:
                raise InvalidInputError(f"input {i} is an empty string")
        if str_idx:
            low = str.lower if self.lowercase else (lambda t: t)
            batch = [low(texts[i]) if pairs is None or pairs[i] is None else (low(texts[i]), low(pairs[i]))
                     for i in str_idx]
            try:
                encodings = (self._truncating if truncate and not keep_last else self._tok).encode_batch(batch)
            except (TypeError, ValueError) as exc:    # e.g. a lone surrogate, which has no UTF-8
                raise InvalidInputError(f"an input cannot be tokenized: {exc}") from None
            for i, enc in zip(str_idx, encodings):
                if truncate and keep_last and len(enc.ids) > self.max_tokens:
                    k = keep_last[i]
                    if k >= self.max_tokens:
                        raise InputTooLongError(f"input {i}: the template's end alone has {k} tokens; this "
                                                f"model accepts at most {self.max_tokens}")
                    cut = self.max_tokens - k
                    out[i] = Encoded(enc.ids[:cut] + enc.ids[len(enc.ids) - k:],
                                     enc.type_ids[:cut] + enc.type_ids[len(enc.ids) - k:])
                    continue
                if len(enc.ids) > self.max_tokens:
                    raise InputTooLongError(
                        f"input {i} has {len(enc.ids)} tokens; this model accepts at most {self.max_tokens}"
                        " (truncation cuts it: truncate=True, --truncate, or the request's truncate)")
                out[i] = Encoded(list(enc.ids), list(enc.type_ids))
        return out

    def tail_count(self, text: str) -> int:
        """The tokens `text` makes at the end of an input: its own and the special tokens the tokenizer
        appends after every input (BERT's [SEP])."""
        return len(self._tok.encode(text, add_special_tokens=False).ids) + self._trailing_specials

    def _check_ids(self, ids, index: int, truncate: bool) -> list[int]:
        if not ids:
            raise InvalidInputError(f"input {index} is an empty token list")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidInputError(f"input {index}: token ids must be integers")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidInputError(f"input {index}: token ids must be in [0, {self.vocab_size})")
        if len(ids) > self.max_tokens:
            if not truncate:
                raise InputTooLongError(f"input {index} has {len(ids)} tokens; this model accepts at most "
                                        f"{self.max_tokens} (truncation cuts it: truncate=True, --truncate, "
                                        "or the request's truncate)")
            ids = ids[: self.max_tokens]
        return list(ids)

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenize_detailed(self, texts: list[str], add_special_tokens: bool = True) -> list[list[dict]]:
        """TEI /tokenize: per token its id, text (the input substring; the token for specials),
        whether it is special, and its character offsets."""
        out = []
        for text, enc in zip(texts, self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)):
            tokens = []
            for tid, tok, (start, stop), special in zip(enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask):
                tokens.append({"id": tid, "text": tok if special else text[start:stop], "special": bool(special),
                               "start": None if special else start, "stop": None if special else stop})
            out.append(tokens)
        return out
