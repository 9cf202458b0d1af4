"""Behaviours of model/: cached decoding, packing, causality, loss, configs, presets, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import (
    PRESETS,
    ModelConfig,
    Transformer,
    lm_loss,
    num_params,
    positions_from_doc_ids,
    preset,
)
from model.transformer import masked_attention, one_query_attention, packing_bias, packing_mask
from model.config import PRESET_PARAMS_AT_65536

VOCAB = 300
VARIANTS = {
    "default": {},
    "gqa": {"n_kv_head": 2},
    "norm_reorder": {"norm_reorder": True},
    "no_qk_norm_tied": {"qk_norm": False, "tie_embeddings": True},
    "image_pos": {"image_pos_emb": 8},
}


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=VOCAB, **overrides)).eval()
    # a trained-looking model: std-0.02 weights make every logit nearly equal, hiding bugs
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model


def image_docs(n_rows: int, seed: int = 0) -> torch.Tensor:
    """Rows `<bos> text <boi> 8 codes <eoi> text <boi> codes...`: images open and close around the
    prefill/decode boundaries the tests pick."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(9, 150, (n,), generator=g).tolist()
    codes = lambda n: torch.randint(150, VOCAB, (n,), generator=g).tolist()
    rows = [[1, *text(3), 3, *codes(8), 4, *text(2 + r), 3, *codes(6 - r)] for r in range(n_rows)]
    return torch.tensor(rows)


# ---- cached decoding -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_matches_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    # rows with images: the prefill ends inside the first, one token at a time through the second
    idx = image_docs(2)
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(max_batch_size=4, max_seq_len=32)
        steps = [model.forward_cached(idx[:, :10], torch.arange(10))]  # prefill
        for t in range(10, idx.shape[1]):  # one token at a time
            steps.append(model.forward_cached(idx[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_static_decode_step_matches_full_forward_with_left_padding(compiled):
    # decode_step attends the whole cache (stale and future slots masked): the shapes stay fixed,
    # so one compiled graph serves every step; it must still equal the uncached forward
    model = make_model(n_kv_head=2)
    if compiled:
        model.compile_decoding()
    short, long = torch.randint(0, VOCAB, (1, 12)), torch.randint(0, VOCAB, (1, 15))
    pad = torch.zeros(1, 3, dtype=torch.long)
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[0, :3] = False
    with torch.no_grad():
        model.setup_caches(2, 20)
        for layer in model.layers:  # stale garbage in the cache must stay invisible
            layer.attn.kv_cache.k.fill_(1e4)
        batch = torch.cat([torch.cat([pad, short[:, :5]], dim=1), long[:, :8]])
        model.forward_cached(batch, torch.arange(8), key_valid=key_valid)
        rows = torch.cat([torch.cat([pad, short], dim=1), long])
        steps = [model.step(rows[:, t:t + 1], torch.tensor([t]), key_valid) for t in range(8, 15)]
        full_short, full_long = model(short), model(long)
    got = torch.cat(steps, dim=1)
    torch.testing.assert_close(got[0], full_short[0, 5:12], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], full_long[0, 8:15], atol=1e-4, rtol=0)


def test_one_query_attention_equals_sdpa():
    # the compiled decoding step's attention (products and sums Inductor fuses) against SDPA
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 4, 20, 16), torch.randn(3, 4, 20, 16)
    mask = torch.rand(3, 1, 1, 20) < 0.6
    mask[..., 0] = True  # every row sees some key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), want, atol=1e-5, rtol=0)
    bf = [t.bfloat16() for t in (q, k, v)]
    got = one_query_attention(*bf, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_decode_step_computes_then_on_its_logits(compiled):
    # a sampler's draw runs inside the step (its compiled graph when compiled)
    model = make_model()
    if compiled:
        model.compile_decoding()
    key_valid = torch.ones(2, 16, dtype=torch.bool)
    ids = torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        model.setup_caches(2, 16)
        model.forward_cached(torch.randint(0, VOCAB, (2, 5)), torch.arange(5))
        logits, top = model.step(ids, torch.tensor([5]), key_valid, torch.topk, (3,))
    assert logits.shape == (2, 1, VOCAB)
    assert torch.equal(top.indices, torch.topk(logits[:, -1], 3).indices)


def test_compiled_decoding_freezes_the_weights():
    # compile_decoding folds the weights into the graph (pre-packed for the CPU's GEMMs): changing
    # them afterwards leaves the compiled step as it was. Passed through torch.compile's options,
    # freezing once did nothing at all, silently; this catches that.
    model = make_model()
    model.compile_decoding()
    key_valid = torch.ones(1, 8, dtype=torch.bool)
    ids = torch.randint(0, VOCAB, (1, 1))

    def step() -> torch.Tensor:
        model.setup_caches(1, 8)
        return model.step(ids, torch.tensor([0]), key_valid)

    with torch.no_grad():
        before = step()
        model.layers[0].mlp.w2.weight.mul_(3.0)
        after = step()
        eager = model.decode_step(ids, torch.tensor([0]), key_valid)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert (eager - before).abs().max() > 1e-3


def decode_bf16_cache(model: Transformer, idx: torch.Tensor, prefill: int = 8) -> torch.Tensor:
    """Logits of idx decoded through a bf16 KV cache: a prefill, then one token a step (float32)."""
    B, T = idx.shape
    model.setup_caches(B, T, dtype=torch.bfloat16)
    steps = [model.forward_cached(idx[:, :prefill], torch.arange(prefill))]
    steps += [model.forward_cached(idx[:, t:t + 1], torch.tensor([t])) for t in range(prefill, T)]
    return torch.cat(steps, dim=1).float()


def test_bf16_cache_under_autocast_decodes_close_to_the_full_forward():
    model = make_model()
    idx = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx).float()
        cached = decode_bf16_cache(model, idx)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(cached, full, atol=0.1, rtol=0.05)


def test_bf16_decoding_copy_decodes_close_to_float32_and_leaves_the_model_alone():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = model.decoding_copy(torch.bfloat16)
    assert twin.tok_emb.weight.dtype == torch.bfloat16 and twin.rope_cos.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == torch.float32 for k, v in before.items())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    idx = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        full = model(idx)
        cached = decode_bf16_cache(twin, idx)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(cached, full, atol=0.15, rtol=0.05)


