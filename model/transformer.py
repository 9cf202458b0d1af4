"""The decoder-only transformer of the early-fusion model: one token stream, text and image ids alike.

Blocks: RMSNorm, rotary position embeddings with explicit per-token positions, attention through
`F.scaled_dot_product_attention` with QK-norm, SwiGLU MLP. Two explicit modes (STYLE.md §6):

- training / scoring: `forward(idx, doc_ids=..., positions=...) -> logits`, then `lm_loss(...)`;
- cached decoding: `setup_caches(max_batch_size, max_seq_len)`, then `forward_cached(idx, input_pos)`.
  Prompts can be prefilled once and their cache repeated along the batch (`cache_state`,
  `load_cache_state`, `expand_cache`) for classifier-free guidance and Bayes-rule scoring.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from tokenizers_mm.special import BOI_ID, EOI_ID


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) · weight, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) of any float dtype -> same shape and dtype."""
        # float32 statistics: bf16 squares lose too much precision under autocast
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles pos·base^(-2i/head_dim) (Su et al. 2021), each (max_len, head_dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]) of every head by the angles of each token's position.

    x: (B, T, H, head_dim); cos, sin: (B or 1, T, 1, head_dim/2) float32 -> (B, T, H, head_dim), x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 where a packed document starts.

    doc_ids: (B, T), equal ids for the tokens of one document, documents contiguous.
    Returns (B, T) long, e.g. doc_ids [[0,0,0,1,1]] -> [[0,1,2,0,1]].
    """
    B, T = doc_ids.shape
    ar = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, ar, 0).cummax(dim=1).values  # index where each token's document starts
    return ar - first


def packing_mask(doc_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask for packed sequences: token i sees j iff j <= i and same document.

    doc_ids: (B, T) -> (B, 1, T, T) bool, True = may attend (the `attn_mask` of SDPA).

    A boolean mask (bench/bench_train.py, bf16 fwd+bwd, B=16, 4 heads of 64, CPU): SDPA with it costs
    about what is_causal does; an additive bf16 mask is within noise of it; flex_attention has no
    CPU backward in torch 2.13; CPU training reads it in masked_attention, which computes the T×T
    scores once and beats SDPA's tiled kernel at these lengths. Built once per forward, shared by
    all layers.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


@torch.library.custom_op("fusion_mm::packing_bias", mutates_args=(), schema="(Tensor doc_ids, ScalarType dtype) -> Tensor")
def packing_bias(doc_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """`packing_mask` as an additive mask: (B, 1, T, T) of dtype, 0 where a query may attend, −inf elsewhere.

    An opaque op, so that a compiled forward builds it once and every layer reads it: Inductor
    otherwise recomputes the mask from doc_ids inside each layer's attention kernels. Scaling and
    masking 16 × 4 × 256 × 512 bf16 scores took 4.8 ms from int64 doc_ids, 4.4 from a boolean
    mask, 1.1 with this (AMX Xeon, compiled, 2026-12-07); a compiled training step on 16 × 512
    packed rows 882 → 835 ms (medians of 10 interleaved rounds).
    """
    return torch.zeros((*doc_ids.shape, doc_ids.shape[1]), dtype=dtype, device=doc_ids.device).masked_fill_(
        ~packing_mask(doc_ids)[:, 0], float("-inf")).unsqueeze(1)


@packing_bias.register_fake
def _(doc_ids: Tensor, dtype: torch.dtype) -> Tensor:
    B, T = doc_ids.shape
    return doc_ids.new_empty((B, 1, T, T), dtype=dtype)


@torch.library.custom_op("fusion_mm::softmax", mutates_args=(), schema="(Tensor scores) -> Tensor")
def opaque_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim in scores' dtype by ATen's CPU kernel (float32 inside, one pass
    over each row), kept whole under torch.compile.

    Inductor decomposes a softmax into max, exp, sum and division and, on masked attention scores,
    wrote the exponentials of all rows in float32 before summing them. Measured on the AMX Xeon
    (bf16, 16 × 4 × 256 × 512 scores, 2 threads, 2026-12-07): Inductor's fused masked softmax
    22.3 ms, ATen's on bf16 scores 3.1 ms plus 4.0 for scaling and masking, with bitwise the same
    probabilities (the 1/√64 scale of 64-wide heads is exact in bf16; other widths round the scaled
    scores to bf16 once more). Whole compiled training steps, interleaved in one process: 16 × 512
    packed rows 940 → 897 and 957 → 923 ms, 16 × 256 426 → 408 ms.
    """
    return torch.softmax(scores, dim=-1)


@opaque_softmax.register_fake
def _(scores: Tensor) -> Tensor:
    return torch.empty_like(scores)


