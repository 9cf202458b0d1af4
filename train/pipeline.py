"""The training data pipeline: shard -> per-epoch packed rows -> torchdata StatefulDataLoader.

The rows of an epoch are a pure function of (seed, epoch, rank, world size): document order is a
permutation seeded by (seed, epoch), each document's own choices by (seed, epoch, document), and
rank r takes rows r, r+W, r+2W, ... (all ranks get the same count, so DDP stays in lockstep).
The loader's state_dict (rows already yielded) plus the epoch is all that exact resume needs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from train.sequences import Row, SequenceConfig, build_sequence, pack, plan_rows
from train.shards import Shard


def doc_rng(seed: int, epoch: int, doc: int, copy: int = 0) -> np.random.Generator:
    """The rng of one document's random choices in one epoch."""
    return np.random.default_rng([seed, epoch, doc, copy])


def epoch_documents(shard: Shard, seed: int, epoch: int, source_weights: dict[str, float] | None = None) -> list[tuple[int, int]]:
    """(document, copy) pairs of one epoch in their shuffled order. With source_weights, each
    document of source s appears w_s times on average (integer part always, the rest by chance)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    items: list[tuple[int, int]] = []
    if source_weights:
        known = {shard.meta(i)["source"] for i in range(len(shard))}
        unknown = set(source_weights) - known
        if unknown:
            raise ValueError(f"source_weights names {sorted(unknown)}, but the shard holds only {sorted(known)}")
    for i in range(len(shard)):
        w = 1.0 if not source_weights else source_weights.get(shard.meta(i)["source"], 1.0)
        copies = int(w) + (1 if rng.random() < w - int(w) else 0)
        items.extend((i, c) for c in range(copies))
    order = rng.permutation(len(items))
    return [items[k] for k in order]


class PackedRows(Dataset):
    """Map-style dataset of one epoch's packed rows for one rank."""

    def __init__(self, shard: Shard, cfg: SequenceConfig, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 source_weights: dict[str, float] | None = None) -> None:
        self.shard, self.cfg, self.seed, self.epoch = shard, cfg, seed, epoch
        self.items = epoch_documents(shard, seed, epoch, source_weights)
        lengths = [len(self._sequence(k)) for k in range(len(self.items))]
        rows = plan_rows(lengths, cfg.block_size)
        per_rank = len(rows) // world
        if per_rank == 0:
            raise ValueError(f"the shard at {shard.path} packs into {len(rows)} rows, fewer than the {world} ranks")
        self.rows = rows[rank::world][:per_rank]
        self.num_truncated = sum(1 for L in lengths if L - 1 > cfg.block_size)

    def _sequence(self, k: int) -> np.ndarray:
        doc, copy = self.items[k]
        return build_sequence(self.shard.document(doc), doc_rng(self.seed, self.epoch, doc, copy), self.cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seqs = [self._sequence(k)[: self.cfg.block_size + 1] for k in self.rows[i]]
        return row_to_tensors(pack(seqs, self.cfg.block_size))


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
