"""The Python API for encoder models: embeddings, hidden states, classification and rerank."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .errors import InvalidInputError, ModelLoadError
from .arch import is_decoder, on_prenorm_layers, spec_for
from .loader import (POOLING_MODES, CheckpointView, PoolingConfig, read_config, read_pooling, read_sentence_config,
                     read_state_dict, resolve_model_dir)
from .model import EncoderModel, pool, sentence_embedding
from .packing import PackedBatch, pack_tokens
from .timing import best_seconds
from .tokenizer import Encoded, TextTokenizer, token_ids
from .workspace import available_memory

log = logging.getLogger("turboserve")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_pair_template(template: str) -> None:
    if not isinstance(template, str) or "{query}" not in template or "{document}" not in template:
        raise InvalidInputError("pair_template must be a string with {query} and {document} in it")
    try:
        template.split("{document}", 1)[1].format(query="")
        template.format(query="", document="")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise InvalidInputError(f"pair_template is not a format string of {{query}} and {{document}}: {exc!r}") from None


def _check_batch_fits(model, max_batch_tokens: int, max_input_length: int) -> None:
    """Refuse a batch budget whose activations cannot fit in memory, at load and with the figures
    (--max-batch-tokens 100000000 was accepted, and the first large batch would have been killed).
    An input longer than the budget runs as a batch of its own (decoder embedding models take
    inputs of 8k-32k tokens), so the largest batch is the larger of the two."""
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise InvalidInputError(f"max_batch_tokens must be a positive integer, not {max_batch_tokens!r}")
    free = available_memory(model.device)
    largest = ((max_batch_tokens, None, "max_batch_tokens"),     # worst case: every sequence one token
               (max_input_length, 1, "max_input_length"))        # one input longer than the budget
    for tokens, sequences, name in largest:
        need = model.activation_bytes(tokens, sequences)
        if free is not None and need > free:
            raise InvalidInputError(f"{name} {tokens} needs {need / 2**30:.1f} GiB of activations, "
                                    f"but {free / 2**30:.1f} GiB of memory is available: lower {name}")


def sparse_entries(vector: torch.Tensor) -> dict[int, float]:
    """A SPLADE vector's entries above 0, {token id: weight} in token-id order."""
    index = vector.nonzero().squeeze(1)
    return dict(zip(index.tolist(), vector[index].tolist()))