class _MaskedAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√d masked)·v with a hand-written backward: the CPU training path.

    Why (bench/bench_train.py, 2-core AMD EPYC with AVX512-BF16, bf16 autocast, 2026-12-06): one
    layer's forward + backward at batch 16, 4 heads of 64, takes 17 ms at T=256 and 86 ms at T=512
    against 35 and 115 ms for SDPA's CPU flash kernel with the same boolean mask; a whole compiled
    training step on the trainer's rows (16 × 512 packed documents) 1,844 against 2,069 ms. At these
    lengths the T×T scores fit in memory, so four batched matrix products (two forward; dq, dk, dv
    from the saved probabilities) beat the tiled kernel, which recomputes them. The scores and
    probabilities are kept in the inputs' dtype (bf16 under autocast); the softmax (`opaque_softmax`)
    and its gradient are computed in float32. GPUs and rows longer than MASKED_ATTENTION_MAX_LEN keep SDPA (memory-efficient kernels).

    Causal blocks: the queries are cut into `blocks` blocks and block i reads only the keys up to
    its own end, so the T×T scores above the diagonal blocks (all masked: the mask must be causal,
    as the packing and causal masks are) are never computed, exponentiated or stored: 2 blocks touch
    3/4 of the square, 4 blocks 10/16. Rows of 512 or more take blocks of 256 queries (`query_blocks`);
    shorter rows the whole square. Measured on the AMX Xeon, 2 threads, bf16, compiled (2026-12-07):
    a training step on 16 × 512 packed rows took 998 → 788 ms with 4 blocks of 128 in
    bench/bench_train.py (5 rounds), but `make train` gained only 2% (9,531-9,570 → 9,618-9,798
    tokens/s). Then (2026-12-07, 8 interleaved rounds in one process, twice) 1 / 2 / 4 blocks took
    881 / 822 / 848 and 836 / 769 / 793 ms a step, and the first step on a cold Inductor cache
    (compilation) 43.8 / 52.6 / 99.8 s: four blocks' backward fuses the four slices' key and value
    gradients with the RoPE and QK-norm backward into one ~4,000-line kernel. So 2 blocks of 256:
    ~50 s less to compile on a fresh machine and ~3% faster steps. At T=1024 one layer's forward +
    backward took 223 ms with 4 blocks, 215 with 8. A step on 16 × 256 rows took 329 ms with the
    whole square against 357 and 352 with 2 and 4 blocks, so shorter rows keep it. (One layer alone
    swings more between runs than whole steps.)
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, blocks: int) -> Tensor:
        scale = q.shape[-1] ** -0.5
        bounds = _block_bounds(q.shape[-2], blocks)
        outs, probs = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # queries [lo, hi) see keys [0, hi)
            scores = torch.matmul(q[..., lo:hi, :], k[..., :hi, :].transpose(-1, -2))
            # scaled and masked in one fused pass; the softmax in ATen's kernel (see opaque_softmax)
            if mask.dtype == torch.bool:
                p = opaque_softmax(torch.where(mask[..., lo:hi, :hi], scores * scale, float("-inf")).to(q.dtype))
            else:
                p = opaque_softmax((scores * scale + mask[..., lo:hi, :hi]).to(q.dtype))
            probs.append(p)
            outs.append(torch.matmul(p, v[..., :hi, :]))
        out = torch.cat(outs, dim=-2)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, *probs = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        bounds = _block_bounds(q.shape[-2], ctx.blocks)
        grad_out = grad_out.to(q.dtype)
        # softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)), and rowsum(dP ⊙ P) = rowsum(dO ⊙ O)
        row = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_q = []
        # keys and values collect a share from every query block at or after them: summed in float32 at least
        acc = torch.promote_types(k.dtype, torch.float32)
        grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        for lo, hi, p in zip(bounds[:-1], bounds[1:], probs):
            go = grad_out[..., lo:hi, :]
            grad_v[..., :hi, :] += torch.matmul(p.transpose(-1, -2), go)
            grad_probs = torch.matmul(go, v[..., :hi, :].transpose(-1, -2)).float()
            grad_scores = (p.float() * (grad_probs - row[..., lo:hi, :]) * scale).to(q.dtype)
            grad_q.append(torch.matmul(grad_scores, k[..., :hi, :]))
            grad_k[..., :hi, :] += torch.matmul(grad_scores.transpose(-1, -2), q[..., lo:hi, :])
        return torch.cat(grad_q, dim=-2), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


ATTENTION_BLOCKS_FROM = 512  # rows this long or longer take causal query blocks (see _MaskedAttention)
ATTENTION_QUERY_BLOCK = 256  # queries per block (2 blocks at T=512: see _MaskedAttention)


def query_blocks(T: int) -> int:
    """masked_attention's number of causal query blocks for rows of T tokens (see _MaskedAttention)."""
    return T // ATTENTION_QUERY_BLOCK if T >= ATTENTION_BLOCKS_FROM else 1


