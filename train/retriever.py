"""Train and evaluate the dense retriever (model/retrieval.py), and use it: zero-shot
classification and data curation.

    python -m train.retriever --tokenizer artifacts/tokenizer --out artifacts/retriever [--preset default]
                              [--set key=value ...]

trains on shapes-train + digits-train image-caption pairs and writes into OUT:
    retriever_config.json, retriever.safetensors   load with model.retrieval.Retriever.from_pretrained
    report.json          recall@1/5 text→image and image→text per corpus (eval split), attribute-correct@1,
                         curation demonstration, zero-shot accuracy on the digits test split, timings
    retrieval_examples.png   query captions (eval) → their top-5 eval images
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from model.precision import bf16_pays
from model.retrieval import Index, Retriever, RetrieverConfig, SearchResult, contrastive_loss, retriever_preset
from tokenizers_mm.document import Document
from train.overrides import apply_overrides
from train.vq import lr_at


class TextEncoder(Protocol):
    """Anything with MultimodalTokenizer's `encode_text` (str -> BPE ids)."""

    def encode_text(self, s: str) -> list[int]: ...


@dataclass(frozen=True)
class RetrieverTrainSettings:
    """Optimisation settings calibrated per preset (used when train_retriever gets None)."""

    steps: int  # AdamW steps
    batch_size: int  # pairs per step (the contrastive loss sees batch_size² image-text pairs)
    lr: float  # peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.1


# "default": ≤ 60 s on this 2-core CPU with 1 thread, another job on the other core: 400 steps took
# 51 s, 61 s in a busier moment (250 steps: shapes attribute-correct@1 0.93; 400: 0.94, digits
# zero-shot 0.997); 350 steps, and the CLI caps training at 60 s of wall time
RETRIEVER_TRAIN_SETTINGS: dict[str, RetrieverTrainSettings] = {
    "tiny": RetrieverTrainSettings(steps=40, batch_size=64, lr=3e-3),
    "default": RetrieverTrainSettings(steps=350, batch_size=128, lr=2e-3),
}


class PairSet(NamedTuple):
    """Image-text pairs for training or evaluating the retriever."""

    images: torch.Tensor  # uint8 (N, S, S, 3) pixels, or int64 (N, grid*grid) VQ codes
    texts: list[list[int]]  # BPE ids per pair
    keys: list[str]  # ground truth of what the image shows ("" if unknown); pairs with equal keys match
    sources: list[str]  # corpus of each pair


def document_key(doc: Document, image_index: int = 0) -> str:
    """What an image of a document shows, without its jitter: "digit:7", or for the shapes world
    the sorted objects (size, colour, shape, position) and relation. "" when unknown. Two images
    with equal keys fit the same captions, so `attribute-correct@1` counts them as right."""
    meta = doc.meta or {}
    if "label" in meta:
        return f"digit:{meta['label']}"
    if "images" in meta and len(meta["images"]) > image_index:
        objs = [f"{o['size']} {o['colour']} {o['shape']} {o['position']}" for o in meta["images"][image_index]]
        rel = meta.get("relation") if len(objs) > 1 else None
        return "shapes:" + (f" {rel} ".join(objs) if rel else "|".join(sorted(objs)))
    return ""


def pairs_from_documents(docs: Sequence[Document], tokenizer: TextEncoder, codes: bool = False,
                         image_encoder: Any = None) -> PairSet:
    """One (text, image) pair per document: its first text segment and first image (a caption
    pair; for a story, the opening sentence and frame it describes). Documents lacking either are
    skipped. codes=True stores VQ codes (`image_encoder.encode_images`, a MultimodalTokenizer)."""
    kept = [d for d in docs if d.texts and d.images]
    texts = [tokenizer.encode_text(d.texts[0]) for d in kept]
    imgs = [d.images[0] for d in kept]
    if codes:
        if image_encoder is None:
            raise ValueError("codes=True needs image_encoder (a MultimodalTokenizer) to turn images into VQ codes")
        images = image_encoder.encode_images(imgs)
    else:
        images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in imgs])) if imgs \
            else torch.zeros(0, 1, 1, 3, dtype=torch.uint8)
    return PairSet(images, texts, [document_key(d) for d in kept], [d.source for d in kept])


