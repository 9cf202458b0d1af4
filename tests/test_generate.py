"""Generation on the KV cache: padding-exactness, constraints, guidance."""
from __future__ import annotations

import pytest
import torch

from model import Transformer, preset
from sample.generate import SamplingConfig, generate_ids, generate_images, left_pad, text_to_image_prompts
from tokenizers_mm import special


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size, block_size=160)).eval()


def test_left_padded_rows_decode_exactly_as_alone():
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=100)).eval()
    a, b = [1, 20, 21, 22, 23, 24], [1, 30, 31]
    ids, valid = left_pad([a, b])
    m.setup_caches(2, 12)
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    key_valid[:, : ids.shape[1]] = valid
    with torch.no_grad():
        out = m.forward_cached(ids, torch.arange(ids.shape[1]), key_valid=key_valid)[:, -1]
        step = m.forward_cached(torch.tensor([[40], [41]]), torch.tensor([ids.shape[1]]), key_valid=key_valid)[:, -1]
        alone_a, alone_b = m(torch.tensor([a]))[0, -1], m(torch.tensor([b]))[0, -1]
        alone_b2 = m(torch.tensor([b + [41]]))[0, -1]
    assert torch.allclose(out[0], alone_a, atol=1e-5) and torch.allclose(out[1], alone_b, atol=1e-5)
    assert torch.allclose(step[1], alone_b2, atol=1e-5)


def test_generated_images_always_have_exactly_grid_codes(tiny_model, tiny_tokenizer):
    t = tiny_tokenizer
    cond, uncond = text_to_image_prompts(t, ["a red circle", "a handwritten digit seven"])
    new = generate_ids(tiny_model, t, cond, max_new_tokens=t.image_tokens + 1, uncond_prompts=uncond,
                       sampling=SamplingConfig(guidance=3.0), stop_after_images=1, seed=1)
    for row in new:
        assert len(row) == t.image_tokens + 1 and row[-1] == special.EOI_ID
        assert all(t.image_offset <= c < t.vocab_size for c in row[:-1])
    images = generate_images(tiny_model, t, ["a red circle"], seed=0)
    assert images[0].size == (t.image_size, t.image_size)


def test_free_generation_never_violates_the_modality_constraints(tiny_model, tiny_tokenizer):
    t = tiny_tokenizer
    prompts = [[special.BOS_ID, *t.encode_text("a red")] for _ in range(6)]
    new = generate_ids(tiny_model, t, prompts, max_new_tokens=150, seed=3)
    for row in new:
        seq = [special.BOS_ID, *row]
        i = 0
        while i < len(seq):
            tok = seq[i]
            if tok == special.BOI_ID:
                codes = seq[i + 1 : i + 1 + t.image_tokens]
                assert len(codes) == t.image_tokens and all(t.layout.is_image_id(c) for c in codes)
                assert seq[i + 1 + t.image_tokens] == special.EOI_ID
                i += t.image_tokens + 2
                continue
            assert not t.layout.is_image_id(tok), "an image code outside <boi>..<eoi>"
            if tok == special.EOS_ID:
                assert i == len(seq) - 1 or all(x == special.PAD_ID for x in seq[i + 1 :])
            i += 1
        t.decode(seq)  # decodes without error


def test_guidance_scale_one_equals_plain_conditional_sampling(tiny_model, tiny_tokenizer):
    t = tiny_tokenizer
    cond, uncond = text_to_image_prompts(t, ["a small red circle", "a handwritten digit seven"])
    kw = dict(max_new_tokens=t.image_tokens + 1, stop_after_images=1, seed=7)
    plain = generate_ids(tiny_model, t, cond, sampling=SamplingConfig(guidance=1.0), **kw)
    with_uncond = generate_ids(tiny_model, t, cond, uncond_prompts=uncond, sampling=SamplingConfig(guidance=1.0), **kw)
    assert plain == with_uncond


def test_a_prompt_longer_than_the_context_is_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="context"):
        generate_ids(tiny_model, tiny_tokenizer, [[special.BOS_ID] * 150], max_new_tokens=20)


def test_reranked_text_to_image_keeps_the_best_scored_candidates_in_order(tiny_run):
    from sample.api import MultimodalModel

    mm = MultimodalModel.from_pretrained(tiny_run)
    caption = "a small red circle in the top left"
    candidates = mm.text_to_image(caption, n=6, seed=3)  # the same draws re-ranking starts from
    scores = mm.image_text_scores(candidates, caption)
    best = mm.text_to_image(caption, n=2, seed=3, rerank=3)
    expected = [candidates[i] for i in scores.argsort(descending=True)[:2].tolist()]
    assert [im.tobytes() for im in best] == [im.tobytes() for im in expected]
    kept = mm.image_text_scores(best, caption)
    assert kept[0] >= kept[1] and kept[1] >= scores.sort(descending=True).values[1] - 1e-6
    with pytest.raises(ValueError, match="rerank"):
        mm.text_to_image(caption, rerank=0)


