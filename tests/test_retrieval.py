"""The retriever (model/retrieval.py) and its training, evaluation and curation (train/retriever.py).

Tiny configs and a toy world of coloured squares in four quadrants (32 classes, captions of two
ids), so that everything trains in a second or two.
"""
from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.retrieval import (
    ExactIndex, FaissIndex, Index, Retriever, RetrieverConfig, build_index, clip_loss, load_index, retriever_preset,
    siglip_loss,
)
from train.retriever import (
    PairSet, bank_neighbours, document_embeddings, calibrate_threshold, corrupt_captions, curate, curation_demo, evaluate_retrieval, recall_at_k,
    train_retriever, zero_shot_classify,
)

try:
    import faiss  # noqa: F401
    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss-cpu is not installed (pip install faiss-cpu, the 'retrieval' extra)")

COLOURS = [(230, 25, 25), (30, 180, 30), (40, 70, 240), (240, 220, 20), (150, 40, 200), (250, 130, 0), (0, 200, 220),
           (240, 240, 240)]
COLOUR_WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
VOCAB = 48  # ids 10..17 colours, 30..33 quadrants, 40 "square"


def toy_pairs(n: int, seed: int = 0) -> PairSet:
    """n pairs: a 10×10 square of one of 8 colours in one of 4 quadrants (±2 px jitter),
    captioned [colour id, "square", quadrant id]."""
    rng = random.Random(seed)
    imgs = np.zeros((n, 32, 32, 3), np.uint8)
    texts, keys = [], []
    for i in range(n):
        c, q = rng.randrange(8), rng.randrange(4)
        y0 = 3 + 16 * (q // 2) + rng.randint(-2, 2)
        x0 = 3 + 16 * (q % 2) + rng.randint(-2, 2)
        imgs[i, y0 : y0 + 10, x0 : x0 + 10] = COLOURS[c]
        texts.append([10 + c, 40, 30 + q])
        keys.append(f"{c}:{q}")
    return PairSet(torch.from_numpy(imgs), texts, keys, ["toy"] * n)


class ToyTokenizer:
    """encode_text for the toy world's words ("red square top left" -> [10, 40, 30])."""

    def encode_text(self, s: str) -> list[int]:
        ids = [10 + i for i, w in enumerate(COLOUR_WORDS) if w in s.split()]
        ids += [40] if "square" in s else []
        ids += [30 + i for i, q in enumerate(QUADRANTS) if s.endswith(q)]
        return ids or [40]


def tiny_config(**kw) -> RetrieverConfig:
    return retriever_preset("tiny", VOCAB, **kw)


@pytest.fixture(scope="module")
def toy_retriever() -> Retriever:
    return train_retriever(toy_pairs(1024, seed=1), tiny_config(), steps=80, batch_size=64, lr=3e-3, settings="tiny",
                           progress=False)


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def make_index(backend: str, emb: torch.Tensor, ids: torch.Tensor | None = None) -> Index:
    if backend == "exact":
        return build_index(emb, ids, chunk_size=97)  # a small chunk exercises the running top-k merge
    if backend == "exact-bf16":
        return build_index(emb, ids, dtype=torch.bfloat16)
    kind = backend.split("-")[1]
    kw = {"ivf": dict(nlist=8, nprobe=8), "hnsw": dict(m=16, ef_search=128), "flat": {}}[kind]
    return build_index(emb, ids, backend="faiss", kind=kind, **kw)


BACKENDS = ["exact", "exact-bf16",
            *(pytest.param(b, marks=needs_faiss) for b in ("faiss-flat", "faiss-ivf", "faiss-hnsw"))]


# ------------------------------------------------------------------------------------ the index

@pytest.mark.parametrize("backend", BACKENDS)
def test_search_never_returns_the_query_itself(backend):
    emb = unit(600, 16)
    ids = torch.arange(1000, 1600)  # ids are not positions
    index = make_index(backend, emb, ids)
    res = index.search(emb[:50], k=5, exclude=[[1000 + i] for i in range(50)])
    for q in range(50):
        assert 1000 + q not in res.ids[q].tolist()
    assert (res.ids >= 1000).all()  # k neighbours were found for every query
    assert res.ids.shape == res.scores.shape == (50, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbours_scoring_above_max_score_are_skipped_as_near_duplicates(backend):
    base = unit(300, 16)
    noisy = F.normalize(base[:20] + 0.01 * unit(20, 16, seed=1), dim=-1)  # near-copies of the first 20
    emb = torch.cat([base, noisy])
    index = make_index(backend, emb)
    res = index.search(base[:20], k=4, exclude=[[i] for i in range(20)], max_score=0.9)
    assert (res.scores <= 0.9 + 1e-6).all()
    for q in range(20):
        assert 300 + q not in res.ids[q].tolist(), "the near-copy of the query must be skipped"
    without = index.search(base[:20], k=1, exclude=[[i] for i in range(20)])
    assert without.ids[:, 0].tolist() == list(range(300, 320)), "without max_score the near-copy is the best neighbour"


def test_exact_search_matches_brute_force_across_chunks():
    emb, q = unit(1000, 24), unit(30, 24, seed=3)
    index = ExactIndex(24, chunk_size=64)
    index.add(emb[:500])
    index.add(emb[500:])  # two adds, ids continue
    res = index.search(q, k=10)
    ref = (q @ emb.T).topk(10, dim=1)
    assert torch.equal(res.ids, ref.indices)
    torch.testing.assert_close(res.scores, ref.values)


def test_search_pads_with_minus_one_when_fewer_than_k_neighbours_qualify():
    emb = unit(5, 8)
    for index in [make_index("exact", emb)] + ([make_index("faiss-flat", emb)] if HAVE_FAISS else []):
        res = index.search(emb[:2], k=8, exclude=[[0], [1]])
        assert (res.ids[:, :4] >= 0).all() and (res.ids[:, 4:] == -1).all()
        assert torch.isinf(res.scores[:, 4:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_save_load_round_trip_gives_the_same_results(backend, tmp_path):
    emb, q = unit(800, 16), unit(10, 16, seed=5)
    index = make_index(backend, emb, torch.arange(800) * 3)
    index.save(tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert type(loaded) is type(index) and len(loaded) == 800
    a, b = index.search(q, 7, exclude=[[0]] * 10), loaded.search(q, 7, exclude=[[0]] * 10)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores)
    if isinstance(index, ExactIndex):
        assert loaded.dtype == index.dtype and torch.equal(loaded.embeddings, index.embeddings)


def test_index_loading_is_strict(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_index(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="index.json"):
        load_index(tmp_path / "empty")
    make_index("exact", unit(10, 4)).save(tmp_path / "ix")
    if HAVE_FAISS:
        with pytest.raises(ValueError, match="expected 'faiss'"):
            FaissIndex.load(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    meta["dim"] = 5
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="disagree"):
        load_index(tmp_path / "ix")


@needs_faiss
def test_exact_and_faiss_agree_on_a_small_bank():
    # clustered data, as real embeddings are: approximate search is then meaningful
    centres = unit(20, 32, seed=7)
    g = torch.Generator().manual_seed(8)
    emb = F.normalize(centres[torch.randint(0, 20, (4000,), generator=g)] + 0.3 * torch.randn(4000, 32, generator=g), dim=-1)
    q = F.normalize(emb[:100] + 0.05 * torch.randn(100, 32, generator=g), dim=-1)
    exact = build_index(emb).search(q, 10)
    flat = build_index(emb, backend="faiss", kind="flat").search(q, 10)
    assert torch.equal(exact.ids, flat.ids)
    torch.testing.assert_close(exact.scores, flat.scores, atol=1e-5, rtol=0)
    ivf_all = build_index(emb, backend="faiss", kind="ivf", nlist=16, nprobe=16).search(q, 10)  # all cells: exact
    assert torch.equal(exact.ids, ivf_all.ids)
    for approx in (build_index(emb, backend="faiss", kind="ivf", nlist=16, nprobe=8),
                   build_index(emb, backend="faiss", kind="hnsw", m=16, ef_search=64)):
        res = approx.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), exact.ids.tolist())])
        assert recall >= 0.9, f"{type(approx).__name__} recall@10 {recall:.2f} against exact search"


def test_missing_faiss_raises_an_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FaissIndex(8)


# ------------------------------------------------------------------------------------ the encoder

def test_document_embedding_is_the_normalised_mean_of_its_text_and_image_embeddings():
    torch.manual_seed(0)
    r = Retriever(tiny_config()).eval()
    pairs = toy_pairs(3)
    t, i = r.embed_texts(pairs.texts), r.embed_images(pairs.images)
    docs = r.embed_documents([[x] for x in pairs.texts], [pairs.images[j : j + 1] for j in range(3)])
    torch.testing.assert_close(docs, F.normalize(t + i, dim=-1))
    torch.testing.assert_close(docs.norm(dim=-1), torch.ones(3))
    text_only = r.embed_documents([[pairs.texts[0]]], [[]])
    image_only = r.embed_documents([[]], [pairs.images[:1]])
    torch.testing.assert_close(text_only[0], t[0])
    torch.testing.assert_close(image_only[0], i[0])


def test_pil_images_and_tensors_embed_identically():
    from PIL import Image

    torch.manual_seed(0)
    r = Retriever(tiny_config()).eval()
    imgs = toy_pairs(4).images
    pils = [Image.fromarray(a.numpy()) for a in imgs]
    floats = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(r.embed_images(pils), r.embed_images(imgs))
    torch.testing.assert_close(r.embed_images(floats), r.embed_images(imgs))


def test_text_ids_outside_the_vocabulary_are_rejected():
    r = Retriever(tiny_config())
    with pytest.raises(ValueError, match="outside the retriever's text vocabulary"):
        r.embed_texts([[VOCAB + 3]])
    with pytest.raises(ValueError, match="empty"):
        r.embed_texts([[]])


def test_same_seed_gives_the_same_retriever_embeddings_and_neighbours():
    pairs = toy_pairs(256)
    kw = dict(steps=6, batch_size=32, settings="tiny", progress=False)
    a = train_retriever(pairs, tiny_config(), seed=3, **kw)
    b = train_retriever(pairs, tiny_config(), seed=3, **kw)
    c = train_retriever(pairs, tiny_config(), seed=4, **kw)
    ea, eb, ec = (m.embed_images(pairs.images) for m in (a, b, c))
    assert torch.equal(ea, eb)
    assert not torch.equal(ea, ec)
    qa = a.embed_texts(pairs.texts[:10])
    assert torch.equal(build_index(ea).search(qa, 5).ids, build_index(eb).search(b.embed_texts(pairs.texts[:10]), 5).ids)


def test_retriever_save_load_round_trip_restores_every_tensor(tmp_path):
    torch.manual_seed(0)
    r = Retriever(tiny_config(loss="siglip"))
    r.save(tmp_path / "r")
    loaded = Retriever.from_pretrained(tmp_path / "r")
    assert loaded.config == r.config
    for k, v in r.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_retriever_loading_is_strict(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Retriever.from_pretrained(tmp_path / "missing")
    Retriever(tiny_config()).save(tmp_path / "r")
    (tmp_path / "r" / "retriever.safetensors").unlink()
    with pytest.raises(ValueError, match="no retriever.safetensors"):
        Retriever.from_pretrained(tmp_path / "r")
    Retriever(tiny_config()).save(tmp_path / "r")
    cfg_path = tmp_path / "r" / "retriever_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "dims": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        Retriever.from_pretrained(tmp_path / "r")
    cfg_path.write_text(json.dumps({**cfg, "dim": cfg["dim"] * 2}))
    with pytest.raises(ValueError, match="do not match"):
        Retriever.from_pretrained(tmp_path / "r")
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Retriever.from_pretrained(tmp_path / "r")


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="image_input"):
        tiny_config(image_input="jpeg")
    with pytest.raises(ValueError, match="loss"):
        tiny_config(loss="triplet")
    with pytest.raises(ValueError, match="unknown retriever preset"):
        retriever_preset("huge", VOCAB)


# ------------------------------------------------------------------------------------ losses and training

@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_losses_decrease_on_a_toy_problem(loss):
    torch.manual_seed(0)
    r = Retriever(tiny_config(loss=loss)).train()
    pairs = toy_pairs(64)
    x = pairs.images.permute(0, 3, 1, 2).float() / 127.5 - 1
    ids, mask = r.pad_texts(pairs.texts)
    opt = torch.optim.AdamW(r.parameters(), lr=3e-3)
    groups = torch.tensor([hash(tuple(t)) for t in pairs.texts])
    positives = groups[:, None] == groups[None, :]
    losses = []
    for _ in range(40):
        img, txt = r.encode_images(x), r.encode_texts(ids, mask)
        out = (clip_loss(img, txt, r.logit_scale, positives) if loss == "clip"
               else siglip_loss(img, txt, r.logit_scale, r.logit_bias, positives))
        opt.zero_grad()
        out.backward()
        opt.step()
        losses.append(out.item())
    assert losses[-1] < 0.5 * losses[0], f"{loss} loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_clip_loss_is_low_for_aligned_and_high_for_shuffled_embeddings():
    e = unit(16, 8)
    scale = torch.tensor(np.log(1 / 0.05))
    assert clip_loss(e, e, scale) < clip_loss(e, e.roll(1, 0), scale)
    b = torch.tensor(-5.0)
    assert siglip_loss(e, e, scale, b) < siglip_loss(e, e.roll(1, 0), scale, b)


def test_trained_toy_retriever_retrieves_the_right_class(toy_retriever):
    ev = toy_pairs(200, seed=9)
    m = evaluate_retrieval(toy_retriever, ev.images, ev.texts, ev.keys)
    assert m["t2i_correct@1"] >= 0.9 and m["i2t_correct@1"] >= 0.9, m
    assert m["i2t_recall@1"] >= 0.9, m  # 32 distinct captions: image→text is unambiguous here


def test_zero_shot_probabilities_sum_to_one_and_name_the_colour(toy_retriever):
    ev = toy_pairs(200, seed=10)
    labels = [f"{c} square {q}" for c in COLOUR_WORDS for q in QUADRANTS]
    probs = zero_shot_classify(toy_retriever, ToyTokenizer(), ev.images, labels, templates=("{}",))
    assert probs.shape == (200, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(200))
    truth = torch.tensor([int(k.split(":")[0]) * 4 + int(k.split(":")[1]) for k in ev.keys])
    assert (probs.argmax(1) == truth).float().mean() >= 0.9
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_classify(toy_retriever, ToyTokenizer(), ev.images, labels, templates=("no slot",))


# ------------------------------------------------------------------------------------ metrics

def test_recall_at_k_on_a_hand_made_example():
    scores = torch.tensor([[0.9, 0.1, 0.2],   # target 0 ranks first
                           [0.5, 0.4, 0.3],   # target 1 ranks second
                           [0.3, 0.2, 0.1]])  # target 2 ranks third
    targets = torch.arange(3)
    assert recall_at_k(scores, targets, 1) == pytest.approx(1 / 3)
    assert recall_at_k(scores, targets, 2) == pytest.approx(2 / 3)
    assert recall_at_k(scores, targets, 3) == pytest.approx(1.0)
    assert recall_at_k(torch.zeros(4, 4), torch.arange(4), 1) == 0.0  # ties count against the query


class FixedRetriever:
    """Stands in for a Retriever in evaluate_retrieval: embeddings chosen by hand."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        self.img, self.txt = img, txt

    def embed_images(self, images):
        return self.img

    def embed_texts(self, texts):
        return self.txt


def test_image_to_text_recall_treats_identical_captions_as_one_candidate():
    e = torch.eye(3)
    img = torch.stack([e[0], e[0], e[1]])  # two images of class 0, one of class 1
    txt = torch.stack([e[0], e[0], e[1]])  # pairs 0 and 1 share one caption
    m = evaluate_retrieval(FixedRetriever(img, txt), torch.zeros(3, 32, 32, 3, dtype=torch.uint8),
                           [[5], [5], [6]], keys=["a", "a", "b"])
    assert m["i2t_recall@1"] == 1.0  # each image's caption ranks first among the 2 distinct captions
    assert m["t2i_recall@1"] == pytest.approx(1 / 3)  # text 0 and 1 tie on two images: only pair 2 is sure
    assert m["t2i_correct@1"] == 1.0 and m["i2t_correct@1"] == 1.0


# ------------------------------------------------------------------------------------ curation

def test_corrupt_captions_moves_the_chosen_fraction_to_wrong_images():
    texts = [[i] for i in range(100)]
    out, moved = corrupt_captions(texts, 0.2, seed=0)
    assert int(moved.sum()) == 20
    assert all(out[i] != texts[i] for i in range(100) if moved[i])
    assert all(out[i] == texts[i] for i in range(100) if not moved[i])
    assert sorted(map(tuple, out)) == sorted(map(tuple, texts))  # a permutation: no caption invented


def test_curation_removes_shuffled_pairs_on_a_toy_retriever(toy_retriever):
    ev = toy_pairs(400, seed=11)
    demo = curation_demo(toy_retriever, ev, fraction=0.2, duplicate_threshold=None)
    assert demo["corrupted_removed"] >= 0.85, demo
    assert demo["clean_lost"] <= 0.15, demo


def test_curate_drops_near_duplicate_pairs_but_keeps_the_first(toy_retriever):
    ev = toy_pairs(50, seed=12)
    images = torch.cat([ev.images, ev.images[:5]])  # exact copies of the first five pairs
    texts = ev.texts + ev.texts[:5]
    thr = calibrate_threshold(toy_retriever, images, texts)
    res = curate(toy_retriever, images, texts, threshold=-1.0, duplicate_threshold=0.999)
    assert res.duplicate[50:].all(), "the copies must go"
    assert not res.duplicate[0], "the first of each duplicate cluster stays"
    assert not res.low_score.any()
    assert -1.0 < thr < 1.0


# ------------------------------------------------------------------------------------ banks

def test_bank_neighbours_never_include_the_document_itself_or_its_exact_copies(toy_retriever):
    from PIL import Image

    from tokenizers_mm.document import Document

    pairs = toy_pairs(40, seed=13)
    words = {10 + i: w for i, w in enumerate(COLOUR_WORDS)} | {40: "square"} | {30 + i: q for i, q in enumerate(QUADRANTS)}
    docs = [Document([" ".join(words[t] for t in txt), Image.fromarray(img.numpy())])
            for txt, img in zip(pairs.texts, pairs.images)]
    docs += docs[:3]  # exact copies of the first three documents, ids 40..42
    emb = document_embeddings(toy_retriever, ToyTokenizer(), docs, batch_size=16)
    torch.testing.assert_close(emb[:3], emb[40:])
    ids = torch.arange(len(docs))
    res = bank_neighbours(build_index(emb, ids), emb, ids, k=3, max_score=0.9999, batch_size=8)
    assert res.ids.shape == (43, 3)
    for i in range(43):
        assert i not in res.ids[i].tolist()
    for i in range(3):
        assert 40 + i not in res.ids[i].tolist() and i not in res.ids[40 + i].tolist()