def _text_groups(texts: Sequence[Sequence[int]]) -> torch.Tensor:
    """An int64 (N,) id per distinct text: pairs sharing a caption are positives of each other."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(tuple(t), len(seen)) for t in texts], dtype=torch.long)


def train_retriever(pairs: PairSet | tuple[torch.Tensor, Sequence[Sequence[int]]], config: RetrieverConfig,
                    steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                    settings: str = "default", seed: int = 0, progress: bool = True, bf16: bool | None = None,
                    time_limit_s: float | None = None) -> Retriever:
    """Train a Retriever contrastively on image-text pairs and return it in eval mode.

    pairs: a PairSet, or (images, texts) with images uint8 (N, S, S, 3) / float (N, 3, S, S) in
      [-1, 1] / int64 codes (N, grid*grid), and texts N lists of BPE ids.
    config.loss: "clip" (symmetric InfoNCE) or "siglip" (sigmoid). Pairs in a batch with the same
      caption count as positives of each other, so repeated captions are not pushed apart.
    steps/batch_size/lr: None takes RETRIEVER_TRAIN_SETTINGS[settings].
    time_limit_s: stop after this much wall time (the schedule follows whichever runs out first).
    Deterministic for a seed (without time_limit_s). Raises on a non-finite loss, naming the step.
    """
    images, texts = pairs[0], pairs[1]
    defaults = RETRIEVER_TRAIN_SETTINGS[settings]
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    n = len(texts)
    if len(images) != n:
        raise ValueError(f"train_retriever got {len(images)} images and {n} texts; expected one text per image")
    if n < 2:
        raise ValueError(f"train_retriever needs at least 2 pairs for a contrastive loss; found {n}")
    if steps < 1 or batch_size < 2 or not lr > 0:
        raise ValueError(f"need steps ≥ 1, batch_size ≥ 2, lr > 0; found steps={steps}, batch_size={batch_size}, lr={lr}")
    use_bf16 = bf16_pays(torch.device("cpu")) if bf16 is None else bf16
    torch.manual_seed(seed)
    model = Retriever(config).train()
    x_all = images if config.image_input == "codes" else _as_uint8(images)
    model.prepare_images(x_all[:1])  # validates the format early
    ids_all, mask_all = model.pad_texts(texts)
    groups = _text_groups(texts)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embed" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": defaults.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    b = min(batch_size, n)
    bar = tqdm(range(steps), desc="retriever", disable=not progress, dynamic_ncols=True, leave=False)
    t_start = time.perf_counter()
    ema = None
    for step in bar:
        elapsed = time.perf_counter() - t_start
        if time_limit_s is not None and elapsed >= time_limit_s:
            break
        sched = step if time_limit_s is None else max(step, int(steps * elapsed / time_limit_s))
        for g in opt.param_groups:
            g["lr"] = lr_at(min(sched, steps - 1), steps, lr)
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + b]
        pos += b
        x = x_all[idx] if config.image_input == "codes" else x_all[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        ids, mask = ids_all[idx], mask_all[idx]
        t = int(mask.sum(1).max())  # trim padding to the batch's longest text
        g = groups[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            img = model.encode_images(x)
            txt = model.encode_texts(ids[:, :t], mask[:, :t])
        loss = contrastive_loss(model, img, txt, positives=g[:, None] == g[None, :])
        if not torch.isfinite(loss):
            raise RuntimeError(f"retriever loss is {loss.item()} at step {step}; lower lr (now {lr}) or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", tau=f"{1 / model.logit_scale.exp().item():.3f}")
    return model.eval()


def _as_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) or float (N, 3, S, S) in [-1, 1] -> uint8 (N, S, S, 3) (compact in memory)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, S, S, 3); found {tuple(images.shape)}")
        return images
    if images.is_floating_point() and images.ndim == 4 and images.shape[1] == 3:
        return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    raise ValueError(f"images must be uint8 (N, S, S, 3) or float (N, 3, S, S) in [-1, 1]; found "
                     f"{images.dtype} {tuple(images.shape)} (VQ codes need a config with image_input='codes')")


# ================================================================================ banks


@torch.no_grad()
def document_embeddings(retriever: Retriever, tokenizer: TextEncoder, docs: Sequence[Document],
                        batch_size: int = 1024) -> torch.Tensor:
    """Unit vectors (N, dim), one per document, as RA-CM3 embeds its memory bank: the normalised
    mean of the document's text part and image part (Retriever.embed_documents), stories included.
    Pixels retrievers only (a codes retriever needs the codes: call embed_documents directly)."""
    out = []
    for i in range(0, len(docs), batch_size):
        part = docs[i : i + batch_size]
        texts = [[tokenizer.encode_text(t) for t in d.texts] for d in part]
        out.append(retriever.embed_documents(texts, [d.images for d in part]))
    return torch.cat(out) if out else torch.zeros(0, retriever.config.dim)


@torch.no_grad()
def bank_neighbours(index: Index, embeddings: torch.Tensor, ids: torch.Tensor, k: int,
                    max_score: float | None = None, batch_size: int = 1024) -> SearchResult:
    """Top-k neighbours of every bank entry within the bank itself, never the entry's own id and
    never one scoring above `max_score` (near-duplicates): what retrieval-augmented training
    prepends, computed once so that resume stays exact. embeddings (N, dim), ids (N,) as added to
    the index. Returns SearchResult with (N, k) scores and ids (-1 where fewer than k qualify)."""
    scores, found = [], []
    for i in range(0, len(embeddings), batch_size):
        own = ids[i : i + batch_size].view(-1, 1)
        r = index.search(embeddings[i : i + batch_size], k, exclude=own, max_score=max_score)
        scores.append(r.scores)
        found.append(r.ids)
    if not scores:
        return SearchResult(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long))
    return SearchResult(torch.cat(scores), torch.cat(found))


QUERY_MODES = ("mixed", "text", "document")


@torch.no_grad()
def query_embeddings(retriever: Retriever, tokenizer: TextEncoder, docs: Sequence[Document], mode: str = "mixed",
                     seed: int = 0, dropout: float = 0.2, batch_size: int = 1024) -> torch.Tensor:
    """The retrieval query of each document as a unit vector (N, dim).

    mode "mixed" (training, as the issue asks): per document, from an rng seeded by (seed,
      position), the query is its text half (each text token dropped with probability `dropout`,
      at least one kept per segment) or its image half, half the time each — so the model learns
      from neighbours found either way, as at inference where the prompt may be text or image.
    mode "text": the document's text alone, no dropout (held-out evaluation: a caption→image
      prompt has only the caption, and the image being scored must not leak in via its neighbours).
    mode "document": the whole document (RA-CM3's bank embedding).
    A document lacking the chosen half falls back to the half it has.
    """
    if mode not in QUERY_MODES:
        raise ValueError(f"query mode must be one of {QUERY_MODES}; found {mode!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"query dropout must be in [0, 1); found {dropout}")
    out = []
    for start in range(0, len(docs), batch_size):
        texts, images = [], []
        for i, d in enumerate(docs[start : start + batch_size], start):
            t = [tokenizer.encode_text(x) for x in d.texts]
            t = [x for x in t if x]
            use_text = bool(t) and (mode == "text" or not d.images)
            use_image = bool(d.images) and (mode != "text" or not t)
            if mode == "mixed" and t and d.images:
                rng = np.random.default_rng([seed, i, 0x9E7])
                use_text = rng.random() < 0.5
                use_image = not use_text
                if use_text and dropout > 0:
                    kept = []
                    for x in t:
                        keep = rng.random(len(x)) >= dropout
                        keep[int(rng.integers(len(x)))] = True  # never an empty query
                        kept.append([tok for tok, k in zip(x, keep) if k])
                    t = kept
            elif mode == "document":
                use_text, use_image = bool(t), bool(d.images)
            texts.append(t if use_text else [])
            images.append(d.images if use_image else [])
        out.append(retriever.embed_documents(texts, images))
    return torch.cat(out) if out else torch.zeros(0, retriever.config.dim)


@torch.no_grad()
def query_neighbours(index: Index, queries: torch.Tensor, doc_embeddings: torch.Tensor, bank_embeddings: torch.Tensor,
                     k: int, own_ids: torch.Tensor | None = None, max_score: float | None = None,
                     candidates: int = 64, batch_size: int = 1024) -> SearchResult:
    """Top-k bank entries for each query, never the document's own id (`own_ids`, (N,), for bank
    documents) and never a near-duplicate of the document: an entry whose document embedding has
    cosine above `max_score` with the querying document's (`doc_embeddings`, (N, dim)), checked
    document to document because a text or image query scores lower than the documents it
    finds. `candidates` entries are searched per query and filtered in rank order.
    bank_embeddings: (len(index), dim) with row i = the entry of id i. Returns (N, k) scores and
    ids (query-entry scores; -1 where fewer than k qualify)."""
    if k < 1:
        raise ValueError(f"k must be at least 1; found {k}")
    c = min(max(candidates, k), len(index))
    scores = torch.full((len(queries), k), float("-inf"))
    found = torch.full((len(queries), k), -1, dtype=torch.long)
    for start in range(0, len(queries), batch_size):
        sl = slice(start, start + batch_size)
        exclude = own_ids[sl].view(-1, 1) if own_ids is not None else None
        r = index.search(queries[sl], c, exclude=exclude)
        ok = r.ids >= 0
        if max_score is not None:
            cand = bank_embeddings[r.ids.clamp(min=0)].float()  # (B, c, dim)
            dup = (cand * doc_embeddings[sl].float().unsqueeze(1)).sum(-1) > max_score
            ok &= ~dup
        rank = ok.long().cumsum(1) - 1  # position among the kept candidates
        take = ok & (rank < k)
        rows, cols = take.nonzero(as_tuple=True)
        scores[rows + start, rank[rows, cols]] = r.scores[rows, cols]
        found[rows + start, rank[rows, cols]] = r.ids[rows, cols]
    return SearchResult(scores, found)


# ================================================================================ evaluation


def recall_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of queries whose target is among the k best-scoring candidates.

    scores: (Q, N) query-candidate similarities; targets: (Q,) index of each query's right candidate.
    Ties count against the query (rank = number of candidates scoring strictly higher, plus ties
    placed before it), so a constant scorer gets recall@1 = 0 rather than 1.
    """
    right = scores.gather(1, targets.view(-1, 1))  # (Q, 1)
    rank = (scores > right).sum(1) + ((scores == right).sum(1) - 1)  # ties before the target
    return float((rank < k).float().mean())


