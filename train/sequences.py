"""Training sequences from tokenized documents, and their packing into fixed-length rows.

Pure numpy functions of (document, rng): every random choice for a document comes from an rng
seeded by (seed, epoch, document index), so a sequence never depends on the order in which
documents are visited, and a resumed run rebuilds exactly the same rows.

Sequence shapes (DESIGN.md, "The token stream"):
    caption→image   <bos> caption <boi> codes <eoi> <eos>
    image→caption   <bos> <boi> codes <eoi> caption <eos>
    caption dropped <bos> <boi> codes <eoi> <eos>        (the unconditional stream of guidance)
    interleaved     <bos> text <boi> codes <eoi> text <boi> codes <eoi> ... <eos>
    CM3 (optional)  <bos> prefix <mask> suffix <infill> span <eom> <eos>
    retrieval       <bos> neighbour_K <break> ... neighbour_1 <break> main document <eos>
                    (RA-CM3 / CM3Leon; K drawn per document, the best neighbour next to the main
                    document, retrieved targets weighted retrieved_weight, the main document 1.0)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from tokenizers_mm.special import (BOI_ID, BOS_ID, EOI_ID, EOM_ID, EOS_ID, INFILL_ID, MASK_ID, ORDERS, PAD_ID,
                                   image_order, neighbours_that_fit, order_marker, retrieved_prefix)
from train.shards import ShardSegment

IGNORE = -100  # target value the loss skips (padding, document ends)


@dataclass(frozen=True)
class SequenceConfig:
    """How documents become training sequences."""

    block_size: int = 512  # tokens per packed row (the model's context)
    p_image_first: float = 0.5  # share of image-caption pairs shown image→caption (captioning)
    # share of caption→image pairs whose caption is dropped, so the model also learns p(image)
    # and classifier-free guidance works at sampling (CM3Leon uses 10-20%, issue 3)
    caption_dropout: float = 0.15
    cm3_prob: float = 0.0  # share of documents trained with CM3's causal-masked objective (Aghajanyan et al. 2022)
    # retrieval augmentation: K neighbours, K uniform in {retrieved_min..retrieved_max} per document
    # (0 = off); needs the neighbours precomputed by `make tokenize`
    retrieved_max: int = 0
    retrieved_min: int = 0
    retrieved_weight: float = 0.1  # loss weight α of targets in the retrieved part (RA-CM3)
    # image token orders. A raster-order model's p(x|c) rests on the first code rows (README,
    # zero-shot classification); averaging it over several token orders is what lifts
    # autoregressive generative classifiers (Sudakov et al. 2026, "Revisiting Autoregressive Models
    # for Generative Image Classification"). With image_orders = K > 1 a share order_prob of the
    # pairs' images is written in one of the other K-1 orders of `image_order`, flagged by the id
    # order_marker_base + k - 1 right after <boi> (ids past the tokenizer's: the model gets K-1
    # more); raster order needs no marker, so sampling and scoring in raster order are unchanged
    image_orders: int = 1
    order_prob: float = 0.5
    order_marker_base: int = 0  # the first marker id: the tokenizer's vocab_size

    def __post_init__(self) -> None:
        for name in ("p_image_first", "caption_dropout", "cm3_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        if self.block_size < 8:
            raise ValueError(f"block_size must be at least 8, got {self.block_size}")
        if not 0 <= self.retrieved_min <= self.retrieved_max:
            raise ValueError(f"need 0 <= retrieved_min <= retrieved_max, got {self.retrieved_min}, {self.retrieved_max}")
        if not 0.0 <= self.retrieved_weight <= 1.0:
            raise ValueError(f"retrieved_weight must be in [0, 1], got {self.retrieved_weight}")
        if not 1 <= self.image_orders <= len(ORDERS) or not 0.0 <= self.order_prob <= 1.0:
            raise ValueError(f"need 1 <= image_orders <= {len(ORDERS)} and 0 <= order_prob <= 1; got "
                             f"{self.image_orders}, {self.order_prob}")
        if self.image_orders > 1 and self.order_marker_base <= 0:
            raise ValueError("image_orders > 1 needs order_marker_base: the tokenizer's vocab_size")


def ordered_image_block(codes: np.ndarray, k: int, marker_base: int) -> np.ndarray:
    """<boi> [marker_k] codes in order k <eoi>; order 0 (raster) is `image_block`'s layout."""
    grid = int(round(len(codes) ** 0.5))
    if grid * grid != len(codes):
        raise ValueError(f"image orders need a square code grid; got {len(codes)} codes")
    head = [BOI_ID] if k == 0 else [BOI_ID, order_marker(k, marker_base)]
    return np.concatenate([head, np.asarray(codes)[image_order(k, grid)], [EOI_ID]]).astype(np.int64)


def image_block(seg: ShardSegment) -> np.ndarray:
    """<boi> codes <eoi> for one image segment."""
    return np.concatenate([[BOI_ID], seg.ids, [EOI_ID]]).astype(np.int64)