def test_float32_head_brings_autocast_logits_closer_to_float32():
    model = make_model()
    idx = torch.randint(0, VOCAB, (4, 24))
    with torch.no_grad():
        model.setup_caches(4, 24)
        exact = model.forward_cached(idx, torch.arange(24))
        same = model.forward_cached(idx, torch.arange(24), float32_head=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.forward_cached(idx, torch.arange(24)).float()
            head32 = model.forward_cached(idx, torch.arange(24), float32_head=True)
    torch.testing.assert_close(same, exact, atol=1e-5, rtol=0)  # no autocast: the same logits
    assert head32.dtype == torch.float32
    assert (head32 - exact).abs().mean() < (bf16 - exact).abs().mean()


def test_under_autocast_a_bf16_cache_gives_the_logits_of_a_float32_cache():
    # attention casts keys and values to bf16 under CPU autocast, so storing them in bf16 loses
    # nothing (sample/classify.py relies on it)
    model = make_model()
    idx = torch.randint(0, VOCAB, (3, 16))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.setup_caches(3, 16, dtype=dtype)
            first = model.forward_cached(idx[:, :10], torch.arange(10), float32_head=True)
            rest = model.forward_cached(idx[:, 10:], torch.arange(10, 16), float32_head=True)
        out[dtype] = torch.cat([first, rest], dim=1)
    torch.testing.assert_close(out[torch.bfloat16], out[torch.float32], atol=0, rtol=0)


def test_left_padded_prompt_decodes_as_it_would_alone():
    model = make_model()
    short, long = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    key_valid = torch.ones(2, 16, dtype=torch.bool)
    key_valid[0, :4] = False  # the padding of the short prompt
    with torch.no_grad():
        model.setup_caches(2, 16)
        batched = model.forward_cached(batch, torch.arange(9), key_valid=key_valid)
        alone = model(short)
    torch.testing.assert_close(batched[0, 4:], alone[0], atol=1e-5, rtol=0)


def test_a_second_prompt_overwrites_the_cache_without_seeing_stale_positions():
    model = make_model()
    long_prompt, short_prompt = torch.randint(0, VOCAB, (1, 20)), torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        model.setup_caches(1, 32)
        model.forward_cached(long_prompt, torch.arange(20))
        cached = model.forward_cached(short_prompt, torch.arange(8))
        torch.testing.assert_close(cached, model(short_prompt), atol=1e-5, rtol=0)


def test_expanded_cache_gives_the_same_logits_as_recomputing():
    model = make_model(n_kv_head=2)
    prompts = torch.randint(0, VOCAB, (2, 7))  # e.g. [cond, uncond] or two class prompts
    repeats = 3
    continuations = torch.randint(0, VOCAB, (2 * repeats, 5))
    with torch.no_grad():
        model.setup_caches(max_batch_size=2 * repeats, max_seq_len=16)
        model.forward_cached(prompts, torch.arange(7))
        state = model.cache_state(batch_size=2, length=7)
        for expand in (lambda: model.load_cache_state(state, repeats=repeats),
                       lambda: model.expand_cache(batch_size=2, repeats=repeats)):
            model.load_cache_state(state)  # rows 0, 1 hold the prompts again
            expand()
            cached = model.forward_cached(continuations, torch.arange(7, 12))
            # row j continues prompt j // repeats (repeat_interleave)
            full = model(torch.cat([prompts.repeat_interleave(repeats, dim=0), continuations], dim=1))
            torch.testing.assert_close(cached, full[:, 7:], atol=1e-5, rtol=0)


# ---- image-position embeddings ---------------------------------------------------------------

def test_image_positions_count_codes_after_boi_and_only_inside_images():
    from model.transformer import image_positions
    idx = torch.tensor([[1, 20, 3, 200, 201, 202, 4, 2, 3, 210]])
    assert image_positions(idx, 8).tolist() == [[-1, -1, -1, 0, 1, 2, -1, -1, -1, 0]]
    assert image_positions(idx, 2).tolist() == [[-1, -1, -1, 0, 1, -1, -1, -1, -1, 0]]  # past n: none
    # the sixth code of an image, then <eoi> closes it
    assert image_positions(torch.tensor([[3, 200, 201, 202, 203, 204, 205, 4, 20]]), 8)[0, 6:].tolist() == [5, -1, -1]
    assert image_positions(idx, 0) is None


def test_image_position_embedding_changes_the_codes_logits_only():
    model = make_model(image_pos_emb=8)
    idx = image_docs(2)
    with torch.no_grad():
        full = model(idx)
        saved = model.img_pos_emb.weight.clone()
        model.img_pos_emb.weight.zero_()
        without = model(idx)
        model.img_pos_emb.weight.copy_(saved)
        first_code = 5  # <bos> 3 text <boi>: everything before the first code is unchanged
        torch.testing.assert_close(without[:, :first_code], full[:, :first_code], atol=1e-6, rtol=0)
        assert (without[:, first_code:] - full[:, first_code:]).abs().max() > 1e-2


@pytest.mark.parametrize("compiled", [False, True])
def test_image_position_embedding_in_the_static_step_with_left_padding(compiled):
    model = make_model(image_pos_emb=8)
    if compiled:
        model.compile_decoding()
    rows = image_docs(2)
    short = rows[1:, :-2]  # 2 tokens shorter: left-padded by 2
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1), rows[:1]])
    T = batch.shape[1]
    key_valid = torch.ones(2, 32, dtype=torch.bool)
    key_valid[0, :2] = False
    with torch.no_grad():
        model.setup_caches(2, 32)
        model.forward_cached(batch[:, :10], torch.arange(10), key_valid=key_valid)
        steps = [model.step(batch[:, t:t + 1], torch.tensor([t]), key_valid) for t in range(10, T)]
        got = torch.cat(steps, dim=1)
        torch.testing.assert_close(got[0], model(short)[0, 8:], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1], model(rows[:1])[0, 10:], atol=1e-4, rtol=0)