@torch.no_grad()
def evaluate_retrieval(retriever: Retriever, images: torch.Tensor | Sequence[Image.Image], texts: Sequence[Sequence[int]],
                       keys: Sequence[str] | None = None) -> dict[str, float]:
    """Recall on held-out pairs: pair i's text should retrieve pair i's image and vice versa.

    Returns {"t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5"} (image→text ranks the
    distinct captions, since a corpus repeats captions verbatim), plus, with keys (what
    each image shows, `document_key`), "t2i_correct@1" / "i2t_correct@1": the top hit shows the same
    thing as the right one (many shapes captions fit several images, which recall counts as misses).
    """
    if len(images) != len(texts):
        raise ValueError(f"evaluate_retrieval got {len(images)} images and {len(texts)} texts; expected pairs")
    img = retriever.embed_images(images)
    txt = retriever.embed_texts(texts)
    s = txt @ img.T  # (N texts, N images)
    target = torch.arange(len(texts))
    out = {f"t2i_recall@{k}": recall_at_k(s, target, k) for k in (1, 5)}
    # image→text over distinct captions: identical captions are one candidate, not k tied ones
    groups = _text_groups(texts)
    first_of: dict[int, int] = {}
    for i, g in enumerate(groups.tolist()):
        first_of.setdefault(g, i)
    first = torch.tensor([first_of[g] for g in range(len(first_of))], dtype=torch.long)  # one pair per caption
    s_i2t = s[first].T  # (N images, distinct captions)
    out.update({f"i2t_recall@{k}": recall_at_k(s_i2t, groups, k) for k in (1, 5)})
    if keys is not None and any(keys):
        key_ids = _text_groups([[hash(k)] for k in keys])
        out["t2i_correct@1"] = float((key_ids[s.argmax(1)] == key_ids).float().mean())
        out["i2t_correct@1"] = float((key_ids[s.argmax(0)] == key_ids).float().mean())
    return out


