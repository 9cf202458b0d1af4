"""Bayes-rule classification speed: the batched, prompt-cached classifier against the naive
per-class, per-image loop of full forward passes, on the same model and the same images.

    .venv/bin/python bench/bench_classify.py [--ckpt runs/default] [--images 40]

Both directions, for 10 digit classes with one template: log p(x | c) and log p(caption | x)
(the naive loop: a full forward of image + caption per pair). The batched path is timed
in float32 (identical to the naive loop) and in bf16 autocast, and with adaptive pruning, each
eager and with the scoring forward compiled (`Transformer.compile_scoring`; its warm-up time,
mostly compilation, is reported apart). Agreement of predictions with the naive loop is reported
next to the speed.
"""
from __future__ import annotations

import argparse
import time

import torch

import common  # noqa: F401
from common import merge_results
from model.precision import bf16_pays
from sample.classify import image_loglik, naive_scores, text_loglik
from train.data.digits import digits_documents

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/default", help="a trained run (falls back to random weights)")
    p.add_argument("--images", type=int, default=120, help="digits test images (evenly spaced over the split)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="time the bf16 autocast paths: auto = where bf16 is native (model.precision); emulated "
                        "bf16 (AVX2-only CPUs) is many times slower than float32")
    args = p.parse_args()
    bf16 = bf16_pays("cpu") if args.bf16 == "auto" else args.bf16 == "on"
    try:
        from sample.api import MultimodalModel

        mm = MultimodalModel.from_pretrained(args.ckpt)
        model, tok, source = mm.model, mm.tokenizer, args.ckpt
    except ValueError as e:
        raise SystemExit(f"{e}\n(bench_classify needs a trained checkpoint: run `make tokenize train` first)")
    test = digits_documents("eval")
    docs = test[:: max(1, len(test) // args.images)][: args.images]  # spread over the split, not its first rows
    labels = torch.tensor([d.meta["label"] for d in docs])
    codes = tok.encode_images([d.images[0] for d in docs])
    captions = [f"a handwritten digit {w}" for w in WORDS]

    out = []
    print(f"{len(docs)} digits test images × 10 classes, model from {source}")
    print(f"{'path':58s} {'images/s':>9s} {'speed-up':>9s} {'accuracy':>9s} {'agrees w/ naive':>16s}")
    for direction in ("image", "text"):
        out += measure(model, tok, codes, captions, labels, direction, bf16)
    merge_results("classify", {"images": len(docs), "classes": 10, "bf16": bf16, "rows": out})


# the batched paths of each direction: p(x|c) with and without adaptive pruning; p(caption|x)
# prefills each image once and scores the ten captions after it (sample.classify.text_loglik)
PATHS = {
    "image": (("batched+cached fp32", dict(bf16=False)), ("batched+cached bf16", dict(bf16=True)),
              ("batched+cached fp32, pruned (16 codes, keep 3)", dict(bf16=False, prune_after=16, keep=3)),
              ("batched+cached bf16, pruned (16 codes, keep 3)", dict(bf16=True, prune_after=16, keep=3))),
    "text": (("batched+cached fp32", dict(bf16=False)), ("batched+cached bf16", dict(bf16=True))),
}


def measure(model, tok, codes, captions, labels, direction: str, bf16: bool) -> list[dict]:
    """Time the naive loop and every batched path of one direction, eager and compiled (bf16
    paths only when `bf16`)."""
    score = image_loglik if direction == "image" else text_loglik
    prefix = "" if direction == "image" else "p(caption|x): "  # image rows keep their earlier names
    rows = {}
    t = time.perf_counter()
    naive = naive_scores(model, tok, codes, captions, direction)
    rows[prefix + "naive loop fp32"] = (time.perf_counter() - t, naive)
    compile_s = {}
    for compiled in (False, True):
        if compiled:
            model.compile_scoring()  # Inductor, dynamic shapes: compiled in the warm-up calls below
        sfx = ", compiled" if compiled else ""
        for name, kw in PATHS[direction]:
            if kw["bf16"] and not bf16:
                continue
            name = prefix + name + sfx
            t = time.perf_counter()
            score(model, tok, codes[:2], captions, **kw)  # warm-up (compilation, when compiled)
            if compiled:
                compile_s[name] = time.perf_counter() - t
            t = time.perf_counter()
            scores = score(model, tok, codes, captions, **kw)
            rows[name] = (time.perf_counter() - t, scores)
    model.compile_scoring(False)
    base = rows[prefix + "naive loop fp32"][0]
    out = []
    for name, (secs, scores) in rows.items():
        pred = scores.argmax(-1)
        row = {"path": name, "direction": direction, "seconds": secs, "images_per_s": len(codes) / secs,
               "speedup": base / secs, "accuracy": float((pred == labels).double().mean()),
               "agreement_with_naive": float((pred == naive.argmax(-1)).double().mean()),
               "max_abs_diff_vs_naive": float((scores - naive)[torch.isfinite(scores)].abs().max()),
               "warmup_s": compile_s.get(name)}
        out.append(row)
        print(f"{name:58s} {row['images_per_s']:9.2f} {row['speedup']:8.1f}x {row['accuracy']:9.3f} "
              f"{row['agreement_with_naive']:16.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