def test_image_position_embedding_survives_cache_snapshots():
    model = make_model(image_pos_emb=8)
    rows = image_docs(2)
    prompts, rest = rows[:, :8], rows[:, 8:]  # the snapshot ends three codes into the first image
    with torch.no_grad():
        model.setup_caches(max_batch_size=6, max_seq_len=32)
        model.forward_cached(prompts, torch.arange(8))
        state = model.cache_state(batch_size=2, length=8)
        model.load_cache_state(state, repeats=3)
        cont = rest.repeat_interleave(3, dim=0)
        cached = model.forward_cached(cont, torch.arange(8, rows.shape[1]))
        full = model(rows.repeat_interleave(3, dim=0))
        torch.testing.assert_close(cached, full[:, 8:], atol=1e-5, rtol=0)
        model.load_cache_state(state.rows(torch.tensor([1])), repeats=2)
        torch.testing.assert_close(model.forward_cached(rest[1:].repeat(2, 1), torch.arange(8, rows.shape[1])),
                                   full[3:5, 8:], atol=1e-5, rtol=0)


def test_forward_cached_without_caches_raises_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="setup_caches"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    model.setup_caches(1, 8)
    model.clear_caches()
    with pytest.raises(ValueError, match="setup_caches"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))


# ---- packing and causality -----------------------------------------------------------------