@torch.no_grad()
def zero_shot_classify(retriever: Retriever, tokenizer: TextEncoder, images: torch.Tensor | Sequence[Image.Image],
                       labels: Sequence[str], templates: Sequence[str] = ("a photo of {}",)) -> torch.Tensor:
    """CLIP-style zero-shot classification (Radford et al. 2021, §3.1.4): each class is the
    normalised mean embedding of its prompts ("a handwritten digit {}" for every template, prompt
    ensembling), and an image's class probabilities are a softmax over its scaled cosine
    similarities to the classes. The discriminative baseline for sample/'s Bayes-rule classifier.

    images: (N, ...) as Retriever.embed_images takes; labels: C class names filled into templates.
    Returns probabilities (N, C) float32, rows summing to 1.
    """
    if not labels or not templates:
        raise ValueError("zero_shot_classify needs at least one label and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' placeholder for the label; found {bad}")
    prompts = [tokenizer.encode_text(t.format(lab)) for lab in labels for t in templates]
    emb = retriever.embed_texts(prompts).view(len(labels), len(templates), -1)
    classes = F.normalize(emb.mean(1), dim=-1)  # (C, D)
    img = retriever.embed_images(images)  # (N, D)
    scale = retriever.logit_scale.detach().clamp(max=np.log(100.0)).exp()
    return torch.softmax(scale * img @ classes.T, dim=-1)


