"""Generation on the model's KV cache: prefill, then one token at a time under the modality
constraints, with classifier-free guidance for image tokens.

Rows of different prompt lengths are left-padded to a common length; the padding is masked out
as keys, and since rotary attention depends only on relative positions, a left-padded row
attends exactly as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image

from model.transformer import Transformer
from sample import logits as L
from tokenizers_mm import special
from tokenizers_mm.images import image_grid
from tokenizers_mm.multimodal import MultimodalTokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn."""

    temperature: float = 1.0  # text temperature (0 = greedy)
    top_k: int | None = None  # text top-k
    top_p: float | None = None  # text nucleus
    repetition_penalty: float = 1.0  # text repetition penalty (CTRL), 1 = off
    # image-code temperature. Default run, guidance 3, 96 shapes eval prompts / 60 digits (shapes
    # colour+shape right / digits judged right): 1.0 -> 70% / 70%, 0.8 -> 80% / 75%,
    # 0.7 -> 83% / 82%, 0.6 -> 81% / 78%, 0.5 -> 76% / 87%
    image_temperature: float = 0.7
    image_top_k: int | None = None  # image-code top-k
    guidance: float = 1.0  # classifier-free guidance scale on image codes (1 = off)
    # image decoding strategy: "sample" (guided sampling) or "cdk" (CM3Leon's contrastive CD-K)
    strategy: str = "sample"
    cdk_k: int = 16  # CD-K: candidates among the conditional model's top k

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.image_temperature < 0:
            raise ValueError("temperatures must be >= 0")
        if self.guidance < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.strategy not in ("sample", "cdk"):
            raise ValueError(f"strategy must be 'sample' or 'cdk', got {self.strategy!r}")
        if self.cdk_k < 1:
            raise ValueError(f"cdk_k must be >= 1, got {self.cdk_k}")

    @property
    def needs_uncond(self) -> bool:
        """Whether image decoding uses an unconditional stream (guidance or CD-K)."""
        return self.guidance != 1.0 or self.strategy == "cdk"


_TEXT, _TEXT_NO_ROOM, _DRAWING, _CLOSING = range(4)  # decoding states, see generate_ids
PREFILL_BUCKET = 16  # compiled decoding left-pads prompts to a multiple of this many tokens