def _block_bounds(T: int, blocks: int) -> list[int]:
    """Bounds of the query blocks of masked_attention: [0, ..., T], blocks of (nearly) equal size."""
    n = max(1, min(blocks, T))
    return [T * i // n for i in range(n + 1)]


# beyond this many tokens a row's T×T probabilities (kept for the backward) grow too large: SDPA's
# tiled kernel takes over
MASKED_ATTENTION_MAX_LEN = 1024
DECODE_CACHE_BUCKET = 64  # compiled decoding rounds its cache length up to a multiple of this
DECODE_RECOMPILE_LIMIT = 64  # graphs per function dynamo keeps compiling before it falls back to eager


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per row, as products and sums that Inductor fuses into a few loops.

    q (B, H, 1, hd), k and v (B, H, L, hd), mask (B or 1, 1, 1, L) bool (True = may attend);
    returns (B, H, 1, hd), SDPA's result up to float32 summation order. For compiled decoding
    steps on the CPU: SDPA's CPU kernel costs ~30 µs a call even for one row of 4 heads against
    128 keys, and ~140 µs for 16 rows (AMX Xeon, bf16), a quarter of a step; there is too little
    work in one query to pay for its blocking. Eager, the (B, H, L, hd) products would be
    materialised: there SDPA stays.
    """
    scores = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # (B, H, L)
    probs = scores.masked_fill(~mask[:, :, 0], float("-inf")).softmax(-1)
    return (probs.unsqueeze(-1) * v.float()).sum(-2, keepdim=True).to(q.dtype)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, blocks: int | None = None) -> Tensor:
    """q, k, v (B, H, T, hd), mask (B or 1, 1, T, T) bool, True = may attend, or additive in the
    inputs' dtype (0 or −inf, `packing_bias`), causal (no query attends a later key) -> (B, H, T, hd).

    Equals `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` up to rounding (tests), for
    rows where every query sees at least one key. Under autocast the inputs are cast to its dtype,
    as SDPA's are. blocks: causal query blocks (1 = the whole T×T square; None = `query_blocks(T)`; see
    _MaskedAttention).
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _MaskedAttention.apply(q, k, v, mask, query_blocks(q.shape[-2]) if blocks is None else blocks)


def compile_inference(fn: Callable[..., Tensor], *, freeze: bool = True, autotune: bool = True,
                      cpp_wrapper: bool = True, keep_guards: tuple[str, ...] = ()) -> Callable[..., Tensor]:
    """`torch.compile` an inference function of fixed shapes (a decoding step), as fast as this
    CPU runs it. Call the result under torch.no_grad().

    freeze: Inductor's freezing folds the module's weights into the graph as constants, pre-packed
      for the CPU's matrix kernels (and, under bf16 autocast, cast once instead of at every step).
    autotune (with freeze): Inductor's max-autotune picks, for every matrix product, between
      oneDNN and its own C++ GEMM template (AMX / AVX-512 micro-kernels inlined into the graph).
      One-token steps multiply a handful of rows by each weight, where a oneDNN call costs
      ~20-30 µs whatever its size and the template's kernels a few µs (AMX Xeon, bf16, one
      256×768 weight: 1 row 46 → 16 µs, 16 rows 54 → 25 µs). It lengthens compilation by ~50%.
    cpp_wrapper: a C++ wrapper around the generated kernels instead of a Python one (CPU only): a
      step launches ~60 small kernels, and their Python glue was a third of a batch-1 step (2-core
      EPYC, bf16 weights: 2.55 → 1.8 ms a step; ~10 s more compilation).
    keep_guards (with freeze): names of module attributes that may be replaced between calls
      (KV caches), whose guards stay when the modules' other guards go (see below).
    """
    options: dict[str, Any] = {"cpp_wrapper": cpp_wrapper}
    if freeze and autotune:
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    if not freeze:
        return torch.compile(fn, dynamic=False, options=options)
    # Frozen, the weights are constants of the graph: Dynamo's ~700 guards on the modules (their
    # types, attributes, hooks, parameters) protect nothing a call could change, and checking them
    # took ~140 µs a step. The guards on the arguments (shapes, dtypes, constants) stay, and those
    # on the attributes named in keep_guards: frozen, a module's tensors are baked into the graph,
    # so a replaced cache must fail its identity guard and recompile, never be silently ignored.
    def guard_filter(entries: list) -> list[bool]:
        return [not e.orig_guard.source.is_unspecialized_nn_module() or any(k in e.name for k in keep_guards)
                for e in entries]

    options["guard_filter_fn"] = guard_filter
    compiled = torch.compile(fn, dynamic=False, options=options)
    config = torch._inductor.config

    def frozen(*args: Any, **kwargs: Any) -> Tensor:
        # Dynamo decides whether parameters become constants while it traces, from Inductor's
        # global flag: `torch.compile(options={"freezing": True})` reaches Inductor only after
        # tracing and so froze nothing (torch 2.13: every weight stayed a graph input, multiplied
        # by unpacked aten.mm). Set around each call, it also covers recompiles, and nothing else.
        before, config.freezing = config.freezing, True
        try:
            return compiled(*args, **kwargs)
        finally:
            config.freezing = before

    return frozen


class KVCache(nn.Module):
    """Keys and values of one attention layer for cached decoding, gpt-fast style.

    Buffers (max_batch_size, n_kv_head, max_seq_len, head_dim), not persistent: never in a
    checkpoint. A call with batch B uses rows [:B]; position p of every row lives at index p.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at positions input_pos (T,); return the first
        kv_len positions of rows [:B]: two (B, n_kv_head, kv_len, head_dim) tensors."""
        B = k.shape[0]
        self.k[:B, :, input_pos] = k.to(self.k.dtype)
        self.v[:B, :, input_pos] = v.to(self.v.dtype)
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]


