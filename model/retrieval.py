"""Dense retrieval for retrieval-augmented training and sampling (RA-CM3 / CM3Leon).

Two parts, both pure model code (no data, no training loop):

1. `Retriever`: a small dual encoder. An image encoder (a CNN over the RGB pixels, or over the
   VQ code grid) and a text encoder (a small transformer over BPE ids) project into one
   L2-normalised space, trained contrastively (CLIP, Radford et al. 2021; SigLIP, Zhai et al.
   2023; losses `clip_loss` / `siglip_loss` below). A document's embedding is the normalised
   mean of its text and image embeddings (RA-CM3, Yasunaga et al. 2023, §3.1), so a query may be
   text, an image, or both.
2. A memory bank behind one interface, `Index`: `ExactIndex` (exact maximum-inner-product search
   in torch: chunked matmul + top-k, saved as safetensors) is the default; `FaissIndex` (IVF or
   HNSW from the optional `faiss-cpu` package) is for banks too large for exact search. Every
   search can exclude ids per query (never retrieve the query's own document) and skip
   near-duplicates (neighbours scoring above `max_score`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from tokenizers_mm.atomic import write_atomic_folder
from tokenizers_mm.weights import load_weights_strict, read_config, save_config_and_weights
from tokenizers_mm.images import pil_to_tensor, to_rgb
from tokenizers_mm.special import PAD_ID

CONFIG_FILE = "retriever_config.json"
WEIGHTS_FILE = "retriever.safetensors"
INDEX_META_FILE = "index.json"
INDEX_FORMAT_VERSION = 1

# ================================================================================ the dual encoder


@dataclass
class RetrieverConfig:
    """Everything needed to rebuild a Retriever; saved as `retriever_config.json` next to its weights."""

    vocab_size: int  # text ids are in [0, vocab_size): the MultimodalTokenizer's text_vocab_size
    dim: int = 128  # width of the shared, L2-normalised embedding space
    image_input: str = "pixels"  # "pixels": RGB (B, 3, S, S) in [-1, 1]; "codes": VQ codes (B, grid*grid)
    image_size: int = 32  # side of the RGB input ("pixels")
    codebook_size: int = 512  # VQ codes per image token ("codes" only)
    grid: int = 8  # VQ code grid side ("codes" only)
    channels: int = 32  # CNN width at full resolution; doubles at each downsampling
    pixel_pool: int = 1  # average-pool the pixels by this factor first (2: 32 px -> 16 px, ~4× cheaper)
    text_width: int = 128  # token embedding / transformer width of the text encoder
    text_layers: int = 1  # transformer layers (0: mean-pooled embeddings + MLP, a bag of words)
    text_heads: int = 4
    max_text_len: int = 32  # longer texts are truncated (the embedded captions are < 20 BPE ids)
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid)
    init_temperature: float = 0.07  # CLIP's initial τ (logit scale 1/τ); SigLIP starts at τ = 0.1
    init_bias: float = -10.0  # SigLIP's initial logit bias (Zhai et al. 2023, §3.2)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "image_size", "codebook_size", "grid", "channels", "pixel_pool",
                     "text_width", "text_heads", "max_text_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"RetrieverConfig.{name} must be a positive integer; found {v!r}")
        if not isinstance(self.text_layers, int) or self.text_layers < 0:
            raise ValueError(f"RetrieverConfig.text_layers must be an integer ≥ 0; found {self.text_layers!r}")
        if self.image_input not in ("pixels", "codes"):
            raise ValueError(f"RetrieverConfig.image_input must be 'pixels' or 'codes'; found {self.image_input!r}")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"RetrieverConfig.loss must be 'clip' or 'siglip'; found {self.loss!r}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} must be divisible by text_heads={self.text_heads}")
        if self.image_input == "pixels" and self.image_size % (8 * self.pixel_pool):
            raise ValueError(f"image_size={self.image_size} must be divisible by 8·pixel_pool={8 * self.pixel_pool} "
                             "(three stride-2 convolutions after pooling)")
        if self.image_input == "codes" and self.grid % 2:
            raise ValueError(f"grid={self.grid} must be even for the code-grid encoder (one stride-2 convolution)")
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1); found {self.init_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetrieverConfig":
        """Strict: unknown or missing keys raise ValueError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"retriever config has unknown keys {unknown}; known: {sorted(names)} — "
                             "was it written by a newer version of this code?")
        if "vocab_size" not in d:
            raise ValueError("retriever config has no 'vocab_size'; it is required (the tokenizer's text_vocab_size)")
        return cls(**d)


