"""Training-step throughput of model.Transformer against Hugging Face LlamaForCausalLM, side by side.

A benchmark, not a test. Identical shapes for every variant (default preset dims, vocab ~4,600,
batch 16, seq 256): one step = forward + loss + backward + AdamW. Variants run interleaved, round
after round, so load from other processes on this shared machine hits all of them alike; the
median step time is reported. Model FLOPs/s are compared to the matmul rate measured at the
model's own GEMM shapes (forward and both backward products), in the precision training uses on
this machine: bf16 where it is native (AMX, AVX512-BF16; model.precision.bf16_pays), float32
elsewhere, where emulated bf16 is no contender. --precision overrides.

    .venv/bin/python bench/bench_train.py            # needs `pip install transformers` (the bench extra)
    .venv/bin/python bench/bench_train.py --no-hf    # ours only

Prints a table and merges the figures into bench/results.json under the "train" key.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import common  # noqa: F401,E402  (puts the project on sys.path)
from common import merge_results  # noqa: E402
from model import ModelConfig, Transformer, lm_loss, num_params, positions_from_doc_ids, preset  # noqa: E402
from model.transformer import masked_attention, query_blocks  # noqa: E402
from model.precision import bf16_pays  # noqa: E402


@dataclass
class Variant:
    """One contender: a step function (forward + loss + backward + optimizer step) and its timings."""

    name: str
    step: Callable[[], float]
    warmup: int = 1
    times: list[float] = field(default_factory=list)
    error: str | None = None
    tokens: int | None = None  # tokens per step when not the shared shape (the trainer-shape rows)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same AdamW for every variant (fused CPU kernel where this torch has it)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


def ours(config: ModelConfig, idx: torch.Tensor, targets: torch.Tensor, *, bf16: bool, compile: bool,
         doc_ids: torch.Tensor | None = None, masked_attention: bool = True,
         attention_blocks: int | None = None) -> Callable[[], float]:
    """Our training step; doc_ids: packed rows as the trainer feeds them (block-diagonal mask,
    positions restarting per document); masked_attention: False forces SDPA for packed rows;
    attention_blocks: masked_attention's causal query blocks (None: by row length; 1: the whole T×T square)."""
    torch.manual_seed(0)
    model = Transformer(config).train()
    for layer in model.layers:
        layer.attn.cpu_masked_attention = masked_attention
        layer.attn.attention_blocks = attention_blocks
    opt = make_optimizer(model)
    positions = positions_from_doc_ids(doc_ids) if doc_ids is not None else None

    def forward_loss(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(idx, doc_ids=doc_ids, positions=positions)
        return lm_loss(logits, targets, z_loss=config.z_loss).loss

    fn = torch.compile(forward_loss) if compile else forward_loss

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = fn(idx, targets)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def hf_llama(config: ModelConfig, idx: torch.Tensor, *, attn: str, bf16: bool, compile: bool,
             doc_ids: torch.Tensor | None = None) -> Callable[[], float]:
    """transformers' LlamaForCausalLM training step; doc_ids: packed rows, given to it as
    position_ids restarting per document, from which transformers builds the block-diagonal
    causal mask itself (`masking_utils.find_packed_sequence_indices`, its packed-training path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hf_config, attn_implementation=attn).train()
    opt = make_optimizer(model)
    forward = torch.compile(model) if compile else model
    extra = {} if doc_ids is None else {"position_ids": positions_from_doc_ids(doc_ids)}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=idx, labels=idx, **extra).loss  # labels are shifted inside
        loss.backward()
        opt.step()
        return loss.item()

    return step


def gemm_shapes(config: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul in one training step of one layer stack + head, forward and backward.

    Forward y = x·W (M=tokens, K=in, N=out); backward dX = dY·Wᵀ (M, N, K) and dW = Xᵀ·dY (K, M, N).
    """
    d, hd = config.dim, config.head_dim
    linears = [(d, (config.n_head + 2 * config.n_kv_head) * hd), (config.n_head * hd, d),
               (d, 2 * config.ffn_hidden), (config.ffn_hidden, d)] * config.n_layer
    linears.append((d, config.vocab_size))  # head
    shapes = []
    for k, n in linears:
        shapes += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]
    return shapes


