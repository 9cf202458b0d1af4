"""The one checkpoint format and its one loader, for training, sampling and the demo.

A model folder holds everything needed to run the model, and nothing is guessed from names:

    config.json         {"format_version", "model": ModelConfig fields, "step", ...extra}
    model.safetensors   the weights (safetensors save_model, so a tied head stays tied)
    tokenizer/          the MultimodalTokenizer folder (tokenizer.json, multimodal.json, VQ files)
    retriever/          (optional) the dense retriever, its index and the bank's documents
                        (model.retrieval.RetrievalBank); required when config.json says
                        "trained_with_retrieval": true

A training run folder (`runs/default/`) holds such folders under `checkpoints/` and a `latest`
file naming the newest complete one; `load_pretrained` accepts either a model folder or a run
folder. Every write goes to a temporary folder that is renamed into place when complete, so a
kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_model, save_model

from model.config import ModelConfig
from model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers_mm.multimodal import MultimodalTokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, LATEST_FILE = "config.json", "model.safetensors", "tokenizer", "latest"
RETRIEVER_DIR = "retriever"


class Pretrained(NamedTuple):
    """A loaded model folder."""

    model: Transformer
    tokenizer: "MultimodalTokenizer"
    path: Path  # the model folder actually loaded (resolved from a run folder)
    info: dict[str, Any]  # config.json without the model fields: step, training config, ...


def resolve(path: str | os.PathLike) -> Path:
    """A model folder, or the newest complete checkpoint of a run folder."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    latest = p / LATEST_FILE
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / CONFIG_FILE).is_file():
            return target
        raise ValueError(f"{latest} names {target}, which is not a complete checkpoint folder")
    if not p.exists():
        raise ValueError(f"checkpoint not found: {p} — train one with `make tokenize train`")
    raise ValueError(f"{p} is neither a model folder (no {CONFIG_FILE}) nor a run folder (no {LATEST_FILE}) "
                     "— point --ckpt at runs/<name> or one of its checkpoints/step_* folders")


def save_pretrained(folder: Path, model: Transformer, tokenizer: "MultimodalTokenizer | Path",
                    info: dict[str, Any] | None = None, retriever: Path | None = None) -> None:
    """Fill `folder` (which must exist, usually a temporary one) with a complete model folder.
    `tokenizer` is a MultimodalTokenizer or the path of a saved tokenizer folder (copied);
    `retriever` the folder of the retrieval bank (`artifacts/retriever`, copied) if any."""
    if (info or {}).get("trained_with_retrieval") and retriever is None:
        raise ValueError("a model trained with retrieval needs its retriever folder in the checkpoint")
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    cfg = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), **(info or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_model(model, str(folder / WEIGHTS_FILE))
    if isinstance(tokenizer, (str, Path)):
        shutil.copytree(tokenizer, folder / TOKENIZER_DIR)
    else:
        tokenizer.save(folder / TOKENIZER_DIR)
    if retriever is not None:
        shutil.copytree(retriever, folder / RETRIEVER_DIR)


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], Path]:
    """(model config, the rest of config.json, resolved folder) without loading weights."""
    folder = resolve(path)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({e})") from None
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} has checkpoint format {cfg.get('format_version')}, this code reads {FORMAT_VERSION}")
    if "model" not in cfg:
        raise ValueError(f"{folder / CONFIG_FILE} has no 'model' section")
    info = {k: v for k, v in cfg.items() if k not in ("model", "format_version")}
    return ModelConfig.from_dict(cfg["model"]), info, folder


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Load a model folder (or a run folder's latest checkpoint) strictly: every weight present
    with its recorded shape, the tokenizer's vocabulary matching the model's."""
    from tokenizers_mm.multimodal import MultimodalTokenizer

    config, info, folder = load_config(path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder} is incomplete: {WEIGHTS_FILE} is missing")
    model = Transformer(config)
    try:
        missing, unexpected = load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {weights} do not fit the config in {folder / CONFIG_FILE}: {e}") from None
    if info.get("trained_with_retrieval") and not (folder / RETRIEVER_DIR).is_dir():
        raise ValueError(f"{folder} holds a model trained with retrieval, but its {RETRIEVER_DIR}/ folder (the "
                         "retriever, index and bank it reads at inference) is missing — copy the checkpoint whole, "
                         f"or add the `make tokenize` output's {RETRIEVER_DIR}/ folder that it was trained with")
    tokenizer = MultimodalTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}")
    return Pretrained(model.to(device).eval(), tokenizer, folder, info)
