"""The training data pipeline: shard -> per-epoch packed rows -> torchdata StatefulDataLoader.

The rows of an epoch are a pure function of (seed, epoch, rank, world size): document order is a
permutation seeded by (seed, epoch), each document's own choices by (seed, epoch, document), and
rank r takes rows r, r+W, r+2W, ... (all ranks get the same count, so DDP stays in lockstep).
The loader's state_dict (rows already yielded) plus the epoch is all that exact resume needs.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from train.sequences import IGNORE, Row, SequenceConfig, build_sequence, neighbour_tokens, pack, plan_rows, with_neighbours
from train.shards import Shard

# torchdata's StatefulDataLoader calls torch.set_vital on every epoch, which torch now deprecates with
# a UserWarning per call: the user can do nothing about it
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

NEIGHBOURS_FILE = "neighbours.npy"  # (num_docs, k) int64 train-shard ids, -1 padded (train/tokenize.py)


def load_neighbours(shard: Shard) -> np.ndarray:
    """The precomputed neighbours of a shard's documents (ids into the train shard)."""
    path = shard.path / NEIGHBOURS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: retrieval-augmented training needs the neighbours that "
                         "`make tokenize` precomputes (with its default retriever=true); re-run it")
    nb = np.load(path)
    if nb.ndim != 2 or len(nb) != len(shard):
        raise ValueError(f"{path} has shape {nb.shape}, expected ({len(shard)}, k): it belongs to another "
                         "tokenize run — re-run `make tokenize`")
    return nb


def doc_rng(seed: int, epoch: int, doc: int, copy: int = 0) -> np.random.Generator:
    """The rng of one document's random choices in one epoch."""
    return np.random.default_rng([seed, epoch, doc, copy])


def _augmented(meta: dict) -> bool:
    return bool(meta.get("meta", {}).get("augmented", False))


def _weight_keys(meta: dict) -> tuple[str, ...]:
    """The source_weights keys that apply to a document, least specific first."""
    source = meta["source"]
    return (source, f"{source}:augmented") if _augmented(meta) else (source,)


def epoch_documents(shard: Shard, seed: int, epoch: int, source_weights: dict[str, float] | None = None) -> list[tuple[int, int]]:
    """(document, copy) pairs of one epoch in their shuffled order. With source_weights, each
    document of source s appears w_s times on average (integer part always, the rest by chance).
    The key "s:augmented" weighs the documents of s that `make tokenize` marked augmented (meta
    "augmented": true) apart from its originals, e.g. {"digits": 10, "digits:augmented": 0}."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    items: list[tuple[int, int]] = []
    keys = [_weight_keys(shard.meta(i)) if source_weights else () for i in range(len(shard))]
    if source_weights:
        known = {k for ks in keys for k in ks}
        unknown = set(source_weights) - known
        if unknown:
            raise ValueError(f"source_weights names {sorted(unknown)}, but the shard holds only {sorted(known)}")
        if any(w < 0 for w in source_weights.values()):
            raise ValueError(f"source_weights must be >= 0; found {source_weights}")
    for i, doc_keys in enumerate(keys):
        w = 1.0
        for k in doc_keys:  # the most specific key given wins
            w = source_weights.get(k, w)
        copies = int(w) + (1 if rng.random() < w - int(w) else 0)
        items.extend((i, c) for c in range(copies))
    order = rng.permutation(len(items))
    return [items[k] for k in order]


class PackedRows(Dataset):
    """Map-style dataset of one epoch's packed rows for one rank."""

    def __init__(self, shard: Shard, cfg: SequenceConfig, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 source_weights: dict[str, float] | None = None, neighbours: np.ndarray | None = None,
                 bank: Shard | None = None, items: list[tuple[int, int]] | None = None) -> None:
        """neighbours (num_docs, k) ids into `bank` (the train shard) are required when
        cfg.retrieved_max > 0. items: the (document, copy) list to use instead of the epoch's."""
        self.shard, self.cfg, self.seed, self.epoch = shard, cfg, seed, epoch
        if cfg.retrieved_max > 0 and (neighbours is None or bank is None):
            raise ValueError("retrieved_max > 0 needs the precomputed neighbours and the train shard they index")
        self.neighbours, self.bank = (neighbours, bank) if cfg.retrieved_max > 0 else (None, None)
        self.items = epoch_documents(shard, seed, epoch, source_weights) if items is None else items
        lengths = [len(self._sequence(k)[0]) for k in range(len(self.items))]
        rows = plan_rows(lengths, cfg.block_size)
        per_rank = len(rows) // world
        if per_rank == 0:
            raise ValueError(f"the shard at {shard.path} packs into {len(rows)} rows, fewer than the {world} ranks")
        self.rows = rows[rank::world][:per_rank]
        self.num_truncated = sum(1 for L in lengths if L - 1 > cfg.block_size)

    def _sequence(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item k's token sequence and its per-token loss weights (None: all 1.0, no retrieval)."""
        doc, copy = self.items[k]
        rng = doc_rng(self.seed, self.epoch, doc, copy)
        seq = build_sequence(self.shard.document(doc), rng, self.cfg)
        if self.neighbours is None:
            return seq, None
        # K drawn after the main document's own choices, so these match a run without retrieval
        k_doc = int(rng.integers(self.cfg.retrieved_min, self.cfg.retrieved_max + 1))
        found = [int(i) for i in self.neighbours[doc][:k_doc] if i >= 0]
        return with_neighbours(seq, [neighbour_tokens(self.bank.document(i)) for i in found],
                               self.cfg.block_size, self.cfg.retrieved_weight)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        built = [self._sequence(k) for k in self.rows[i]]
        seqs = [s[: self.cfg.block_size + 1] for s, _ in built]
        if self.neighbours is None:
            return row_to_tensors(pack(seqs, self.cfg.block_size))
        weights = [w[: self.cfg.block_size + 1] for _, w in built]
        return row_to_tensors(pack(seqs, self.cfg.block_size, weights))


def row_to_tensors(row: Row) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in row._asdict().items()}