def test_positions_restart_at_each_packed_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(positions_from_doc_ids(doc_ids), expected)


@pytest.mark.parametrize("variant", ["default", "gqa", "norm_reorder"])
def test_packed_row_logits_equal_each_document_run_alone(variant):
    model = make_model(**VARIANTS[variant])
    lengths = [5, 9, 3, 7]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    idx = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids, positions=positions_from_doc_ids(doc_ids))
        alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_changing_a_future_token_never_changes_earlier_logits(packed):
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % VOCAB
    kwargs = {"doc_ids": torch.tensor([[0] * 6 + [1] * 10] * 2)} if packed else {}
    with torch.no_grad():
        a, b = model(idx, **kwargs), model(changed, **kwargs)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_a_packed_document_never_sees_the_previous_one():
    model = make_model()
    idx = torch.randint(0, VOCAB, (1, 12))
    changed = idx.clone()
    changed[:, 2] = (changed[:, 2] + 1) % VOCAB  # inside document 0
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc_ids), model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(a[:, 5:], b[:, 5:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("compiled,T,blocks", [(False, 24, None), (False, 24, 4), (False, 23, 4), (False, 3, 4),
                                               (True, 24, 4)])
def test_masked_attention_matches_sdpa_values_and_gradients(compiled, T, blocks):
    # blocks=4: causal query blocks (the trainer's rows of 512); T=23: blocks of unequal size;
    # T=3: fewer tokens than blocks
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = packing_mask(torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24])[:, :T])
    grad = torch.randn(2, 3, T, 8, dtype=torch.float64)
    fn = torch.compile(masked_attention) if compiled else masked_attention
    ours = torch.autograd.grad(fn(q, k, v, mask, blocks), (q, k, v), grad) + (fn(q, k, v, mask, blocks),)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = torch.autograd.grad(ref, (q, k, v), grad) + (ref,)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_masked_attention_reads_the_additive_packing_bias_as_the_boolean_mask(compiled):
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8 + [2] * 3, [0] * 16])
    bias = packing_bias(doc_ids, torch.float32)
    assert bias.shape == (2, 1, 16, 16) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, packing_mask(doc_ids)) and bool((bias[bias != 0] == float("-inf")).all())
    fn = torch.compile(masked_attention) if compiled else masked_attention
    outs = []
    for mask in (packing_mask(doc_ids), bias):
        q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
        out = fn(q, k, v, mask, 2)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_masked_attention_under_autocast_computes_in_bf16_like_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    mask = packing_mask(torch.tensor([[0] * 9 + [1] * 7]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = masked_attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=0)
    ours.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_packed_training_forward_equals_inference_forward_and_never_crosses_documents():
    # with gradients on, packed rows take masked_attention on the CPU; without, SDPA
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7] * 2)
    with torch.no_grad():
        reference = model(idx, doc_ids=doc_ids)
    emb = model.tok_emb.weight
    logits = model(idx, doc_ids=doc_ids)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    # the loss of document 1 has no gradient through document 0's tokens
    hidden = {}
    handle = model.tok_emb.register_forward_hook(lambda m, i, o: hidden.setdefault("x", o.retain_grad() or o))
    model(idx, doc_ids=doc_ids)[:, 5:].sum().backward()
    handle.remove()
    assert hidden["x"].grad[:, :5].abs().max() == 0 and hidden["x"].grad[:, 5:].abs().max() > 0
    assert emb.grad is not None


