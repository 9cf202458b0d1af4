"""Zero-shot classification by Bayes' rule from the model's own token likelihoods.

Two directions, and their combination:
- "image" (generative, analysis by synthesis): log p(x | c) = Σ log p(code_i | <bos> caption_c <boi> code_<i);
  posterior p(c | x) ∝ p(c) · p(x | c).
- "text": log p(caption_c | x) = Σ log p(tok | <bos> <boi> codes <eoi> caption_<) including <eos>.
- "both": the sum of the two log-scores, then the prior; `weights` temper each direction first
  (sample.bayes.combine_directions; fitted on labelled images by fit_direction_weights).

Views (test-time augmentation): with views=V the image is also scored shifted by whole pixels
(`shifted_views`) and each direction's log-score is averaged over the V views, a product of
experts over copies the model should find equally likely. It costs V× the time and reduces the
variance of the model's per-image likelihood (digits p(x|c): 62.5% → 70.6% at V=9 on the default
model, 2026-12-04; see README). `brightness=(1.0, 0.9, 0.8)` also reads every view dimmed to each
level (`image_views`), as training's augmented digits are (80-100% brightness): a dimmed digit has
other codes (30% of them change at 95%) but the same class (digits p(x|c) 58.9% → 67.8% with these
three levels and no shift, 2026-12-07). Views and levels multiply: V·B× the time.

Retrieval (RA-CM3), for models trained with it: `classify(bank=...)` reads each class caption
behind the k bank documents the retriever finds for the caption, and each image behind those it
finds for the image, `<bos> d_k <break> ... d_1 <break> prompt` as in training (`retrieved_context`).

Efficiency: every class prompt is prefilled once and its KV cache repeated along the batch for
all images (`cache_state` / `load_cache_state`), and in the text direction each image's prefix is
prefilled once and shared by all class captions. `naive_scores` is the per-class, per-image
loop of full forward passes that the cached path must agree with (tests, `make bench`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.precision import bf16_pays
from model.retrieval import RetrievalBank
from model.transformer import CacheState, Transformer
from sample.bayes import check_prior, check_weights, combine_directions, ensemble_templates, fit_direction_weights, posterior
from sample.generate import left_pad
from tokenizers_mm import special
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.special import image_order, order_marker

Mode = Literal["image", "text", "both"]


@dataclass
class Classification:
    """Posteriors and scores for N images over C labels."""

    labels: list[str]
    posterior: Tensor  # (N, C) float64, rows sum to one
    loglik: Tensor  # (N, C) the log-score the posterior came from (template-ensembled)
    image_loglik: Tensor | None  # (N, C) log p(x | c), if computed
    text_loglik: Tensor | None  # (N, C) log p(caption_c | x), if computed
    mode: str
    views: int = 1  # shifted views per brightness level
    brightness: tuple[float, ...] = (1.0,)
    # with retrieval (classify(bank=...)): the documents read before each class caption (image
    # direction), keyed by caption, and before each image (text direction; its first view)
    caption_neighbours: dict[str, list["Neighbour"]] | None = None
    image_neighbours: list[list["Neighbour"]] | None = None

    @property
    def predictions(self) -> list[str]:
        return [self.labels[i] for i in self.posterior.argmax(-1).tolist()]


def check_labels(labels: Sequence[str], templates: Sequence[str]) -> None:
    """ValueError for no labels, one label, duplicates, empty labels, or a template without {}."""
    if len(labels) == 0:
        raise ValueError("no labels given: pass at least two class names")
    if len(labels) == 1:
        raise ValueError(f"only one label ({labels[0]!r}): classification needs at least two")
    dupes = sorted({l for l in labels if list(labels).count(l) > 1})
    if dupes:
        raise ValueError(f"duplicate labels: {dupes}")
    if any(not l.strip() for l in labels):
        raise ValueError("a label is empty")
    if not templates:
        raise ValueError("no prompt template given, e.g. 'a handwritten digit {}'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no {{}} where the label goes, e.g. 'a handwritten digit {{}}'")


def _autocast(enabled: bool | None):
    """bf16 autocast if asked, or (None) where bf16 is native on this CPU (model.precision)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_pays("cpu") if enabled is None else enabled)


