"""Held-out image-token NLL with retrieval on and off (issue 4, item 7).

    python bench/eval_retrieval.py --ckpt runs/ra --data artifacts [--baseline runs/default] [--k 2] [--rows 64]

On the eval split's caption pairs in caption→image order (their neighbours were retrieved from
the train bank by `make tokenize` with the caption alone, so nothing of the image leaks in),
measures the NLL per image token of the MAIN documents only:
    ckpt, retrieval off      the pairs alone
    ckpt, retrieval on       the same pairs behind their k best neighbours (<break>-separated)
    baseline, off / on       the same for a model trained without retrieval (if given)
Writes them under "retrieval" in bench/results.json and a bar chart (bench/retrieval_nll.png).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, ROOT, merge_results  # noqa: F401  (common puts the project on sys.path)

from model.checkpoint import load_pretrained  # noqa: E402
from tokenizers_mm.atomic import save_figure_atomic  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.pipeline import load_neighbours, retrieval_eval_rows  # noqa: E402
from train.sequences import SequenceConfig  # noqa: E402
from train.shards import Shard  # noqa: E402
from train.trainer import evaluate  # noqa: E402


def measure(ckpt: str, data: Path, k: int, rows: int, seed: int) -> dict[str, Any]:
    """NLLs (nats per token) of one checkpoint's main documents with retrieval off and on."""
    loaded = load_pretrained(ckpt)
    train_shard, eval_shard = Shard(data / "shards" / "train"), Shard(data / "shards" / "eval")
    if loaded.tokenizer.vocab_size != train_shard.index["layout"]["vocab_size"]:
        raise ValueError(f"{ckpt} was not trained on {data}: vocabularies differ "
                         f"({loaded.tokenizer.vocab_size} vs {train_shard.index['layout']['vocab_size']})")
    cfg = TrainConfig.from_saved(loaded.info["train_config"])
    seq = SequenceConfig(block_size=loaded.model.config.block_size)
    off, on = retrieval_eval_rows(eval_shard, seq, seed, rows, load_neighbours(eval_shard), train_shard, k)
    image_range = (loaded.tokenizer.image_offset, loaded.tokenizer.vocab_size)
    out: dict[str, Any] = {"ckpt": str(ckpt), "step": loaded.info.get("step"),
                           "trained_with_retrieval": bool(loaded.info.get("trained_with_retrieval")),
                           "rows_off": len(off), "rows_on": len(on)}
    for name, r in (("off", off), ("on", on)):
        ev = evaluate(loaded.model, r, cfg, image_range, torch.device("cpu"))
        out[name] = {"image_nll": round(ev["eval_image_nll"], 4), "text_nll": round(ev["eval_text_nll"], 4)}
    out["image_nll_reduction"] = round(1 - out["on"]["image_nll"] / out["off"]["image_nll"], 4)
    return out


def bar_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("trained with retrieval,\nretrieval off", result["model"]["off"]["image_nll"], "tab:gray"),
            ("trained with retrieval,\nretrieval on", result["model"]["on"]["image_nll"], "tab:red")]
    if "baseline" in result:
        bars = [("trained without,\nretrieval off", result["baseline"]["off"]["image_nll"], "tab:blue")] + bars
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, b in enumerate(bars):
        ax.text(i, b[1], f"{b[1]:.3f}", ha="center", va="bottom")
    ax.set_ylabel("held-out image NLL (nats / token)")
    ax.set_title(f"caption→image, eval split, k={result['k']} neighbours")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run (or checkpoint) trained with retrieval")
    p.add_argument("--baseline", default=None, help="a run trained without retrieval on the same artifacts")
    p.add_argument("--data", default="artifacts", type=Path, help="the `make tokenize` output both were trained on")
    p.add_argument("--k", type=int, default=2, help="neighbours prepended when retrieval is on")
    p.add_argument("--rows", type=int, default=64, help="packed rows of pairs without retrieval (the same pairs with it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=Path(__file__).resolve().parent / "retrieval_nll.png", type=Path)
    p.add_argument("--results", default=RESULTS, type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result: dict[str, Any] = {"k": args.k, "data": str(args.data), "model": measure(args.ckpt, args.data, args.k, args.rows, args.seed)}
        if args.baseline:
            base = measure(args.baseline, args.data, args.k, args.rows, args.seed)
            result["baseline"] = base
            result["image_nll_reduction_vs_baseline"] = round(1 - result["model"]["on"]["image_nll"] / base["off"]["image_nll"], 4)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merge_results("retrieval", result, args.results)
    bar_chart(result, args.png)
    print(json.dumps(result, indent=1))
    print(f"wrote 'retrieval' in {args.results} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