def left_pad(rows: Sequence[Sequence[int]], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to one length, a multiple of `multiple` -> ids (B, T) and key_valid (B, T) bool."""
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = torch.full((len(rows), T), special.PAD_ID, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
            valid[i, T - len(r):] = True
    return ids, valid


def image_state(prompt: Sequence[int], image_tokens: int) -> int:
    """-1 if a prompt ends in text, else how many codes follow its last unfinished <boi>."""
    for j in range(len(prompt) - 1, -1, -1):
        if prompt[j] == special.EOI_ID:
            return -1
        if prompt[j] == special.BOI_ID:
            return min(len(prompt) - 1 - j, image_tokens)
    return -1


@torch.no_grad()
def generate_ids(model: Transformer, tokenizer: MultimodalTokenizer, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 uncond_prompts: Sequence[Sequence[int]] | None = None, stop_after_images: int | None = None,
                 allow_text: bool = True, allow_image: bool = True, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens under the modality constraints.

    uncond_prompts: one per prompt, the guidance stream's context (needed when guidance != 1).
    stop_after_images: a row stops after completing this many new images.
    on_token(row, token) is called for every drawn token. Returns the new ids of each row.
    """
    B = len(prompts)
    guided = sampling.needs_uncond
    if guided and (uncond_prompts is None or len(uncond_prompts) != B):
        raise ValueError("classifier-free guidance and CD-K need one unconditional prompt per prompt")
    rows = list(prompts) + (list(uncond_prompts) if guided else [])
    # compiled, the prefill is a graph too (one per prompt length): prompts are padded further left
    # to a multiple of PREFILL_BUCKET, where that fits, so that captions of different lengths share it
    bucket = PREFILL_BUCKET if model.decoding_compiled else 1
    ids, valid = left_pad(rows, bucket)
    if ids.shape[1] + max_new_tokens > model.config.block_size:
        ids, valid = left_pad(rows)
    T0 = ids.shape[1]
    total = T0 + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"context of {model.config.block_size} tokens")
    device = model.tok_emb.weight.device
    cache_len = model.decoding_cache_len(total)  # > total when compiled: a few lengths share one graph
    model.setup_caches(len(rows), cache_len, dtype=model.tok_emb.weight.dtype)  # float32, or a decoding_copy's dtype
    key_valid = torch.ones(len(rows), cache_len, dtype=torch.bool, device=device)
    key_valid[:, :T0] = valid.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n_img = tokenizer.image_tokens
    # What a row may draw depends only on its state in Chameleon's decoding state machine: in
    # text with room left for a whole image, in text without it, drawing codes, owing <eoi>.
    # One (4, V) table from allowed_tokens, indexed by the rows' states at every step; the row
    # bookkeeping is plain Python (per-element tensor reads and writes cost more than the math).
    table = L.allowed_tokens(torch.tensor([-1, -1, 0, n_img]), torch.tensor([n_img + 2, 0, 1, 1]),
                             text_vocab_size=tokenizer.text_vocab_size, vocab_size=model.config.vocab_size,
                             image_tokens=n_img, allow_text=allow_text, allow_image=allow_image)
    table[:, tokenizer.vocab_size:] = False
    forced = [int(r.nonzero()[0]) if int(r.sum()) == 1 else None for r in table]  # e.g. <eoi> after the codes
    image_pos = [image_state(p, n_img) for p in prompts]  # -1 in text, else codes drawn so far
    done = [False] * B
    images_done = [0] * B
    out: list[list[int]] = [[] for _ in range(B)]
    history = [list(p) for p in prompts]

    penalise = sampling.repetition_penalty != 1.0
    # Compiled decoding draws the codes of rows that are all inside an image in the step's own
    # graph (L.draw_image_code, after the step's logits): no eager kernels between steps. The
    # same uniforms are drawn in the same order as the eager path's, so a seed draws the same
    # images up to float rounding.
    fused = model.decoding_compiled and sampling.strategy == "sample" and allow_image
    draw_args = (tokenizer.image_offset, tokenizer.vocab_size, sampling.guidance, sampling.image_temperature,
                 sampling.image_top_k)
    no_uniforms = torch.zeros(B, 1, dtype=torch.float64)

    def fused_step(step_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compiled step on step_ids at positions: the last logits, and the next tokens when
        every live row draws a code (else None, and no uniforms are drawn)."""
        codes_next = all(d or 0 <= p < n_img for d, p in zip(done, image_pos))
        logits, codes = model.step(step_ids.to(device), positions.to(device), key_valid, L.draw_image_code,
                                   (L.uniforms(B, generator) if codes_next else no_uniforms,) + draw_args)
        return logits[:, -1], codes.cpu() if codes_next else None

    # the prefill: compiled, through the step (eager, it was an eighth of a 16-row image's time)
    logits, drawn_codes = fused_step(ids, torch.arange(T0)) if fused else \
        (model.forward_cached(ids.to(device), torch.arange(T0, device=device), key_valid=key_valid)[:, -1], None)
    for t in range(max_new_tokens):
        room_for_image = max_new_tokens - t >= n_img + 2
        state = [(_TEXT if room_for_image else _TEXT_NO_ROOM) if p < 0 else _DRAWING if p < n_img else _CLOSING
                 for p in image_pos]
        tok = drawn_codes if drawn_codes is not None else \
            _draw(logits.float().cpu(), state, done, history, table, sampling, generator)
        drawn = tok.tolist()
        for r in range(B):
            if done[r]:
                drawn[r] = special.PAD_ID
                continue
            v = drawn[r] = drawn[r] if forced[state[r]] is None else forced[state[r]]
            out[r].append(v)
            if penalise:
                history[r].append(v)
            if on_token is not None:
                on_token(r, v)
            if v == special.BOI_ID:
                image_pos[r] = 0
            elif v == special.EOI_ID:
                image_pos[r] = -1
                images_done[r] += 1
                if stop_after_images is not None and images_done[r] >= stop_after_images:
                    done[r] = True
            elif image_pos[r] >= 0:
                image_pos[r] += 1
            elif v == special.EOS_ID:
                done[r] = True
        if all(done) or t == max_new_tokens - 1:
            break
        step_ids = torch.tensor(drawn + drawn if guided else drawn)  # the guidance stream follows the draws
        pos = torch.tensor([T0 + t], device=device)
        if fused:
            logits, drawn_codes = fused_step(step_ids[:, None], pos)
        else:
            logits = model.step(step_ids[:, None].to(device), pos, key_valid)[:, -1]
    model.clear_caches()
    return out


def _draw(logits: torch.Tensor, state: list[int], done: list[bool], history: list[list[int]], table: torch.Tensor,
          sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One step's tokens (B,) from its logits (B or 2B, V) under the rows' decoding states."""
    B = len(state)
    cond = logits[:B]
    imaging = [s >= _DRAWING for s in state]
    in_image = torch.tensor(imaging)
    mask = table[torch.tensor(state)]
    guided = logits.shape[0] > B
    if guided:
        if sampling.strategy == "cdk":
            guided_lp = L.cd_k(cond, logits[B:], sampling.cdk_k)
        else:
            guided_lp = L.classifier_free_guidance(cond, logits[B:], sampling.guidance)
        cond = torch.where(in_image[:, None], guided_lp, cond.log_softmax(-1))
    tok = torch.full((B,), special.PAD_ID, dtype=torch.long)
    # each modality's filters run only when some live row needs them (inside an image, the
    # text filters would be discarded: most steps of text→image decoding)
    if any(not d and not i for d, i in zip(done, imaging)):
        text_logits = L.repetition_penalty(cond, _history_tensor(history), sampling.repetition_penalty) \
            if sampling.repetition_penalty != 1.0 else cond
        text_logits = L.top_p_filter(L.top_k_filter(L.apply_mask(text_logits, mask), sampling.top_k), sampling.top_p)
        tok = L.sample_token(text_logits, sampling.temperature, generator)
    if any(not d and i for d, i in zip(done, imaging)):
        image_logits = L.top_k_filter(L.apply_mask(cond, mask), sampling.image_top_k)
        tok = torch.where(in_image, L.sample_token(image_logits, sampling.image_temperature, generator), tok)
    return tok


def _history_tensor(history: list[list[int]]) -> torch.Tensor:
    T = max(len(h) for h in history)
    out = torch.full((len(history), T), -1, dtype=torch.long)
    for i, h in enumerate(history):
        out[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    return out


def text_to_image_prompts(tokenizer: MultimodalTokenizer, captions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Conditional prompts `<bos> caption <boi>` and the unconditional one `<bos> <boi>` (the
    caption dropped, as in training) for each caption."""
    cond = [[special.BOS_ID, *tokenizer.encode_text(c), special.BOI_ID] for c in captions]
    uncond = [[special.BOS_ID, special.BOI_ID] for _ in captions]
    return cond, uncond


@torch.no_grad()
def generate_images(model: Transformer, tokenizer: MultimodalTokenizer, captions: Sequence[str], *,
                    sampling: SamplingConfig = SamplingConfig(guidance=3.0), seed: int = 0) -> list[Image.Image]:
    """One image per caption (repeat captions for several samples)."""
    cond, uncond = text_to_image_prompts(tokenizer, captions)
    new = generate_ids(model, tokenizer, cond, max_new_tokens=tokenizer.image_tokens + 1, sampling=sampling,
                       uncond_prompts=uncond, stop_after_images=1, seed=seed)
    codes = [[c - tokenizer.image_offset for c in row[: tokenizer.image_tokens]] for row in new]
    return tokenizer.decode_images(codes)


def sample_grid(model: Transformer, tokenizer: MultimodalTokenizer, prompts: Sequence[str], *, per_prompt: int = 2,
                guidance: float = 3.0, seed: int = 0, batch_size: int = 16) -> Image.Image:
    """A picture of text→image samples: one column per prompt, `per_prompt` rows."""
    captions = [p for _ in range(per_prompt) for p in prompts]
    images: list[Image.Image] = []
    for i in range(0, len(captions), batch_size):
        images += generate_images(model, tokenizer, captions[i : i + batch_size],
                                  sampling=SamplingConfig(guidance=guidance), seed=seed + i)
    rows = [images[r * len(prompts) : (r + 1) * len(prompts)] for r in range(per_prompt)]
    return image_grid(rows, scale=2)