# ================================================================================ curation


class CurationResult(NamedTuple):
    """Which pairs a DataComp-style filter keeps, and why the others went."""

    kept: torch.Tensor  # bool (N,)
    scores: torch.Tensor  # float32 (N,) image-text cosine similarity of each pair
    low_score: torch.Tensor  # bool (N,) dropped: score below the threshold
    duplicate: torch.Tensor  # bool (N,) dropped: a near-duplicate of an earlier kept pair


@torch.no_grad()
def curate(retriever: Retriever, images: torch.Tensor | Sequence[Image.Image], texts: Sequence[Sequence[int]],
           threshold: float, duplicate_threshold: float | None = 0.999, chunk_size: int = 4096) -> CurationResult:
    """Filter image-text pairs as DataComp (Gadre et al. 2023) does with CLIP scores: drop pairs
    whose image-text cosine similarity is below `threshold` (a caption that does not describe its
    image), then drop near-duplicates: a pair whose document embedding (RA-CM3's mean of image and
    text) has cosine > `duplicate_threshold` with an earlier pair that passed the score filter
    (the first of a cluster is kept). duplicate_threshold=None keeps duplicates."""
    img = retriever.embed_images(images)
    txt = retriever.embed_texts(texts)
    scores = (img * txt).sum(-1)
    low = scores < threshold
    dup = torch.zeros(len(scores), dtype=torch.bool)
    if duplicate_threshold is not None and len(scores):
        doc = F.normalize(img + txt, dim=-1)
        ok = ~low
        for start in range(0, len(doc), chunk_size):
            s = doc[start : start + chunk_size] @ doc.T  # (chunk, N)
            rows = torch.arange(start, start + len(s)).view(-1, 1)
            earlier = torch.arange(len(doc)).view(1, -1) < rows
            dup[start : start + len(s)] = ((s > duplicate_threshold) & earlier & ok.view(1, -1)).any(1)
        dup &= ok
    return CurationResult(~low & ~dup, scores, low, dup)


