"""Mixtures draw each source with its weight, in an order fixed by (seed, epoch)."""
from __future__ import annotations

from collections import Counter

import pytest

from tokenizers_mm.document import Document
from train.data.mixture import Mixture, interleave, mix_documents


def _docs(name: str, n: int) -> list[Document]:
    return [Document([f"{name} {i}"], source=name) for i in range(n)]


@pytest.fixture()
def sources():
    return {"a": _docs("a", 50), "b": _docs("b", 10), "c": _docs("c", 30)}


def test_same_seed_and_epoch_give_the_same_order_whatever_the_dict_order(sources):
    w = {"a": 1.0, "b": 2.0, "c": 1.0}
    m1 = Mixture(sources, w, seed=3)
    m2 = Mixture(dict(reversed(list(sources.items()))), dict(reversed(list(w.items()))), seed=3)
    assert m1.order(0) == m2.order(0) == Mixture(sources, w, seed=3).order(0)
    m1.order(5)  # earlier calls don't change later ones
    assert m1.order(0) == m2.order(0)


def test_different_epochs_and_seeds_give_different_orders(sources):
    w = {"a": 1.0, "b": 1.0, "c": 1.0}
    m = Mixture(sources, w, seed=0)
    assert m.order(0) != m.order(1)
    assert m.order(0) != Mixture(sources, w, seed=1).order(0)


def test_sources_are_drawn_in_proportion_to_their_weights(sources):
    m = Mixture(sources, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0, num_samples=20_000)
    counts = Counter(name for name, _ in m.order(0))
    assert abs(counts["a"] / 20_000 - 0.5) < 0.02
    assert abs(counts["b"] / 20_000 - 0.3) < 0.02
    assert abs(counts["c"] / 20_000 - 0.2) < 0.02


def test_each_document_is_seen_once_before_any_is_seen_twice(sources):
    m = Mixture(sources, {"a": 1.0, "b": 1.0, "c": 0.0}, seed=0, num_samples=200)
    order = m.order(0)
    b_idx = [i for name, i in order if name == "b"]
    for start in range(0, len(b_idx) - 10, 10):
        assert sorted(b_idx[start:start + 10]) == list(range(10))
    assert "c" not in {name for name, _ in order}  # weight 0 leaves a source out


def test_epoch_returns_the_documents_of_the_order(sources):
    m = Mixture(sources, {"a": 1.0, "b": 1.0, "c": 1.0}, seed=0)
    assert len(m) == 90 and len(m.epoch(2)) == 90
    assert [d.texts[0] for d in m.epoch(2)] == [f"{n} {i}" for n, i in m.order(2)]


def test_mix_documents_gives_n_documents_deterministically(sources):
    w = {"a": 1.0, "b": 1.0, "c": 1.0}
    a, b = mix_documents(sources, w, n=25, seed=4), mix_documents(sources, w, n=25, seed=4)
    assert len(a) == 25 and [d.texts for d in a] == [d.texts for d in b]


@pytest.mark.parametrize("weights, match", [
    ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, "unknown sources"),
    ({"a": 1.0, "b": 1.0}, "no weight"),
    ({"a": -1.0, "b": 1.0, "c": 1.0}, "expected a finite number"),
    ({"a": float("nan"), "b": 1.0, "c": 1.0}, "expected a finite number"),
    ({"a": 0.0, "b": 0.0, "c": 0.0}, "all weights are zero"),
])
def test_bad_weights_are_refused_with_the_problem_named(sources, weights, match):
    with pytest.raises(ValueError, match=match):
        Mixture(sources, weights, seed=0)


def test_an_empty_source_with_positive_weight_is_refused(sources):
    with pytest.raises(ValueError, match="no documents"):
        Mixture({**sources, "d": []}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, seed=0)


def test_interleave_alternates_and_keeps_every_document():
    a, b = _docs("a", 3), _docs("b", 1)
    assert [d.texts[0] for d in interleave(a, b)] == ["a 0", "b 0", "a 1", "a 2"]
    assert interleave() == []
