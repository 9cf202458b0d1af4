"""`make tokenize`: train the image and text tokenizers, then tokenize the corpora into shards.

    python -m train.tokenize --preset default --out artifacts [--data docs.jsonl --data-mode add|replace]
                             [--set key=value ...]

Writes into OUT:
    tokenizer/           the self-contained MultimodalTokenizer folder
    shards/train, shards/eval
    vq_recon_<corpus>.png   originals above, reconstructions below (eval images)
    report.json          VQ metrics per corpus, BPE vocabulary, document/token counts, bad inputs
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenizers_mm.document import Document
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.text import train_bpe
from tokenizers_mm.vqvae import VQ_PRESETS
from train.overrides import apply_overrides
from train.shards import IMAGE, TEXT, ShardWriter


@dataclass
class TokenizeConfig:
    """What `make tokenize` builds. Presets below; any field can be overridden with --set."""

    image_size: int = 32  # side of the square RGB images every source is converted to
    vq_preset: str = "default"  # a key of tokenizers_mm.vqvae.VQ_PRESETS
    vq_steps: int | None = None  # VQ-VAE training steps (None: the trainer's default for the preset)
    vq_batch_size: int | None = None
    vq_lr: float | None = None
    bpe_vocab_size: int = 4096  # upper bound; the embedded captions saturate far below it
    shapes_train: int = 20_000  # shapes documents in the train split (singles, pairs, stories)
    shapes_eval: int = 1_000
    digits: bool = True  # include scikit-learn's digits (train 1,437 / eval 360)
    digits_augment_copies: int = 4  # augmented extra copies of each training digit
    jsonl_eval_fraction: float = 0.05  # share of a user's JSONL documents held out for eval
    on_bad_input: str = "skip"  # "skip" (report and count) or "raise"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vq_preset not in VQ_PRESETS:
            raise ValueError(f"unknown vq_preset {self.vq_preset!r}; choose from {sorted(VQ_PRESETS)}")
        if self.on_bad_input not in ("skip", "raise"):
            raise ValueError(f"on_bad_input must be 'skip' or 'raise', got {self.on_bad_input!r}")
        if not 0.0 <= self.jsonl_eval_fraction < 1.0:
            raise ValueError(f"jsonl_eval_fraction must be in [0, 1), got {self.jsonl_eval_fraction}")


PRESETS: dict[str, TokenizeConfig] = {
    # seconds, for tests: a few hundred documents and a tiny VQ-VAE
    "tiny": TokenizeConfig(vq_preset="tiny", bpe_vocab_size=512, shapes_train=300, shapes_eval=60,
                           digits_augment_copies=0),
    # this 2-core CPU, at most 6 minutes (issue 2)
    "default": TokenizeConfig(),
}


def load_sources(cfg: TokenizeConfig, data: list[Path], data_mode: str) -> tuple[dict, dict, list]:
    """Build {corpus: [Document]} for train and eval, and the list of bad inputs skipped."""
    from train.data.digits import digits_documents
    from train.data.jsonl import load_jsonl
    from train.data.shapes import shapes_documents

    train: dict[str, list[Document]] = {}
    evals: dict[str, list[Document]] = {}
    bad: list = []
    if data_mode == "add" or not data:
        if cfg.shapes_train:
            train["shapes"] = shapes_documents("train", cfg.shapes_train, seed=cfg.seed, size=cfg.image_size)
            evals["shapes"] = shapes_documents("eval", cfg.shapes_eval, seed=cfg.seed, size=cfg.image_size)
        if cfg.digits:
            train["digits"] = digits_documents("train", size=cfg.image_size, augment_copies=cfg.digits_augment_copies, seed=cfg.seed)
            evals["digits"] = digits_documents("eval", size=cfg.image_size)
    for path in data:
        docs, problems = load_jsonl(path, size=cfg.image_size, on_error=cfg.on_bad_input)
        bad.extend(problems)
        name = f"jsonl:{Path(path).name}"
        tr, ev = split_documents(docs, cfg.jsonl_eval_fraction, cfg.seed)
        train[name], evals[name] = tr, ev
    if not any(train.values()):
        raise ValueError("no training documents: every source is empty or disabled")
    return train, evals, bad


def split_documents(docs: list[Document], eval_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic train/eval split of a user's documents by a hash of (seed, position)."""
    train, evals = [], []
    for i, d in enumerate(docs):
        h = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "little") / 2**64
        (evals if h < eval_fraction else train).append(d)
    if not train:
        train, evals = evals, []
    return train, evals


def images_array(docs: list[Document]) -> np.ndarray:
    """All images of the documents as uint8 (N, H, W, 3)."""
    imgs = [np.asarray(im, dtype=np.uint8) for d in docs for im in d.images]
    return np.stack(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8)