@torch.no_grad()
def _prefill(model: Transformer, prompts: list[list[int]], max_batch: int, extra: int, bf16: bool | None) -> tuple[CacheState, Tensor, Tensor]:
    """Prefill left-padded prompts once; returns their cache snapshot, last logits (P, V) float32
    and key validity (P, Lp)."""
    ids, valid = left_pad(prompts)
    P, Lp = ids.shape
    # under bf16 autocast attention reads keys and values in bf16 anyway, so a bf16 cache gives
    # the same scores with half the memory traffic (5-15% faster scoring on the default model)
    low = bf16_pays("cpu") if bf16 is None else bf16
    # the cache's length rounded up to a multiple of 64: few distinct cache shapes, so a compiled
    # scorer (Transformer.compile_scoring) does not recompile for every prompt length
    length = min(-(-(Lp + extra) // 64) * 64, max(model.config.block_size, Lp + extra))
    model.setup_caches(max(max_batch, P), length, dtype=torch.bfloat16 if low else torch.float32)
    key_valid = torch.ones(P, Lp + extra, dtype=torch.bool)
    key_valid[:, :Lp] = valid
    with _autocast(bf16):
        last = model.score_forward(ids, torch.arange(Lp), key_valid=key_valid, float32_head=True)[:, -1]
    return model.cache_state(P, Lp), last, key_valid


@torch.no_grad()
def _continue_logp(model: Transformer, state: CacheState, first_logits: Tensor, key_valid: Tensor,
                   rows: Tensor, targets: Tensor, bf16: bool | None) -> Tensor:
    """For cache rows `rows` (R,) of the snapshot, the log-probability of each target sequence
    (R, L) continuing that prompt: (R, L) float32. Targets equal to -1 are padding (logp 0)."""
    R, L = targets.shape
    sub = state.rows(rows)
    model.load_cache_state(sub)
    Lp = state.length
    safe = targets.clamp(min=0)
    lp_first = first_logits[rows].log_softmax(-1).gather(-1, safe[:, :1])  # (R, 1)
    if L > 1:
        with _autocast(bf16):
            logits = model.score_forward(safe[:, :-1], torch.arange(Lp, Lp + L - 1), key_valid=key_valid[rows],
                                         float32_head=True)
        lp_rest = logits.log_softmax(-1).gather(-1, safe[:, 1:, None]).squeeze(-1)
        lp = torch.cat([lp_first, lp_rest], dim=1)
    else:
        lp = lp_first
    return lp.masked_fill(targets < 0, 0.0)


MAX_VIEWS = 25
# shift offsets (dx, dy) nearest first: the image itself, its 4 one-pixel axis shifts, the 4
# one-pixel diagonals, then the 16 two-pixel shifts; views=V takes the first V
_OFFSETS: list[tuple[int, int]] = sorted(
    ((dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)),
    key=lambda o: (max(abs(o[0]), abs(o[1])), abs(o[0]) + abs(o[1]), o[1], o[0]))


def shifted_views(image: Image.Image, views: int) -> list[Image.Image]:
    """The image and views-1 copies shifted by whole pixels (nearest shifts first, at most 2 px),
    the uncovered border filled by repeating the edge pixels (black stays black)."""
    if not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be between 1 and {MAX_VIEWS}, got {views}")
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    pad = np.pad(arr, ((2, 2), (2, 2), (0, 0)), mode="edge")
    return [Image.fromarray(np.ascontiguousarray(pad[2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w])) for dx, dy in _OFFSETS[:views]]


MAX_BRIGHTNESS_LEVELS = 8


def check_brightness(brightness: Sequence[float]) -> list[float]:
    """Brightness levels: distinct factors in (0, 1] (1 = the image itself), at most 8."""
    try:
        levels = [float(b) for b in brightness]
    except (TypeError, ValueError):
        raise ValueError(f"brightness must be a sequence of numbers in (0, 1], got {brightness!r}") from None
    if not 1 <= len(levels) <= MAX_BRIGHTNESS_LEVELS or len(set(levels)) != len(levels) \
            or not all(0.0 < b <= 1.0 for b in levels):
        raise ValueError(f"brightness must be 1 to {MAX_BRIGHTNESS_LEVELS} distinct factors in (0, 1] "
                         f"(1 = the image itself), got {brightness!r}")
    return levels


def image_views(image: Image.Image, views: int, brightness: Sequence[float] = (1.0,)) -> list[Image.Image]:
    """`shifted_views(image, views)` read at each brightness level (pixel values scaled and
    rounded), level-major: views·len(brightness) images, the image itself first when 1.0 comes first."""
    shifted = shifted_views(image, views)
    out = []
    for b in check_brightness(brightness):
        out.extend(shifted if b == 1.0 else
                   [Image.fromarray((np.asarray(v, dtype=np.float32) * b).round().astype(np.uint8)) for v in shifted])
    return out


def image_codes(tokenizer: MultimodalTokenizer, images: Sequence[Image.Image] | Tensor) -> Tensor:
    """PIL images or precomputed codes (N, G) -> image ids (N, G) (codes + image_offset)."""
    if isinstance(images, Tensor):
        codes = images.long()
    else:
        codes = tokenizer.encode_images(list(images))
    return codes + tokenizer.image_offset


def trained_orders(model: Transformer, tokenizer: MultimodalTokenizer) -> int:
    """How many image orders the model was trained with (train.sequences.SequenceConfig.image_orders):
    their markers are the ids it has past the tokenizer's."""
    return max(1, min(len(special.ORDERS), model.config.vocab_size - tokenizer.vocab_size + 1))


def in_order(model: Transformer, tokenizer: MultimodalTokenizer, x: Tensor, order: int) -> tuple[list[int], Tensor]:
    """Image ids (N, G) in raster order -> (the ids after <boi> that announce `order`, the ids in
    that order); order 0 is raster order with no marker."""
    if not order:
        return [], x
    if not 0 < order < trained_orders(model, tokenizer):
        raise ValueError(f"image order {order} needs a model trained with image_orders > {order}; this one has "
                         f"{trained_orders(model, tokenizer)}")
    return [order_marker(order, tokenizer.vocab_size)], x[:, torch.from_numpy(image_order(order, tokenizer.grid))]


def _check_context(context: Sequence[Sequence[int]] | None, n: int, what: str) -> list[list[int]]:
    if context is None:
        return [[] for _ in range(n)]
    if len(context) != n:
        raise ValueError(f"context needs one id list per {what} ({n}), got {len(context)}")
    return [list(map(int, c)) for c in context]


@dataclass
class Neighbour:
    """A bank document read before a prompt (RA-CM3): its bank entry and retriever score."""

    id: int
    score: float


def retrieved_context(bank: RetrievalBank, texts: Sequence[str] | None, images: Sequence[Image.Image] | None,
                      tokenizer: MultimodalTokenizer, k: int, room: Sequence[int]) -> tuple[list[list[int]], list[list[Neighbour]]]:
    """For each query (a caption in `texts`, or an image in `images`) the k bank documents the
    retriever finds closest, as the ids to read before the prompt (`special.retrieved_prefix`, the
    layout of training) and as Neighbours, best first. The worst are dropped while the context is
    longer than room[q] tokens: the prompt is never cut for them (as in training and generation)."""
    if (texts is None) == (images is None):
        raise ValueError("retrieve with captions or with images, one of the two")
    if texts is not None:
        found = bank.search_documents([[tokenizer.encode_text(t)] for t in texts], [[] for _ in texts], k)
    else:
        found = bank.search_documents([[] for _ in images], [[im] for im in images], k)
    contexts, kept = [], []
    for q, (scores, ids) in enumerate(zip(found.scores.tolist(), found.ids.tolist())):
        near = [Neighbour(int(i), float(s)) for s, i in zip(scores, ids) if i >= 0]
        docs = [bank.documents[nb.id] for nb in near]
        fit = special.neighbours_that_fit(docs, room[q])
        contexts.append(special.retrieved_prefix(docs[:fit]))
        kept.append(near[:fit])
    return contexts, kept


@torch.no_grad()
def image_loglik(model: Transformer, tokenizer: MultimodalTokenizer, images: Sequence[Image.Image] | Tensor,
                 captions: Sequence[str], *, batch_rows: int = 160, bf16: bool | None = None,
                 prune_after: int | None = None, keep: int = 3, order: int = 0,
                 context: Sequence[Sequence[int]] | None = None) -> Tensor:
    """log p(x | caption_c) for every image and caption: (N, C).

    prune_after=K: score the first K codes under every caption, then finish only the `keep` best
    captions per image; pruned captions get -inf (their exact score is not computed).
    order: read the codes in image order k behind its marker (tokenizers_mm.special.image_order),
    for a model trained with more than k orders (`trained_orders`); 0 is raster order.
    context: per caption, ids read between <bos> and the caption, e.g. its retrieved documents
    (`retrieved_context`); the prompt becomes `<bos> context caption <boi>`.
    """
    x = image_codes(tokenizer, images)  # (N, G)
    N, G = x.shape
    C = len(captions)
    marker, x = in_order(model, tokenizer, x, order)
    context = _check_context(context, C, "caption")
    prompts = [[special.BOS_ID, *ctx, *tokenizer.encode_text(c), special.BOI_ID, *marker] for c, ctx in zip(captions, context)]
    state, first, key_valid = _prefill(model, prompts, batch_rows, G, bf16)
    per_chunk = max(1, batch_rows // C)

    def score(pairs_img: Tensor, pairs_cls: Tensor, upto: int) -> Tensor:
        out = []
        for i in range(0, len(pairs_img), batch_rows):
            pi, pc = pairs_img[i : i + batch_rows], pairs_cls[i : i + batch_rows]
            out.append(_continue_logp(model, state, first, key_valid, pc, x[pi, :upto], bf16).sum(-1))
        return torch.cat(out) if out else torch.zeros(0)

    result = torch.full((N, C), float("-inf"))
    try:
        if prune_after is None or keep >= C:
            for j in range(0, N, per_chunk):
                n = min(per_chunk, N - j)
                imgs = torch.arange(j, j + n).repeat_interleave(C)
                cls = torch.arange(C).repeat(n)
                result[j : j + n] = score(imgs, cls, G).view(n, C)
        else:
            imgs = torch.arange(N).repeat_interleave(C)
            cls = torch.arange(C).repeat(N)
            partial = score(imgs, cls, min(prune_after, G)).view(N, C)
            best = partial.topk(keep, dim=-1).indices  # (N, keep)
            imgs = torch.arange(N).repeat_interleave(keep)
            full = score(imgs, best.flatten(), G).view(N, keep)
            result.scatter_(1, best, full)
    finally:
        model.clear_caches()
    return result




@torch.no_grad()
def text_loglik(model: Transformer, tokenizer: MultimodalTokenizer, images: Sequence[Image.Image] | Tensor,
                captions: Sequence[str], *, batch_rows: int = 160, bf16: bool | None = None,
                context: Sequence[Sequence[int]] | None = None) -> Tensor:
    """log p(caption_c <eos> | image) for every image and caption: (N, C). Each image's prefix
    `<bos> <boi> codes <eoi>` is prefilled once and shared by all captions.
    context: per image, ids read between <bos> and the image, e.g. its retrieved documents
    (`retrieved_context`)."""
    x = image_codes(tokenizer, images)
    N, G = x.shape
    C = len(captions)
    context = _check_context(context, N, "image")
    caps = [tokenizer.encode_text(c) + [special.EOS_ID] for c in captions]
    Lc = max(len(c) for c in caps)
    targets = torch.full((C, Lc), -1, dtype=torch.long)
    for i, c in enumerate(caps):
        targets[i, : len(c)] = torch.tensor(c)
    per_chunk = max(1, batch_rows // C)
    result = torch.empty(N, C)
    try:
        for j in range(0, N, per_chunk):
            n = min(per_chunk, N - j)
            prefixes = [[special.BOS_ID, *context[i], special.BOI_ID, *x[i].tolist(), special.EOI_ID] for i in range(j, j + n)]
            state, first, key_valid = _prefill(model, prefixes, max(batch_rows, n * C), Lc, bf16)
            rows = torch.arange(n).repeat_interleave(C)
            result[j : j + n] = _continue_logp(model, state, first, key_valid, rows, targets.repeat(n, 1), bf16).sum(-1).view(n, C)
    finally:
        model.clear_caches()
    return result


def classify(model: Transformer | Sequence[Transformer], tokenizer: MultimodalTokenizer, images: Sequence[Image.Image] | Tensor,
             labels: Sequence[str], templates: Sequence[str] = ("{}",), *, prior: Sequence[float] | Tensor | None = None,
             mode: Mode = "both", views: int = 1, bf16: bool | None = None, prune_after: int | None = None,
             keep: int = 3, weights: tuple[float, float] = (1.0, 1.0), orders: int | None = None,
             bank: RetrievalBank | None = None, k: int = 2, brightness: Sequence[float] = (1.0,)) -> Classification:
    """Posterior over `labels` for each image by Bayes' rule.

    templates: prompt templates with {} for the label; their likelihoods are combined by
    log-mean-exp (see sample.bayes.ensemble_templates). mode: "image" uses p(x|c), "text" uses
    p(caption_c|x), "both" adds the two log-scores, weighted by `weights` = (image, text).
    views: score each PIL image also shifted by whole pixels and average each log-score over the
    views (module docstring; V× the time). brightness: levels in (0, 1] at which every view is
    also read, dimmed (`image_views`); the log-scores are averaged over all V·B copies.
    orders: average log p(x|c) over the first `orders` image token orders, for models trained with
    image_orders > 1 (`trained_orders`); None = every order all the models were trained with (1,
    raster order, for the default recipe). O× the image direction's time.
    model: one model, or several trained on this same tokenizer (for example the same recipe with
    different seeds): each direction's log-score is averaged over the models, a product of experts
    whose errors are largely particular to each run (README: four runs lift digits p(x|c) from
    56% to 78%). M models cost M× the time.
    prior: None (uniform) or C probabilities. bf16: autocast; None = where bf16 is native (AMX,
    AVX512-BF16), float32 elsewhere.
    bank: retrieval augmentation (RA-CM3), for models trained with it: each class caption is
    read behind the k bank documents the retriever finds for it (image direction), each image
    behind the k found for the image (text direction), in the layout of training; the worst are
    dropped where the context is short. The result lists them (caption_neighbours, image_neighbours).
    """
    labels = list(labels)
    check_labels(labels, templates)
    models = [model] if isinstance(model, Transformer) else list(model)
    if not models:
        raise ValueError("classify needs at least one model")
    for m in models:  # the rule load_pretrained applies: the model covers every id of the tokenizer
        if m.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"a model's vocabulary ({m.config.vocab_size}) is smaller than the tokenizer's "
                             f"({tokenizer.vocab_size}): every model must be trained on this tokenizer")
    if mode not in ("image", "text", "both"):
        raise ValueError(f"mode must be 'image', 'text' or 'both', got {mode!r}")
    if not isinstance(views, int) or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be an integer between 1 and {MAX_VIEWS}, got {views!r}")
    most = min(trained_orders(m, tokenizer) for m in models)
    orders = most if orders is None else orders
    if not isinstance(orders, int) or not 1 <= orders <= most:
        raise ValueError(f"orders must be an integer between 1 and {most} (the image orders every model was "
                         f"trained with), got {orders!r}")
    p = check_prior(prior, len(labels))
    weights = check_weights(weights)  # refuse bad weights before the work
    levels = check_brightness(brightness)
    copies = views * len(levels)  # every image is read this many times
    if copies > 1:
        if isinstance(images, Tensor):
            raise ValueError("views > 1 (or several brightness levels) needs the images themselves (PIL), not precomputed codes")
        per_image = [image_views(im, views, levels) for im in images]
        images = [v[k] for k in range(copies) for v in per_image]  # copy-major: (V·B·N)
    codes = image_codes(tokenizer, images) - tokenizer.image_offset  # encode once for every template
    n = len(codes) // copies
    captions = {t: [t.format(l) for l in labels] for t in templates}
    contexts: dict[str, list[list[int]]] = {}  # per template (image direction) and "" (text direction)
    caption_nb: dict[str, list[Neighbour]] | None = None
    image_nb: list[list[Neighbour]] | None = None
    if bank is not None:
        block, G = min(m.config.block_size for m in models), codes.shape[1]
        marker = 1 if orders > 1 else 0
        caption_nb = {}
        if mode in ("image", "both"):
            for t, caps in captions.items():
                room = [block - (len(tokenizer.encode_text(c)) + 2 + marker + G) for c in caps]
                contexts[t], found = retrieved_context(bank, caps, None, tokenizer, k, room)
                caption_nb.update(zip(caps, found))
        if mode in ("text", "both"):
            longest = max(len(tokenizer.encode_text(c)) for caps in captions.values() for c in caps)
            pil = tokenizer.decode_images(codes) if isinstance(images, Tensor) else list(images)
            contexts[""], found = retrieved_context(bank, None, pil, tokenizer, k, [block - (G + 4 + longest)] * len(pil))
            image_nb = found[:n]

    def combine(per_template: list[Tensor]) -> Tensor:  # T × (V·B·N, C) -> (N, C)
        return ensemble_templates(torch.stack(per_template)).view(copies, n, -1).mean(0)

    def direction(loglik, **kw) -> Tensor:  # one direction's (N, C) log-score, averaged over the models
        key = (lambda t: t) if loglik is image_loglik else (lambda t: "")
        return torch.stack([combine([loglik(m, tokenizer, codes, captions[t], bf16=bf16, context=contexts.get(key(t)), **kw)
                                     for t in templates]) for m in models]).mean(0)

    def image_direction() -> Tensor:  # averaged over the image orders too
        return torch.stack([direction(image_loglik, prune_after=prune_after, keep=keep, order=o)
                            for o in range(orders)]).mean(0)

    img_ll = image_direction() if mode in ("image", "both") else None
    txt_ll = direction(text_loglik) if mode in ("text", "both") else None
    score = img_ll if txt_ll is None else txt_ll if img_ll is None else combine_directions(img_ll, txt_ll, weights)
    return Classification(labels, posterior(score, p), score, img_ll, txt_ll, mode, views, tuple(levels), caption_nb, image_nb)


def calibrate_directions(model: Transformer | Sequence[Transformer], tokenizer: MultimodalTokenizer, images: Sequence[Image.Image],
                         truth: Sequence[int], labels: Sequence[str], templates: Sequence[str] = ("{}",), *,
                         views: int = 1, bf16: bool | None = None, orders: int | None = None,
                         bank: RetrievalBank | None = None, k: int = 2,
                         brightness: Sequence[float] = (1.0,)) -> tuple[tuple[float, float], Classification]:
    """Direction weights (image, text) for "both", fitted on labelled images of the task
    (truth[i] indexes labels): both directions are scored as `classify` would with these templates,
    views, brightness levels, orders and retrieval, then sample.bayes.fit_direction_weights. Returns the weights and the scores."""
    if len(images) != len(truth) or len(images) < 2:
        raise ValueError(f"calibration needs at least two labelled images, one label each; got {len(images)} "
                         f"images and {len(truth)} labels")
    scored = classify(model, tokenizer, images, labels, templates, mode="both", views=views, bf16=bf16, orders=orders,
                      bank=bank, k=k, brightness=brightness)
    return fit_direction_weights(scored.image_loglik, scored.text_loglik, torch.as_tensor(list(truth))), scored


@torch.no_grad()
def naive_scores(model: Transformer, tokenizer: MultimodalTokenizer, images: Sequence[Image.Image] | Tensor,
                 captions: Sequence[str], direction: Literal["image", "text"] = "image", bf16: bool = False,
                 order: int = 0, context: Sequence[Sequence[int]] | None = None) -> Tensor:
    """The reference: one full forward pass per (image, caption) pair, no cache, no batching.
    order: the image direction in image order k behind its marker (see image_loglik).
    context: ids after <bos>, per caption (image direction) or per image (text direction)."""
    marker, x = in_order(model, tokenizer, image_codes(tokenizer, images), order if direction == "image" else 0)
    per_caption = _check_context(context if direction == "image" else None, len(captions), "caption")
    per_image = _check_context(context if direction == "text" else None, len(x), "image")
    out = torch.empty(len(x), len(captions))
    for j in range(len(x)):
        for c, cap in enumerate(captions):
            text = tokenizer.encode_text(cap)
            if direction == "image":
                seq = [special.BOS_ID, *per_caption[c], *text, special.BOI_ID, *marker, *x[j].tolist()]
                start = len(seq) - x.shape[1]
            else:
                seq = [special.BOS_ID, *per_image[j], special.BOI_ID, *x[j].tolist(), special.EOI_ID, *text, special.EOS_ID]
                start = len(seq) - len(text) - 1
            ids = torch.tensor([seq])
            with _autocast(bf16):
                logits = model(ids).float()
            lp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out[j, c] = lp[start - 1 :].sum()
    return out
