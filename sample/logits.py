"""Sampling math as pure functions of logits and token ids (gpt-fast style), unit-testable
without a model: filtering, penalties, classifier-free guidance, modality constraints."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenizers_mm import special

NEG_INF = float("-inf")


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits of each row (B, V); the rest become -inf. None or 0: no-op."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of tokens whose probability
    reaches p (always at least the top one). None or >= 1: no-op."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def repetition_penalty(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive / multiply negative logits of tokens
    already in `previous` (B, L; negative ids ignored) by `penalty` (> 1 discourages repeats)."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    prev = previous.clamp(min=0)
    # amax so that an ignored (-1 -> 0) entry never un-marks a real occurrence of token 0
    seen = torch.zeros(logits.shape, dtype=torch.int32).scatter_reduce(
        -1, prev, (previous >= 0).int(), reduce="amax").bool()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """CFG on log-probabilities (Ho & Salimans 2022; CM3Leon §3): uncond + scale·(cond − uncond).
    scale 1 returns the conditional log-probabilities."""
    cond_lp, uncond_lp = cond.float().log_softmax(-1), uncond.float().log_softmax(-1)
    if scale == 1.0:
        return cond_lp
    return uncond_lp + scale * (cond_lp - uncond_lp)


def contrastive_filter(logits: Tensor, alpha: float) -> Tensor:
    """CD-K's plausibility constraint (Li et al. 2023, used by CM3Leon): keep tokens whose
    probability is at least alpha times the most likely one's; the rest become -inf."""
    if alpha <= 0:
        return logits
    lp = logits.float().log_softmax(-1)
    keep = lp >= lp.max(-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return logits.masked_fill(~keep, NEG_INF)


def cd_k(cond: Tensor, uncond: Tensor, k: int) -> Tensor:
    """CM3Leon's CD-K contrastive decoding (Yu et al. 2023, §3.2, after Li et al. 2023): among the
    k most likely tokens of the conditional model, score log p_cond − log p_uncond; all other
    tokens get -inf. The unconditional stream plays the "amateur"."""
    cond_lp, uncond_lp = cond.float().log_softmax(-1), uncond.float().log_softmax(-1)
    keep = torch.isfinite(top_k_filter(cond_lp, k))
    return (cond_lp - uncond_lp).masked_fill(~keep, NEG_INF)


def allowed_tokens(image_pos: Tensor, room: Tensor, *, text_vocab_size: int, vocab_size: int,
                   image_tokens: int, allow_text: bool = True, allow_image: bool = True) -> Tensor:
    """Chameleon-style modality constraints as a (B, V) bool mask of the tokens each row may draw.

    image_pos: (B,) long: -1 when the row is in text, else the number of codes already drawn in
      the current image (0..image_tokens).
    room: (B,) long: tokens the row may still generate.
    In text: text tokens, <eos>, and <boi> only if a whole image (codes + <eoi>) still fits after
    it. Inside an image: only image codes until image_tokens are drawn, then only <eoi>.
    """
    B = image_pos.shape[0]
    V = vocab_size
    ids = torch.arange(V, device=image_pos.device)
    is_text = (ids >= len(special.SPECIAL_TOKENS)) & (ids < text_vocab_size)
    is_code = ids >= text_vocab_size
    in_image = image_pos >= 0
    mask = torch.zeros(B, V, dtype=torch.bool, device=image_pos.device)
    # text rows
    text_rows = ~in_image
    if allow_text:
        mask |= text_rows[:, None] & is_text[None]
    mask[:, special.EOS_ID] |= text_rows
    can_image = text_rows & (room >= image_tokens + 2) & allow_image
    mask[:, special.BOI_ID] |= can_image
    # image rows
    drawing = in_image & (image_pos < image_tokens)
    mask |= drawing[:, None] & is_code[None]
    mask[:, special.EOI_ID] |= in_image & (image_pos >= image_tokens)
    return mask


def apply_mask(logits: Tensor, mask: Tensor) -> Tensor:
    """Disallowed tokens get -inf."""
    return logits.masked_fill(~mask, NEG_INF)


def sample_token(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row from logits (B, V); temperature 0 is greedy. Returns (B,) long."""
    if temperature <= 0:
        return logits.argmax(-1)
    # inverse-CDF draw, one uniform per row. torch.multinomial draws a random number per
    # vocabulary entry: 18 µs a row of 1,015 tokens on a 2-core Xeon, the largest cost of a
    # batch-16 decoding step outside the model (bench/bench_sample.py).
    return draw_token(logits, temperature, uniforms(logits.shape[0], generator))


def uniforms(rows: int, generator: torch.Generator | None) -> Tensor:
    """The (rows, 1) float64 uniforms sample_token draws with."""
    return torch.rand(rows, 1, dtype=torch.float64, generator=generator)


def draw_token(logits: Tensor, temperature: float, u: Tensor) -> Tensor:
    """sample_token with its uniforms u (B, 1) given: the token whose CDF interval holds u.
    Tokens of probability 0 leave the CDF flat and are never drawn. Returns (B,) long."""
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = (logits.float() / temperature).softmax(-1).double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def draw_image_code(logits: Tensor, u: Tensor, lo: int, hi: int, guidance: float, temperature: float,
                    top_k: int | None) -> Tensor:
    """The next image code of rows that are all inside an image, as generate_ids draws it:
    logits (B or 2B, V), the guidance stream's rows after the conditional ones when there are 2B;
    codes are ids [lo, hi); u (B, 1) as in draw_token. Classifier-free guidance, top-k and
    temperature over the codes alone: the other tokens are masked out in an image, and the
    normalisers that guidance takes over the whole vocabulary differ from these by a constant
    per row, which sampling ignores. Returns (B,) long ids. A pure function of tensors: compiled
    decoding computes it inside the step's graph (Transformer.decode_step's `then`)."""
    B = u.shape[0]
    codes = logits[:B, lo:hi].float()
    if logits.shape[0] > B:
        codes = classifier_free_guidance(codes, logits[B:, lo:hi], guidance)
    return draw_token(top_k_filter(codes, top_k), temperature, u) + lo
