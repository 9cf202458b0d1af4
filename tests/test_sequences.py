"""Shards, training sequences, packing and the resumable data pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenizers_mm.special import BOI_ID, BOS_ID, EOI_ID, EOM_ID, EOS_ID, INFILL_ID, MASK_ID, PAD_ID, image_order
from train.pipeline import PackedRows, make_loader
from train.sequences import IGNORE, SequenceConfig, build_sequence, pack, plan_rows
from train.shards import IMAGE, TEXT, Shard, ShardSegment, ShardWriter

OFFSET, CODES = 100, 16  # a toy layout: text ids < 100, image ids 100..115, 4 codes per image


def toy_shard(path, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    w = ShardWriter(path, OFFSET + CODES, {"image_offset": OFFSET, "image_tokens": 4})
    for i in range(n_docs):
        text = rng.integers(9, OFFSET, rng.integers(2, 8)).tolist()
        image = (OFFSET + rng.integers(0, CODES, 4)).tolist()
        if i % 4 == 3:  # a story
            w.add([(TEXT, text), (IMAGE, image), (TEXT, text[:2]), (IMAGE, image)], "story", {"i": i})
        else:
            w.add([(TEXT, text), (IMAGE, image)], "pair", {"i": i})
    w.close()
    return Shard(path)


def test_shard_round_trips_documents(tmp_path):
    w = ShardWriter(tmp_path, 200, {})
    w.add([(TEXT, [10, 11]), (IMAGE, [150, 151, 152, 153])], "s", {"label": 3})
    w.add([(TEXT, [12])], "t", {})
    index = w.close()
    shard = Shard(tmp_path)
    assert len(shard) == 2 and index["num_tokens"] == 7
    d0 = shard.document(0)
    assert [s.kind for s in d0] == [TEXT, IMAGE]
    assert d0[1].ids.tolist() == [150, 151, 152, 153]
    assert shard.meta(0) == {"source": "s", "meta": {"label": 3}}


def test_an_unfinished_shard_is_refused(tmp_path):
    ShardWriter(tmp_path, 200, {})  # never closed: no index.json
    with pytest.raises(ValueError, match="make tokenize"):
        Shard(tmp_path)


def pair():
    return [ShardSegment(TEXT, np.array([10, 11, 12])), ShardSegment(IMAGE, np.array([100, 101, 102, 103]))]


def test_pairs_appear_in_both_orders_and_captions_drop_at_the_configured_rate():
    cfg = SequenceConfig(block_size=64, p_image_first=0.5, caption_dropout=0.2)
    kinds = {"text_first": 0, "image_first": 0, "dropped": 0}
    for s in range(4000):
        seq = build_sequence(pair(), np.random.default_rng(s), cfg).tolist()
        assert seq[0] == BOS_ID and seq[-1] == EOS_ID
        if seq[1] == BOI_ID:
            kinds["image_first" if 10 in seq else "dropped"] += 1
        else:
            kinds["text_first"] += 1
    assert abs(kinds["image_first"] / 4000 - 0.5) < 0.03
    assert abs(kinds["dropped"] / (kinds["dropped"] + kinds["text_first"]) - 0.2) < 0.03


def test_image_orders_are_the_raster_grid_reversed_and_transposed():
    assert image_order(0, 3).tolist() == list(range(9))
    assert image_order(1, 3).tolist() == list(range(8, -1, -1))
    assert image_order(2, 3).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert image_order(3, 3).tolist() == [8, 5, 2, 7, 4, 1, 6, 3, 0]


def test_ordered_images_carry_their_marker_and_a_permutation_of_the_codes():
    base = 200
    cfg = SequenceConfig(block_size=64, image_orders=4, order_prob=0.6, order_marker_base=base)
    codes = np.array([100, 101, 102, 103])
    seen = {0: 0, 1: 0, 2: 0, 3: 0}
    for s in range(3000):
        seq = np.asarray(build_sequence(pair(), np.random.default_rng(s), cfg))
        at = int(np.flatnonzero(seq == BOI_ID)[0])
        k = int(seq[at + 1]) - base + 1 if seq[at + 1] >= base else 0
        body = seq[at + 1 + (k > 0) : at + 1 + (k > 0) + 4]
        assert body.tolist() == codes[image_order(k, 2)].tolist() and seq[at + 1 + (k > 0) + 4] == EOI_ID
        seen[k] += 1
    assert abs(seen[0] / 3000 - 0.4) < 0.03 and min(seen[1], seen[2], seen[3]) > 0.15 * 3000
    # the default draws nothing more: sequences are those of a config without the option
    plain = SequenceConfig(block_size=64)
    for s in range(50):
        a = build_sequence(pair(), np.random.default_rng(s), plain)
        b = build_sequence(pair(), np.random.default_rng(s), SequenceConfig(block_size=64, image_orders=1, order_prob=0.9))
        assert a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="order_marker_base"):
        SequenceConfig(block_size=64, image_orders=2)
    with pytest.raises(ValueError, match="image_orders"):
        SequenceConfig(block_size=64, image_orders=5, order_marker_base=base)


def test_cm3_moves_one_span_behind_infill_and_keeps_every_token():
    cfg = SequenceConfig(block_size=64, cm3_prob=1.0, p_image_first=0.0, caption_dropout=0.0)
    for s in range(200):
        seq = build_sequence(pair(), np.random.default_rng(s), cfg).tolist()
        assert seq.count(MASK_ID) == 1 and seq.count(INFILL_ID) == 1 and seq[-2] == EOM_ID
        m, f = seq.index(MASK_ID), seq.index(INFILL_ID)
        span = seq[f + 1 : -2]
        restored = seq[:m] + span + seq[m + 1 : f]
        assert restored == [BOS_ID, 10, 11, 12, BOI_ID, 100, 101, 102, 103, EOI_ID]
        if BOI_ID in span:  # an image span is always whole
            assert span[0] == BOI_ID and span[-1] == EOI_ID


def test_packing_never_lets_targets_cross_documents():
    seqs = [np.array([BOS_ID, 10, 11, EOS_ID]), np.array([BOS_ID, 12, EOS_ID])]
    row = pack(seqs, block_size=8)
    assert row.idx.tolist() == [BOS_ID, 10, 11, BOS_ID, 12, PAD_ID, PAD_ID, PAD_ID]
    assert row.targets.tolist() == [10, 11, EOS_ID, 12, EOS_ID, IGNORE, IGNORE, IGNORE]
    assert row.doc_ids.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert row.positions.tolist()[:5] == [0, 1, 2, 0, 1]
    assert row.weights.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_plan_rows_fills_rows_without_overflow():
    lengths = [5, 9, 3, 17, 2, 8]
    rows = plan_rows(lengths, block_size=16)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    for r in rows:
        assert sum(min(lengths[i] - 1, 16) for i in r) <= 16 or len(r) == 1


def test_epoch_rows_depend_only_on_seed_and_epoch(tmp_path):
    shard = toy_shard(tmp_path)
    cfg = SequenceConfig(block_size=32)
    a = PackedRows(shard, cfg, seed=1, epoch=0)
    b = PackedRows(shard, cfg, seed=1, epoch=0)
    c = PackedRows(shard, cfg, seed=1, epoch=1)
    assert all(torch.equal(a[i]["idx"], b[i]["idx"]) for i in range(len(a)))
    assert any(not torch.equal(a[i]["idx"], c[i]["idx"]) for i in range(min(len(a), len(c))))


def test_ranks_get_disjoint_rows_of_equal_count(tmp_path):
    shard = toy_shard(tmp_path, n_docs=60)
    cfg = SequenceConfig(block_size=32)
    full = PackedRows(shard, cfg, seed=0, epoch=0)
    r0 = PackedRows(shard, cfg, seed=0, epoch=0, rank=0, world=2)
    r1 = PackedRows(shard, cfg, seed=0, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) == len(full) // 2
    assert r0.rows == full.rows[0::2][: len(r0)] and r1.rows == full.rows[1::2][: len(r1)]


def test_loader_resumes_exactly_mid_epoch(tmp_path):
    shard = toy_shard(tmp_path)
    ds = PackedRows(shard, SequenceConfig(block_size=32), seed=0, epoch=0)
    loader = make_loader(ds, batch_size=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [b["idx"] for b in it]
    resumed = make_loader(PackedRows(shard, SequenceConfig(block_size=32), seed=0, epoch=0), 2, state)
    again = [b["idx"] for b in resumed]
    assert len(rest) == len(again) > 0
    assert all(torch.equal(x, y) for x, y in zip(rest, again))


def test_source_weights_repeat_documents_of_a_source(tmp_path):
    shard = toy_shard(tmp_path, n_docs=40)
    from train.pipeline import epoch_documents

    plain = epoch_documents(shard, 0, 0)
    weighted = epoch_documents(shard, 0, 0, {"story": 3.0})
    n_story = sum(1 for i in range(len(shard)) if shard.meta(i)["source"] == "story")
    assert len(weighted) == len(plain) + 2 * n_story
    with pytest.raises(ValueError, match="nonexistent"):
        epoch_documents(shard, 0, 0, {"nonexistent": 2.0})


def test_augmented_documents_are_weighted_apart_from_their_originals(tmp_path):
    from train.pipeline import epoch_documents

    w = ShardWriter(tmp_path, OFFSET + CODES, {"image_offset": OFFSET, "image_tokens": 4})
    for i in range(30):  # 10 originals, then two augmented copies of each
        w.add([(TEXT, [10 + i % 10]), (IMAGE, [OFFSET] * 4)], "digits", {"index": i % 10, "augmented": i >= 10})
    w.add([(TEXT, [10]), (IMAGE, [OFFSET] * 4)], "shapes", {})
    w.close()
    shard = Shard(tmp_path)
    items = epoch_documents(shard, 0, 0, {"digits": 3.0, "digits:augmented": 0.0})
    docs = [d for d, _ in items]
    assert sorted(set(docs)) == list(range(10)) + [30]  # no augmented copy, the shapes document once
    assert all(docs.count(d) == 3 for d in range(10))
    # the augmented key alone leaves the originals at the source's weight (1 by default)
    half = [d for d, _ in epoch_documents(shard, 0, 0, {"digits:augmented": 0.5})]
    assert all(half.count(d) == 1 for d in range(10)) and 0 < sum(d >= 10 and d < 30 for d in half) < 20
    with pytest.raises(ValueError, match="shapes:augmented"):
        epoch_documents(shard, 0, 0, {"shapes:augmented": 0.0})  # no shapes document is augmented
    with pytest.raises(ValueError, match=">= 0"):
        epoch_documents(shard, 0, 0, {"digits": -1.0})