# presets: call with the tokenizer's text vocabulary, e.g. retriever_preset("default", tok.text_vocab_size)
RETRIEVER_PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for tests
    "tiny": dict(dim=32, channels=8, pixel_pool=2, text_width=32, text_layers=1, text_heads=2, max_text_len=24),
    # ≤ 60 s of training on this 2-core CPU (train/retriever.py calibrates the optimisation). Measured
    # at 250 steps × 128 pairs, 1 thread, bf16: pixels at 32 px 51 s, shapes attribute-correct@1 0.93;
    # pixels pooled to 16 px 34 s, 0.93; VQ codes 22 s, 0.81 (0.85 after 600 steps), digits zero-shot
    # 0.99 / 0.99 / 0.80 — pixels retrieve better and pooling costs nothing here.
    "default": dict(dim=128, channels=32, pixel_pool=2, text_width=128, text_layers=1, text_heads=4),
}


def retriever_preset(name: str, vocab_size: int, **overrides: Any) -> RetrieverConfig:
    """The named preset for a text vocabulary of `vocab_size`, with field overrides."""
    if name not in RETRIEVER_PRESETS:
        raise ValueError(f"unknown retriever preset {name!r}; choose from {sorted(RETRIEVER_PRESETS)}")
    return RetrieverConfig(vocab_size=vocab_size, **{**RETRIEVER_PRESETS[name], **overrides})


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    k = 4 if stride == 2 else 3
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU())


