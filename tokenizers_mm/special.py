"""The named special tokens of the unified vocabulary (see DESIGN.md, "The token stream").

They take the first ids of the vocabulary, in this order, in every tokenizer the project trains,
so `PAD_ID == 0` etc. hold everywhere and tests can rely on them.
"""
import numpy as np

PAD = "<pad>"  # padding; never a training target
BOS = "<bos>"  # start of a sequence
EOS = "<eos>"  # end of a sequence
BOI = "<boi>"  # begin image: followed by exactly grid×grid image codes
EOI = "<eoi>"  # end image
BREAK = "<break>"  # CM3Leon's separator between retrieved documents and the main document
MASK = "<mask>"  # CM3 causal-masked objective: stands where a span was cut out ...
INFILL = "<infill>"  # ... and opens the span again at the end of the sequence
EOM = "<eom>"  # end of the infilled span

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, BOI, EOI, BREAK, MASK, INFILL, EOM)
PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID, BREAK_ID, MASK_ID, INFILL_ID, EOM_ID = range(len(SPECIAL_TOKENS))


def neighbours_that_fit(neighbours, room: int) -> int:
    """How many of the best-first retrieved documents to keep so that their `retrieved_prefix`
    (each document and its <break>) takes at most `room` tokens: the worst are dropped first, and
    the main document is never cut for them (training, generation and classification alike)."""
    lengths = [len(n) + 1 for n in neighbours]
    kept = len(lengths)
    while kept and sum(lengths[:kept]) > room:
        kept -= 1
    return kept


def retrieved_prefix(neighbours) -> list[int]:
    """Retrieved documents (token id sequences, best first) as they are prepended right after
    <bos>: `n_K <break> ... n_1 <break>`, the best next to the main document (RA-CM3, CM3Leon).
    Training (train.sequences.with_neighbours), generation and classification all use this layout."""
    return [int(t) for n in reversed(list(neighbours)) for t in (*n, BREAK_ID)]


# Image token orders (train.sequences.SequenceConfig.image_orders). An image is written in raster
# order, or, in a model trained with image_orders = K > 1, in order k < K flagged by the marker id
# `order_marker(k, vocab_size)` right after <boi>: ids past the tokenizer's own, which only such a
# model has. The orders of a g×g code grid as (transpose, reverse): raster, reverse raster
# (bottom-right first), column-major, reverse column-major.
ORDERS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))


def image_order(k: int, grid: int) -> np.ndarray:
    """Order k as a permutation: codes_in_order_k = codes[image_order(k, grid)] for codes in
    raster order (G = grid² of them)."""
    transpose, reverse = ORDERS[k]
    idx = np.arange(grid * grid).reshape(grid, grid)
    idx = (idx.T if transpose else idx).reshape(-1)
    return idx[::-1].copy() if reverse else idx


def order_marker(k: int, vocab_size: int) -> int:
    """The id that flags order k > 0 after <boi>, for a tokenizer of vocab_size ids."""
    if not 0 < k < len(ORDERS):
        raise ValueError(f"order markers exist for orders 1..{len(ORDERS) - 1}, got {k}")
    return vocab_size + k - 1
