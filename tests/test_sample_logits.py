"""Sampling math as pure functions: filters, penalties, guidance, modality constraints."""
from __future__ import annotations

import torch

from sample import logits as L
from tokenizers_mm import special

TEXT_V, V, N = 50, 70, 4  # text ids [9, 50), image codes [50, 70), 4 codes per image


def test_top_k_keeps_exactly_k_tokens():
    x = torch.randn(3, V)
    kept = torch.isfinite(L.top_k_filter(x, 5)).sum(-1)
    assert kept.tolist() == [5, 5, 5]
    assert torch.equal(L.top_k_filter(x, None), x)


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(L.top_p_filter(x, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(L.top_p_filter(x, 0.1)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_lowers_only_seen_tokens():
    x = torch.tensor([[2.0, -1.0, 3.0]])
    out = L.repetition_penalty(x, torch.tensor([[0, 1, -1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_guidance_at_scale_one_equals_conditional_log_probs():
    cond, uncond = torch.randn(2, V), torch.randn(2, V)
    assert torch.allclose(L.classifier_free_guidance(cond, uncond, 1.0), cond.log_softmax(-1))
    at0 = L.classifier_free_guidance(cond, uncond, 0.0)
    assert torch.allclose(at0, uncond.log_softmax(-1))


def test_contrastive_filter_keeps_tokens_within_alpha_of_the_best():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.06, 0.04]]))
    assert torch.isfinite(L.contrastive_filter(x, 0.1)).tolist() == [[True, True, True, False]]


def mask(image_pos, room):
    return L.allowed_tokens(torch.tensor(image_pos), torch.tensor(room), text_vocab_size=TEXT_V,
                            vocab_size=V, image_tokens=N)


def test_in_text_only_text_boi_and_eos_are_allowed():
    m = mask([-1], [100])[0]
    allowed = set(torch.nonzero(m).flatten().tolist())
    assert allowed == set(range(len(special.SPECIAL_TOKENS), TEXT_V)) | {special.BOI_ID, special.EOS_ID}


def test_an_image_is_never_begun_without_room_to_finish_it():
    assert not mask([-1], [N + 1])[0, special.BOI_ID]
    assert mask([-1], [N + 2])[0, special.BOI_ID]


def test_inside_an_image_only_codes_then_only_eoi():
    m = mask([0, N - 1, N], [50, 50, 50])
    assert set(torch.nonzero(m[0]).flatten().tolist()) == set(range(TEXT_V, V))
    assert set(torch.nonzero(m[1]).flatten().tolist()) == set(range(TEXT_V, V))
    assert torch.nonzero(m[2]).flatten().tolist() == [special.EOI_ID]


def test_random_draws_under_the_mask_never_violate_the_constraints():
    g = torch.Generator().manual_seed(0)
    image_pos, seq = -1, []
    for t in range(400):
        m = mask([image_pos], [400 - t])
        tok = int(L.sample_token(L.apply_mask(torch.randn(1, V, generator=g), m), 1.0, g))
        assert m[0, tok]
        seq.append(tok)
        if tok == special.EOS_ID:
            break
        if tok == special.BOI_ID:
            image_pos = 0
        elif tok == special.EOI_ID:
            image_pos = -1
        elif image_pos >= 0:
            image_pos += 1
    # every <boi> is followed by exactly N codes and <eoi>
    for i, tok in enumerate(seq):
        if tok == special.BOI_ID and i + N + 1 < len(seq):
            assert all(TEXT_V <= c < V for c in seq[i + 1 : i + 1 + N]) and seq[i + 1 + N] == special.EOI_ID


def test_sampled_tokens_follow_the_distribution_and_never_take_masked_ones():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 20_000
    draws = L.sample_token(p.log().expand(n, -1), 1.0, g)
    freq = torch.bincount(draws, minlength=len(p)).double() / n
    assert freq[p == 0].sum() == 0
    sigma = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p.double()).abs() <= 4 * sigma + 1e-12).all(), freq
    # temperature: T=0.5 squares the probabilities before renormalising
    p2 = p.double() ** 2 / (p.double() ** 2).sum()
    freq2 = torch.bincount(L.sample_token(p.log().expand(n, -1), 0.5, g), minlength=len(p)).double() / n
    assert ((freq2 - p2).abs() <= 4 * (p2 * (1 - p2) / n).sqrt() + 1e-12).all(), freq2


def test_greedy_sampling_takes_the_argmax():
    x = torch.randn(4, V)
    assert torch.equal(L.sample_token(x, 0.0, None), x.argmax(-1))


def test_cd_k_scores_only_the_conditional_top_k_by_contrast():
    cond = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    uncond = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    out = L.cd_k(cond, uncond, 2)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    assert out.argmax(-1).item() == 1  # token 1 gains most from the condition


def test_the_fused_image_code_draw_equals_the_eager_one():
    # compiled decoding draws codes with draw_image_code inside the step's graph; with the same
    # uniforms it must pick what generate_ids' eager path picks (guidance over the whole
    # vocabulary, then the image mask) for every guidance, temperature and top-k
    torch.manual_seed(0)
    B = 6
    drawing = L.allowed_tokens(torch.zeros(B, dtype=torch.long), torch.full((B,), N + 1), text_vocab_size=TEXT_V,
                               vocab_size=V, image_tokens=N)
    for guidance, temperature, top_k in [(1.0, 1.0, None), (3.0, 0.7, None), (3.0, 1.0, 5), (2.0, 0.0, None)]:
        logits = torch.randn(2 * B if guidance != 1.0 else B, V) * 3
        eager = logits[:B]
        if guidance != 1.0:
            eager = L.classifier_free_guidance(eager, logits[B:], guidance)
        eager = L.top_k_filter(L.apply_mask(eager, drawing), top_k)
        for seed in range(5):
            want = L.sample_token(eager, temperature, torch.Generator().manual_seed(seed))
            u = L.uniforms(B, torch.Generator().manual_seed(seed))
            got = L.draw_image_code(logits, u, TEXT_V, V, guidance, temperature, top_k)
            assert torch.equal(got, want), (guidance, temperature, top_k, seed)
