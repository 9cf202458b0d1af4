"""The transformer's training loop: `python -m train` (`make train`).

    python -m train --data artifacts --out runs/default [--preset default] [--steps N]
                    [--resume auto|never|must] [--set key=value ...]
    torchrun --standalone --nproc_per_node=2 -m train ...      (DDP; gloo on CPU, nccl on GPU)

A flat loop whose parts decide their own timing (torchtitan style): the checkpointer saves every
`ckpt_every` steps and at the end, the evaluator runs every `eval_every`. Exact resume: weights,
AdamW state, the step (the learning rate is a pure function of it), the epoch and the loader's
position, and the RNG, all saved together in one atomically written checkpoint folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.checkpoint import LATEST_FILE, load_config, resolve, save_pretrained
from tokenizers_mm.atomic import save_figure_atomic, write_atomic_folder, write_text_atomic
from model.config import preset as model_preset
from model.precision import bf16_pays
from model.transformer import Transformer, lm_loss
from tokenizers_mm.multimodal import MultimodalTokenizer
from train.config import PRESETS, TrainConfig
from train.overrides import apply_overrides
from train.pipeline import PackedRows, eval_rows, load_neighbours, make_loader, retrieval_eval_rows
from train.sequences import SequenceConfig
from train.shards import Shard

STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------------------------------------
# distributed
@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            dist.init_process_group("nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return Dist(dist.get_rank(), world, device)
    return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def ranks_in_sync(model: torch.nn.Module, d: Dist) -> bool:
    """True if every rank holds bitwise the same weights (compares a per-tensor fingerprint)."""
    fp = torch.stack([p.double().sum() + (p.double() * torch.arange(p.numel(), dtype=torch.float64).view_as(p)).sum()
                      for p in model.parameters()]).to(d.device)
    gathered = [torch.zeros_like(fp) for _ in range(d.world)]
    dist.all_gather(gathered, fp)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------
# schedule and optimizer
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr·min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# ---------------------------------------------------------------------------------------------
# checkpoints
class Checkpointer:
    """Writes checkpoint folders `run/checkpoints/step_NNNNNN/` (model folder + train_state.pt)
    atomically, then points `run/latest` at the newest; keeps the last `keep`."""

    def __init__(self, run: Path, cfg: TrainConfig, tokenizer_dir: Path, d: Dist, retriever_dir: Path | None = None) -> None:
        self.run, self.cfg, self.tokenizer_dir, self.d = run, cfg, tokenizer_dir, d
        self.retriever_dir = retriever_dir  # copied into every checkpoint, so sampling can retrieve
        self.last_saved = -1

    def should_save(self, step: int, last_step: bool) -> bool:
        return step != self.last_saved and (last_step or step % self.cfg.ckpt_every == 0)

    def save(self, step: int, model: Transformer, optimizer: torch.optim.Optimizer, epoch: int,
             loader_state: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.last_saved = step
        if not self.d.is_main:
            return
        name = f"step_{step:06d}"
        state = {"step": step, "epoch": epoch, "loader": loader_state, "optimizer": optimizer.state_dict(),
                 "rng": torch.get_rng_state()}
        info = {"step": step, "train_config": dataclasses.asdict(self.cfg), "metrics": metrics,
                "trained_with_retrieval": self.cfg.retrieved_max > 0, "retrieval_k": self.cfg.retrieved_max}

        def fill(folder: Path) -> None:
            save_pretrained(folder, model, self.tokenizer_dir, info, self.retriever_dir)
            torch.save(state, folder / STATE_FILE)

        write_atomic_folder(self.run / "checkpoints" / name, fill)
        write_text_atomic(self.run / LATEST_FILE, f"checkpoints/{name}\n")
        kept = sorted(p for p in (self.run / "checkpoints").glob("step_*") if p.is_dir())
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def load_train_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {STATE_FILE}: it is a model folder, not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# evaluation and reporting
@torch.no_grad()
def evaluate(model: Transformer, rows: list[dict[str, torch.Tensor]], cfg: TrainConfig, image_range: tuple[int, int],
             device: torch.device) -> dict[str, float]:
    """Held-out NLL per target token, overall and per modality (nats)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # text nll, text count, image nll, image count
    for i in range(0, len(rows), cfg.batch_size):
        batch = {k: torch.stack([r[k] for r in rows[i : i + cfg.batch_size]]).to(device) for k in rows[0]}
        with autocast_ctx(cfg, device):
            logits = model(batch["idx"], doc_ids=batch["doc_ids"], positions=batch["positions"])
        out = lm_loss(logits, batch["targets"], z_loss=0.0, image_token_range=image_range)
        sums += torch.stack([out.text_nll_sum, out.text_count, out.image_nll_sum, out.image_count]).double().cpu()
    model.train()
    t, tc, im, ic = sums.tolist()
    return {"eval_loss": (t + im) / max(tc + ic, 1), "eval_text_nll": t / max(tc, 1), "eval_image_nll": im / max(ic, 1)}


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return bf16_pays(device) if cfg.autocast is None else cfg.autocast


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    if not uses_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def plot_metrics(metrics_file: Path, out: Path) -> None:
    """Loss curves (train loss, held-out text and image NLL) from metrics.jsonl as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="0.5", lw=1)
    for key, color in (("eval_text_nll", "tab:blue"), ("eval_image_nll", "tab:red"), ("eval_loss", "black")):
        pts = [(r["step"], r[key]) for r in evals]
        if pts:
            ax.plot(*zip(*pts), "o-", label=key.replace("_", " "), color=color, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"training run {metrics_file.parent.name}")
    fig.tight_layout()
    save_figure_atomic(fig, out)


GRID_PROMPTS = [f"a handwritten digit {w}" for w in
                ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")] + [
    "a large red circle in the center", "a small blue square in the top left",
    "a small yellow triangle in the bottom right", "a large green square in the center",
    "a small white circle at the right", "a red circle to the left of a blue square"]


def write_sample_grid(model: Transformer, tokenizer: MultimodalTokenizer, out: Path, seed: int) -> bool:
    """Text→image samples for fixed prompts (two per prompt, guidance 3); False if the sampler
    is not available."""
    try:
        from sample.generate import sample_grid
    except ImportError:
        return False
    model.eval()
    grid = sample_grid(model, tokenizer, GRID_PROMPTS, per_prompt=2, guidance=3.0, seed=seed)
    model.train()
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return True


# ---------------------------------------------------------------------------------------------
def batches(cfg: TrainConfig, shard: Shard, seq_cfg: SequenceConfig, d: Dist, epoch: int,
            loader_state: dict | None, state: dict, neighbours: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches across epochs; `state` always holds the epoch and the loader's position
    as of the last batch handed out. neighbours: the train shard's precomputed neighbours
    (retrieval augmentation), or None."""
    while True:
        ds = PackedRows(shard, seq_cfg, cfg.seed, epoch, d.rank, d.world, cfg.source_weights or None,
                        neighbours=neighbours, bank=shard)
        loader = make_loader(ds, cfg.batch_size, loader_state)
        loader_state = None
        for batch in loader:
            state["epoch"], state["loader"] = epoch, loader.state_dict()
            yield batch
        epoch += 1
        state["epoch"], state["loader"] = epoch, None


