"""Retrieval augmentation end to end: neighbours precomputed by `make tokenize`, training sequences
with retrieved documents behind <break>, and retrieval at inference through the sample API."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, env
from tokenizers_mm import special
from tokenizers_mm.special import BOI_ID, BOS_ID, BREAK_ID, EOI_ID, EOS_ID
from train.pipeline import PackedRows, load_neighbours, retrieval_eval_rows
from train.sequences import IGNORE, SequenceConfig, build_sequence, neighbour_tokens, with_neighbours
from train.shards import IMAGE, TEXT, Shard, ShardSegment

# ------------------------------------------------------------------ neighbours from `make tokenize`


def bank_embeddings(artifacts) -> torch.Tensor:
    from model.retrieval import load_index

    index = load_index(artifacts / "retriever" / "index")
    assert torch.equal(index.ids, torch.arange(len(index)))  # bank id = train shard document
    return index.embeddings.float()


def test_train_neighbours_are_never_the_document_itself_nor_a_near_duplicate(tiny_artifacts):
    shard = Shard(tiny_artifacts / "shards" / "train")
    nb = load_neighbours(shard)
    assert nb.shape == (len(shard), 4) and nb.dtype == np.int64
    assert not (nb == np.arange(len(nb))[:, None]).any()
    assert ((nb >= -1) & (nb < len(shard))).all() and (nb >= 0).mean() > 0.9
    # -1 only pads the end of a row
    assert all((row[: (row >= 0).sum()] >= 0).all() for row in nb)
    emb = bank_embeddings(tiny_artifacts)
    rows, cols = np.nonzero(nb >= 0)
    cos = (emb[torch.from_numpy(rows)] * emb[torch.from_numpy(nb[rows, cols])]).sum(-1)
    report = json.loads((tiny_artifacts / "report.json").read_text())
    assert float(cos.max()) <= report["retriever"]["neighbours"]["max_score"] + 1e-5
    # neighbours of held-out documents come from the train bank
    ev = load_neighbours(Shard(tiny_artifacts / "shards" / "eval"))
    assert ((ev >= -1) & (ev < len(shard))).all() and (ev[:, 0] >= 0).all()


def test_tokenize_computes_the_same_retriever_and_neighbours_twice(tiny_artifacts, tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.tokenize", "--preset", "tiny", "--out", str(tmp_path)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for split in ("train", "eval"):
        for name in ("neighbours.npy", "neighbour_scores.npy"):
            a, b = np.load(tiny_artifacts / "shards" / split / name), np.load(tmp_path / "shards" / split / name)
            assert np.array_equal(a, b), (split, name)
    from safetensors.torch import load_file

    for name in ("retriever.safetensors", "bank.safetensors", "index/index.safetensors"):
        a, b = load_file(tiny_artifacts / "retriever" / name), load_file(tmp_path / "retriever" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------ sequences


def pair(text, code) -> list[ShardSegment]:
    return [ShardSegment(TEXT, np.array(text)), ShardSegment(IMAGE, np.full(4, code))]


def test_retrieved_documents_precede_the_main_one_behind_break_with_alpha_weights():
    main = build_sequence(pair([10, 11], 100), np.random.default_rng(0), SequenceConfig(block_size=64, p_image_first=0.0,
                                                                                         caption_dropout=0.0))
    n1, n2 = neighbour_tokens(pair([20], 101)), neighbour_tokens(pair([30], 102)[::-1])  # image-first stored: reordered
    ids, w = with_neighbours(main, [n1, n2], block_size=64, weight=0.1)
    img = lambda c: [BOI_ID, c, c, c, c, EOI_ID]  # noqa: E731
    assert ids.tolist() == [BOS_ID, 30, *img(102), BREAK_ID, 20, *img(101), BREAK_ID, 10, 11, *img(100), EOS_ID]
    n_ret = 2 * (1 + 6 + 1)
    assert np.allclose(w[1 : 1 + n_ret], 0.1) and np.all(w[1 + n_ret :] == 1.0)


def test_neighbours_are_dropped_worst_first_and_the_main_document_is_never_cut_for_them():
    main = np.array([BOS_ID, *range(10, 40), EOS_ID])  # 32 tokens
    best, worst = np.arange(50, 60), np.arange(60, 80)
    ids, w = with_neighbours(main, [best, worst], block_size=48, weight=0.1)
    assert ids.tolist() == [BOS_ID, *best, BREAK_ID, *main[1:]] and len(ids) <= 49
    ids, w = with_neighbours(main, [best, worst], block_size=32, weight=0.1)  # no room for any
    assert ids.tolist() == main.tolist() and np.all(w == 1.0)


def toy_bank(tmp_path, n=30):
    from train.shards import ShardWriter

    w = ShardWriter(tmp_path / "s", 200, {})
    for i in range(n):
        w.add([(TEXT, [10 + i % 50, 11]), (IMAGE, [100 + i % 16] * 4)], "pair", {})
    w.close()
    shard = Shard(tmp_path / "s")
    nb = np.stack([(np.arange(1, 4) + i) % n for i in range(n)]).astype(np.int64)  # never itself
    return shard, nb


def test_k_is_drawn_per_document_up_to_retrieved_max_and_leaves_the_main_document_as_without_retrieval(tmp_path):
    shard, nb = toy_bank(tmp_path)
    plain = PackedRows(shard, SequenceConfig(block_size=128), seed=3, epoch=0)
    ra_cfg = SequenceConfig(block_size=128, retrieved_max=2, retrieved_weight=0.1)
    ra = PackedRows(shard, ra_cfg, seed=3, epoch=0, neighbours=nb, bank=shard)
    counts = []
    for k in range(len(ra.items)):
        ids, w = ra._sequence(k)
        breaks = int((ids == BREAK_ID).sum())
        counts.append(breaks)
        body = ids[np.nonzero(ids == BREAK_ID)[0][-1] + 1 :] if breaks else ids[1:]
        assert body.tolist() == plain._sequence(k)[0][1:].tolist()  # same main document, same choices
        assert np.all(w[len(ids) - len(body) :] == 1.0)
    assert set(counts) == {0, 1, 2}
    with pytest.raises(ValueError, match="neighbours"):
        PackedRows(shard, ra_cfg, seed=3, epoch=0)
    # rows: retrieved targets weigh α, main targets 1, padding 0
    row = ra[0]
    real = row["targets"] != IGNORE
    assert {round(float(x), 4) for x in row["weights"][real].unique()} == {0.1, 1.0}


def test_held_out_rows_with_retrieval_score_exactly_the_main_documents_targets(tiny_artifacts):
    train, ev = Shard(tiny_artifacts / "shards" / "train"), Shard(tiny_artifacts / "shards" / "eval")
    off, on = retrieval_eval_rows(ev, SequenceConfig(block_size=256), seed=0, max_rows=4,
                                  neighbours=load_neighbours(ev), bank=train, k=2)
    assert len(off) == 4 and len(on) > len(off)
    n_targets = lambda rows: sum(int((r["targets"] != IGNORE).sum()) for r in rows)  # noqa: E731
    image = lambda rows: sum(int((r["targets"] >= 9 + 400).sum()) for r in rows)  # noqa: E731
    assert n_targets(on) == n_targets(off) and image(on) == image(off)
    assert any((r["idx"] == BREAK_ID).any() for r in on) and not any((r["idx"] == BREAK_ID).any() for r in off)


# ------------------------------------------------------------------ inference


@pytest.fixture(scope="module")
def ra_model(tiny_ra_run):
    from sample.api import MultimodalModel

    return MultimodalModel.from_pretrained(tiny_ra_run)


def test_retrieve_returns_bank_documents_best_first_with_scores(ra_model):
    found = ra_model.retrieve("a handwritten digit seven", k=3)
    assert len(found) == 3
    scores = [r.score for r in found]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-5 for s in scores)
    for r in found:
        assert r.document.texts and r.document.images  # a caption pair, decoded from the bank
        caption = r.ids[: r.ids.index(BOI_ID)]
        assert caption == ra_model.tokenizer.encode_text(r.document.texts[0])
        assert r.ids[len(caption) :] == [BOI_ID, *r.ids[len(caption) + 1 : -1], EOI_ID]
        assert len(r.ids) - len(caption) == ra_model.tokenizer.image_tokens + 2
    image_query = ra_model.retrieve([found[0].document.images[0]], k=2)
    assert len(image_query) == 2


def test_generation_retrieves_by_default_for_a_model_trained_with_it_and_can_switch_it_off(ra_model):
    assert ra_model.trained_with_retrieval and ra_model.retrieval_k == 2
    on = ra_model.generate(["a handwritten digit seven"], next="image", seed=0)[0]
    assert [r.id for r in on.retrieved] == [r.id for r in ra_model.retrieve("a handwritten digit seven", 2)]
    assert on.prompt_ids.count(BREAK_ID) == 2 and on.prompt_ids[0] == BOS_ID
    assert on.prompt_ids[1 : 1 + len(on.retrieved[1].ids)] == on.retrieved[1].ids  # the best sits next to the prompt
    assert len(on.document.images) == 1
    off = ra_model.generate(["a handwritten digit seven"], next="image", seed=0, retrieve=False)[0]
    assert off.retrieved == [] and BREAK_ID not in off.prompt_ids
    one = ra_model.generate(["a handwritten digit seven"], next="image", seed=0, k=1)[0]
    assert len(one.retrieved) == 1 and one.prompt_ids.count(BREAK_ID) == 1


def test_a_model_without_retrieval_does_not_retrieve_unless_asked(tiny_run):
    from sample.api import MultimodalModel

    mm = MultimodalModel.from_pretrained(tiny_run)
    assert not mm.trained_with_retrieval and mm.can_retrieve  # tiny artifacts carry a bank
    assert mm.generate(["a red circle"], next="image")[0].retrieved == []
    # its context (128) holds a retrieved pair (~78 tokens) beside a short prompt and answer ...
    assert len(mm.generate(["a red circle"], next="text", max_new_tokens=8, retrieve=True, k=1)[0].retrieved) == 1
    # ... but not beside a 65-token image: the neighbour is dropped, never the prompt
    assert mm.generate(["a red circle"], next="image", retrieve=True, k=1)[0].retrieved == []


def test_loading_a_retrieval_model_without_its_retriever_folder_is_a_clear_error(tiny_ra_run, tmp_path):
    from model.checkpoint import load_pretrained, resolve

    folder = tmp_path / "ckpt"
    shutil.copytree(resolve(tiny_ra_run), folder)
    assert json.loads((folder / "config.json").read_text())["trained_with_retrieval"] is True
    shutil.rmtree(folder / "retriever")
    with pytest.raises(ValueError, match="trained with retrieval.*retriever/ folder.*missing"):
        load_pretrained(folder)


def test_the_cli_writes_the_retrieved_documents_into_result_json(tiny_ra_run, tmp_path):
    from sample.cli import main

    assert main(["generate", "--ckpt", str(tiny_ra_run), "--prompt", "a handwritten digit two", "--next", "image",
                 "--n", "1", "--out", str(tmp_path / "on")]) == 0
    result = json.loads((tmp_path / "on" / "result.json").read_text())
    assert len(result["retrieved"]) == 2 and result["retrieved"][0]["score"] >= result["retrieved"][1]["score"]
    assert (tmp_path / "on" / result["retrieved"][0]["segments"][1]["image"]).is_file()
    assert main(["generate", "--ckpt", str(tiny_ra_run), "--prompt", "a handwritten digit two", "--next", "image",
                 "--n", "1", "--retrieval", "off", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "result.json").read_text())["retrieved"] == []


def test_the_curation_filter_drops_only_pairs_and_counts_what_it_dropped(tiny_artifacts):
    from model.retrieval import Retriever
    from tokenizers_mm.multimodal import MultimodalTokenizer
    from train.data.shapes import shapes_documents
    from train.tokenize import PRESETS, curate_documents

    tok = MultimodalTokenizer.from_pretrained(tiny_artifacts / "tokenizer")
    retriever = Retriever.from_pretrained(tiny_artifacts / "retriever")
    docs = shapes_documents("train", 120, seed=5)
    kept, counts = curate_documents(PRESETS["tiny"], retriever, tok, {"shapes": docs})
    dropped = [d for d in docs if not any(d is k for k in kept["shapes"])]
    assert len(dropped) == counts["dropped_low_score"] + counts["dropped_duplicate"] > 0
    assert all(d.is_pair() for d in dropped) and counts["pairs"] == sum(d.is_pair() for d in docs)
    assert [d for d in docs if not d.is_pair()] == [d for d in kept["shapes"] if not d.is_pair()]  # stories kept, in order


def test_a_retrieval_run_logs_held_out_nll_with_and_without_retrieval(tiny_ra_run):
    evals = [json.loads(x) for x in (tiny_ra_run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    last = evals[-1]
    for key in ("eval_image_nll", "eval_c2i_image_nll", "eval_ra_image_nll", "eval_ra_text_nll"):
        assert np.isfinite(last[key]) and last[key] > 0, key
    assert last["eval_ra_image_nll"] != last["eval_c2i_image_nll"]  # neighbours reached the model


# ------------------------------------------------------------------ classification with retrieval


def _digits(n: int):
    from train.data.digits import digits_documents

    return [d.images[0] for d in digits_documents("eval")[:n]]


def test_classification_reads_retrieved_documents_as_the_naive_loop_does(ra_model):
    from sample.classify import classify, naive_scores

    mm, images = ra_model, _digits(2)
    labels, template = ["one", "two", "three"], "a handwritten digit {}"
    captions = [template.format(l) for l in labels]
    out = classify(mm.model, mm.tokenizer, images, labels, [template], mode="both", bank=mm.bank, k=2)
    # the neighbours are the bank's best for each caption and for each image, best first
    assert list(out.caption_neighbours) == captions
    for caption, found in out.caption_neighbours.items():
        assert [nb.id for nb in found] == [r.id for r in mm.retrieve(caption, 2)]
    for image, found in zip(images, out.image_neighbours):
        assert [nb.id for nb in found] == [r.id for r in mm.retrieve([image], 2)]
        assert found[0].score >= found[1].score
    # the scores are those of full forward passes over `<bos> d_2 <break> d_1 <break> prompt ...`
    per_caption = [special.retrieved_prefix([mm.bank.documents[nb.id] for nb in out.caption_neighbours[c]]) for c in captions]
    per_image = [special.retrieved_prefix([mm.bank.documents[nb.id] for nb in found]) for found in out.image_neighbours]
    assert all(ctx.count(BREAK_ID) == 2 for ctx in per_caption + per_image)
    naive_img = naive_scores(mm.model, mm.tokenizer, images, captions, "image", context=per_caption)
    naive_txt = naive_scores(mm.model, mm.tokenizer, images, captions, "text", context=per_image)
    assert torch.allclose(out.image_loglik, naive_img, atol=2e-3, rtol=1e-4)
    assert torch.allclose(out.text_loglik, naive_txt, atol=2e-3, rtol=1e-4)
    # and the retrieved documents change them: the model reads its context
    off = classify(mm.model, mm.tokenizer, images, labels, [template], mode="both")
    assert off.caption_neighbours is None and off.image_neighbours is None
    assert not torch.allclose(off.image_loglik, out.image_loglik, atol=1e-2)


def test_classification_drops_the_worst_neighbours_where_the_context_is_short(ra_model):
    from sample.classify import classify, image_loglik

    mm, images = ra_model, _digits(1)
    out = classify(mm.model, mm.tokenizer, images, ["seven", "eight"], ["a handwritten digit {}"], mode="image",
                   bank=mm.bank, k=4)
    assert out.image_neighbours is None  # the text direction was not scored: nothing retrieved for it
    block, G = mm.model.config.block_size, mm.tokenizer.image_tokens
    for caption, found in out.caption_neighbours.items():
        full = [r.id for r in mm.retrieve(caption, 4)]
        assert 1 <= len(found) < 4 and [nb.id for nb in found] == full[: len(found)]  # the best kept, in order
        context = special.retrieved_prefix([mm.bank.documents[nb.id] for nb in found])
        assert 1 + len(context) + len(mm.tokenizer.encode_text(caption)) + 1 + G <= block
    with pytest.raises(ValueError, match="one id list per caption"):
        image_loglik(mm.model, mm.tokenizer, images, ["a", "b"], context=[[5]])


def test_the_classify_cli_retrieves_for_a_model_trained_with_retrieval_and_reports_it(tiny_ra_run, tiny_run, tmp_path, capsys):
    from sample.cli import main

    path = tmp_path / "digit.png"
    _digits(1)[0].save(path)
    args = ["classify", "--labels", "zero,seven", "--template", "a handwritten digit {}", "--images", str(path),
            "--views", "1", "--json"]
    assert main([*args, "--ckpt", str(tiny_ra_run)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = row["retrieved"]
    assert len(got["image"]) == 2 and got["image"][0]["score"] >= got["image"][1]["score"]
    assert set(got["captions"]) == {"a handwritten digit zero", "a handwritten digit seven"}
    assert all(d["text"] for found in got["captions"].values() for d in found)
    assert main([*args, "--ckpt", str(tiny_ra_run), "--retrieval", "off"]) == 0
    assert "retrieved" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--ckpt", str(tiny_run)]) == 0  # trained without retrieval: auto is off
    assert "retrieved" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--ckpt", str(tiny_ra_run), "--k", "0"]) == 2
    assert "--k must be between 1 and 64" in capsys.readouterr().err