def test_reranked_captions_are_the_best_scored_samples_in_order(tiny_run):
    from sample.api import MultimodalModel
    from train.data import shapes as shapes_data

    mm = MultimodalModel.from_pretrained(tiny_run)
    image = shapes_data.shapes_documents("eval", 4, seed=0)[0].images[0]
    candidates = mm.caption(image, n=6, temperature=1.0, seed=5, max_new_tokens=8)  # the draws re-ranking starts from
    best = mm.caption(image, n=2, temperature=1.0, seed=5, max_new_tokens=8, rerank=3)
    assert best == [candidates[i] for i in mm.rank_texts(image, candidates)[:2]]
    nonempty = [c for c in candidates if c.strip()]
    if nonempty:  # the winner scores at least as high as every non-empty candidate
        assert float(mm.text_image_scores(image, [best[0]])[0]) >= float(mm.text_image_scores(image, nonempty).max()) - 1e-6
    with pytest.raises(ValueError, match="temperature"):
        mm.caption(image, rerank=2)
    with pytest.raises(ValueError, match="rerank"):
        mm.caption(image, rerank=0, temperature=1.0)


def test_sampling_precision_picks_the_decoder_weights_and_scoring_keeps_float32(tiny_run):
    from sample.api import MultimodalModel

    fp32 = MultimodalModel.from_pretrained(tiny_run, precision="fp32")
    bf16 = MultimodalModel.from_pretrained(tiny_run, precision="bf16")
    assert fp32.decoder is fp32.model and fp32.model.tok_emb.weight.dtype == torch.float32
    assert bf16.decoder.tok_emb.weight.dtype == torch.bfloat16 and bf16.model.tok_emb.weight.dtype == torch.float32
    images = bf16.text_to_image("a small red circle in the top left", n=2, seed=0)
    assert [im.size for im in images] == [(bf16.tokenizer.image_size,) * 2] * 2
    with pytest.raises(ValueError, match="precision"):
        MultimodalModel.from_pretrained(tiny_run, precision="fp16")


def test_compiled_decoding_compiles_once_for_prompts_of_different_lengths(tiny_tokenizer):
    # a compiled decode step is specialised to its cache length, and the compiled prefill to the
    # prompt's: generate_ids rounds both up to buckets (Transformer.decoding_cache_len,
    # PREFILL_BUCKET), so new prompt lengths reuse the graphs instead of compiling some each (and
    # falling back to eager after dynamo's limit)
    from torch._dynamo.utils import counters

    t = tiny_tokenizer
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=t.vocab_size, block_size=160)).eval()
    assert model.decoding_cache_len(70) == 70  # eager: exact
    model.compile_decoding()
    assert model.decoding_cache_len(70) == 128 and model.decoding_cache_len(150) == 160
    before = counters["stats"]["unique_graphs"]
    for caption in ("a red circle", "a small blue square in the top left"):
        # caches of another shape in between (as classification allocates) must not cost a recompile
        model.setup_caches(3, 40)
        model.clear_caches()
        cond, _ = text_to_image_prompts(t, [caption])
        new = generate_ids(model, t, cond, max_new_tokens=t.image_tokens + 1, stop_after_images=1, seed=0)
        assert len(new[0]) == t.image_tokens + 1 and new[0][-1] == special.EOI_ID
    assert counters["stats"]["unique_graphs"] - before == 2  # the prefill and the step


def test_compiled_decoding_draws_what_eager_decoding_draws(tiny_tokenizer):
    # compiled, the prompt is padded further left and prefilled in a graph, and the codes are drawn
    # inside the step's graph; with the same seed the images must come out the same (float32:
    # the CDF differences are ~1e-7, a draw would need to land that close to a boundary)
    t = tiny_tokenizer
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=t.vocab_size, block_size=160)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)  # sharper than the init, so that draws differ by prompt
    cond, uncond = text_to_image_prompts(t, ["a red circle", "a small blue square in the top left"])
    for guidance in (1.0, 3.0):
        runs = []
        for compiled in (False, True):
            model.compile_decoding(enable=compiled, autotune=False)  # autotuning only picks kernels: spare its time
            runs.append(generate_ids(model, t, cond, max_new_tokens=t.image_tokens + 1, uncond_prompts=uncond,
                                     stop_after_images=1, seed=3, sampling=SamplingConfig(guidance=guidance)))
        assert runs[0] == runs[1], guidance
        assert runs[0][0] != runs[0][1]  # the two prompts drew different images