def train(cfg: TrainConfig, data: Path, run: Path, resume: str = "auto", steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) a run; returns the last metrics. See the module docstring."""
    d = setup_distributed()
    try:
        result = _train(cfg, data, run, resume, steps, d)
        if d.world > 1:
            # leave together: a rank that tears gloo down while rank 0 still writes the last
            # checkpoint made rank 0 abort at exit ("terminate called without an active exception",
            # seen under load in CI)
            dist.barrier()
        return result
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: Path, run: Path, resume: str, steps: int | None, d: Dist) -> dict[str, Any]:
    tok_dir = data / "tokenizer"
    tokenizer = MultimodalTokenizer.from_pretrained(tok_dir)
    shard = Shard(data / "shards" / "train")
    eval_shard = Shard(data / "shards" / "eval") if (data / "shards" / "eval" / "index.json").is_file() else None

    state_in, info = None, {}
    has_ckpt = (run / LATEST_FILE).is_file()
    if resume == "must" and not has_ckpt:
        raise ValueError(f"--resume must: no checkpoint in {run}")
    if has_ckpt and resume in ("auto", "must"):
        _, info, folder = load_config(run)
        saved = TrainConfig.from_saved(info["train_config"])
        cfg = dataclasses.replace(saved, steps=cfg.steps)  # the saved run's settings; steps may grow
        state_in = load_train_state(folder)
    elif has_ckpt and resume == "never" and d.is_main:
        raise ValueError(f"{run} already holds a run (see {run / LATEST_FILE}); pick another --out, "
                         "delete it, or resume with --resume auto")
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)

    torch.manual_seed(cfg.seed)
    # image order markers (cfg.image_orders > 1) are ids past the tokenizer's
    vocab = tokenizer.vocab_size + cfg.image_orders - 1
    # an order marker (cfg.image_orders > 1) takes the first place after <boi>
    img_pos = {"image_pos_emb": tokenizer.image_tokens + (cfg.image_orders > 1)} if cfg.image_pos_emb else {}
    mcfg = model_preset(cfg.model, vocab_size=vocab, **{**img_pos, **cfg.model_overrides, "block_size": cfg.block_size})
    model = Transformer(mcfg).to(d.device)
    start_step, epoch, loader_state = 0, 0, None
    if state_in is not None:
        from safetensors.torch import load_model

        load_model(model, str(resolve(run) / "model.safetensors"), strict=True)
        start_step, epoch, loader_state = state_in["step"], state_in["epoch"], state_in["loader"]
    optimizer = make_optimizer(model, cfg, d.device)
    if state_in is not None:
        optimizer.load_state_dict(state_in["optimizer"])
        torch.set_rng_state(state_in["rng"])

    train_model: torch.nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    seq_cfg = SequenceConfig(cfg.block_size, cfg.p_image_first, cfg.caption_dropout, cfg.cm3_prob,
                             retrieved_max=cfg.retrieved_max, retrieved_weight=cfg.retrieved_weight,
                             image_orders=cfg.image_orders, order_prob=cfg.order_prob,
                             order_marker_base=tokenizer.vocab_size)
    held_out = eval_rows(eval_shard, seq_cfg, cfg.seed, cfg.eval_rows) if eval_shard is not None and len(eval_shard) else []
    neighbours, held_out_ra = None, None
    if cfg.retrieved_max > 0:
        neighbours = load_neighbours(shard)
        if held_out:  # the same caption→image pairs without and with retrieval (main documents' NLL only)
            held_out_ra = retrieval_eval_rows(eval_shard, seq_cfg, cfg.seed, cfg.eval_rows, load_neighbours(eval_shard),
                                              shard, cfg.retrieved_max)
    retriever_dir = data / "retriever"
    if cfg.retrieved_max > 0 and not retriever_dir.is_dir():
        raise ValueError(f"retrieved_max > 0 but {retriever_dir} is missing: run `make tokenize` with retriever=true")
    image_range = (tokenizer.image_offset, tokenizer.vocab_size)
    checkpointer = Checkpointer(run, cfg, tok_dir, d, retriever_dir if retriever_dir.is_dir() else None)
    checkpointer.last_saved = start_step
    run.mkdir(parents=True, exist_ok=True)
    metrics_file = run / "metrics.jsonl"
    if d.is_main:
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[train] model {cfg.model}: {model.num_params() / 1e6:.2f} M parameters, vocab {tokenizer.vocab_size}, "
              f"block {cfg.block_size}; {len(shard):,} train documents; ranks {d.world} on {d.device} in "
              f"{'bf16 autocast' if uses_bf16(cfg, d.device) else 'float32 (bf16 is not native here)'}; "
              f"{'resuming at step ' + str(start_step) if start_step else 'from scratch'}")

    loader_pos: dict[str, Any] = {"epoch": epoch, "loader": loader_state}
    stream = batches(cfg, shard, seq_cfg, d, epoch, loader_state, loader_pos, neighbours)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * d.world
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not d.is_main, dynamic_ncols=True)
    last: dict[str, Any] = dict(info["metrics"]) if state_in is not None else {}  # a finished run resumed keeps its figures
    t_log, tok_log = time.time(), 0
    step = start_step
    grid_due = False  # a sample grid to draw once this step's checkpoint is written
    try:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            n_local = sum(((b["targets"] != -100) * b["weights"]).sum() for b in micro)
            n_global = all_reduce_sum(n_local.to(d.device), d).clamp(min=1)
            totals = torch.zeros(5, device=d.device)  # nll·n, text nll, text count, image nll, image count
            for i, b in enumerate(micro):
                b = {k: v.to(d.device, non_blocking=True) for k, v in b.items()}
                sync = contextlib.nullcontext() if (d.world == 1 or i == len(micro) - 1) else train_model.no_sync()
                with sync:
                    with autocast_ctx(cfg, d.device):
                        logits = train_model(b["idx"], doc_ids=b["doc_ids"], positions=b["positions"])
                    out = lm_loss(logits, b["targets"], z_loss=mcfg.z_loss, weights=b["weights"], image_token_range=image_range)
                    # normalise by the targets of the whole step on all ranks (DDP averages over ranks)
                    (out.loss * (out.num_targets * d.world / n_global)).backward()
                totals += torch.stack([out.nll.detach() * out.num_targets, out.text_nll_sum, out.text_count,
                                       out.image_nll_sum, out.image_count]).float()
            loss = totals[0] / n_local.clamp(min=1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; the last good "
                                         f"checkpoint is in {run} — lower lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tok_log += tokens_per_step
            bar.update(1)
            last_step = step == cfg.steps

            if step % cfg.log_every == 0 or last_step:
                now = time.time()
                t = totals.tolist()
                last = {"step": step, "loss": round(loss.item(), 4), "text_nll": round(t[1] / max(t[2], 1), 4),
                        "image_nll": round(t[3] / max(t[4], 1), 4), "lr": lr_at(step - 1, cfg),
                        "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tok_log / (now - t_log)),
                        "epoch": loader_pos["epoch"]}
                t_log, tok_log = now, 0
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=last["tokens_per_s"])
                if d.is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(last) + "\n")
            if held_out and (step % cfg.eval_every == 0 or last_step):
                ev = evaluate(model, held_out, cfg, image_range, d.device)
                if held_out_ra is not None:
                    for prefix, rows in zip(("c2i", "ra"), held_out_ra):
                        ev.update({k.replace("eval_", f"eval_{prefix}_"): v
                                   for k, v in evaluate(model, rows, cfg, image_range, d.device).items()})
                if d.is_main:
                    ev = {"step": step, **{k: round(v, 4) for k, v in ev.items()}}
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(ev) + "\n")
                    last.update(ev)
                    bar.write(f"[train] step {step}: held-out loss {ev['eval_loss']:.3f} "
                              f"(text {ev['eval_text_nll']:.3f}, image {ev['eval_image_nll']:.3f} nats/token)")
                    plot_metrics(metrics_file, run / "loss_curve.png")
                    grid_due = cfg.sample_grid
            if checkpointer.should_save(step, last_step):
                checkpointer.save(step, model, optimizer, loader_pos["epoch"], loader_pos["loader"], last)
            if grid_due:  # after the checkpoint: a sampler failure never costs trained steps
                grid_due = False
                write_sample_grid(model, tokenizer, run / "samples" / f"step_{step:06d}.png", cfg.seed)
    except KeyboardInterrupt:
        if step > checkpointer.last_saved:
            checkpointer.save(step, model, optimizer, loader_pos["epoch"], loader_pos["loader"], last)
            bar.write(f"[train] interrupted: saved step {step} to {run}; `make train` resumes from it")
        elif d.is_main:
            bar.write(f"[train] interrupted at step {step}, already saved; `make train` resumes from it")
        raise
    finally:
        bar.close()
    if d.world > 1:
        last["ranks_in_sync"] = ranks_in_sync(model, d)
        if not last["ranks_in_sync"]:
            raise RuntimeError("DDP ranks ended with different weights: gradients were not synchronised")
    if d.is_main:
        (run / "final_metrics.json").write_text(json.dumps(last, indent=2))
        if cfg.sample_grid:
            latest = sorted((run / "samples").glob("step_*.png")) if (run / "samples").is_dir() else []
            if latest:
                shutil.copyfile(latest[-1], run / "samples.png")
    return last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--data", default="artifacts", type=Path, help="output folder of `make tokenize`")
    p.add_argument("--out", default=None, type=Path, help="run folder (default runs/<preset>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (extends a resumed run)")
    p.add_argument("--resume", default="auto", choices=["auto", "never", "must"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    args = p.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:  # a polite kill (SIGTERM) saves a checkpoint like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        cfg = apply_overrides(PRESETS[args.preset], args.set)
        train(cfg, args.data, args.out or Path("runs") / args.preset, args.resume, args.steps)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