class PixelEncoder(nn.Module):
    """RGB (B, 3, S, S) in [-1, 1] -> (B, dim), unnormalised. A flattened 4×4 map rather than a
    global pool feeds the projection, because position is content here ("in the top left")."""

    def __init__(self, cfg: RetrieverConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.pool = cfg.pixel_pool
        self.net = nn.Sequential(_conv_block(3, c, 1), _conv_block(c, 2 * c, 2), _conv_block(2 * c, 4 * c, 2),
                                 _conv_block(4 * c, 4 * c, 2))
        side = cfg.image_size // cfg.pixel_pool // 8
        self.proj = nn.Sequential(nn.Flatten(), nn.LayerNorm(4 * c * side * side), nn.Linear(4 * c * side * side, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return self.proj(self.net(x))


class CodeEncoder(nn.Module):
    """VQ codes (B, grid*grid) int64 in [0, codebook_size) -> (B, dim), unnormalised."""

    def __init__(self, cfg: RetrieverConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.grid = cfg.grid
        self.embed = nn.Embedding(cfg.codebook_size, 2 * c)
        self.net = nn.Sequential(_conv_block(2 * c, 2 * c, 1), _conv_block(2 * c, 4 * c, 2))
        side = cfg.grid // 2
        self.proj = nn.Sequential(nn.Flatten(), nn.LayerNorm(4 * c * side * side), nn.Linear(4 * c * side * side, cfg.dim))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes.view(-1, self.grid, self.grid)).permute(0, 3, 1, 2)  # (B, 2c, g, g)
        return self.proj(self.net(x))


class TextEncoder(nn.Module):
    """BPE ids (B, T) padded with PAD_ID, and a mask (B, T) of real tokens -> (B, dim), unnormalised.
    Mean-pooled over real tokens; with text_layers ≥ 1 a transformer with learned positions first,
    so that word order counts ("a red circle above a blue square" is not its mirror)."""

    def __init__(self, cfg: RetrieverConfig) -> None:
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(cfg.vocab_size, w)
        self.pos = nn.Parameter(torch.zeros(cfg.max_text_len, w))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(w, cfg.text_heads, 2 * w, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.text_layers)
        )
        self.proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU(), nn.Linear(w, cfg.dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, T, w)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, w)
        return self.proj(pooled)


class Retriever(nn.Module):
    """Dual encoder into one L2-normalised space of width `config.dim`.

    Training path: `encode_images(x)` / `encode_texts(ids, mask)` (with gradients) and the
    `logit_scale` / `logit_bias` parameters for `clip_loss` / `siglip_loss`.
    Inference path: `embed_images`, `embed_texts`, `embed_documents` (no gradients, batched,
    float32 outputs (B, dim) of unit norm).
    """

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder: nn.Module = PixelEncoder(config) if config.image_input == "pixels" else CodeEncoder(config)
        self.text_encoder = TextEncoder(config)
        tau = config.init_temperature if config.loss == "clip" else 0.1
        # CLIP learns log(1/τ) (Radford et al. 2021, §2.5); SigLIP learns t' = log t and a bias b
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))
        self.logit_bias = nn.Parameter(torch.tensor(config.init_bias if config.loss == "siglip" else 0.0))

    # --- training path (gradients) -----------------------------------------------------------
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) in [-1, 1] or codes (B, grid*grid) int64 -> unit vectors (B, dim)."""
        return F.normalize(self.image_encoder(x).float(), dim=-1)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Padded ids (B, T) and real-token mask (B, T) -> unit vectors (B, dim)."""
        return F.normalize(self.text_encoder(ids, mask).float(), dim=-1)

    # --- input preparation ---------------------------------------------------------------------
    def pad_texts(self, texts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists of BPE ids -> (ids (B, T), mask (B, T)), truncated to max_text_len, PAD_ID-padded.
        Raises ValueError for an id outside [0, vocab_size) or an empty text."""
        cfg = self.config
        rows = [list(t)[: cfg.max_text_len] for t in texts]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"text {i} is empty; every text query needs at least one BPE id")
            lo, hi = min(r), max(r)
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"text {i} holds id {hi if hi >= cfg.vocab_size else lo} outside the retriever's text "
                                 f"vocabulary [0, {cfg.vocab_size}); encode it with the tokenizer the retriever was "
                                 "trained with (MultimodalTokenizer.encode_text)")
        t = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), t), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask

    def prepare_images(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images, float pixels (B, 3, S, S) in [-1, 1], uint8 pixels (B, S, S, 3), or (for an
        image_input="codes" retriever) int64 codes (B, grid*grid) -> the image encoder's input."""
        cfg = self.config
        if cfg.image_input == "codes":
            if not isinstance(images, torch.Tensor) or images.is_floating_point() or images.dtype == torch.uint8:
                raise ValueError(f"this retriever reads VQ codes (image_input='codes'); pass int64 codes of shape "
                                 f"(B, {cfg.grid * cfg.grid}) from MultimodalTokenizer.encode_images, not pixels")
            if images.ndim != 2 or images.shape[1] != cfg.grid * cfg.grid:
                raise ValueError(f"codes must be (B, {cfg.grid * cfg.grid}); found {tuple(images.shape)}")
            if images.numel() and (images.min() < 0 or images.max() >= cfg.codebook_size):
                raise ValueError(f"codes must lie in [0, {cfg.codebook_size}); found [{images.min()}, {images.max()}]")
            return images.long()
        if isinstance(images, torch.Tensor):
            if images.dtype == torch.uint8:
                if images.ndim != 4 or images.shape[-1] != 3:
                    raise ValueError(f"uint8 images must be (B, H, W, 3); found {tuple(images.shape)}")
                images = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"image tensors must be float (B, 3, H, W) in [-1, 1] or uint8 (B, H, W, 3); "
                                 f"found {images.dtype} {tuple(images.shape)}")
            x = images.float()
        else:
            x = pil_to_tensor([to_rgb(im, cfg.image_size) for im in images]) if len(images) else \
                torch.zeros(0, 3, cfg.image_size, cfg.image_size)
        if tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {tuple(x.shape[2:])} pixels; the retriever reads {cfg.image_size}×"
                             f"{cfg.image_size} — pass PIL images (resized automatically) or resize first")
        return x

    # --- inference path ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images (see `prepare_images`) -> unit vectors (B, dim) float32."""
        was = self.training
        self.eval()
        x = self.prepare_images(images)
        out = [self.encode_images(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.config.dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[Sequence[int]], batch_size: int = 1024) -> torch.Tensor:
        """Lists of BPE ids (MultimodalTokenizer.encode_text) -> unit vectors (B, dim) float32."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.pad_texts(texts[i : i + batch_size])
            out.append(self.encode_texts(ids, mask))
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.config.dim)

    @torch.no_grad()
    def embed_documents(self, texts: Sequence[Sequence[Sequence[int]]],
                        images: Sequence[Sequence[Image.Image] | torch.Tensor]) -> torch.Tensor:
        """Documents -> unit vectors (B, dim): the normalised mean of the document's text embedding
        and its image embedding (RA-CM3 §3.1), each itself the normalised mean over the document's
        text (resp. image) segments. A document with only text (or only images) gets that part
        alone, so the same function embeds text, image and mixed queries.

        texts[b]: the BPE id lists of document b's text segments (may be empty).
        images[b]: document b's images: PIL images, or a tensor (n_b, ...) as `prepare_images` takes.
        """
        if len(texts) != len(images):
            raise ValueError(f"embed_documents got {len(texts)} text lists and {len(images)} image lists; "
                             "pass one of each per document (an empty list where a document has none)")
        flat_t = [t for doc in texts for t in doc]
        n_img = [len(doc) for doc in images]
        t_emb = self.embed_texts(flat_t)
        if sum(n_img):
            parts = [self.prepare_images(doc) for doc, n in zip(images, n_img) if n]
            i_emb = self.embed_images(torch.cat(parts))
        else:
            i_emb = torch.zeros(0, self.config.dim)
        out = torch.zeros(len(texts), self.config.dim)
        ti = ii = 0
        for b, doc in enumerate(texts):
            if not doc and not n_img[b]:
                raise ValueError(f"document {b} has neither text nor image; nothing to embed")
            acc = torch.zeros(self.config.dim)
            if doc:
                acc += F.normalize(t_emb[ti : ti + len(doc)].mean(0), dim=-1)
                ti += len(doc)
            if n_img[b]:
                acc += F.normalize(i_emb[ii : ii + n_img[b]].mean(0), dim=-1)
                ii += n_img[b]
            out[b] = F.normalize(acc, dim=-1)
        return out

    # --- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write `retriever_config.json` and `retriever.safetensors` into `directory` (created),
        each atomically (temporary name, then rename)."""
        save_config_and_weights(self, self.config.to_dict(), directory, CONFIG_FILE, WEIGHTS_FILE, "retriever")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Retriever":
        """Load a folder written by `save`, strictly; returns the model in eval mode."""
        cfg_dict = read_config(directory, CONFIG_FILE, WEIGHTS_FILE, "retriever",
                               f"train one with `python -m train.retriever --out {directory}`")
        model = cls(RetrieverConfig.from_dict(cfg_dict))
        load_weights_strict(model, directory, CONFIG_FILE, WEIGHTS_FILE, "retriever")
        return model.eval()


# ================================================================================ losses


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): cross-entropy of image→text and
    text→image over the batch, pair i the positive of row i.

    image_emb, text_emb: unit vectors (B, D); logit_scale: scalar log(1/τ) (clamped at log 100 as
    in CLIP). positives: optional bool (B, B) of other pairs that are also correct (e.g. identical
    captions); their logits are removed from the negatives so that a duplicate is not pushed away.
    """
    scale = logit_scale.clamp(max=math.log(100.0)).exp()
    logits = scale * image_emb @ text_emb.T  # (B, B): image i vs text j
    if positives is not None:
        off = positives & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Alg. 1): every (image, text) pair of the
    batch is an independent binary problem, label +1 on the diagonal (and on `positives`), −1 off
    it; summed over texts, averaged over images. Shapes as in `clip_loss`; logit_bias scalar."""
    logits = logit_scale.exp() * image_emb @ text_emb.T + logit_bias  # (B, B)
    labels = torch.eye(len(logits), device=logits.device, dtype=torch.bool)
    if positives is not None:
        labels = labels | positives
    signs = labels.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum(1).mean()


