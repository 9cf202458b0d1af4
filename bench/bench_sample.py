"""Image generation speed: our KV-cached, modality-constrained sampler against the same model
without a KV cache and against Hugging Face `LlamaForCausalLM.generate()` of the same dimensions.

A benchmark, not a test. Each contender draws one image (grid² codes + <eoi>) per row after a
short caption prompt, at batch 1 and batch 16, timed interleaved. Random weights (speed does not
depend on them); float32, bf16 autocast and weights stored in bf16 tried for every contender; the
best of each is compared. Two tasks: plain sampling, and text→image as the product draws it, with classifier-free
guidance (scale 3, the unconditional stream's prompt `<bos> <boi>`): ours batches both streams
into one forward pass; transformers' `generate(guidance_scale=..., negative_prompt_ids=...)`, its
documented way to guide a decoder-only model, runs the unconditional stream as a second forward.

    .venv/bin/python bench/bench_sample.py [--no-hf] [--no-compile]     # HF needs transformers (bench extra)
"""
from __future__ import annotations

import argparse
import contextlib

import torch

import common  # noqa: F401  (puts the project on sys.path)
from common import interleaved, merge_results
from model import Transformer, preset
from model.transformer import compile_inference
from sample import logits as L
from tokenizers_mm import special

UNCOND = [special.BOS_ID, special.BOI_ID]  # the guidance stream's prompt: the caption dropped, as in training
GUIDANCE = 3.0  # the text→image default of `make eval` and the demo
# each precision every contender tries: its name in the rows, bf16 autocast, weight dtype
PRECISIONS = {"fp32": ("fp32", False, torch.float32), "bf16": ("bf16", True, torch.float32),
              "bf16w": ("bf16 weights", False, torch.bfloat16)}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def ours_cached(model: Transformer, prompt: torch.Tensor, new: int, text_vocab: int, bf16: bool,
                guidance: float = 1.0):
    """Our sampler's inner loop (generate_ids without the Python bookkeeping of callbacks)."""
    from sample.generate import SamplingConfig, generate_ids

    class Tok:  # the few tokenizer facts generate_ids reads
        image_tokens = new - 1
        text_vocab_size = text_vocab
        vocab_size = model.config.vocab_size
        image_offset = text_vocab

    prompts = prompt.tolist()
    uncond = [UNCOND] * len(prompts) if guidance != 1.0 else None

    def run():
        with autocast(bf16):
            return generate_ids(model, Tok, prompts, max_new_tokens=new, sampling=SamplingConfig(guidance=guidance),
                                uncond_prompts=uncond, stop_after_images=1, seed=0)
    return run


def ours_uncached(model: Transformer, prompt: torch.Tensor, new: int, text_vocab: int, bf16: bool):
    """The same constrained sampling, recomputing the whole sequence every step (no KV cache)."""
    def run():
        ids = prompt.clone()
        g = torch.Generator().manual_seed(0)
        B = ids.shape[0]
        image_pos = torch.zeros(B, dtype=torch.long)
        with torch.no_grad(), autocast(bf16):
            for t in range(new):
                logits = model(ids)[:, -1].float()
                mask = L.allowed_tokens(image_pos, torch.full((B,), new - t), text_vocab_size=text_vocab,
                                        vocab_size=model.config.vocab_size, image_tokens=new - 1)
                tok = L.sample_token(L.apply_mask(logits, mask), 1.0, g)
                image_pos += 1
                ids = torch.cat([ids, tok[:, None]], dim=1)
        return ids
    return run


def compiled_copy(model: Transformer) -> Transformer:
    """The same weights with `compile_decoding()` on (compilation is paid in the warm-up call)."""
    import copy

    twin = copy.deepcopy(model)
    twin.compile_decoding()
    return twin