def write_shard(path: Path, tok: MultimodalTokenizer, sources: dict[str, list[Document]], desc: str) -> dict:
    """Tokenize documents (images in large batches) into a shard folder."""
    layout = {"text_vocab_size": tok.text_vocab_size, "image_offset": tok.image_offset,
              "codebook_size": tok.layout.codebook_size, "image_tokens": tok.image_tokens}
    writer = ShardWriter(path, tok.vocab_size, layout)
    per_source = {}
    chunk = 512
    for name, docs in sources.items():
        n_before = dict(writer.counts)
        for i in tqdm(range(0, len(docs), chunk), desc=f"{desc} {name}", unit="chunk", leave=False, disable=None):
            part = docs[i : i + chunk]
            images = [im for d in part for im in d.images]
            codes = iter((tok.encode_images(images) + tok.image_offset).tolist())
            texts = iter(tok.encode_texts([t for d in part for t in d.texts]))
            for d in part:
                segs = [(IMAGE, next(codes)) if not isinstance(s, str) else (TEXT, next(texts)) for s in d.segments]
                writer.add(segs, d.source or name, d.meta)
        per_source[name] = {"docs": len(docs), **{k: writer.counts[k] - n_before[k] for k in writer.counts}}
    index = writer.close()
    return {"docs": index["num_docs"], "tokens": index["num_tokens"], "text_tokens": index["text_tokens"],
            "image_tokens": index["image_tokens"], "images": index["images"], "per_source": per_source}


def run(cfg: TokenizeConfig, out: Path, data: list[Path], data_mode: str = "add") -> dict:
    """The whole of `make tokenize`; returns the report (also written to out/report.json)."""
    from train.vq import evaluate_vq, reconstruction_grid, train_vqvae

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_docs, eval_docs, bad = load_sources(cfg, data, data_mode)
    n_train = {k: len(v) for k, v in train_docs.items()}
    print(f"[tokenize] documents: train {n_train}, eval { {k: len(v) for k, v in eval_docs.items()} }, "
          f"bad inputs skipped: {len(bad)} ({time.time() - t0:.1f}s)")

    # text tokenizer: byte-level BPE on every training text
    texts = [t for docs in train_docs.values() for d in docs for t in d.texts]
    if not texts:
        raise ValueError("the training documents hold no text: a text tokenizer cannot be trained")
    bpe = train_bpe(texts, vocab_size=cfg.bpe_vocab_size)
    print(f"[tokenize] BPE: {bpe.get_vocab_size()} tokens from {len(texts):,} texts ({time.time() - t0:.1f}s)")

    # image tokenizer: VQ-VAE on the training images, each corpus with equal weight
    vq_cfg = dataclasses.replace(VQ_PRESETS[cfg.vq_preset], image_size=cfg.image_size)
    per_corpus = [images_array(v) for v in train_docs.values() if any(d.images for d in v)]
    if not per_corpus:
        raise ValueError("the training documents hold no image: an image tokenizer cannot be trained")
    train_images = balance(per_corpus, cfg.seed)
    kwargs = {k: v for k, v in (("steps", cfg.vq_steps), ("batch_size", cfg.vq_batch_size), ("lr", cfg.vq_lr)) if v is not None}
    vq = train_vqvae(torch.from_numpy(train_images), vq_cfg, seed=cfg.seed, **kwargs)
    t_vq = time.time() - t0
    vq_report = {}
    for name, docs in eval_docs.items():
        imgs = images_array(docs)
        if len(imgs) == 0:
            continue
        x = torch.from_numpy(imgs)
        vq_report[name] = evaluate_vq(vq, x)
        safe = name.replace(":", "_").replace("/", "_")
        reconstruction_grid(vq, x, n=16).save(out / f"vq_recon_{safe}.png")
    print(f"[tokenize] VQ-VAE eval: {json.dumps(vq_report)} ({t_vq:.1f}s)")

    tok = MultimodalTokenizer(bpe, vq)
    tok.save(out / "tokenizer")
    splits = {"train": write_shard(out / "shards" / "train", tok, train_docs, "train"),
              "eval": write_shard(out / "shards" / "eval", tok, eval_docs, "eval")}
    report = {
        "preset": dataclasses.asdict(cfg),
        "vq": {"codebook_usage": {k: v["codebook_usage"] for k, v in vq_report.items()},
               "perplexity": {k: v["perplexity"] for k, v in vq_report.items()},
               "psnr_db": {k: v["psnr_db"] for k, v in vq_report.items()},
               "codebook_size": vq_cfg.codebook_size, "grid": vq_cfg.grid, "train_images": int(len(train_images))},
        "bpe": {"vocab_size": bpe.get_vocab_size()},
        "vocab_size": tok.vocab_size,
        "splits": splits,
        "bad_inputs": {"count": len(bad), "examples": [dataclasses.asdict(b) for b in bad[:20]]},
        "seconds": round(time.time() - t0, 1),
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    print(f"[tokenize] wrote {out}/tokenizer, shards ({splits['train']['tokens']:,} train tokens, "
          f"{splits['eval']['tokens']:,} eval) and report.json in {report['seconds']}s")
    return report


def balance(per_corpus: list[np.ndarray], seed: int) -> np.ndarray:
    """Concatenate image sets, repeating the smaller ones so that every corpus weighs the same
    in VQ-VAE training (digits are 7k images, shapes tens of thousands)."""
    largest = max(len(a) for a in per_corpus)
    rng = np.random.default_rng(seed)
    parts = [a if len(a) == largest else a[rng.integers(0, len(a), largest)] for a in per_corpus]
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--out", default="artifacts", type=Path)
    p.add_argument("--data", action="append", default=[], type=Path, help="a JSONL file of your documents (repeatable)")
    p.add_argument("--data-mode", default="add", choices=["add", "replace"], help="add to or replace the embedded corpora")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TokenizeConfig field")
    args = p.parse_args(argv)
    try:
        cfg = apply_overrides(PRESETS[args.preset], args.set)
        run(cfg, args.out, args.data, args.data_mode)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