def matmul_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = 3) -> float:
    """Achieved FLOP/s in `dtype` over the given (M, K, N) products (total flops / total best time)."""
    total_flops, total_time = 0.0, 0.0
    for m, k, n in sorted(set(shapes)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        count = shapes.count((m, k, n))
        total_flops += count * 2 * m * k * n
        total_time += count * best
    return total_flops / total_time


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_flops_per_step(config: ModelConfig, batch: int, seq: int) -> float:
    """6·N·tokens (N: parameters in matmuls, the embedding lookup excluded) plus causal attention:
    QKᵀ and AV are 2·2·T·dim flops per token forward at full T, half that causal, ×3 with backward."""
    n_matmul = num_params(config) - config.vocab_size * config.dim * (0 if config.tie_embeddings else 1)
    attention = 3 * config.n_layer * 2 * seq * config.dim  # per token: 6·n_layer·T·dim (causal)
    return batch * seq * (6 * n_matmul + attention)


def attention_paths(batch: int, n_head: int, head_dim: int, seqs: tuple[int, ...], dtype: torch.dtype,
                    repeats: int = 3) -> list[dict]:
    """Forward + backward time of one attention layer in `dtype` for each way to mask packed rows.

    The packing mask has ~4 documents per row. flex_attention is tried too; torch's CPU build has
    no flex backward (the error is recorded), which rules it out for training here.
    """
    import torch.nn.functional as F
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, n_head, seq, head_dim, generator=g, dtype=dtype).requires_grad_()
                   for _ in range(3))
        doc_ids = torch.sort(torch.randint(0, 4, (batch, seq), generator=g), dim=1).values
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        bool_mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
        additive = torch.zeros(bool_mask.shape, dtype=dtype).masked_fill(~bool_mask, float("-inf"))
        paths: dict[str, Callable[[], torch.Tensor]] = {
            "sdpa is_causal (one doc per row)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "sdpa bool packing mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
            "sdpa additive packing mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
        }
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            block_mask = create_block_mask(lambda b, h, qi, ki: (doc_ids[b, qi] == doc_ids[b, ki]) & (qi >= ki),
                                           batch, None, seq, seq, device="cpu")
            flex = torch.compile(flex_attention)
            paths["flex_attention compiled"] = lambda: flex(q, k, v, block_mask=block_mask)
            masked = torch.compile(masked_attention)
            paths[f"masked_attention compiled, {query_blocks(seq)} query blocks (ours)"] = lambda: masked(q, k, v, bool_mask)
            if query_blocks(seq) > 1:
                paths["masked_attention compiled, whole square"] = lambda: masked(q, k, v, bool_mask, 1)
        except Exception as e:  # older torch
            rows.append({"seq": seq, "path": "flex_attention compiled", "error": str(e).splitlines()[0][:160]})
        times: dict[str, list[float]] = {}
        for name, fn in paths.items():
            try:
                fn().sum().backward()
                times[name] = []
            except Exception as e:
                rows.append({"seq": seq, "path": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        for _ in range(repeats):  # interleaved
            for name in times:
                times[name].append(_timed(lambda: paths[name]().sum().backward()))
        for name, ts in times.items():
            rows.append({"seq": seq, "path": name, "fwd_bwd_ms": 1e3 * statistics.median(ts)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--vocab", type=int, default=1015, help="the default tokenizer's vocabulary (503 BPE + 512 codes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--packed-seq", type=int, default=512,
                        help="the trainer's row length for the packed-rows comparison (0 skips it)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face variants")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the contenders' precision (auto: bf16 where it is native on this CPU, else fp32)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    args = parser.parse_args()
    bf16 = bf16_pays("cpu") if args.precision == "auto" else args.precision == "bf16"
    prec, dtype = ("bf16", torch.bfloat16) if bf16 else ("fp32", torch.float32)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = preset(args.preset, vocab_size=args.vocab)
    tokens = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    variants = [Variant(f"ours {prec} eager", ours(config, idx, targets, bf16=bf16, compile=False))]
    if not args.no_compile:
        variants.append(Variant(f"ours {prec} compile", ours(config, idx, targets, bf16=bf16, compile=True), warmup=2))
    if bf16:  # the float32 reference
        variants.append(Variant("ours fp32 eager", ours(config, idx, targets, bf16=False, compile=False)))
    packed = bool(args.packed_seq and not args.no_compile)
    if packed:
        # the trainer's own shape: rows of packed documents (~80 tokens, as a caption and its 64
        # codes), compiled, our hand-written masked attention against SDPA with a boolean mask
        pg = torch.Generator().manual_seed(1)
        p_idx = torch.randint(0, args.vocab, (args.batch, args.packed_seq), generator=pg)
        p_docs = torch.cumsum((torch.rand(args.batch, args.packed_seq, generator=pg) < 1 / 80).long(), dim=1)
        # and masked_attention's causal query blocks against the whole T×T square
        for masked, blocks, path in ((True, None, f"masked_attention, {query_blocks(args.packed_seq)} query blocks"),
                                     (True, 1, "masked_attention, whole square"), (False, None, "SDPA")):
            variants.append(Variant(f"ours {prec} compile, packed rows of {args.packed_seq}, {path}",
                                    ours(config, p_idx, p_idx, bf16=bf16, compile=True, doc_ids=p_docs,
                                         masked_attention=masked, attention_blocks=blocks),
                                    warmup=2, tokens=args.batch * args.packed_seq))
    if not args.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            sys.exit("transformers is not installed: `.venv/bin/pip install transformers` (or pass --no-hf)")
        for attn in ("eager", "sdpa"):
            for half in sorted({False, bf16}):
                name = f"HF Llama {'bf16' if half else 'fp32'} {attn}"
                variants.append(Variant(name, hf_llama(config, idx, attn=attn, bf16=half, compile=False)))
        if not args.no_compile:
            variants.append(Variant(f"HF Llama {prec} sdpa compile",
                                    hf_llama(config, idx, attn="sdpa", bf16=bf16, compile=True), warmup=2))
        if packed:  # the same packed rows through transformers' own packed-sequence path
            variants.append(Variant(f"HF Llama {prec} sdpa compile, packed rows of {args.packed_seq}, position_ids",
                                    hf_llama(config, p_idx, attn="sdpa", bf16=bf16, compile=True, doc_ids=p_docs),
                                    warmup=2, tokens=args.batch * args.packed_seq))

    print(f"preset {args.preset}: dim {config.dim}, n_layer {config.n_layer}, n_head {config.n_head}, "
          f"ffn {config.ffn_hidden}, vocab {args.vocab}, {num_params(config) / 1e6:.2f} M params; "
          f"batch {args.batch} × seq {args.seq}, {args.threads} threads", flush=True)
    for v in variants:  # warm-up (and compilation) outside the timed rounds
        t = time.perf_counter()
        try:
            for _ in range(v.warmup):
                v.step()
        except Exception as e:  # a variant that fails (e.g. compile on this build) is reported, not fatal
            v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"  warm-up {v.name}: {time.perf_counter() - t:.1f} s" + (f" FAILED {v.error}" if v.error else ""),
              flush=True)
    for r in range(args.rounds):
        for v in variants:
            if v.error is None:
                for _ in range(args.steps):
                    v.times.append(_timed(v.step))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    attention_rows = attention_paths(args.batch, config.n_head, config.head_dim, (256, 512), dtype)
    flops = model_flops_per_step(config, args.batch, args.seq)
    rate = matmul_rate(gemm_shapes(config, tokens), dtype)
    rows = []
    for v in variants:
        if v.error is not None:
            rows.append({"name": v.name, "error": v.error})
            continue
        step_s = statistics.median(v.times)
        rows.append({"name": v.name, "step_s": step_s, "tokens_per_s": (v.tokens or tokens) / step_s,
                     "min_step_s": min(v.times), "steps": len(v.times), "shared_shape": v.tokens is None})
    ok = [r for r in rows if "error" not in r and r["shared_shape"]]
    ours_best = max((r for r in ok if r["name"].startswith("ours")), key=lambda r: r["tokens_per_s"])
    hf_rows = [r for r in ok if r["name"].startswith("HF")]
    hf_best = max(hf_rows, key=lambda r: r["tokens_per_s"]) if hf_rows else None
    mfu = flops / ours_best["step_s"] / rate

    print(f"\n{'variant':62s} {'step ms':>9s} {'tokens/s':>10s} {'vs HF best':>11s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:62s} {'failed':>9s}  {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / hf_best['tokens_per_s']:.2f}x" if hf_best and r["shared_shape"] else "-"
        print(f"{r['name']:62s} {r['step_s'] * 1e3:9.0f} {r['tokens_per_s']:10.0f} {ratio:>11s}")
    print(f"\nattention paths, one layer fwd+bwd {prec}, batch {args.batch}, {config.n_head} heads of {config.head_dim}:")
    for a in attention_rows:
        print(f"  T={a['seq']:4d} {a['path']:48s} " + (f"{a['fwd_bwd_ms']:7.1f} ms" if "error" not in a else a["error"]))
    print(f"\n{prec} matmul rate at the model's GEMM shapes: {rate / 1e12:.2f} TFLOP/s")
    print(f"model FLOPs per step {flops / 1e9:.1f} G; best ours ({ours_best['name']}) "
          f"{flops / ours_best['step_s'] / 1e12:.3f} TFLOP/s = {100 * mfu:.0f}% of the matmul rate (target >= 40%)")
    speedup = ours_best["tokens_per_s"] / hf_best["tokens_per_s"] if hf_best else None
    if speedup is not None:
        print(f"speed-up over HF's best ({hf_best['name']}): {speedup:.2f}x (target >= 1.5x)")
    # the trainer's own work: packed rows, each side's best way to keep attention inside documents
    packed_ok = [r for r in rows if "error" not in r and not r["shared_shape"]]
    ours_packed = max((r for r in packed_ok if r["name"].startswith("ours")), key=lambda r: r["tokens_per_s"], default=None)
    hf_packed = next((r for r in packed_ok if r["name"].startswith("HF")), None)
    speedup_packed = ours_packed["tokens_per_s"] / hf_packed["tokens_per_s"] if ours_packed and hf_packed else None
    if speedup_packed is not None:
        print(f"packed rows of {args.packed_seq} (the trainer's): {ours_packed['name']} against {hf_packed['name']}: "
              f"{speedup_packed:.2f}x")

    result = {
        "shapes": {"preset": args.preset, "dim": config.dim, "n_layer": config.n_layer, "n_head": config.n_head,
                   "ffn_hidden": config.ffn_hidden, "vocab_size": args.vocab, "batch": args.batch, "seq": args.seq,
                   "params": num_params(config)},
        "protocol": f"median of {args.rounds} interleaved rounds x {args.steps} steps after warm-up; "
                    "step = forward + loss + backward + fused AdamW",
        "variants": rows,
        "attention_paths": attention_rows,
        "precision": prec,
        "matmul_flops_per_s": rate,
        "model_flops_per_step": flops,
        "ours_best": ours_best["name"],
        "ours_share_of_matmul_rate": mfu,
        "hf_best": hf_best["name"] if hf_best else None,
        "speedup_vs_hf_best": speedup,
        "ours_packed_best": ours_packed["name"] if ours_packed else None,
        "hf_packed": hf_packed["name"] if hf_packed else None,
        "speedup_packed_vs_hf": speedup_packed,
    }
    merge_results("train", result, args.out)


if __name__ == "__main__":
    main()