def contrastive_loss(model: Retriever, image_emb: torch.Tensor, text_emb: torch.Tensor,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """The loss `model.config.loss` names, with the model's own temperature (and bias)."""
    if model.config.loss == "siglip":
        return siglip_loss(image_emb, text_emb, model.logit_scale, model.logit_bias, positives)
    return clip_loss(image_emb, text_emb, model.logit_scale, positives)


# ================================================================================ the index


class SearchResult(NamedTuple):
    """Neighbours of each query, best first. Where fewer than k qualify, ids are -1 and scores -inf."""

    scores: torch.Tensor  # (Q, k) float32 inner products (cosine similarities for unit vectors)
    ids: torch.Tensor  # (Q, k) int64 ids as given to `add`


@runtime_checkable
class Index(Protocol):
    """A memory bank of (embedding, id) pairs searched by maximum inner product."""

    dim: int

    def __len__(self) -> int: ...

    def add(self, embeddings: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None) -> None:
        """Append embeddings (N, dim) with int64 ids (N,) (default: consecutive from len(self))."""
        ...

    def search(self, queries: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | torch.Tensor | None = None,
               max_score: float | None = None) -> SearchResult:
        """Top-k by inner product for queries (Q, dim). exclude[q]: ids never returned for query q
        (its own document); max_score: skip neighbours scoring above it (near-duplicates)."""
        ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _check_queries(queries: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != dim:
        found = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise ValueError(f"queries must be a tensor (Q, {dim}); found {found}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; found {k!r}")
    return queries.float()


def _exclude_matrix(exclude: Sequence[Sequence[int]] | torch.Tensor | None, q: int) -> torch.Tensor | None:
    """Ragged per-query id lists -> int64 (Q, E) padded with -1 (never a valid id), or None."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        ex = exclude.long()
        if ex.ndim == 1:
            ex = ex.unsqueeze(1)
    else:
        if len(exclude) != q:
            raise ValueError(f"exclude has {len(exclude)} entries for {q} queries; give one id list per query")
        width = max((len(e) for e in exclude), default=0)
        ex = torch.full((q, max(width, 1)), -1, dtype=torch.long)
        for i, e in enumerate(exclude):
            if len(e):
                ex[i, : len(e)] = torch.as_tensor(list(e), dtype=torch.long)
    if ex.shape[0] != q:
        raise ValueError(f"exclude has {ex.shape[0]} rows for {q} queries; give one row per query")
    return ex


def _as_ids(ids: torch.Tensor | Sequence[int] | None, n: int, start: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(start, start + n, dtype=torch.long)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if len(ids) != n:
        raise ValueError(f"add got {n} embeddings and {len(ids)} ids; give one id per embedding")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be ≥ 0 (-1 marks a missing neighbour in search results)")
    return ids


class ExactIndex:
    """Exact maximum-inner-product search in torch: the bank is a (N, dim) matrix, queries are
    scored chunk by chunk (a (Q, chunk) matmul) and a running top-k is merged, so memory stays
    O(Q·(k + chunk)) for any bank size. dtype=torch.bfloat16 halves memory and runs the matmul on
    AMX (scores then carry ~3 significant digits; ties may reorder)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, chunk_size: int = 65_536) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"ExactIndex dtype must be torch.float32 or torch.bfloat16; found {dtype}")
        self.dim = dim
        self.dtype = dtype
        self.chunk_size = chunk_size
        self._emb: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def embeddings(self) -> torch.Tensor:
        """The bank (N, dim) in the index's dtype."""
        self._consolidate()
        return self._emb[0] if self._emb else torch.zeros(0, self.dim, dtype=self.dtype)

    @property
    def ids(self) -> torch.Tensor:
        """The ids (N,) int64, in bank order."""
        self._consolidate()
        return self._ids[0] if self._ids else torch.zeros(0, dtype=torch.long)

    def _consolidate(self) -> None:
        if len(self._emb) > 1:
            self._emb, self._ids = [torch.cat(self._emb)], [torch.cat(self._ids)]

    def add(self, embeddings: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None) -> None:
        """Append embeddings (N, dim) and their ids (N,) (default: consecutive from len(self))."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}); found {tuple(embeddings.shape)}")
        self._emb.append(embeddings.detach().to(self.dtype).contiguous())
        self._ids.append(_as_ids(ids, len(embeddings), self._n))
        self._n += len(embeddings)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | torch.Tensor | None = None,
               max_score: float | None = None) -> SearchResult:
        """Exact top-k (see `Index.search`). Excluded and near-duplicate entries are masked before
        the top-k, so every query gets k neighbours whenever k qualify."""
        q = _check_queries(queries, self.dim, k).to(self.dtype)
        ex = _exclude_matrix(exclude, len(q))
        best_s = torch.full((len(q), k), float("-inf"))
        best_i = torch.full((len(q), k), -1, dtype=torch.long)
        bank, ids = self.embeddings, self.ids
        for start in range(0, len(bank), self.chunk_size):
            ids_c = ids[start : start + self.chunk_size]
            s = (q @ bank[start : start + self.chunk_size].T).float()  # (Q, chunk)
            if max_score is not None:
                s = s.masked_fill(s > max_score, float("-inf"))
            if ex is not None:
                hit = (ex.unsqueeze(-1) == ids_c.view(1, 1, -1)).any(1)  # (Q, chunk)
                s = s.masked_fill(hit, float("-inf"))
            kk = min(k, s.shape[1])
            top_s, top_p = s.topk(kk, dim=1)
            cand_s = torch.cat([best_s, top_s], 1)
            cand_i = torch.cat([best_i, ids_c[top_p]], 1)
            best_s, order = cand_s.topk(k, dim=1)
            best_i = cand_i.gather(1, order)
        best_i = best_i.masked_fill(torch.isinf(best_s), -1)
        return SearchResult(best_s, best_i)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `index.json` + `index.safetensors` (embeddings, ids) into `directory`, atomically."""
        def fill(tmp: Path) -> None:
            save_file({"embeddings": self.embeddings.contiguous(), "ids": self.ids.contiguous()},
                      str(tmp / "index.safetensors"), metadata={"format": "exact_index"})
            meta = {"format_version": INDEX_FORMAT_VERSION, "backend": "exact", "dim": self.dim, "size": len(self),
                    "dtype": str(self.dtype).removeprefix("torch.")}
            (tmp / INDEX_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        write_atomic_folder(directory, fill)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ExactIndex":
        """Load a folder written by `save`, strictly."""
        d = Path(directory)
        meta = _read_index_meta(d, "exact")
        path = d / "index.safetensors"
        if not path.is_file():
            raise ValueError(f"index folder {d} has no index.safetensors; re-save the index with ExactIndex.save()")
        t = load_file(str(path))
        if set(t) != {"embeddings", "ids"}:
            raise ValueError(f"{path} holds tensors {sorted(t)}; expected exactly ['embeddings', 'ids']")
        emb, ids = t["embeddings"], t["ids"]
        if emb.ndim != 2 or emb.shape[1] != meta["dim"] or len(emb) != meta["size"] or ids.shape != (len(emb),):
            raise ValueError(f"{path}: embeddings {tuple(emb.shape)} and ids {tuple(ids.shape)} disagree with "
                             f"index.json (dim {meta['dim']}, size {meta['size']}); re-save the index")
        index = cls(meta["dim"], dtype=getattr(torch, meta["dtype"]))
        if len(emb):
            index.add(emb, ids)
        return index


def _read_index_meta(d: Path, backend: str | None) -> dict[str, Any]:
    if not d.is_dir():
        raise ValueError(f"index folder not found: {d}")
    p = d / INDEX_META_FILE
    if not p.is_file():
        raise ValueError(f"index folder {d} has no {INDEX_META_FILE}; it was not written by an Index.save() "
                         "(or the write was interrupted) — rebuild the index")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); rebuild the index") from None
    if meta.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{p} has index format {meta.get('format_version')}; this code reads {INDEX_FORMAT_VERSION}")
    if backend is not None and meta.get("backend") != backend:
        raise ValueError(f"{d} holds a {meta.get('backend')!r} index; expected {backend!r} — use load_index() "
                         "to load whichever backend a folder holds")
    return meta


