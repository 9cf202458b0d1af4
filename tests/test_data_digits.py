"""The digits corpus: the fixed stratified split, true captions, augmentation only in train."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from train.data.digits import (CORE_PHRASING_SHARE, CORE_PHRASINGS, DIGIT_WORDS, DISTRACTOR_SHARE, check_unseen_templates, digit_captions,
                               digit_image, digit_split_indices, digits_documents)


@pytest.fixture(scope="module")
def train_docs():
    return digits_documents("train")


@pytest.fixture(scope="module")
def eval_docs():
    return digits_documents("eval")


def test_split_is_1437_train_and_360_eval_disjoint_and_complete(train_docs, eval_docs):
    assert len(train_docs) == 1437 and len(eval_docs) == 360
    tr, ev = {d.meta["index"] for d in train_docs}, {d.meta["index"] for d in eval_docs}
    assert not tr & ev and tr | ev == set(range(1797))


def test_split_is_sklearns_stratified_split_with_seed_0():
    y = load_digits().target
    tr, ev = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    assert digit_split_indices("train").tolist() == tr.tolist()
    assert digit_split_indices("test").tolist() == ev.tolist()
    counts_all, counts_eval = np.bincount(y, minlength=10), np.bincount(y[ev], minlength=10)
    assert np.all(np.abs(counts_eval - 0.2 * counts_all) <= 1)


def test_test_is_an_alias_of_eval_and_the_seed_never_changes_the_split(eval_docs):
    assert [d.meta for d in digits_documents("test")] == [d.meta for d in eval_docs]
    assert [d.meta["index"] for d in digits_documents("eval", seed=7)] == [d.meta["index"] for d in eval_docs]


def test_documents_are_caption_then_white_on_black_rgb_image(train_docs):
    scans = load_digits().images
    for d in train_docs[:100]:
        assert d.source == "digits" and isinstance(d.segments[0], str)
        img = d.images[0]
        assert img.mode == "RGB" and img.size == (32, 32)
        arr = np.asarray(img).astype(int)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey
        # box-downsampled back to 8×8 it is the scan again (up to interpolation blur)
        small = arr[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3)) / 255 * 16
        assert np.corrcoef(small.ravel(), scans[d.meta["index"]].ravel())[0, 1] > 0.9


def test_every_caption_names_its_digit_in_words_or_numerals(train_docs, eval_docs):
    for d in train_docs + eval_docs:
        label = d.meta["label"]
        words = set(d.texts[0].replace(",", "").split())
        assert DIGIT_WORDS[label] in words or str(label) in words
        assert not ({str(k) for k in range(10) if k != label} | set(DIGIT_WORDS) - {DIGIT_WORDS[label]}) & words


def test_caption_templates_include_the_data_examples():
    caps = digit_captions(7)
    assert len(caps) >= 4 and "a handwritten digit seven" in caps and "the number 7 written by hand" in caps
    assert "a handwritten 7" in caps
    assert len(set(caps)) == len(caps) and all(c == c.strip() and "  " not in c and " ," not in c for c in caps)
    with pytest.raises(ValueError):
        digit_captions(10)


def test_about_half_the_captions_are_core_phrasings_the_rest_composed(train_docs):
    core = {c.format(w=w, n=n) for c in CORE_PHRASINGS for w, n in zip(DIGIT_WORDS, map(str, range(10)))}
    share = np.mean([d.texts[0] in core for d in train_docs])
    assert abs(share - CORE_PHRASING_SHARE) < 0.05
    composed = [d.texts[0] for d in train_docs if d.texts[0] not in core]
    assert len(set(composed)) > 500  # the composed ones vary
    listed = {c for k in range(10) for c in digit_captions(k)}
    made_up = np.mean([c not in listed for c in composed])  # a made-up word before the label
    assert abs(made_up - DISTRACTOR_SHARE) < 0.05


def test_held_out_templates_share_no_word_with_training_captions(monkeypatch):
    check_unseen_templates()
    import train.data.digits as digits

    monkeypatch.setattr(digits, "SUFFIXES", digits.SUFFIXES + ("with a pen",))
    with pytest.raises(ValueError, match="pen"):
        check_unseen_templates()


def test_eval_images_are_never_augmented(eval_docs):
    scans = load_digits().images
    for d in eval_docs:
        assert not d.meta["augmented"]
        assert d.images[0].tobytes() == digit_image(scans[d.meta["index"]]).tobytes()
    for split in ("eval", "test"):
        with pytest.raises(ValueError, match="never augmented"):
            digits_documents(split, augment_copies=1)


def test_augmentation_adds_distorted_copies_after_the_untouched_train_originals(train_docs):
    aug = digits_documents("train", augment_copies=1)
    assert len(aug) == 2 * 1437
    assert [d.images[0].tobytes() for d in aug[:1437]] == [d.images[0].tobytes() for d in train_docs]
    copies = aug[1437:]
    assert all(c.meta["augmented"] and c.meta["index"] == o.meta["index"] and c.meta["label"] == o.meta["label"]
               for c, o in zip(copies, train_docs))
    diffs = [np.abs(np.asarray(c.images[0], float) - np.asarray(o.images[0], float)).mean()
             for c, o in zip(copies[:200], train_docs[:200])]
    assert min(diffs) > 0  # every copy is changed ...
    assert np.median(diffs) < 40  # ... but mildly: still the same digit in the same place
    assert [d.images[0].tobytes() for d in digits_documents("train", augment_copies=1)[1437:1447]] == \
        [d.images[0].tobytes() for d in copies[:10]]  # deterministic from the seed


def test_negative_augment_copies_and_unknown_split_are_refused():
    with pytest.raises(ValueError):
        digits_documents("train", augment_copies=-1)
    with pytest.raises(ValueError, match="unknown split"):
        digits_documents("validation")


def test_other_sizes_are_supported():
    d = digits_documents("eval", size=64)[0]
    assert d.images[0].size == (64, 64)


def test_the_retriever_trains_on_the_originals_and_the_first_copies_only():
    from tokenizers_mm.document import Document
    from train.tokenize import retriever_documents

    aug = digits_documents("train", augment_copies=3)
    other = [Document(["a red circle"], source="shapes")]
    kept = retriever_documents({"shapes": other, "digits": aug}, digit_copies=1)
    assert kept[0] is other[0]  # other sources whole, in shard order
    assert [d.images[0].tobytes() for d in kept[1:]] == \
        [d.images[0].tobytes() for d in digits_documents("train", augment_copies=1)]
    assert retriever_documents({"digits": aug}, digit_copies=5) == aug  # more than there are: all
    assert [d.meta["augmented"] for d in retriever_documents({"digits": aug}, digit_copies=0)] == [False] * 1437


def test_made_up_words_are_named_in_meta_and_left_out_of_the_bpe_texts(train_docs):
    from train.tokenize import bpe_texts

    made_up = [d for d in train_docs if "made_up_word" in d.meta]
    assert made_up and all(d.meta["made_up_word"] in d.texts[0].split() for d in made_up)
    texts = bpe_texts(made_up)
    assert all(d.meta["made_up_word"] not in t.split() and len(t.split()) == len(d.texts[0].split()) - 1
               for d, t in zip(made_up, texts))
    plain = [d for d in train_docs if "made_up_word" not in d.meta][:50]
    assert bpe_texts(plain) == [d.texts[0] for d in plain]
