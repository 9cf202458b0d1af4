"""Weighted mixtures of document sources, in an order fixed by (seed, epoch) alone.

Each sample first picks a source with probability proportional to its weight, then takes that
source's next document from a shuffled cycle: every document of a source is seen once before
any is seen twice, and a small source with a large weight simply cycles more often.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tokenizers_mm.document import Document


def _check(sources: dict[str, Sequence[Document]], weights: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ValueError(f"weights name unknown sources {unknown}; the sources are {sorted(sources)}")
    missing = sorted(set(sources) - set(weights))
    if missing:
        raise ValueError(f"sources {missing} have no weight; give each source a weight (0 leaves it out)")
    w = {k: float(v) for k, v in weights.items()}
    for name, v in w.items():
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"weight of source {name!r} is {v}; expected a finite number >= 0")
    if sum(w.values()) <= 0:
        raise ValueError(f"all weights are zero ({weights}); give at least one source a positive weight")
    for name, v in w.items():
        if v > 0 and len(sources[name]) == 0:
            raise ValueError(f"source {name!r} has weight {v} but no documents; remove it or give it weight 0")
    return w


class Mixture:
    """Draws documents from several sources with the given weights.

    The order of epoch `e` depends only on (seed, e), not on dict order or earlier calls, so a
    resumed run sees the same documents as an uninterrupted one.
    """

    def __init__(self, sources: dict[str, Sequence[Document]], weights: dict[str, float], seed: int = 0,
                 num_samples: int | None = None) -> None:
        """num_samples: documents per epoch; default the total size of the weighted sources."""
        w = _check(sources, weights)
        self.names = sorted(k for k, v in w.items() if v > 0)  # sorted: independent of dict order
        self.sources = {k: sources[k] for k in self.names}
        total = sum(w[k] for k in self.names)
        self.probs = np.array([w[k] / total for k in self.names])
        self.seed = seed
        self.num_samples = sum(len(s) for s in self.sources.values()) if num_samples is None else num_samples
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0; found {self.num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int = 0) -> list[tuple[str, int]]:
        """(source name, index in that source) of every sample of an epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        picks = rng.choice(len(self.names), size=self.num_samples, p=self.probs)
        queues: dict[int, list[int]] = {}
        for k, name in enumerate(self.names):
            need, n = int((picks == k).sum()), len(self.sources[name])
            cycles = [rng.permutation(n) for _ in range(-(-need // n))] if need else []
            queues[k] = np.concatenate(cycles).tolist()[:need] if cycles else []
        pos = [0] * len(self.names)
        out: list[tuple[str, int]] = []
        for k in picks.tolist():
            out.append((self.names[k], queues[k][pos[k]]))
            pos[k] += 1
        return out

    def epoch(self, epoch: int = 0) -> list[Document]:
        """The documents of an epoch, in order."""
        return [self.sources[name][i] for name, i in self.order(epoch)]


def mix_documents(sources: dict[str, Sequence[Document]], weights: dict[str, float], n: int,
                  seed: int = 0) -> list[Document]:
    """`n` documents drawn from the sources in proportion to their weights (see `Mixture`)."""
    return Mixture(sources, weights, seed=seed, num_samples=n).epoch(0)


def interleave(*lists: Sequence[Document]) -> list[Document]:
    """Round-robin merge: a0 b0 c0 a1 b1 c1 ...; longer lists continue once shorter ones end."""
    out: list[Document] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out