def hf_generate(model: Transformer, prompt: torch.Tensor, new: int, bf16: bool, compiled: bool = False,
                frozen: bool = False, guidance: float = 1.0, dtype: torch.dtype = torch.float32):
    """transformers' generate() on a LlamaForCausalLM of the same dimensions. frozen: compiled as our
    compile_decoding() compiles (`compile_inference`: Inductor freezing, max-autotune's GEMM template
    and the C++ wrapper), so that the comparison is between the decoding loops, not between
    compiler settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, attn_implementation="sdpa")).eval().to(dtype)
    if compiled:  # transformers' documented fast path: a static KV cache and a compiled forward
        hf.generation_config.cache_implementation = "static"
        hf.forward = compile_inference(hf.forward) if frozen else torch.compile(hf.forward, dynamic=False)

    guide = {} if guidance == 1.0 else {"guidance_scale": guidance,
                                         "negative_prompt_ids": torch.tensor([UNCOND] * len(prompt))}

    def run():
        with torch.no_grad(), autocast(bf16):
            return hf.generate(prompt, do_sample=True, max_new_tokens=new, min_new_tokens=new, top_k=0,
                               pad_token_id=special.PAD_ID, eos_token_id=None, **guide)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--vocab", type=int, default=1015, help="vocabulary (the default tokenizer's is ~1,015)")
    p.add_argument("--grid", type=int, default=8, help="image codes per side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    # a whole run compiles ~40 graphs (45-60 min on a 2-core CPU); these pick a subset
    p.add_argument("--tasks", default="plain,guided", help="comma-separated subset of: plain, guided")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help=f"comma-separated subset of: {', '.join(PRECISIONS)} (every contender runs each)")
    args = p.parse_args()
    tasks = _subset(p, "--tasks", args.tasks, {"plain": 1.0, "guided": GUIDANCE})
    picked = _subset(p, "--precisions", args.precisions, PRECISIONS)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        p.error(f"--batches must be positive, got {args.batches!r}")
    # every contender's compiled graphs (batch 1 and 16, float32 and bf16, prefill and decode,
    # HF with and without freezing) must stay compiled: past the default limit of 8 graphs per
    # function, torch.compile silently falls back to eager
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 2048
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=args.vocab, block_size=max(128, args.grid ** 2 + 32))).eval()
    # three precisions for every contender: float32; bf16 autocast over float32 weights; weights stored
    # in bf16 (ours: Transformer.decoding_copy, what sample/api.py decodes with where bf16 is native;
    # transformers: the model cast with .to(bfloat16), its documented torch_dtype=bfloat16)
    precisions = {tag: (bf16, dtype) for tag, bf16, dtype in picked.values()}
    dtypes = {dtype for _, dtype in precisions.values()}
    weights = {dt: model if dt == torch.float32 else model.decoding_copy(dt) for dt in dtypes}
    compiled = {} if args.no_compile else {dt: compiled_copy(m) for dt, m in weights.items()}
    text_vocab = args.vocab - 512
    new = args.grid * args.grid + 1
    rows, failures = [], {}
    for guidance in tasks.values():
        task = "plain" if guidance == 1.0 else f"guidance {guidance:g}"
        for batch in batches:
            prompt = torch.cat([torch.tensor([[special.BOS_ID]]), torch.randint(9, text_vocab, (1, 8)),
                                torch.tensor([[special.BOI_ID]])], dim=1).repeat(batch, 1)
            fns = {}
            for tag, (bf16, dtype) in precisions.items():
                fns[f"ours cached {tag}"] = ours_cached(weights[dtype], prompt, new, text_vocab, bf16, guidance)
                if not args.no_compile:
                    fns[f"ours cached compiled {tag}"] = ours_cached(compiled[dtype], prompt, new, text_vocab, bf16, guidance)
                if guidance == 1.0:  # the no-cache reference loop has no guidance stream
                    fns[f"ours uncached {tag}"] = ours_uncached(weights[dtype], prompt, new, text_vocab, bf16)
                if not args.no_hf:
                    fns[f"HF generate {tag}"] = hf_generate(model, prompt, new, bf16, guidance=guidance, dtype=dtype)
                    if not args.no_compile:
                        fns[f"HF generate static compiled {tag}"] = hf_generate(model, prompt, new, bf16, compiled=True,
                                                                                guidance=guidance, dtype=dtype)
                        fns[f"HF generate static compiled frozen {tag}"] = hf_generate(
                            model, prompt, new, bf16, compiled=True, frozen=True, guidance=guidance, dtype=dtype)
            fns = {name: fn for name, fn in fns.items() if _works(f"{task}, batch {batch}: {name}", fn, failures)}
            secs = interleaved(fns, args.rounds, warmup=0)  # _works already ran each once (compiling)
            for name, sec in secs.items():
                rows.append({"task": task, "batch": batch, "name": name, "seconds": sec, "images_per_s": batch / sec,
                             "tokens_per_s": batch * new / sec})
                # as each block finishes: a run stopped early (a full one takes most of an hour) still tells
                print(f"{task}, batch {batch}: {name}: {batch / sec:.2f} images/s", flush=True)
    print(f"\n{'task':12s} {'batch':>5} {'contender':50s} {'images/s':>9} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['task']:12s} {r['batch']:5d} {r['name']:50s} {r['images_per_s']:9.2f} {r['tokens_per_s']:9.0f}")
    summary = summarize(rows, batches)
    for key, line in summary.items():
        print(f"{key}: ours {line['images_per_s']:.2f} images/s"
              + (f"; ×{line['speedup_vs_uncached']:.2f} vs no cache" if line["speedup_vs_uncached"] else "")
              + (f"; ×{line['speedup_vs_hf']:.2f} vs HF's best ({line['hf_best']}; target >= 2)" if line["hf_best"] else "")
              + (f"; ×{line['speedup_vs_hf_compiled']:.2f} vs HF's own compiled path" if line["hf_compiled"] else ""))
    for name, err in failures.items():
        print(f"{name}: failed ({err})")
    merge_results("sample", {"preset": args.preset, "vocab": args.vocab, "new_tokens": new, "guidance": GUIDANCE, "rows": rows,
                             "summary": summary, "failed": failures, "precisions": list(picked)})


def summarize(rows: list[dict], batches: list[int]) -> dict[str, dict]:
    """Per task and batch: our best contender against no cache, transformers' best contender, and
    transformers' best without `compile_inference` (its documented fast path: a static cache and
    torch.compile, which is what a user of transformers gets)."""
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        for batch in batches:
            def best(keep):
                return max((r for r in rows if r["task"] == task and r["batch"] == batch and keep(r["name"])),
                           key=lambda r: r["tokens_per_s"], default=None)
            ours, unc = best(lambda n: n.startswith("ours cached")), best(lambda n: n.startswith("ours uncached"))
            hf, hf_own = best(lambda n: n.startswith("HF")), best(lambda n: n.startswith("HF") and "frozen" not in n)
            if ours is None:
                continue
            key = f"batch{batch}" if task == "plain" else f"{task}, batch{batch}"
            summary[key] = {"ours_best": ours["name"], "tokens_per_s": ours["tokens_per_s"],
                            "images_per_s": ours["images_per_s"],
                            "speedup_vs_uncached": ours["tokens_per_s"] / unc["tokens_per_s"] if unc else None,
                            "hf_best": hf["name"] if hf else None,
                            "speedup_vs_hf": ours["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
                            "hf_compiled": hf_own["name"] if hf_own else None,
                            "speedup_vs_hf_compiled": ours["tokens_per_s"] / hf_own["tokens_per_s"] if hf_own else None}
    return summary


def _subset(parser: argparse.ArgumentParser, flag: str, value: str, choices: dict) -> dict:
    """The entries of `choices` named in a comma-separated flag value (parser.error on others)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        parser.error(f"{flag} takes a comma-separated subset of {', '.join(choices)}; got {value!r}")
    return {n: choices[n] for n in names}


def _works(name: str, fn, failures: dict[str, str]) -> bool:
    """Run fn once (its warm-up: compilation happens here); a contender that fails on this build is
    reported, not fatal."""
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - any failure of a contender is a benchmark finding
        failures[name] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return False


if __name__ == "__main__":
    main()