def build_sequence(segments: Sequence[ShardSegment], rng: np.random.Generator, cfg: SequenceConfig) -> np.ndarray:
    """One document -> one token sequence (int64), with this document's random choices."""
    segs = list(segments)
    is_pair = len(segs) == 2 and segs[0].is_image != segs[1].is_image
    if is_pair:
        text = next(s for s in segs if not s.is_image)
        image = next(s for s in segs if s.is_image)
        if rng.random() < cfg.p_image_first:
            segs = [image, text]
        elif rng.random() < cfg.caption_dropout:
            segs = [image]
        else:
            segs = [text, image]
    pieces = [image_block(s) if s.is_image else s.ids.astype(np.int64) for s in segs]
    if is_pair and cfg.image_orders > 1 and rng.random() < cfg.order_prob:  # no draw at all by default
        k = 1 + int(rng.integers(cfg.image_orders - 1))
        pieces = [ordered_image_block(s.ids, k, cfg.order_marker_base) if s.is_image else p for s, p in zip(segs, pieces)]
    if cfg.cm3_prob > 0 and rng.random() < cfg.cm3_prob and pieces:
        pieces = cm3_mask(pieces, rng)
    return np.concatenate([[BOS_ID], *pieces, [EOS_ID]]).astype(np.int64)


def cm3_mask(pieces: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """CM3's causal-masked objective: cut one span (a whole image, or a run of a text segment's
    tokens), leave <mask> in its place, and append <infill> span <eom> at the end, so that the
    model learns to fill in a hole with both sides in view."""
    k = int(rng.integers(len(pieces)))
    piece = pieces[k]
    if piece[0] == BOI_ID or len(piece) <= 1:
        a, b = 0, len(piece)
    else:
        a = int(rng.integers(len(piece)))
        b = int(rng.integers(a + 1, len(piece) + 1))
    span = piece[a:b]
    rest = [*pieces[:k], piece[:a], [MASK_ID], piece[b:], *pieces[k + 1 :]]
    return [np.asarray(p, dtype=np.int64) for p in rest] + [np.asarray([INFILL_ID, *span, EOM_ID], dtype=np.int64)]


def neighbour_tokens(segments: Sequence[ShardSegment]) -> np.ndarray:
    """A retrieved document as it is prepended: caption pairs in caption→image order (no random
    choices: a neighbour is context, not a training example), stories as they are."""
    segs = list(segments)
    if len(segs) == 2 and segs[0].is_image and not segs[1].is_image:
        segs = [segs[1], segs[0]]
    pieces = [image_block(s) if s.is_image else s.ids.astype(np.int64) for s in segs]
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


def with_neighbours(main: np.ndarray, neighbours: Sequence[np.ndarray], block_size: int,
                    weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Prepend retrieved documents to a built sequence `<bos> ... <eos>`.

    neighbours: token arrays (`neighbour_tokens`), best first. Layout: `<bos> n_K <break> ...
    n_1 <break> main <eos>`, the best next to the main document. While the whole is longer than
    block_size + 1, the worst neighbour is dropped: the main document is never cut for them.
    Returns (ids, weights): weights (L,) float32, `weight` on the retrieved part (its tokens and
    <break>s) and 1.0 on the main document, so the loss of target j is weighted weights[j].
    """
    body = main[1:]  # main without its <bos>
    kept = list(neighbours)[: neighbours_that_fit(neighbours, block_size - len(body))]
    retrieved = retrieved_prefix(kept)
    n_ret = len(retrieved)
    ids = np.concatenate([[BOS_ID], retrieved, body]).astype(np.int64)
    weights = np.ones(len(ids), np.float32)
    weights[1 : 1 + n_ret] = weight
    return ids, weights


class Row(NamedTuple):
    """One packed row of length block_size (all int64 except weights)."""

    idx: np.ndarray  # (T,) input ids, PAD after the last document
    targets: np.ndarray  # (T,) next-token targets, IGNORE at padding and where a document ends
    doc_ids: np.ndarray  # (T,) which packed document each position belongs to (-1 at padding)
    positions: np.ndarray  # (T,) position within its own document (rotary positions restart)
    weights: np.ndarray  # (T,) float32 loss weight of each target


def pack(sequences: Sequence[np.ndarray], block_size: int, weights: Sequence[np.ndarray] | None = None) -> Row:
    """Pack whole sequences into one row; the caller guarantees they fit (see `plan_rows`).
    A sequence of length L contributes L-1 (input, target) positions."""
    T = block_size
    idx = np.full(T, PAD_ID, np.int64)
    tgt = np.full(T, IGNORE, np.int64)
    doc = np.full(T, -1, np.int64)
    pos = np.zeros(T, np.int64)
    w = np.zeros(T, np.float32)
    at = 0
    for j, s in enumerate(sequences):
        n = len(s) - 1
        assert at + n <= T, "sequences overflow the row"
        idx[at : at + n] = s[:-1]
        tgt[at : at + n] = s[1:]
        doc[at : at + n] = j
        pos[at : at + n] = np.arange(n)
        w[at : at + n] = 1.0 if weights is None else weights[j][1:]
        at += n
    return Row(idx, tgt, doc, pos, w)


def plan_rows(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Greedy packing in the given order: indices of the sequences that go into each row.
    A sequence longer than block_size+1 gets a row of its own (and is cut by the caller)."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, L in enumerate(lengths):
        n = min(L - 1, block_size)
        if cur and used + n > block_size:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows
