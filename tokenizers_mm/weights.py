"""One folder format for a small model: `<name>_config.json` + `<name>.safetensors`, saved
atomically and loaded strictly. The VQ-VAE and the retriever both use it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tokenizers_mm.atomic import write_text_atomic


def save_config_and_weights(module: torch.nn.Module, config: dict[str, Any], directory: str | os.PathLike,
                            config_file: str, weights_file: str, kind: str) -> None:
    """Write the config JSON and the weights into `directory` (created), each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp_w = d / f".{weights_file}.tmp{os.getpid()}"
    save_file(state, str(tmp_w), metadata={"format": kind, "config": json.dumps(config)})
    os.replace(tmp_w, d / weights_file)
    write_text_atomic(d / config_file, json.dumps(config, indent=2) + "\n")


def read_config(directory: str | os.PathLike, config_file: str, weights_file: str, what: str,
                how_to_make: str) -> dict[str, Any]:
    """The config dict of a saved folder; ValueError naming what is missing or unreadable."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{what} folder not found: {d} — {how_to_make}")
    for name in (config_file, weights_file):
        if not (d / name).is_file():
            raise ValueError(f"{what} folder {d} has no {name}; expected both {config_file} and {weights_file} "
                             f"as written by its save()")
    try:
        return json.loads((d / config_file).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / config_file} is not valid JSON ({e}); re-save the {what}") from None


def load_weights_strict(model: torch.nn.Module, directory: str | os.PathLike, config_file: str,
                        weights_file: str, what: str) -> None:
    """Load the weights into `model`, naming every missing, unexpected or mis-shaped tensor."""
    w_path = Path(directory) / weights_file
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"cannot read {w_path}: {e} — re-save the {what}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"weights in {w_path} do not match {Path(directory) / config_file}: missing {missing}, "
                         f"unexpected {unexpected}, mismatched shapes {mismatched} — the two files come from "
                         f"different {what}s; re-save them together")
    model.load_state_dict(state, strict=True)