@dataclass
class CacheState:
    """A snapshot of every layer's KV cache: rows [:batch_size], positions [:length].

    keys[i], values[i]: (batch_size, n_kv_head, length, head_dim) for layer i.
    """

    keys: list[Tensor]
    values: list[Tensor]
    ids: Tensor | None = None  # (batch_size, length) token ids, for a model with image_pos_emb

    def rows(self, index: Tensor | list[int]) -> "CacheState":
        """The snapshot of the given rows only."""
        return CacheState([k[index] for k in self.keys], [v[index] for v in self.values],
                          None if self.ids is None else self.ids[index])

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) causal self-attention with QK-norm and RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # one fused projection for q, k, v: one GEMM instead of three
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.dim, bias=False)
        # QK-norm (Chameleon §2.3): RMSNorm over head_dim, one weight shared by the heads
        self.q_norm: nn.Module = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None
        # rows trained on the CPU (packed or one causal sequence) take masked_attention (see
        # _MaskedAttention); False: always SDPA (bench/bench_train.py compares the two)
        self.cpu_masked_attention = True
        self.attention_blocks: int | None = None  # its causal query blocks (None: by row length; 1: the whole square)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, dim) -> q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd)."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, T, self.n_head, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd) -> (B, Tq, H·hd)."""
        if self.n_kv_head != self.n_head:  # grouped-query: each kv head serves n_head/n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout = self.dropout if self.training else 0.0
        T = q.shape[-2]
        if (self.cpu_masked_attention and q.device.type == "cpu" and q.requires_grad and dropout == 0.0
                and T <= MASKED_ATTENTION_MAX_LEN and (mask is not None or is_causal)):
            if mask is None:  # one causal sequence per row
                mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
            y = masked_attention(q, k, v, mask, self.attention_blocks)  # CPU training (see _MaskedAttention)
        elif T == 1 and mask is not None and q.device.type == "cpu" and torch.compiler.is_compiling():
            y = one_query_attention(q, k, v, mask)  # a compiled decoding step (see there)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        B, H, T, hd = y.shape
        return y.transpose(1, 2).reshape(B, T, H * hd)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """Training / scoring: x (B, T, dim) -> (B, T, dim).

        mask: (B, 1, T, T) bool packing mask (True = may attend), or None for a plain causal
        row, which takes SDPA's is_causal fast path.
        """
        q, k, v = self._qkv(x, cos, sin)
        y = self._attend(q, k, v, mask, is_causal=mask is None)
        return self.resid_drop(self.wo(y))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                       mask: Tensor, kv_len: int) -> Tensor:
        """Cached decoding: x (B, T, dim) at positions input_pos (T,); mask (T, kv_len) or
        (B, 1, T, kv_len) bool, True = may attend."""
        assert self.kv_cache is not None, "setup_caches() must run before forward_cached()"
        q, k, v = self._qkv(x, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v, kv_len)
        # never is_causal here: SDPA aligns it top-left when Tq < Tk (LIBS.md), so a one-token
        # step would only see key 0; the explicit mask is bottom-right aligned by construction
        y = self._attend(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal=False)
        return self.resid_drop(self.wo(y))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(x·w1) ⊙ x·w3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ffn_hidden = config.ffn_hidden
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_hidden, bias=False)  # fused gate and up: one GEMM
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        gate, up = self.w13(x).split(self.ffn_hidden, dim=-1)
        return self.resid_drop(self.w2(F.silu(gate) * up))


class Block(nn.Module):
    """One transformer block, pre-norm or Chameleon-34B re-ordered norm (config.norm_reorder)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_reorder = config.norm_reorder
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def _residual(self, x: Tensor, attn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_reorder:
            # Chameleon-34B / Swin-v2: normalise the branch outputs, not the inputs, so no block can
            # grow the residual stream without bound
            h = x + self.attn_norm(attn(x))
            return h + self.ffn_norm(self.mlp(h))
        h = x + attn(self.attn_norm(x))
        return h + self.mlp(self.ffn_norm(h))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """Training / scoring: (B, T, dim) -> (B, T, dim); see Attention.forward for mask."""
        return self._residual(x, lambda y: self.attn(y, cos, sin, mask))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                       mask: Tensor, kv_len: int) -> Tensor:
        """Cached decoding: (B, T, dim) -> (B, T, dim)."""
        return self._residual(x, lambda y: self.attn.forward_cached(y, cos, sin, input_pos, mask, kv_len))


class LossOutput(NamedTuple):
    """Result of `lm_loss`. Scalars; the per-modality sums are detached, for reporting."""

    loss: Tensor  # nll + z_loss: what to backpropagate
    nll: Tensor  # mean negative log-likelihood per target token (weighted mean when weights given)
    z_loss: Tensor  # the z-loss term already included in loss: z · mean(logsumexp²)
    num_targets: Tensor  # number of target tokens (sum of their weights when weights given)
    text_nll_sum: Tensor  # summed (unweighted) NLL of target tokens outside image_token_range
    text_count: Tensor  # number of those text targets
    image_nll_sum: Tensor  # summed (unweighted) NLL of target tokens inside image_token_range
    image_count: Tensor  # number of those image targets


def lm_loss(logits: Tensor, targets: Tensor, *, z_loss: float, ignore_index: int = -100,
            weights: Tensor | None = None, image_token_range: tuple[int, int] | None = None) -> LossOutput:
    """Next-token cross-entropy normalised by the number of target tokens, plus z-loss.

    logits: (B, T, V) of any float dtype; log-softmax runs in float32 even under bf16 autocast.
    targets: (B, T) long; positions equal to ignore_index (padding) are never targets.
    weights: (B, T) float per-token weights or None; the loss is then sum(w·nll) / sum(w).
    z_loss: coefficient of z · mean(logsumexp(logits)²) (PaLM; Chameleon uses 1e-5), averaged
      with the same weights as the NLL.
    image_token_range: [lo, hi) ids of image codes: targets inside count as image, others as text;
      None counts every target as text. A target counts for the modality sums iff it is not
      ignore_index and its weight (if any) is > 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}: "
                         "expected logits (B, T, V) and targets (B, T)")
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    nll = lse - logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if weights is None:
        w = valid.float()
    else:
        if weights.shape != targets.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must have the shape of targets {tuple(targets.shape)}")
        w = weights.float() * valid
    num_targets = w.sum()
    denom = torch.where(num_targets > 0, num_targets, torch.ones_like(num_targets))  # no 0/0 on an empty batch
    mean_nll = (nll * w).sum() / denom
    z_term = z_loss * (lse.pow(2) * w).sum() / denom

    with torch.no_grad():
        counted = valid & (w > 0)
        if image_token_range is None:
            is_image = torch.zeros_like(counted)
        else:
            lo, hi = image_token_range
            is_image = (targets >= lo) & (targets < hi)
        image = counted & is_image
        text = counted & ~is_image
        nll_d = nll.detach()
        text_nll_sum, image_nll_sum = (nll_d * text).sum(), (nll_d * image).sum()
        text_count, image_count = text.sum(), image.sum()
    return LossOutput(mean_nll + z_term, mean_nll, z_term, num_targets,
                      text_nll_sum, text_count, image_nll_sum, image_count)