# ---- loss ----------------------------------------------------------------------------------

def test_loss_is_mean_nll_over_targets_and_ignores_padding():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 3:] = -100
    out = lm_loss(logits, targets, z_loss=0.0)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.nll, expected)
    torch.testing.assert_close(out.loss, expected)
    assert out.num_targets.item() == keep.sum().item() == 8


def test_loss_respects_token_weights():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, 3, -100]])
    weights = torch.tensor([[1.0, 0.5, 0.0, 3.0]])  # weight on a padded position is ignored
    out = lm_loss(logits, targets, z_loss=0.0, weights=weights)
    nll = F.cross_entropy(logits[0, :3], targets[0, :3], reduction="none")
    torch.testing.assert_close(out.loss, (nll[0] + 0.5 * nll[1]) / 1.5)
    assert out.num_targets.item() == 1.5
    assert out.text_count.item() == 2  # the zero-weight target is not counted


def test_loss_splits_text_and_image_nll_by_target_id_range():
    logits = torch.randn(2, 6, 20)
    targets = torch.tensor([[1, 12, 13, 5, -100, 19], [15, 15, 2, 0, 11, -100]])
    out = lm_loss(logits, targets, z_loss=0.0, image_token_range=(10, 18))
    nll = F.cross_entropy(logits.view(-1, 20), targets.view(-1), reduction="none", ignore_index=-100).view(2, 6)
    image = (targets >= 10) & (targets < 18)
    text = (targets != -100) & ~image
    assert out.image_count.item() == 5 and out.text_count.item() == 5
    torch.testing.assert_close(out.image_nll_sum, nll[image].sum())
    torch.testing.assert_close(out.text_nll_sum, nll[text].sum())
    torch.testing.assert_close((out.image_nll_sum + out.text_nll_sum) / 10, out.nll)


def test_z_loss_adds_coefficient_times_mean_squared_logsumexp():
    logits = torch.randn(2, 3, 9) * 3 + 2
    targets = torch.tensor([[1, 2, -100], [4, 5, 6]])
    keep = targets != -100
    out = lm_loss(logits, targets, z_loss=1e-2)
    expected_z = 1e-2 * torch.logsumexp(logits, -1)[keep].pow(2).mean()
    torch.testing.assert_close(out.z_loss, expected_z)
    torch.testing.assert_close(out.loss, out.nll + expected_z)