class Encoder:
    """A loaded encoder model. Thread-compatible: one forward runs at a time per Encoder."""

    def __init__(self, model: EncoderModel, tokenizer: TextTokenizer, pooling: PoolingConfig,
                 model_dir: Path, config: dict, max_batch_tokens: int):
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.model_dir, self.config = model_dir, config
        self.max_batch_tokens = max_batch_tokens
        self.precision_plan = None         # precision.PrecisionPlan when loaded with dtype="auto"
        self.id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        self.pair_template = None          # load(pair_template=...)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, dtype: str = "fp32", threads: int | None = None,
             device: str = "cpu", pooling: str | None = None, normalize: bool | None = None,
             use_planner: bool = True, max_batch_tokens: int = 4096,
             int8_keep: frozenset = frozenset(), int8_alpha: float = 0.5, quality_bound: float = 0.999,
             calibration: str | os.PathLike | None = None, replan: bool = False,
             tensor_parallel: int = 1, max_input_length: int | None = None,
             classifier_tokens: list[str] | None = None, pair_template: str | None = None) -> "Encoder":
        """Load a Hugging Face model directory (None: the bundled all-MiniLM-L6-v2): an encoder (BERT,
        RoBERTa, XLM-RoBERTa, DistilBERT, MPNet; ModernBERT and EmbeddingGemma on the pre-norm layers), or
        a decoder's trunk as an embedding model (GPT-2, LLaMA, Qwen2, Qwen3, Mistral, Gemma 2 / 3;
        prenorm_encoder.py; pooled by its sentence-transformers config, else the last token's state).

        dtype: "fp32", "bf16", "int8" (W8A8 with SmoothQuant, see quantize.py; `int8_keep` names the
        linears that stay fp32; the pre-norm layers' int8 is W8A8 without SmoothQuant) or "auto": per
        linear, the fastest precision that keeps the pooled embeddings' minimum cosine against fp32 at or
        above `quality_bound` (precision.py; for every architecture; int8_alpha only for the BERT family). The plan is
        read from a JSON file beside the model, or made (calibration: a text file, one input per line;
        default a built-in set) and saved there; `replan` makes it anew.
        threads: torch threads to use (default: the cores available).
        tensor_parallel: ranks to shard the model over (parallel.py; each rank gets threads / N); call
        close() to stop them.
        max_input_length: tokens an input may have; default the sentence-transformers config's
        max_seq_length where there is one (all-MiniLM-L6-v2: 256), else the model's positions (512).
        classifier_tokens: a causal LM as a classifier / reranker from its LM head's logits of these
        tokens at the last position (Qwen3-Reranker: ["no", "yes"]; two tokens give one logit, the
        second's minus the first's, so rerank's sigmoid is softmax([no, yes])[yes]). A causal model's
        ...ForSequenceClassification checkpoint needs none: its `score` head is loaded.
        pair_template: how a text pair (classify's pairs, rerank's query and documents) becomes one
        input, a format string with {query} and {document} (Qwen3-Reranker's chat prompt:
        docs/templates/qwen3-reranker.txt); truncation then cuts the tokens just before the template's
        tail (the document's end; the query too only if the document is gone).
        """
        if pooling is not None and pooling not in POOLING_MODES:
            raise InvalidInputError(f"pooling must be one of {', '.join(POOLING_MODES)}, not {pooling!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer, not {threads!r}")
        torch.set_num_threads(threads or available_cores())
        keep_freed_memory()
        model_dir = resolve_model_dir(path)
        config = read_config(model_dir)
        prenorm, causal = on_prenorm_layers(config), is_decoder(config)
        if dtype == "bf16" and not cpu_has_native_bf16():
            log.warning("this CPU has no native bf16 (avx512_bf16/AMX): bf16 GEMMs are emulated and "
                        "run several times slower than fp32; int8 is the fast option here")
        if pair_template is not None:
            _check_pair_template(pair_template)
        if classifier_tokens is not None and (not isinstance(classifier_tokens, (list, tuple)) or not classifier_tokens
                                              or not all(isinstance(t, str) and t for t in classifier_tokens)):
            raise InvalidInputError("classifier_tokens must be a list of token strings, such as [\"no\", \"yes\"]")
        if classifier_tokens and not causal:
            raise InvalidInputError("classifier_tokens read a causal LM's head; this model is not a causal LM")
        if dtype == "auto" and not 0.0 < quality_bound <= 1.0:
            raise InvalidInputError(f"quality_bound is a minimum cosine in (0, 1], not {quality_bound}")
        if prenorm:
            from .prenorm_encoder import PreNormEncoderModel
            tokens = token_ids(model_dir, classifier_tokens) if classifier_tokens else None

            def build(base):
                return PreNormEncoderModel(model_dir, base, device, tokens)
            model = build("fp32" if dtype == "auto" else dtype)
            view = CheckpointView(read_state_dict(model_dir), model.spec, model_dir) if dtype == "auto" else None
        else:
            spec = spec_for(config)
            view = CheckpointView(read_state_dict(model_dir), spec, model_dir)

            def build(base):
                return EncoderModel(config, spec, view, base, device, use_planner)
            model = build("fp32" if dtype in ("int8", "auto") else dtype)
        if tensor_parallel != 1:
            from . import parallel
            parallel.check_shardable(model, tensor_parallel)      # before any calibration work
        sentence = read_sentence_config(model_dir)
        limit = (max_input_length if max_input_length is not None
                 else min(model.max_tokens, sentence.max_seq_length or model.max_tokens))
        if not 1 <= limit <= model.max_tokens:
            raise InvalidInputError(f"max_input_length must be in [1, {model.max_tokens}] (the model's positions), "
                                    f"not {limit}")
        tokenizer = TextTokenizer(model_dir, limit, model.vocab_size, sentence.lowercase)
        # sentence-transformers pools a plain Hugging Face model by the mean; a decoder's last token is
        # the one whose state has read the whole input
        pool_cfg = read_pooling(model_dir) or PoolingConfig(mode="lasttoken" if causal else "mean")
        if sentence.prompts and not pool_cfg.include_prompt and any(sentence.prompts.values()):
            raise ModelLoadError(f"{model_dir}: pooling without the prompt's tokens (include_prompt false) is "
                                 "not supported")
        if pooling is not None:
            pool_cfg.mode = pooling
        if normalize is not None:
            pool_cfg.normalize = normalize
        if pool_cfg.mode == "splade" and model.mlm is None:
            archs = ", ".join(config.get("architectures") or []) or config.get("model_type")
            raise ModelLoadError(f"{model_dir}: SPLADE pooling needs a masked-LM head (a BERT, RoBERTa, XLM-RoBERTa, "
                                 f"DistilBERT or MPNet ...ForMaskedLM checkpoint); this one is {archs}")
        enc = cls(model, tokenizer, pool_cfg, model_dir, config, max_batch_tokens)
        enc.prompts, enc.default_prompt_name = sentence.prompts, sentence.default_prompt_name
        enc.pair_template = pair_template
        if dtype == "int8" and not prenorm:        # the pre-norm layers quantize their own linears (W8A8) as they load
            from . import quantize
            texts = quantize.calibration_texts(tokenizer)
            batches = [b for b, _ in enc._batches(tokenizer.encode(texts, truncate=True))]
            stats = quantize.input_absmax(model, batches)
            quantize.quantize_(model, view, stats, alpha=int8_alpha, keep=int8_keep)
            if pool_cfg.mode == "splade":          # the masked-LM head is used only there
                model.fast_mlm_head()
                log.info("masked-LM decoder in %s, the fastest candidate on this machine", model.mlm.fast_decoder_name)
        elif dtype == "auto":
            enc._plan_precision(view, quality_bound, calibration, int8_alpha, replan, build)
        _check_batch_fits(enc.model, max_batch_tokens, limit)
        if tensor_parallel != 1:
            enc.model = parallel.start(enc.model, tensor_parallel, threads)
        return enc

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (a single-process model holds nothing to release)."""
        from . import parallel
        parallel.close(self.model)

    def _plan_precision(self, view, bound: float, calibration, alpha: float, replan: bool, build) -> None:
        """Load or make the precision plan for `bound` and run it. build(dtype): a fresh model of the
        same weights in one dtype, for the plan's whole-model bf16 alternative."""
        from . import precision, quantize
        if calibration is not None:
            try:
                texts = [line.strip() for line in Path(calibration).read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise InvalidInputError(f"cannot read the calibration file {calibration}: {exc.strerror}") from exc
            if len(texts) < 4:
                raise InvalidInputError(f"the calibration file {calibration} needs at least 4 non-empty lines")
            user_calib, user_held = texts[0::2], texts[1::2]
        else:
            user_calib, user_held = [], []
        # the built-in set always joins the user's: a narrow file (a few topics, a small vocabulary)
        # leaves most channels' activation ranges unseen, and a plan fitted to it alone missed the
        # bound on other text (MiniLM: 0.9967 on the public workload for a 20-word file)
        calib = user_calib + quantize.calibration_texts(self.tokenizer)
        held = user_held + quantize.calibration_texts(self.tokenizer, seed=1)

        def batches(texts):
            return [b for b, _ in self._batches(self.tokenizer.encode(texts, truncate=True))]
        settings = {"pooling": self.pooling_key(), "max_input_length": self.tokenizer.max_tokens, "alpha": alpha,
                    "device": self.model.device.type, "calibration": hashlib.sha256(
                        "\n".join(user_calib + user_held).encode()).hexdigest()[:16] if calibration else None}
        plan = None if replan else precision.find_plan(self.model_dir, bound, settings)
        head = self.model if self.pooling.mode == "splade" else None       # its masked-LM decoder is planned too
        if plan is None:
            t = time.perf_counter()
            calib_b, held_b, refs = batches(calib), batches(held), {}
            plan = precision.make_plan(self.model, view, calib_b, held_b, self._embedding_of(self.model), bound,
                                       alpha=alpha, model_dir=self.model_dir, settings=settings, head=head,
                                       references=refs)
            if self.model.device.type == "cuda" or cpu_has_native_bf16():
                self._try_whole_bf16(plan, build, calib_b, held_b, refs)
            where = precision.save_plan(plan, self.model_dir)
            log.info("precision plan for min cosine %g made in %.1f s, saved to %s", bound, time.perf_counter() - t,
                     where)
        elif plan.whole != "bf16":
            precision.apply_plan(self.model, view, plan, batches(calib), head)
        if plan.whole == "bf16" and self.model.dtype_name != "bf16":
            self.model = build("bf16")
        self.precision_plan = plan
        log.info("precision plan (min cosine %g; held-out %.5f): %s", bound,
                 plan.measured.get("heldout_min_cosine", float("nan")), plan.summary())

    def _try_whole_bf16(self, plan, build, calib_b, held_b, refs) -> None:
        """The whole model in bf16 (activations too: no casts around each linear, bf16 attention and
        epilogues) as the plan's alternative: taken when it keeps the plan's bounds on both input sets
        and its forward passes over the calibration inputs are faster than the plan's. With AMX,
        all-MiniLM-L6-v2 in bf16 ran at 30,602 tokens/s against the 0.999 plan's 26,336, at min
        cosine 0.99989 (docs/benchmarks.md): per-linear timings do not see those casts."""
        from . import precision
        model = build("bf16")
        calib_cos, held_cos = (precision.min_cosine(precision.pooled(model, batches, self._embedding_of(model)), ref)
                               for batches, ref in ((calib_b, refs["calib"]), (held_b, refs["held"])))
        t_bf16, t_plan = self._forward_seconds(model, calib_b), self._forward_seconds(self.model, calib_b)
        plan.measured["whole_bf16"] = {"calibration_min_cosine": round(calib_cos, 6),
                                       "heldout_min_cosine": round(held_cos, 6), "forward_s": round(t_bf16, 4),
                                       "plan_forward_s": round(t_plan, 4)}
        if (calib_cos >= plan.measured["calibration_bound"] - precision.SLACK
                and held_cos >= plan.bound - precision.SLACK and t_bf16 < t_plan):
            plan.whole = "bf16"
            self.model = model

    def _forward_seconds(self, model, batches) -> float:
        """Best of two timed passes (after one untimed) of `model` and the pooling over `batches`."""
        from .precision import pooled
        return best_seconds(lambda: pooled(model, batches, self._embedding_of(model)), repeat=2)

    def pooling_key(self) -> str:
        """The pooling as a key of what was measured under it (precision plans, cost tables)."""
        p = self.pooling
        return f"splade/{p.splade_strategy}/{p.splade_activation}" if p.mode == "splade" else p.mode

    def _embedding_of(self, model):
        """What dtype auto bounds the cosine of, as embed(hidden, batch): the pooled states (before any
        Dense modules), or the SPLADE vector of `model`'s head."""
        if self.pooling.mode == "splade":
            return lambda hidden, batch: sentence_embedding(hidden, batch, self.pooling, model)
        return lambda hidden, batch: pool(hidden, batch, self.pooling.mode)

    @property
    def dtype(self) -> str:
        return self.model.dtype_name

    @property
    def dimension(self) -> int:
        """The embeddings' width: the last Dense module's output, else the vocabulary for SPLADE, else
        the hidden size."""
        if self.pooling.dense:
            return self.pooling.dense[-1][0].shape[0]
        return self.model.vocab_size if self.pooling.mode == "splade" else self.model.hidden

    # --------------------------------------------------------------- batching
    def _batches(self, encoded: list[Encoded]):
        """Length-sorted batches under the token budget; yields (PackedBatch, original indices)."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        group: list[int] = []
        tokens = 0
        for i in order + [None]:
            n = len(encoded[i].ids) if i is not None else 0
            if group and (i is None or tokens + n > self.max_batch_tokens):
                yield pack_tokens([encoded[j].ids for j in group], [encoded[j].type_ids for j in group],
                                  self.model.position_offset), group
                group, tokens = [], 0
            if i is not None:
                group.append(i)
                tokens += n

    def _run(self, encoded: list[Encoded], fn) -> list:
        results: list = [None] * len(encoded)
        for batch, idx in self._batches(encoded):
            hidden = self.model.forward(batch)
            out = fn(hidden, batch)
            # off the model's device (a no-op on the CPU): a batch's rows in one copy, or per-sequence
            # states each queued, then one wait
            rows = (out.to("cpu").unbind(0) if isinstance(out, torch.Tensor)
                    else [r.to("cpu", non_blocking=True) for r in out])
            if hidden.is_cuda:
                torch.cuda.synchronize(hidden.device)
            for i, r in zip(idx, rows):
                results[i] = r
        return results

    def tokenize(self, inputs, pairs=None, truncate: bool = False) -> list[Encoded]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)):
            raise InvalidInputError(f"inputs must be a string or a list, not {type(inputs).__name__}")
        if len(inputs) == 0:
            raise InvalidInputError("the input list is empty")
        if pairs is not None and self.pair_template is not None:
            return self._templated(list(inputs), pairs, truncate)
        encoded = self.tokenizer.encode(list(inputs), pairs, truncate)
        types = self.model.type_emb
        if pairs is not None and types is not None and any(max(e.type_ids, default=0) >= types.shape[0] for e in encoded):
            raise InvalidInputError(f"this model has {types.shape[0]} token type(s): it takes no text pairs")
        return encoded

    def _templated(self, inputs: list, pairs: list, truncate: bool) -> list[Encoded]:
        """Each (text, pair) as pair_template's one input (a text without a pair stays itself)."""
        if len(pairs) != len(inputs):
            raise InvalidInputError("texts and pairs differ in length")
        if not all(isinstance(t, str) for t in [*inputs, *(p for p in pairs if p is not None)]):
            raise InvalidInputError("text pairs must be strings")
        tail = self.pair_template.split("{document}", 1)[1]
        tails = {}              # query -> tokens of its tail (a rerank's documents share one query)
        texts, keep = [], []
        for query, document in zip(inputs, pairs):
            # a text alone keeps its closing special tokens, as without a template
            texts.append(query if document is None else self.pair_template.format(query=query, document=document))
            if truncate:
                tail_text = "" if document is None else tail.format(query=query)
                if tail_text not in tails:
                    tails[tail_text] = self.tokenizer.tail_count(tail_text)
                keep.append(tails[tail_text])
        return self.tokenizer.encode(texts, None, truncate, keep_last=keep or None)

    # ------------------------------------------------------------- public API
    def embed(self, inputs, truncate: bool = False, normalize: bool | None = None,
              prompt_name: str | None = None) -> torch.Tensor:
        """Pooled sentence embeddings [N, D] (fp32), pooled, projected and normalized as the model's
        sentence-transformers config says unless overridden. prompt_name: one of the model's
        `prompts`, prepended to every text input (default: its default_prompt_name, if any)."""
        return self.embed_encoded(self.tokenize(self.with_prompt(inputs, prompt_name), truncate=truncate),
                                  normalize)

    def with_prompt(self, inputs, prompt_name: str | None = None) -> list:
        """Text inputs with the named (or the default) prompt in front; token-id inputs as they are."""
        if not isinstance(inputs, (str, list, tuple)):
            return inputs                           # tokenize() says what is wrong with it
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        name = prompt_name or self.default_prompt_name
        if name is None:
            return items
        if name not in self.prompts:
            known = ", ".join(self.prompts) or "none: this model defines no prompts"
            raise InvalidInputError(f"unknown prompt_name {name!r}; the model's prompts: {known}")
        return [self.prompts[name] + x if isinstance(x, str) else x for x in items]

    def embed_encoded(self, encoded: list[Encoded], normalize: bool | None = None) -> torch.Tensor:
        rows = self._run(encoded, lambda h, b: sentence_embedding(h, b, self.pooling, self.model))
        out = torch.stack(rows)
        if self.pooling.normalize if normalize is None else normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def embed_sparse(self, inputs, truncate: bool = False, prompt_name: str | None = None) -> list[dict[int, float]]:
        """SPLADE sparse embeddings: per input, {token id: weight} for the vocabulary entries with a
        weight above 0, in token-id order (a model loaded with pooling "splade", or whose
        sentence-transformers config is a SparseEncoder's)."""
        if self.pooling.mode != "splade":
            raise InvalidInputError("sparse embeddings need a SPLADE model: a masked-LM checkpoint loaded with "
                                    f"pooling='splade' (this one pools by {self.pooling.mode!r})")
        return [sparse_entries(row) for row in self.embed(inputs, truncate, normalize=False, prompt_name=prompt_name)]

    def hidden_states(self, inputs, truncate: bool = False, prompt_name: str | None = None) -> list[torch.Tensor]:
        """Per-token last hidden states, one [L_i, H] fp32 tensor per input; texts get the named (or
        the model's default) prompt first, as embed() and TEI's /embed_all do."""
        def split(h, b: PackedBatch):
            h = h.float()
            return [h[b.cu_seqlens[i]:b.cu_seqlens[i + 1]].clone() for i in range(b.num_seqs)]
        return self._run(self.tokenize(self.with_prompt(inputs, prompt_name), truncate=truncate), split)

    def classify(self, inputs, pairs=None, truncate: bool = False) -> torch.Tensor:
        """Sequence-classification logits [N, num_labels]; label names in `id2label`."""
        rows = self._run(self.tokenize(inputs, pairs, truncate), lambda h, b: self.model.classify(h, b))
        return torch.stack(rows)

    def rerank(self, query: str, documents: list[str], truncate: bool = False, raw: bool = False) -> list[float]:
        """Cross-encoder relevance of each document to the query (sigmoid of the logit unless raw)."""
        if not isinstance(query, str) or not query:
            raise InvalidInputError("the query must be a non-empty string")
        if not isinstance(documents, (list, tuple)) or not documents:
            raise InvalidInputError("documents must be a non-empty list of strings")
        if not all(isinstance(d, str) for d in documents):
            raise InvalidInputError("every document must be a string")
        logits = self.classify([query] * len(documents), list(documents), truncate)
        if logits.shape[1] != 1:
            raise InvalidInputError(f"rerank needs a model with one output; this one has {logits.shape[1]}")
        scores = logits[:, 0] if raw else torch.sigmoid(logits[:, 0])
        return scores.tolist()
