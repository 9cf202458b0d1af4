"""`make tokenize`: train the image and text tokenizers, then tokenize the corpora into shards.

    python -m train.tokenize --preset default --out artifacts [--data docs.jsonl --data-mode add|replace]
                             [--set key=value ...]

Writes into OUT:
    tokenizer/           the self-contained MultimodalTokenizer folder
    shards/train, shards/eval
    retriever/           the dense retriever (retriever_config.json, retriever.safetensors), index/ over
                         the train documents' embeddings, bank.safetensors (their token ids)
    shards/*/neighbours.npy, neighbour_scores.npy
                         (N, retrieval_k) train-bank ids (-1 padded) and scores of each document's
                         precomputed neighbours (train: never itself; eval: retrieved from the train bank)
    vq_recon_<corpus>.png   originals above, reconstructions below (eval images)
    report.json          VQ metrics per corpus, BPE vocabulary, document/token counts, bad inputs
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tokenizers_mm.document import Document
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.text import train_bpe
from tokenizers_mm.vqvae import VQ_PRESETS, VQVAE
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
    # augmented extra copies of each training digit (train.data.digits.augment_digit). Distinct
    # copies keep the image likelihood general: on 1,437 scans the model overfits. Digits-only runs
    # (image positions, 1,000 steps, 2026-12-07) read p(x|c) on the 360 test digits at 70.8 / 65.8 /
    # 51.9 / 36.4% after 250 / 500 / 750 / 1,000 steps with 4 copies (test image NLL 2.35 -> 3.64
    # nats per code) and at 71.9 / 82.2 / 86.4 / 86.9% with 16 (README, zero-shot classification)
    digits_augment_copies: int = 4
    jsonl_eval_fraction: float = 0.05  # share of a user's JSONL documents held out for eval
    on_bad_input: str = "skip"  # "skip" (report and count) or "raise"
    retriever: bool = True  # train the dense retriever and precompute neighbours (retrieval-augmented training)
    retriever_preset: str = "default"  # a key of model.retrieval.RETRIEVER_PRESETS (and its training settings)
    retriever_time_limit_s: float | None = 60.0  # wall-time cap on retriever training (None: deterministic)
    # the retriever trains on the digit originals and only this many of their augmented copies: with
    # all 16 its 60-s budget went to digits and its shapes text->image top-1 fell from 93.4% to 90.9%,
    # and the re-ranking of drawings that leans on it with it (2026-12-07)
    retriever_digit_copies: int = 4
    retrieval_k: int = 4  # neighbours stored per document (training draws K <= retrieved_max of them)
    # near-duplicates skipped as neighbours: document-document cosine above this. Not the 0.9:
    # this retriever puts same-content documents at 0.99+ (median top-1 bank score 0.9997), so 0.9
    # would skip every same-content neighbour; 0.999 skips only (near-)copies
    retrieval_max_score: float = 0.999
    query_dropout: float = 0.2  # share of query text tokens dropped when precomputing training neighbours
    curate: bool = False  # DataComp-style filter: drop caption pairs scoring low with the retriever, and near-duplicates
    curation_position: float = 0.5  # threshold between median mismatched and median own pair score (calibrate_threshold)
    curation_duplicate_threshold: float = 0.999  # document cosine above which a later pair is a duplicate
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vq_preset not in VQ_PRESETS:
            raise ValueError(f"unknown vq_preset {self.vq_preset!r}; choose from {sorted(VQ_PRESETS)}")
        if self.on_bad_input not in ("skip", "raise"):
            raise ValueError(f"on_bad_input must be 'skip' or 'raise', got {self.on_bad_input!r}")
        if not 0.0 <= self.jsonl_eval_fraction < 1.0:
            raise ValueError(f"jsonl_eval_fraction must be in [0, 1), got {self.jsonl_eval_fraction}")
        from model.retrieval import RETRIEVER_PRESETS

        if self.retriever_preset not in RETRIEVER_PRESETS:
            raise ValueError(f"unknown retriever_preset {self.retriever_preset!r}; choose from {sorted(RETRIEVER_PRESETS)}")
        if self.retriever_digit_copies < 0:
            raise ValueError(f"retriever_digit_copies must be >= 0, got {self.retriever_digit_copies}")
        if self.retrieval_k < 1:
            raise ValueError(f"retrieval_k must be at least 1, got {self.retrieval_k}")
        if self.curate and not self.retriever:
            raise ValueError("curate=true needs the retriever (retriever=true): it scores the pairs")


PRESETS: dict[str, TokenizeConfig] = {
    # seconds, for tests: a few hundred documents and a tiny VQ-VAE
    # (the tiny retriever trains a few seconds without a time cap, so tiny artifacts are deterministic)
    "tiny": TokenizeConfig(vq_preset="tiny", bpe_vocab_size=512, shapes_train=300, shapes_eval=60,
                           digits_augment_copies=0, retriever_preset="tiny", retriever_time_limit_s=None),
    # this 2-core CPU, at most 6 minutes (issue 2)
    "default": TokenizeConfig(),
    # the same artifacts (retriever and neighbours included), so that `make tokenize train PRESET=ra` works
    "ra": TokenizeConfig(),
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


# the report's key for the union of every corpus's eval split: the usage of the shared codebook as a
# whole (default run: 98.0% shapes, 94.1% digits, 100% all; without VQ training's per-corpus
# diversity term the codes specialised by corpus: 85.9%, 77.7%, 98.8%)
ALL_EVAL = "all eval splits"


def run(cfg: TokenizeConfig, out: Path, data: list[Path], data_mode: str = "add") -> dict:
    """The whole of `make tokenize`; returns the report (also written to out/report.json)."""
    from train.vq import balance, evaluate_vq, reconstruction_grid, train_vqvae

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_docs, eval_docs, bad = load_sources(cfg, data, data_mode)
    n_train = {k: len(v) for k, v in train_docs.items()}
    print(f"[tokenize] documents: train {n_train}, eval { {k: len(v) for k, v in eval_docs.items()} }, "
          f"bad inputs skipped: {len(bad)} ({time.time() - t0:.1f}s)")

    # text tokenizer: byte-level BPE on every training text
    texts = bpe_texts(flat(train_docs))
    if not texts:
        raise ValueError("the training documents hold no text: a text tokenizer cannot be trained")
    bpe = train_bpe(texts, vocab_size=cfg.bpe_vocab_size)
    print(f"[tokenize] BPE: {bpe.get_vocab_size()} tokens from {len(texts):,} texts ({time.time() - t0:.1f}s)")

    # image tokenizer: VQ-VAE on the training images, each corpus with equal weight
    vq_cfg = dataclasses.replace(VQ_PRESETS[cfg.vq_preset], image_size=cfg.image_size)
    per_corpus = [images_array(v) for v in train_docs.values() if any(d.images for d in v)]
    if not per_corpus:
        raise ValueError("the training documents hold no image: an image tokenizer cannot be trained")
    train_images, groups = balance(per_corpus, cfg.seed)
    kwargs = {k: v for k, v in (("steps", cfg.vq_steps), ("batch_size", cfg.vq_batch_size), ("lr", cfg.vq_lr)) if v is not None}
    vq = train_vqvae(torch.from_numpy(train_images), vq_cfg, seed=cfg.seed, groups=groups, **kwargs)
    t_vq = time.time() - t0
    vq_report, eval_images = {}, []
    for name, docs in eval_docs.items():
        imgs = images_array(docs)
        if len(imgs) == 0:
            continue
        x = torch.from_numpy(imgs)
        vq_report[name] = evaluate_vq(vq, x)
        eval_images.append(x)
        safe = name.replace(":", "_").replace("/", "_")
        reconstruction_grid(vq, x, n=16).save(out / f"vq_recon_{safe}.png")
    if len(eval_images) > 1:  # one codebook serves every corpus: its usage over all of them together
        vq_report[ALL_EVAL] = evaluate_vq(vq, torch.cat(eval_images))
    world = [d for d in eval_docs.get("shapes", []) if "images" in d.meta]  # the embedded shapes world
    recon_exact = {"shapes_reconstruction_exact": shapes_reconstruction_exact(vq, world)} if world else {}
    print(f"[tokenize] VQ-VAE eval: {json.dumps({**vq_report, **recon_exact})} ({t_vq:.1f}s)")

    tok = MultimodalTokenizer(bpe, vq)
    tok.save(out / "tokenizer")
    retriever, retrieval_report = None, {}
    n_pairs = sum(1 for d in flat(train_docs) if d.texts and d.images)
    if cfg.retriever and n_pairs < 2:  # e.g. a text-only JSONL corpus: nothing to train a dual encoder on
        print(f"[tokenize] retriever skipped: {n_pairs} training documents hold both text and an image")
        retrieval_report = {"skipped": f"{n_pairs} training documents with both text and an image"}
    elif cfg.retriever:
        retriever, retrieval_report = train_retrieval(cfg, tok, train_docs, eval_docs, out)
        print(f"[tokenize] retriever: {json.dumps(retrieval_report['eval'])} ({time.time() - t0:.1f}s)")
        if cfg.curate:
            train_docs, retrieval_report["curation_filter"] = curate_documents(cfg, retriever, tok, train_docs)
            print(f"[tokenize] curation: {json.dumps(retrieval_report['curation_filter'])}")
    splits = {"train": write_shard(out / "shards" / "train", tok, train_docs, "train"),
              "eval": write_shard(out / "shards" / "eval", tok, eval_docs, "eval")}
    for split in ("train", "eval"):  # never leave neighbours of an earlier run beside new shards
        for name in (NEIGHBOURS_FILE, NEIGHBOUR_SCORES_FILE):
            (out / "shards" / split / name).unlink(missing_ok=True)
    if retriever is None:  # an earlier run's bank would not match these shards
        shutil.rmtree(out / "retriever", ignore_errors=True)
    else:
        retrieval_report["neighbours"] = write_neighbours(cfg, retriever, tok, train_docs, eval_docs, out)
        print(f"[tokenize] neighbours: {json.dumps(retrieval_report['neighbours'])} ({time.time() - t0:.1f}s)")
    report = {
        "preset": dataclasses.asdict(cfg),
        "vq": {"codebook_usage": {k: v["codebook_usage"] for k, v in vq_report.items()},
               "perplexity": {k: v["perplexity"] for k, v in vq_report.items()},
               "psnr_db": {k: v["psnr_db"] for k, v in vq_report.items()},
               **{key: {k: v[key] for k, v in vq_report.items()}
                  for key in ("blank_share", "content_perplexity") if all(key in v for v in vq_report.values())},
               **recon_exact,
               "codebook_size": vq_cfg.codebook_size, "grid": vq_cfg.grid, "train_images": int(len(train_images))},
        "bpe": {"vocab_size": bpe.get_vocab_size()},
        "vocab_size": tok.vocab_size,
        "splits": splits,
        "bad_inputs": {"count": len(bad), "examples": [dataclasses.asdict(b) for b in bad[:20]]},
        **({"retriever": retrieval_report} if retrieval_report else {}),
        "seconds": round(time.time() - t0, 1),
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    print(f"[tokenize] wrote {out}/tokenizer, shards ({splits['train']['tokens']:,} train tokens, "
          f"{splits['eval']['tokens']:,} eval) and report.json in {report['seconds']}s")
    return report


NEIGHBOURS_FILE, NEIGHBOUR_SCORES_FILE = "neighbours.npy", "neighbour_scores.npy"


def shapes_reconstruction_exact(vq: VQVAE, docs: list[Document]) -> float:
    """Share of the shapes images whose VQ reconstruction the world's exact checker passes (every
    object's colour, shape, size and position): the ceiling of text→image accuracy with this tokenizer."""
    from tokenizers_mm.images import tensor_to_pil
    from train.data.shapes import check_scene, scenes_of

    x = torch.from_numpy(images_array(docs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    recon = tensor_to_pil(vq.decode(vq.encode(x)))
    scenes = [s for d in docs for s in scenes_of(d)]
    return sum(check_scene(img, s).exact for img, s in zip(recon, scenes, strict=True)) / len(scenes)


def flat(sources: dict[str, list[Document]]) -> list[Document]:
    """All documents in shard order (sources in order, each source's documents in order)."""
    return [d for docs in sources.values() for d in docs]


def bpe_texts(docs: list[Document]) -> list[str]:
    """The texts the BPE learns its merges from: every text, less a digit caption's made-up word
    (train.data.digits.made_up_word). Noise must not shape the vocabulary (with them the BPE grew
    from 591 to 1,099 tokens of random letter pairs); the model reads a made-up word in the pieces
    an unseen word would be split into."""
    out = []
    for d in docs:
        word = d.meta.get("made_up_word")
        out += [" ".join(w for w in t.split(" ") if w != word) if word else t for t in d.texts]
    return out


def retriever_documents(train_docs: dict[str, list[Document]], digit_copies: int) -> list[Document]:
    """The retriever's training documents: every source's, but of the digits only the originals
    and their first `digit_copies` augmented copies (digits_documents stores copy k after copy k-1)."""
    docs = dict(train_docs)
    if "digits" in docs:
        originals = sum(1 for d in docs["digits"] if not d.meta.get("augmented"))
        docs["digits"] = docs["digits"][: originals * (1 + digit_copies)]
    return flat(docs)


def train_retrieval(cfg: TokenizeConfig, tok: MultimodalTokenizer, train_docs: dict[str, list[Document]],
                    eval_docs: dict[str, list[Document]], out: Path) -> tuple[Any, dict]:
    """Train the dense retriever on the training split's image-caption pairs, save it to
    out/retriever, and measure it on the eval split: recall@1/5 both ways, the curation
    demonstration (20% shuffled captions) and CLIP-style zero-shot accuracy on digits."""
    from model.retrieval import retriever_preset
    from train.retriever import (DIGIT_TEMPLATES, curation_demo, evaluate_retrieval, pairs_from_documents,
                                 train_retriever, zero_shot_classify)

    t0 = time.time()
    pairs = pairs_from_documents(retriever_documents(train_docs, cfg.retriever_digit_copies), tok)
    rcfg = retriever_preset(cfg.retriever_preset, tok.text_vocab_size, image_size=cfg.image_size)
    retriever = train_retriever(pairs, rcfg, settings=cfg.retriever_preset, seed=cfg.seed,
                                time_limit_s=cfg.retriever_time_limit_s, progress=False)
    t_train = time.time() - t0
    retriever.save(out / "retriever")
    recalls, curation = {}, {}
    for name, docs in eval_docs.items():
        p = pairs_from_documents(docs, tok)
        if len(p.texts) < 2:
            continue
        recalls[name] = {k: round(v, 4) for k, v in evaluate_retrieval(retriever, p.images, p.texts, p.keys).items()}
        curation[name] = curation_demo(retriever, p, 0.2, position=cfg.curation_position,
                                       duplicate_threshold=cfg.curation_duplicate_threshold, seed=cfg.seed)
    report: dict[str, Any] = {"preset": cfg.retriever_preset, "params": sum(p.numel() for p in retriever.parameters()),
                              "train_pairs": len(pairs.texts), "eval": recalls, "curation_demo": curation}
    if "digits" in eval_docs:
        from train.data.digits import DIGIT_WORDS

        dig = pairs_from_documents(eval_docs["digits"], tok)
        labels = torch.tensor([int(k.split(":")[1]) for k in dig.keys])
        probs = zero_shot_classify(retriever, tok, dig.images, DIGIT_WORDS, DIGIT_TEMPLATES)
        report["zero_shot_digits_accuracy"] = round(float((probs.argmax(1) == labels).float().mean()), 4)
    report["seconds_train"] = round(t_train, 1)
    report["seconds_train_and_eval"] = round(time.time() - t0, 1)
    return retriever, report


def curate_documents(cfg: TokenizeConfig, retriever: Any, tok: MultimodalTokenizer,
                     train_docs: dict[str, list[Document]]) -> tuple[dict[str, list[Document]], dict]:
    """DataComp-style filter on the training caption pairs (stories kept): drop pairs whose
    image-caption score is below a threshold calibrated on the corpus itself, and near-duplicates."""
    from train.retriever import calibrate_threshold, curate

    kept: dict[str, list[Document]] = {}
    counts = {"pairs": 0, "dropped_low_score": 0, "dropped_duplicate": 0, "thresholds": {}}
    for name, docs in train_docs.items():
        pair_pos = [i for i, d in enumerate(docs) if d.is_pair()]
        if len(pair_pos) < 2:
            kept[name] = docs
            continue
        images = torch.from_numpy(np.stack([np.asarray(docs[i].images[0].convert("RGB"), np.uint8) for i in pair_pos]))
        texts = [tok.encode_text(docs[i].texts[0]) or [0] for i in pair_pos]
        threshold = calibrate_threshold(retriever, images, texts, cfg.curation_position, cfg.seed)
        res = curate(retriever, images, texts, threshold, cfg.curation_duplicate_threshold)
        drop = {pair_pos[j] for j in (~res.kept).nonzero().flatten().tolist()}
        kept[name] = [d for i, d in enumerate(docs) if i not in drop]
        counts["pairs"] += len(pair_pos)
        counts["dropped_low_score"] += int(res.low_score.sum())
        counts["dropped_duplicate"] += int(res.duplicate.sum())
        counts["thresholds"][name] = round(threshold, 4)
    return kept, counts


def bank_documents(shard: Any) -> list[list[int]]:
    """Each shard document as the model reads it behind <break>: text ids and <boi> codes <eoi>,
    caption pairs in caption→image order, stories as they are."""
    from tokenizers_mm.special import BOI_ID, EOI_ID

    out = []
    for i in range(len(shard)):
        segs = shard.document(i)
        if len(segs) == 2 and segs[0].is_image and not segs[1].is_image:
            segs = [segs[1], segs[0]]
        out.append([t for s in segs for t in ([BOI_ID, *s.ids.tolist(), EOI_ID] if s.is_image else s.ids.tolist())])
    return out


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_neighbours(cfg: TokenizeConfig, retriever: Any, tok: MultimodalTokenizer, train_docs: dict[str, list[Document]],
                     eval_docs: dict[str, list[Document]], out: Path) -> dict:
    """The memory bank (every training document's embedding in an exact index, and its token ids)
    in out/retriever, and each document's precomputed neighbours beside its shard: computed once
    here, so that training sequences (and so a resumed run) never depend on anything else."""
    from model.retrieval import INDEX_DIR, DocumentBank, build_index
    from train.retriever import document_embeddings, query_embeddings, query_neighbours
    from train.shards import Shard

    t0 = time.time()
    train_flat, eval_flat = flat(train_docs), flat(eval_docs)
    emb = document_embeddings(retriever, tok, train_flat)  # (N, dim)
    ids = torch.arange(len(emb))
    index = build_index(emb, ids)
    index.save(out / "retriever" / INDEX_DIR)
    DocumentBank.from_documents(bank_documents(Shard(out / "shards" / "train"))).save(out / "retriever")
    stats = {"k": cfg.retrieval_k, "max_score": cfg.retrieval_max_score, "query": "text or image half (train), text (eval)"}
    # training queries: the text half (query dropout) or the image half of each document; eval
    # queries: the text only, so the image NLL measured with retrieval does not see the image
    for split, docs, mode, own in (("train", train_flat, "mixed", ids), ("eval", eval_flat, "text", None)):
        if not docs:
            continue
        q = query_embeddings(retriever, tok, docs, mode=mode, seed=cfg.seed, dropout=cfg.query_dropout)
        doc_emb = emb if split == "train" else document_embeddings(retriever, tok, docs)
        r = query_neighbours(index, q, doc_emb, emb, cfg.retrieval_k, own_ids=own, max_score=cfg.retrieval_max_score)
        save_npy_atomic(out / "shards" / split / NEIGHBOURS_FILE, r.ids.numpy().astype(np.int64))
        save_npy_atomic(out / "shards" / split / NEIGHBOUR_SCORES_FILE, r.scores.numpy().astype(np.float32))
        valid = r.ids >= 0
        stats[split] = {"docs": len(docs), "filled": round(float(valid.float().mean()), 4),
                        "mean_top1_score": round(float(r.scores[valid[:, 0], 0].mean()), 4) if valid[:, 0].any() else None}
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


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