def _import_faiss() -> Any:
    try:
        import faiss  # optional extra: only the approximate backend needs it
    except ImportError:
        raise ImportError("FaissIndex needs the faiss-cpu package, which is not installed: "
                          "`pip install faiss-cpu` (or `pip install -e '.[retrieval]'`), or use ExactIndex") from None
    return faiss


class FaissIndex:
    """Approximate maximum-inner-product search on FAISS (optional extra `faiss-cpu`).

    kind="ivf": an inverted file of `nlist` k-means cells, `nprobe` cells searched per query
      (trained on the first batch given to `add`, which needs ≳ 40·nlist vectors);
    kind="hnsw": a graph with `m` links per node, `ef_search` candidates per query (no training);
    kind="flat": exact, for tests and as a reference.
    Exclusion and near-duplicate skipping over-fetch candidates and filter, widening until k
    qualify or the whole bank was seen.
    """

    def __init__(self, dim: int, kind: str = "ivf", nlist: int = 1024, nprobe: int = 16, m: int = 32,
                 ef_search: int = 64, ef_construction: int = 80) -> None:
        faiss = _import_faiss()
        if kind not in ("ivf", "hnsw", "flat"):
            raise ValueError(f"FaissIndex kind must be 'ivf', 'hnsw' or 'flat'; found {kind!r}")
        self.dim, self.kind = dim, kind
        self.params = {"nlist": nlist, "nprobe": nprobe, "m": m, "ef_search": ef_search, "ef_construction": ef_construction}
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "ivf":
            self._quantizer = faiss.IndexFlatIP(dim)  # must outlive the IVF index that points at it
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, ip)
            self.index.nprobe = nprobe
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, m, ip)
            base.hnsw.efConstruction = ef_construction
            base.hnsw.efSearch = ef_search
            self.index = faiss.IndexIDMap2(base)
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, embeddings: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None) -> None:
        """Append embeddings (N, dim) with ids (N,); an untrained IVF index trains on this batch first."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}); found {tuple(embeddings.shape)}")
        x = embeddings.detach().float().contiguous().numpy()
        i = _as_ids(ids, len(x), len(self)).numpy()
        if not self.index.is_trained:
            need = self.params["nlist"]
            if len(x) < need:
                raise ValueError(f"an IVF index with nlist={need} needs at least {need} vectors (≳ {40 * need} for "
                                 f"good cells) in its first add; found {len(x)} — lower nlist or use ExactIndex")
            self.index.train(x)
        self.index.add_with_ids(x, i)

    def train(self, sample: torch.Tensor) -> None:
        """Fit an IVF index's cells on a sample (N, dim) of the bank (FAISS suggests 30–256 vectors
        per cell) before adding; cheaper than letting `add` train on a whole large first batch."""
        if sample.ndim != 2 or sample.shape[1] != self.dim:
            raise ValueError(f"sample must be (N, {self.dim}); found {tuple(sample.shape)}")
        if self.kind == "ivf":
            self.index.train(sample.detach().float().contiguous().numpy())

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed for recall after building (IVF cells probed / HNSW candidate list)."""
        if nprobe is not None and self.kind == "ivf":
            self.params["nprobe"] = self.index.nprobe = nprobe
        if ef_search is not None and self.kind == "hnsw":
            self.params["ef_search"] = ef_search
            _import_faiss().downcast_index(self.index.index).hnsw.efSearch = ef_search

    def search(self, queries: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | torch.Tensor | None = None,
               max_score: float | None = None) -> SearchResult:
        """Approximate top-k (see `Index.search`)."""
        q = _check_queries(queries, self.dim, k).contiguous().numpy()
        ex = _exclude_matrix(exclude, len(q))
        n = len(self)
        fetch = min(n, k + (ex.shape[1] if ex is not None else 0) + (8 if max_score is not None else 0))
        while True:
            s_np, i_np = self.index.search(q, max(fetch, 1))
            s, i = torch.from_numpy(s_np).float(), torch.from_numpy(i_np).long()
            ok = i >= 0
            if max_score is not None:
                ok &= s <= max_score
            if ex is not None:
                ok &= ~(i.unsqueeze(-1) == ex.unsqueeze(1)).any(-1)
            if bool((ok.sum(1) >= min(k, n)).all()) or fetch >= n:
                break
            fetch = min(n, fetch * 4)
        s = s.masked_fill(~ok, float("-inf"))
        top_s, pos = s.topk(min(k, s.shape[1]), dim=1)
        top_i = i.gather(1, pos).masked_fill(torch.isinf(top_s), -1)
        if top_s.shape[1] < k:  # a bank smaller than k
            pad = k - top_s.shape[1]
            top_s = torch.cat([top_s, torch.full((len(q), pad), float("-inf"))], 1)
            top_i = torch.cat([top_i, torch.full((len(q), pad), -1, dtype=torch.long)], 1)
        return SearchResult(top_s, top_i)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `index.json` + `index.faiss` into `directory`, atomically."""
        faiss = _import_faiss()
        def fill(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            meta = {"format_version": INDEX_FORMAT_VERSION, "backend": "faiss", "kind": self.kind, "dim": self.dim,
                    "size": len(self), "params": self.params}
            (tmp / INDEX_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        write_atomic_folder(directory, fill)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FaissIndex":
        """Load a folder written by `save`, strictly."""
        faiss = _import_faiss()
        d = Path(directory)
        meta = _read_index_meta(d, "faiss")
        path = d / "index.faiss"
        if not path.is_file():
            raise ValueError(f"index folder {d} has no index.faiss; re-save the index with FaissIndex.save()")
        p = meta["params"]
        index = cls(meta["dim"], meta["kind"], p["nlist"], p["nprobe"], p["m"], p["ef_search"], p["ef_construction"])
        index.index = faiss.read_index(str(path))
        if meta["kind"] == "ivf":
            index._quantizer = None  # the read index owns its quantizer
            faiss.extract_index_ivf(index.index).nprobe = p["nprobe"]
        if index.index.d != meta["dim"] or len(index) != meta["size"]:
            raise ValueError(f"{path} holds {len(index)} vectors of dim {index.index.d}; index.json says "
                             f"{meta['size']} of dim {meta['dim']} — re-save the index")
        return index


def load_index(directory: str | os.PathLike) -> ExactIndex | FaissIndex:
    """Load whichever backend `directory` holds (its index.json names it)."""
    meta = _read_index_meta(Path(directory), None)
    backend = meta.get("backend")
    if backend == "exact":
        return ExactIndex.load(directory)
    if backend == "faiss":
        return FaissIndex.load(directory)
    raise ValueError(f"{directory}: unknown index backend {backend!r}; expected 'exact' or 'faiss'")


def build_index(embeddings: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None, backend: str = "exact",
                **kwargs: Any) -> ExactIndex | FaissIndex:
    """An index over embeddings (N, dim): backend "exact" (ExactIndex; kwargs: dtype, chunk_size)
    or "faiss" (FaissIndex; kwargs: kind, nlist, nprobe, m, ef_search)."""
    if backend == "exact":
        index: ExactIndex | FaissIndex = ExactIndex(embeddings.shape[1], **kwargs)
    elif backend == "faiss":
        index = FaissIndex(embeddings.shape[1], **kwargs)
    else:
        raise ValueError(f"unknown index backend {backend!r}; expected 'exact' or 'faiss'")
    index.add(embeddings, ids)
    return index


# ================================================================================ the bank's documents

BANK_FILE = "bank.safetensors"
INDEX_DIR = "index"


class DocumentBank:
    """The token ids of every bank entry, so that a retrieved id can be shown and prepended:
    entry i is document i of the training shard as the model reads it (text ids, and `<boi>`
    codes `<eoi>` per image, no `<bos>`/`<eos>`; pairs in caption→image order). Stored as two
    flat tensors in `bank.safetensors`: tokens int32 (T,) and offsets int64 (N + 1,)."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(tokens):
            raise ValueError(f"bank offsets must start at 0 and end at len(tokens)={len(tokens)}; found "
                             f"{offsets[:1].tolist()}..{offsets[-1:].tolist()}")
        self.tokens, self.offsets = tokens, offsets

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]]) -> "DocumentBank":
        lengths = torch.tensor([0] + [len(d) for d in documents], dtype=torch.long)
        flat = [t for d in documents for t in d]
        return cls(torch.tensor(flat, dtype=torch.int32), lengths.cumsum(0))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        if not 0 <= i < len(self):
            raise IndexError(f"bank entry {i} out of range [0, {len(self)})")
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])].tolist()

    def save(self, directory: str | os.PathLike) -> None:
        """Write `bank.safetensors` into `directory` (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{BANK_FILE}.tmp{os.getpid()}"
        save_file({"tokens": self.tokens.contiguous(), "offsets": self.offsets.contiguous()}, str(tmp),
                  metadata={"format": "document_bank"})
        os.replace(tmp, d / BANK_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DocumentBank":
        path = Path(directory) / BANK_FILE
        if not path.is_file():
            raise ValueError(f"{directory} has no {BANK_FILE} (the bank's documents); re-run `make tokenize`")
        t = load_file(str(path))
        if set(t) != {"tokens", "offsets"}:
            raise ValueError(f"{path} holds tensors {sorted(t)}; expected exactly ['offsets', 'tokens']")
        return cls(t["tokens"], t["offsets"])


class RetrievalBank(NamedTuple):
    """Everything retrieval needs at inference, loaded from one folder (`artifacts/retriever/`,
    copied into each checkpoint as `retriever/`): the encoder, the index over the bank's document
    embeddings (ids = bank entries), and the bank's documents."""

    retriever: Retriever
    index: "ExactIndex | FaissIndex"
    documents: DocumentBank

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RetrievalBank":
        """Load strictly: the retriever, `index/` and `bank.safetensors` must all be there and agree."""
        d = Path(directory)
        retriever = Retriever.from_pretrained(d)
        index = load_index(d / INDEX_DIR)
        documents = DocumentBank.load(d)
        if len(index) != len(documents) or index.dim != retriever.config.dim:
            raise ValueError(f"{d}: the index holds {len(index)} entries of dim {index.dim}, the bank {len(documents)} "
                             f"documents and the retriever embeds in dim {retriever.config.dim}; they come from "
                             "different `make tokenize` runs — re-run it")
        return cls(retriever, index, documents)

    @torch.no_grad()
    def search_documents(self, texts: Sequence[Sequence[Sequence[int]]], images: Sequence[Sequence[Image.Image] | torch.Tensor],
                         k: int) -> SearchResult:
        """The k bank entries closest to each query document, best first: queries embedded as the
        bank's documents are (`Retriever.embed_documents`: text, images, or both)."""
        if not 1 <= k <= 64:
            raise ValueError(f"k must be between 1 and 64, got {k}")
        return self.index.search(self.retriever.embed_documents(texts, images), min(k, len(self.index)))


__all__ = [
    "RetrieverConfig", "RETRIEVER_PRESETS", "retriever_preset", "Retriever", "clip_loss", "siglip_loss",
    "contrastive_loss", "SearchResult", "Index", "ExactIndex", "FaissIndex", "load_index", "build_index",
    "DocumentBank", "RetrievalBank",
]