def image_positions(idx: Tensor, n: int) -> Tensor | None:
    """Each token's place in its image: (B, T) long, j for the j-th code after the last <boi>
    (0 <= j < n), -1 outside images (<boi> and <eoi> included). None when n == 0. Packed rows need
    no separation: a document ends in text. Cached decoding scans the ids cached so far."""
    if not n:
        return None
    T = idx.shape[1]
    t = torch.arange(T, device=idx.device)
    boi, marker = idx == BOI_ID, (idx == BOI_ID) | (idx == EOI_ID)
    last = torch.where(marker, t, -1).cummax(-1).values  # the latest marker at or before each token
    in_chunk = boi.gather(1, last.clamp(min=0)) & (last >= 0)
    pos = torch.where(in_chunk, t - last - 1, -1)
    return torch.where((pos >= 0) & (pos < n), pos, -1)


class Transformer(nn.Module):
    """Decoder-only transformer over the unified token vocabulary (see module docstring for modes)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # float32 on this CPU runs 4x slower once weights or activations become denormal (LIBS.md);
        # flushing them to zero changes no result that matters and is a no-op on GPUs
        torch.set_flush_denormal(True)
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.img_pos_emb = nn.Embedding(config.image_pos_emb, config.dim) if config.image_pos_emb else None
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_base)
        # derived tables: not persistent, so never in a checkpoint
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._cache_shape: tuple[int, int] | None = None  # (max_batch_size, max_seq_len) once set up
        # with image_pos_emb: the ids written into the cache, from which a new token's place in its
        # image follows (a plain attribute, like the KV caches: never in a state_dict)
        self._cached_ids: Tensor | None = None
        self._compiled_step: Callable[..., Tensor] | None = None  # see compile_decoding()
        # compiled decoding's KV caches (and ids), kept per (batch, length, dtype, device): see setup_caches
        self._cache_pool: dict[tuple, tuple[list[KVCache], Tensor | None]] = {}
        self._compiled_scoring: Callable[..., Tensor] | None = None  # see compile_scoring()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; residual output projections (attn.wo, mlp.w2) get
        init_std/sqrt(2·n_layer) so the residual stream's variance does not grow with depth (GPT-2)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attn.wo.weight, mean=0.0, std=resid_std)
            nn.init.normal_(layer.mlp.w2.weight, mean=0.0, std=resid_std)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B or 1, T) long -> cos, sin (B or 1, T, 1, head_dim/2)."""
        return self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2)

    def forward(self, idx: Tensor, *, doc_ids: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """Training / scoring forward pass.

        idx: (B, T) long token ids, T <= block_size.
        doc_ids: (B, T) packed-document ids; attention never crosses documents (block-diagonal
          causal mask). None: each row is one causal sequence (SDPA's is_causal fast path; CPU
          training reads a causal additive mask).
        positions: (B, T) long RoPE positions, e.g. `positions_from_doc_ids(doc_ids)` so packed
          documents restart at 0. None: arange(T) for every row.
        Returns logits (B, T, vocab_size).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}: "
                             "crop the input or build the model with a larger block_size")
        if positions is None:
            positions = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        elif positions.shape != idx.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must have the shape of idx {tuple(idx.shape)}")
        # CPU training takes masked_attention, which reads an additive mask built once (packing_bias)
        cpu_training = idx.device.type == "cpu" and torch.is_grad_enabled() and T <= MASKED_ATTENTION_MAX_LEN
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else self.tok_emb.weight.dtype
        mask = None
        if doc_ids is not None:
            if doc_ids.shape != idx.shape:
                raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of idx {tuple(idx.shape)}")
            mask = packing_bias(doc_ids, dtype) if cpu_training else packing_mask(doc_ids)
        elif cpu_training:  # one causal document per row (16 × 256 rows: 389 → 373 ms a compiled step)
            mask = packing_bias(torch.zeros(1, T, dtype=torch.long, device=idx.device), dtype)
        cos, sin = self._rope(positions)
        x = self._embed(idx, image_positions(idx, self.config.image_pos_emb))  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.head(self.norm(x))  # (B, T, vocab_size)

    def _embed(self, idx: Tensor, image_pos: Tensor | None) -> Tensor:
        """Token embeddings, plus the image-position embedding of codes where the model has one."""
        x = self.tok_emb(idx)
        if self.img_pos_emb is None or image_pos is None:
            return x
        inside = image_pos >= 0
        return x + self.img_pos_emb(image_pos.clamp(min=0)) * inside.unsqueeze(-1).to(x.dtype)

    # ---- cached decoding -------------------------------------------------------------------

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32) -> None:
        """Allocate a KV cache per layer for up to max_batch_size rows and max_seq_len positions.

        Replaces any previous caches of another shape. dtype: storage dtype (bfloat16 halves memory; keys and
        values are cast to the query dtype when attended).
        """
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds block_size={self.config.block_size}: "
                             "RoPE tables only cover block_size positions")
        if max_batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"max_batch_size and max_seq_len must be positive, got {max_batch_size}, {max_seq_len}")
        device = self.tok_emb.weight.device
        first = self.layers[0].attn.kv_cache
        if (self._cache_shape == (max_batch_size, max_seq_len) and first is not None and first.k.dtype == dtype
                and first.k.device == device):
            return  # same shape: keep the buffers (a compiled decode step stays valid; stale rows are never read)
        key = (max_batch_size, max_seq_len, dtype, device)
        if key in self._cache_pool:
            caches, ids = self._cache_pool[key]
        else:
            caches = [KVCache(max_batch_size, max_seq_len, self.config.n_kv_head, self.config.head_dim, dtype, device)
                      for _ in self.layers]
            ids = torch.zeros(max_batch_size, max_seq_len, dtype=torch.long, device=device) \
                if self.img_pos_emb is not None else None
            if self.decoding_compiled:
                # a frozen compiled step guards the identity of the cache tensors it was traced
                # with (Dynamo treats module tensors as constants when freezing): new ones of the
                # same shape would recompile it (~15-30 s) at every generation. So compiled
                # decoding keeps one set of caches per shape and reuses it.
                self._cache_pool[key] = (caches, ids)
        for layer, cache in zip(self.layers, caches):
            layer.attn.kv_cache = cache
        self._cached_ids = ids
        self._cache_shape = (max_batch_size, max_seq_len)

    def clear_caches(self) -> None:
        """Free the KV caches; forward_cached raises until setup_caches runs again."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self._cached_ids = None
        self._cache_shape = None

    def _require_caches(self) -> tuple[int, int]:
        if self._cache_shape is None:
            raise ValueError("no KV cache: call model.setup_caches(max_batch_size, max_seq_len) first")
        return self._cache_shape

    def forward_cached(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor | None = None, *,
                       float32_head: bool = False) -> Tensor:
        """Cached decoding step (prefill when T > 1, one token when T == 1).

        idx: (B, T) long, B <= max_batch_size; input_pos: (T,) long positions of these tokens, the
        same for every row. Writes their keys/values into the cache at input_pos and attends
        causally to every cached position <= each token's own (positions beyond max(input_pos)
        are never read, so stale rows from earlier prompts are harmless). Returns logits (B, T, V).
        One host sync (max(input_pos)) bounds attention to the filled prefix. Inference only: call
        it under torch.no_grad() or torch.inference_mode() (the cache is written in place).
        key_valid: optional (B, >= kv_len) bool, False for cache positions no query may see (the
          left padding of prompts of different lengths batched together). With rotary positions
          only relative distances enter attention, so a left-padded row attends as it would alone.
        float32_head: compute the output head in float32 even under bf16 autocast. For scoring
          (sample/classify.py): the head is ~4% of the FLOPs, and on the default model it halves
          the bf16 error of a 64-code image log-likelihood (mean |Δ| vs float32 0.108 → 0.059 nats).
        """
        return self._cached(idx, input_pos, key_valid, self._check_cached(idx, input_pos, key_valid), float32_head)

    def _check_cached(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor | None) -> int:
        """Validate a forward_cached call; returns kv_len (one host sync)."""
        max_batch, max_len = self._require_caches()
        B, T = idx.shape
        if B > max_batch:
            raise ValueError(f"batch {B} exceeds the cache's max_batch_size={max_batch}: call setup_caches again")
        if input_pos.shape != (T,):
            raise ValueError(f"input_pos must have shape ({T},) for idx of shape {tuple(idx.shape)}, "
                             f"got {tuple(input_pos.shape)}")
        kv_len = int(input_pos.max()) + 1
        if kv_len > max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the cache's max_seq_len={max_len}")
        if key_valid is not None and (key_valid.shape[0] != B or key_valid.shape[1] < kv_len):
            raise ValueError(f"key_valid must be (B={B}, >= {kv_len}), got {tuple(key_valid.shape)}")
        return kv_len

    def _cached(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor | None, kv_len: int,
                float32_head: bool) -> Tensor:
        """The body of forward_cached after its checks and host sync (what compile_scoring compiles)."""
        # bottom-right aligned causal mask: query at position p sees cached keys 0..p
        mask = torch.arange(kv_len, device=idx.device)[None, :] <= input_pos[:, None]  # (T, kv_len)
        if key_valid is not None:
            mask = mask[None, None] & key_valid[:, None, None, :kv_len]  # (B, 1, T, kv_len)
        cos, sin = self._rope(input_pos.unsqueeze(0))
        x = self._embed(idx, self._cached_image_positions(idx, input_pos, kv_len))
        for layer in self.layers:
            x = layer.forward_cached(x, cos, sin, input_pos, mask, kv_len)
        if float32_head:
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(self.norm(x.float()), self.head.weight.float())
        return self.head(self.norm(x))

    def _cached_image_positions(self, idx: Tensor, input_pos: Tensor, kv_len: int) -> Tensor | None:
        """Write idx into the id cache at input_pos and return its tokens' image positions, read
        off the ids cached so far (positions past input_pos do not enter: the scan is causal)."""
        if self._cached_ids is None:
            return None
        ids = self._cached_ids[: idx.shape[0]]
        ids.index_copy_(1, input_pos, idx)
        return image_positions(ids[:, :kv_len], self.config.image_pos_emb).index_select(1, input_pos)

    def decode_step(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor,
                    then: Callable[..., Tensor] | None = None, then_args: tuple = ()) -> Tensor | tuple[Tensor, Tensor]:
        """One new token per row with static shapes: the decoding step `torch.compile` can fuse.

        idx: (B, 1) long; input_pos: (1,) long, the position written; key_valid: (B, max_seq_len)
        bool as in forward_cached. (B, T) ids at T positions work too (a compiled prefill). Unlike
        forward_cached it attends to the whole cache (keys past input_pos masked out) instead of
        slicing the filled prefix, so every step has the same shapes and no host sync: one compiled
        graph serves a whole generation (gpt-fast's design). Equals forward_cached up to float
        summation order. Returns logits (B, T, V).
        then: a function of the logits (B, V) and then_args, e.g. a sampler's draw, computed in the
        same graph when compiled (no eager kernels between steps); the step then returns
        (logits, then(logits, *then_args)).
        """
        _, max_len = self._require_caches()
        mask = (torch.arange(max_len, device=idx.device) <= input_pos[:, None])[None, None]  # (1, 1, T, max_len)
        mask = mask & key_valid[:, None, None, :max_len]  # (B, 1, T, max_len)
        cos, sin = self._rope(input_pos.unsqueeze(0))
        x = self._embed(idx, self._cached_image_positions(idx, input_pos, max_len))
        for layer in self.layers:
            x = layer.forward_cached(x, cos, sin, input_pos, mask, max_len)
        logits = self.head(self.norm(x))
        return logits if then is None else (logits, then(logits[:, -1], *then_args))

    def compile_decoding(self, enable: bool = True, freeze: bool = True, autotune: bool = True) -> None:
        """Use a `torch.compile`d `decode_step` in the samplers (sample/generate.py).

        Pays about 40-55 s of compilation on this CPU per (batch, cache length) shape (the step and,
        through generate_ids, the prefill), then
        decodes faster (bench/bench_sample.py); worth it for long or repeated generation
        (evaluations, benchmarks, a demo server), not for one image from the CLI.

        freeze, autotune: see `compile_inference`. Frozen, the weights are captured at the first
        call: after loading new ones, call compile_decoding() again.
        """
        # one graph per (batch, cache length); every Transformer shares decode_step's code, so a
        # process that decodes a few batch sizes with float32 and bf16 copies passes dynamo's default
        # of 8 graphs per function, past which it silently runs eager (seen in bench runs)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
        self._cache_pool = {}
        self.clear_caches()  # so that the step only ever sees pooled caches (setup_caches)
        self._compiled_step = compile_inference(self.decode_step, freeze=freeze, autotune=autotune,
                                                cpp_wrapper=self.tok_emb.weight.device.type == "cpu",
                                                keep_guards=("kv_cache", "_cached_ids")) if enable else None

    def decoding_cache_len(self, needed: int) -> int:
        """The KV cache length a sampler should allocate to decode `needed` positions.

        Eager decoding: exactly `needed`. Compiled (compile_decoding()): rounded up to a multiple of
        DECODE_CACHE_BUCKET within block_size, because a compiled step is specialised to its cache
        length: without buckets every new prompt length compiled a new graph (20-60 s on a 2-core
        CPU) and after 8 of them decoding fell back to eager. The extra slots are masked out.
        """
        if not self.decoding_compiled or needed >= self.config.block_size:
            return needed
        return min(-(-needed // DECODE_CACHE_BUCKET) * DECODE_CACHE_BUCKET, self.config.block_size)

    def decoding_copy(self, dtype: torch.dtype) -> "Transformer":
        """A copy of this model with its weights stored in `dtype`, for sampling (sample/api.py).

        One-token decoding reads every weight at every step, so on a CPU it is bound by how many
        bytes the weights take: a bf16 copy halves them. Default preset, 2-core AMD EPYC with
        AVX512-BF16, the compiled decode step alone: 4.1 → 2.2 ms at batch 1 and 7.4 → 5.5 ms at
        batch 16 against float32 weights, where bf16 autocast over float32 weights (casting them at
        every step) was slower than float32. The rotary tables stay float32 (bf16 would blur the
        angles of far positions); the norms compute in float32 anyway. Samplers use the copy's own
        KV cache in its dtype. The copy is independent: it shares no tensor with this model.
        Without native bf16 (2-core AMD EPYC with AVX2 only, compiled step, 2026-12-06) bf16 weights
        still pay at small batches, where the step waits on memory (the float32 weights, 35 MB, do
        not fit the 32 MB L3; the bf16 ones do): 3.79 → 2.13 ms at batch 1, 5.34 → 2.71 at 2, 7.48
        → 5.15 at 4, but 8.0 → 10.2 ms at 8 rows, where emulated bf16 arithmetic costs more than
        the bytes saved; eager, they gain nothing at batch 1 (9.5 vs 10.1 ms). So "auto" keeps
        float32 there (sample/api.py), and `precision="bf16"` is the choice for compiled decoding
        of one or two images at a time.
        """
        twin = copy.deepcopy(self)
        twin.clear_caches()
        twin._compiled_step = twin._compiled_scoring = None
        twin._cache_pool = {}
        twin.to(dtype)
        twin.rope_cos, twin.rope_sin = self.rope_cos.clone(), self.rope_sin.clone()
        return twin.eval()

    def step(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor,
             then: Callable[..., Tensor] | None = None, then_args: tuple = ()) -> Tensor | tuple[Tensor, Tensor]:
        """The decoding step the samplers call: `decode_step`, compiled if `compile_decoding()` ran."""
        fn = self._compiled_step or self.decode_step
        return fn(idx, input_pos, key_valid, then, then_args)

    @property
    def decoding_compiled(self) -> bool:
        """Whether compile_decoding() is on."""
        return self._compiled_step is not None

    def compile_scoring(self, enable: bool = True) -> None:
        """Use a `torch.compile`d `forward_cached` in `score_forward` (sample/classify.py).

        Scoring pushes many rows of many tokens through the cache at once; in eager mode the
        norms, rotary embedding, SwiGLU and bf16 casts around the matrix products took ~60% of
        the time (profile, default model, AMX Xeon). Compiled with dynamic shapes, one graph per
        precision serves every (rows, length): 120 digits × 10 classes, log p(x|c), bf16
        autocast: 3.4 s eager → 1.9 s, after ~50 s of compilation (same run). Worth it for
        hundreds of images (evaluations, benchmarks, a server), not for a few from the CLI.
        The weights are read at every call (no freezing), so loading new ones needs no recompile.
        """
        self._compiled_scoring = torch.compile(self._cached, dynamic=True) if enable else None

    def score_forward(self, idx: Tensor, input_pos: Tensor, key_valid: Tensor | None = None, *,
                      float32_head: bool = False) -> Tensor:
        """`forward_cached` for scoring: compiled if `compile_scoring()` ran."""
        kv_len = self._check_cached(idx, input_pos, key_valid)  # eager: its host sync would break the graph
        return (self._compiled_scoring or self._cached)(idx, input_pos, key_valid, kv_len, float32_head)

    def cache_state(self, batch_size: int, length: int) -> CacheState:
        """Copy rows [:batch_size], positions [:length] of every layer's cache (e.g. after a prefill)."""
        max_batch, max_len = self._require_caches()
        if batch_size > max_batch or length > max_len:
            raise ValueError(f"cache_state({batch_size}, {length}) exceeds the cache ({max_batch}, {max_len})")
        keys, values = [], []
        for layer in self.layers:
            cache = layer.attn.kv_cache
            keys.append(cache.k[:batch_size, :, :length].clone())
            values.append(cache.v[:batch_size, :, :length].clone())
        ids = None if self._cached_ids is None else self._cached_ids[:batch_size, :length].clone()
        return CacheState(keys, values, ids)

    @torch.no_grad()
    def load_cache_state(self, state: CacheState, repeats: int = 1) -> None:
        """Write a snapshot back, each of its rows repeated `repeats` times along the batch
        (repeat_interleave: new row j holds snapshot row j // repeats).

        Typical use: prefill C prompts (batch C), `s = cache_state(C, prompt_len)`, then for each
        chunk of N continuations `load_cache_state(s, repeats=N)` and decode a batch of C·N from
        position prompt_len on; rows [n·N, (n+1)·N) continue prompt n (classifier-free guidance:
        C=2 with [cond, uncond]; Bayes scoring: one class prompt per c, N images each).
        """
        max_batch, max_len = self._require_caches()
        rows = state.batch_size * repeats
        if rows > max_batch or state.length > max_len:
            raise ValueError(f"{state.batch_size} rows × {repeats} repeats at length {state.length} do not "
                             f"fit the cache ({max_batch}, {max_len}): call setup_caches with a larger size")
        for layer, k, v in zip(self.layers, state.keys, state.values):
            cache = layer.attn.kv_cache
            cache.k[:rows, :, :state.length] = k.repeat_interleave(repeats, dim=0)
            cache.v[:rows, :, :state.length] = v.repeat_interleave(repeats, dim=0)
        if self._cached_ids is not None:
            if state.ids is None:
                raise ValueError("this model embeds image positions, and the cache snapshot carries no token ids")
            self._cached_ids[:rows, :state.length] = state.ids.repeat_interleave(repeats, dim=0)

    def expand_cache(self, batch_size: int, repeats: int, length: int | None = None) -> None:
        """In place: repeat cache rows [:batch_size] `repeats` times along the batch
        (repeat_interleave), over positions [:length] (default: the whole cache)."""
        _, max_len = self._require_caches()
        self.load_cache_state(self.cache_state(batch_size, max_len if length is None else length), repeats)