@torch.no_grad()
def calibrate_threshold(retriever: Retriever, images: torch.Tensor | Sequence[Image.Image],
                        texts: Sequence[Sequence[int]], position: float = 0.5, seed: int = 0) -> float:
    """A score threshold chosen without labels: `position` of the way from the median score of
    deliberately mismatched pairs (each image with a random other pair's caption) up to the median
    score of the corpus's own pairs. Medians stay put when a minority of the corpus is corrupt, or
    when some random re-pairings happen to match (one in ten for digits), where a tail quantile of
    the mismatched scores would land among the good pairs."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1]; found {position}")
    img = retriever.embed_images(images)
    txt = retriever.embed_texts(texts)
    n = len(txt)
    g = torch.Generator().manual_seed(seed)
    other = (torch.arange(n) + torch.randint(1, max(n, 2), (n,), generator=g)) % n  # never itself
    lo = float((img * txt[other]).sum(-1).median())
    hi = float((img * txt).sum(-1).median())
    return lo + position * (hi - lo)


def corrupt_captions(texts: Sequence[Sequence[int]], fraction: float = 0.2, seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """Move `fraction` of captions to wrong images: the chosen pairs' captions are rotated among
    themselves (a derangement, so none keeps its own). Returns (texts, corrupted bool (N,))."""
    n = len(texts)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    out = [list(t) for t in texts]
    if len(chosen) >= 2:
        for a, b in zip(chosen.tolist(), chosen.roll(1).tolist()):
            out[a] = list(texts[b])
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[chosen] = len(chosen) >= 2
    return out, corrupted


def curation_demo(retriever: Retriever, pairs: PairSet, fraction: float = 0.2, threshold: float | None = None,
                  position: float = 0.5, duplicate_threshold: float | None = 0.999, seed: int = 0) -> dict[str, Any]:
    """The DataComp-style filter on a corpus with `fraction` of its captions shuffled to wrong
    images. threshold None: `calibrate_threshold` on the corrupted corpus itself (no labels used).

    Reports, among pairs whose caption is really wrong (with keys: the moved caption describes a
    different thing — a shuffled digit caption names the right digit 1 time in 10), the share
    removed, and among clean pairs the share lost (by the score filter alone, and in total with
    the duplicate filter)."""
    texts, moved = corrupt_captions(pairs.texts, fraction, seed)
    if any(pairs.keys):
        owner = torch.arange(len(texts))
        # where each caption came from: recover by matching the rotation (same rule as corrupt_captions)
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(texts), generator=g)[: int(round(fraction * len(texts)))]
        if len(chosen) >= 2:
            owner[chosen] = chosen.roll(1)
        wrong = torch.tensor([pairs.keys[i] != pairs.keys[j] for i, j in enumerate(owner.tolist())])
    else:
        wrong = moved
    if threshold is None:
        threshold = calibrate_threshold(retriever, pairs.images, texts, position, seed)
    res = curate(retriever, pairs.images, texts, threshold, duplicate_threshold)
    clean = ~moved
    share = lambda m, of: float((m & of).sum()) / max(1, int(of.sum()))  # noqa: E731
    return {
        "pairs": len(texts), "corrupted": int(moved.sum()), "corrupted_wrong": int(wrong.sum()),
        "threshold": round(threshold, 4), "position": position, "duplicate_threshold": duplicate_threshold,
        "corrupted_removed": round(share(~res.kept, wrong), 4),
        "corrupted_removed_by_score": round(share(res.low_score, wrong), 4),
        "clean_lost_by_score": round(share(res.low_score, clean), 4),
        "clean_lost": round(share(~res.kept, clean), 4),
        "duplicates_dropped": int(res.duplicate.sum()),
        "kept": int(res.kept.sum()),
    }


# ================================================================================ the CLI


@dataclass
class RetrieverRunConfig:
    """What `python -m train.retriever` trains on and how; any field can be overridden with --set."""

    preset: str = "default"  # a key of model.retrieval.RETRIEVER_PRESETS (and of RETRIEVER_TRAIN_SETTINGS)
    image_input: str = "pixels"  # "pixels" or "codes" (VQ codes from the tokenizer's VQ-VAE)
    loss: str = "clip"  # "clip" or "siglip"
    shapes_train: int = 20_000  # as in `make tokenize` (the retriever sees the same training split)
    shapes_eval: int = 1_000
    digits_augment_copies: int = 4  # as the retriever trains in `make tokenize` (TokenizeConfig.retriever_digit_copies)
    steps: int | None = None  # None: RETRIEVER_TRAIN_SETTINGS[preset]
    batch_size: int | None = None
    lr: float | None = None
    curation_position: float = 0.5  # threshold between the medians of mismatched and own pairs (calibrate_threshold)
    curation_duplicate_threshold: float = 0.999  # this retriever puts same-content pairs at 0.99+ (measured)
    time_limit_s: float | None = 60.0  # hard cap on retriever training (it runs inside `make tokenize`)
    seed: int = 0


RUN_PRESETS: dict[str, RetrieverRunConfig] = {
    "tiny": RetrieverRunConfig(preset="tiny", shapes_train=300, shapes_eval=60, digits_augment_copies=0),
    "default": RetrieverRunConfig(),
}

DIGIT_TEMPLATES: tuple[str, ...] = ("a handwritten digit {}", "the digit {}, written by hand", "a scan of a handwritten {}")


def retrieval_grid(retriever: Retriever, pairs: PairSet, pils: Sequence[Image.Image], captions: Sequence[str],
                   queries: Sequence[int], k: int = 5, scale: int = 3) -> Image.Image:
    """A picture: one row per query caption (drawn as text), then its top-k images from `pils`,
    the right image framed in green."""
    img = retriever.embed_images(pairs.images)
    txt = retriever.embed_texts([pairs.texts[q] for q in queries])
    top = (txt @ img.T).topk(k, dim=1).indices
    side = pils[0].size[0] * scale
    pad, text_w = 4, 380
    canvas = Image.new("RGB", (text_w + k * (side + pad) + pad, len(queries) * (side + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for r, q in enumerate(queries):
        y = pad + r * (side + pad)
        draw.text((6, y + side // 2 - 6), captions[q][:62], fill=(230, 230, 230))
        for c, j in enumerate(top[r].tolist()):
            x = text_w + pad + c * (side + pad)
            canvas.paste(pils[j].resize((side, side), Image.Resampling.NEAREST), (x, y))
            if pairs.keys[j] and pairs.keys[j] == pairs.keys[q]:
                draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(40, 220, 40), width=2)
    return canvas


def run(cfg: RetrieverRunConfig, tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    """Train on shapes-train + digits-train, evaluate on the eval splits, write OUT (see module doc)."""
    from tokenizers_mm.multimodal import MultimodalTokenizer
    from train.data.digits import DIGIT_WORDS, digits_documents
    from train.data.shapes import shapes_documents

    t0 = time.time()
    tok = MultimodalTokenizer.from_pretrained(tokenizer_dir)
    codes = cfg.image_input == "codes"
    train_docs = shapes_documents("train", cfg.shapes_train, seed=cfg.seed, size=tok.image_size) + \
        digits_documents("train", size=tok.image_size, augment_copies=cfg.digits_augment_copies, seed=cfg.seed)
    eval_docs = {"shapes": shapes_documents("eval", cfg.shapes_eval, seed=cfg.seed, size=tok.image_size),
                 "digits": digits_documents("eval", size=tok.image_size)}
    train_pairs = pairs_from_documents(train_docs, tok, codes=codes, image_encoder=tok)
    eval_pairs = {k: pairs_from_documents(v, tok, codes=codes, image_encoder=tok) for k, v in eval_docs.items()}
    t_data = time.time() - t0
    print(f"[retriever] {len(train_pairs.texts):,} train pairs, eval {({k: len(v.texts) for k, v in eval_pairs.items()})} "
          f"({t_data:.1f}s)")

    extra = dict(codebook_size=tok.layout.codebook_size, grid=tok.grid) if codes else {}
    rcfg = retriever_preset(cfg.preset, tok.text_vocab_size, image_input=cfg.image_input, loss=cfg.loss,
                            image_size=tok.image_size, **extra)
    t1 = time.time()
    retriever = train_retriever(train_pairs, rcfg, cfg.steps, cfg.batch_size, cfg.lr, settings=cfg.preset, seed=cfg.seed,
                                time_limit_s=cfg.time_limit_s)
    t_train = time.time() - t1
    retriever.save(out)

    recalls = {k: {m: round(v, 4) for m, v in evaluate_retrieval(retriever, p.images, p.texts, p.keys).items()}
               for k, p in eval_pairs.items()}
    curation = {k: curation_demo(retriever, p, 0.2, position=cfg.curation_position,
                                 duplicate_threshold=cfg.curation_duplicate_threshold, seed=cfg.seed)
                for k, p in eval_pairs.items()}
    dig = eval_pairs["digits"]
    labels = torch.tensor([int(k.split(":")[1]) for k in dig.keys])
    probs = zero_shot_classify(retriever, tok, dig.images, DIGIT_WORDS, DIGIT_TEMPLATES)
    zero_shot = round(float((probs.argmax(1) == labels).float().mean()), 4)

    rows = []
    for name, docs in eval_docs.items():
        p = eval_pairs[name]
        pils = [d.images[0] for d in docs if d.texts and d.images]
        caps = [d.texts[0] for d in docs if d.texts and d.images]
        step = max(1, len(caps) // 4)
        rows.append(retrieval_grid(retriever, p, pils, caps, list(range(0, len(caps), step))[:4]))
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (40, 40, 40))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(out / "retrieval_examples.png")

    report = {
        "run": dataclasses.asdict(cfg), "retriever": rcfg.to_dict(),
        "params": sum(p.numel() for p in retriever.parameters()),
        "train_pairs": len(train_pairs.texts), "eval": recalls, "curation": curation,
        "zero_shot_digits_accuracy": zero_shot, "zero_shot_templates": list(DIGIT_TEMPLATES),
        "temperature": round(1 / float(retriever.logit_scale.detach().exp()), 4),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    print(json.dumps({"eval": recalls, "curation": curation, "zero_shot": zero_shot, "seconds": report["seconds"]}, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.retriever", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, type=Path, help="a MultimodalTokenizer folder (from `make tokenize`)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", default="default", choices=sorted(RUN_PRESETS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RetrieverRunConfig field")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    try:
        cfg = apply_overrides(RUN_PRESETS[args.preset], args.set)
        args.out.mkdir(parents=True, exist_ok=True)
        run(cfg, args.tokenizer, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