def test_loss_runs_in_float32_on_bf16_logits():
    logits = torch.randn(2, 4, 50).bfloat16()
    targets = torch.randint(0, 50, (2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss(logits, targets, z_loss=1e-5)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.nll, F.cross_entropy(logits.float().view(-1, 50), targets.view(-1)))


def test_loss_of_a_batch_without_targets_is_zero_not_nan():
    out = lm_loss(torch.randn(1, 3, 5), torch.full((1, 3), -100), z_loss=1e-5)
    assert out.loss.item() == 0.0 and out.num_targets.item() == 0


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=VOCAB)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, VOCAB, (4, 17))
    losses = []
    for _ in range(10):
        out = lm_loss(model(idx[:, :-1]), idx[:, 1:], z_loss=model.config.z_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.05)  # std-0.02 init: near-uniform logits
    assert losses[-1] < losses[0] - 0.5


# ---- variants, precision -------------------------------------------------------------------

def test_norm_reorder_variant_runs_and_differs_from_pre_norm():
    idx = torch.randint(0, VOCAB, (2, 10))
    pre, reorder = make_model(seed=1), make_model(seed=1, norm_reorder=True)
    assert reorder.state_dict().keys() == pre.state_dict().keys()
    reorder.load_state_dict(pre.state_dict())  # same weights, only the norm placement differs
    with torch.no_grad():
        a, b = pre(idx), reorder(idx)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)


def test_bf16_autocast_forward_is_close_to_float32():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=VOCAB)).eval()
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        ref = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)
    assert low.dtype == torch.bfloat16
    ref_probs, low_probs = ref.softmax(-1), low.float().softmax(-1)
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)
    assert (ref_probs - low_probs).abs().max() < 1e-3


# ---- configs, presets, checkpoints ---------------------------------------------------------

def test_config_round_trips_through_a_dict():
    config = preset("default", vocab_size=4512, n_kv_head=2, norm_reorder=True)
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config
    assert again.ffn_hidden == 704 and again.n_kv_head == 2


def test_config_rejects_unknown_keys_naming_them():
    d = preset("tiny", vocab_size=VOCAB).to_dict()
    d["n_layers"] = 3
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("kwargs, message", [
    ({"dim": 100, "n_head": 3}, "divisible by n_head"),
    ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
    ({"dim": 24, "n_head": 8}, "even"),
    ({"dropout": 1.0}, "dropout"),
    ({"n_layer": 0}, "n_layer"),
])
def test_invalid_configs_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=VOCAB, **{"dim": 64, "n_head": 4, **kwargs})


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        preset("huge", vocab_size=VOCAB)


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS_AT_65536))
def test_preset_param_counts_match_their_annotations(name):
    count = num_params(preset(name, vocab_size=65_536))
    assert count == pytest.approx(PRESET_PARAMS_AT_65536[name], rel=0.10)


def test_default_preset_has_5_to_10_million_parameters_at_the_cpu_vocabulary():
    assert 5e6 <= num_params(preset("default", vocab_size=4_000 + 512)) <= 10e6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_num_params_formula_matches_the_module(variant):
    config = preset("tiny", vocab_size=VOCAB, **VARIANTS[variant])
    assert Transformer(config).num_params() == num_params(config)


def test_tiny_preset_blocks_hold_about_a_tenth_of_a_million_parameters():
    config = preset("tiny", vocab_size=VOCAB)
    assert 0.05e6 < num_params(config) - 2 * VOCAB * config.dim < 0.2e6


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    model = Transformer(preset("default", vocab_size=1000))
    assert model.layers[0].attn.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].mlp.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_save_and_load_restore_every_tensor(tmp_path, tied):
    from safetensors.torch import load_model, save_model
    model = make_model(tie_embeddings=tied)
    model.setup_caches(2, 16)  # caches and rope tables must stay out of the checkpoint
    assert not any("cache" in k or "rope" in k for k in model.state_dict())
    save_model(model, str(tmp_path / "model.safetensors"))
    other = make_model(seed=1, tie_embeddings=tied)
    load_model(other, str(tmp_path / "model.safetensors"))  # strict
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    if tied:
        assert other.head.weight.data_ptr() == other.tok_emb.weight.data_ptr()