def make_loader(dataset: PackedRows, batch_size: int, state: dict[str, Any] | None = None) -> StatefulDataLoader:
    """Sequential loader over the epoch's rows (the order is already shuffled), dropping the last
    partial batch so every step has the same shape (one compiled graph)."""
    if len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} rows per epoch is fewer than the batch size {batch_size}; "
                         "lower batch_size or add data")
    loader = StatefulDataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def eval_rows(shard: Shard, cfg: SequenceConfig, seed: int, max_rows: int) -> list[dict[str, torch.Tensor]]:
    """A fixed set of held-out rows (no caption dropout, no CM3; pairs half in each order)."""
    eval_cfg = SequenceConfig(block_size=cfg.block_size, p_image_first=0.5, caption_dropout=0.0, cm3_prob=0.0)
    ds = PackedRows(shard, eval_cfg, seed=seed, epoch=0)
    return [ds[i] for i in range(min(max_rows, len(ds)))]


def retrieval_eval_rows(shard: Shard, cfg: SequenceConfig, seed: int, max_rows: int, neighbours: np.ndarray,
                        bank: Shard, k: int) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Held-out rows for measuring what retrieval does: the eval shard's caption pairs in
    caption→image order (their neighbours were retrieved with the caption alone, so nothing of
    the image leaks in), the same documents without and with their k best neighbours.
    Returns (rows_off, rows_on); in rows_on the retrieved part's targets are IGNORE, so any
    NLL summed over the rows is the main documents' alone. rows_off has at most max_rows rows."""
    off_cfg = SequenceConfig(block_size=cfg.block_size, p_image_first=0.0, caption_dropout=0.0, cm3_prob=0.0)
    on_cfg = SequenceConfig(block_size=cfg.block_size, p_image_first=0.0, caption_dropout=0.0, cm3_prob=0.0,
                            retrieved_max=k, retrieved_min=k, retrieved_weight=0.0)
    kinds = np.asarray(shard.segments[:, 0])
    pairs = [(i, 0) for i, (first, count) in enumerate(np.asarray(shard.docs))
             if count == 2 and kinds[first] != kinds[first + 1]]
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(pairs))
    off = PackedRows(shard, off_cfg, seed, 0, items=[pairs[j] for j in order])
    used = [off.items[j] for r in off.rows[:max_rows] for j in r]
    rows_off = [off[i] for i in range(min(max_rows, len(off)))]
    on = PackedRows(shard, on_cfg, seed, 0, neighbours=neighbours, bank=bank, items=used)
    rows_on = []
    for i in range(len(on)):
        row = on[i]
        row["targets"] = row["targets"].masked_fill(row["weights"] == 0, IGNORE)  # the main documents only
        rows_on.append(row)
    return rows_off, rows_on
