"""Train and evaluate the VQ-VAE image tokenizer (tokenizers_mm/vqvae.py).

    python -m train.vq --preset default --out artifacts/vq      # digits-train + shapes-train

writes DIR/vq_config.json + DIR/vq.safetensors (load with VQVAE.from_pretrained), one
reconstruction grid per corpus (DIR/recon_<corpus>.png, eval images: originals above,
reconstructions below) and DIR/report.json (metrics per corpus on the eval split, timings).

No augmentation that changes geometry: flips would swap "left of" in the shapes world and mirror
digits, and the tokenizer must reconstruct the images the model will see.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from model.precision import bf16_pays
from tokenizers_mm.images import image_grid, tensor_to_pil
from tokenizers_mm.vqvae import VQ_PRESETS, VQConfig, VQOutput, VQVAE, num_params


@dataclass(frozen=True)
class VQTrainSettings:
    """Optimisation settings calibrated per preset (used when train_vqvae gets None)."""

    steps: int  # optimizer steps
    batch_size: int  # images per step
    lr: float  # peak AdamW learning rate (after warm-up, then cosine decay)
    diversity_weight: float = 0.0  # weight of the per-corpus codebook diversity term (code_diversity_loss)
    diversity_temperature: float = 100.0  # its softmax sharpness over −‖z − c‖ (nearest codes sit ~0.1 apart)


# "default" is calibrated on this 2-core AMX CPU to reach ≥ 90% codebook usage and ≥ 30 dB on both
# corpora in ≤ 150 s. Measured with 1 thread (the other core busy), bf16 autocast, same image budget:
# batch 64 × 450 steps 29.2 dB shapes; 32 × 800 31.6 dB; 16 × 1400 32.5 dB shapes / 35.7 dB digits in
# 140 s — in a short run, more (noisier) updates beat bigger batches. 1200 steps keeps time margin on a
# busy machine: 32.1 / 34.3 dB, 98.6% of codes on the eval images, 145 s with the other core loaded.
VQ_TRAIN_SETTINGS: dict[str, VQTrainSettings] = {
    "tiny": VQTrainSettings(steps=60, batch_size=32, lr=3e-3),
    # diversity 0.05 at temperature 100 (measured 2026-12-03, 1 thread, eval split, shapes / digits):
    # off 85.9 / 77.7% of codes used, 32.9 / 35.9 dB; 0.01@50 92.4 / 84.4%, 32.2 / 34.9 dB;
    # 0.03@50 98.4 / 87.5%, 33.3 / 34.6 dB; 0.05@100 97.7 / 91.6%, 32.8 / 34.1 dB (seed 1: 99.2 / 94.3%,
    # 31.7 / 33.4 dB); 0.08@100 99.8 / 94.7%, 30.8 / 33.2 dB; 0.1@50 100 / 95.9%, 31.6 / 32.8 dB
    "default": VQTrainSettings(steps=1200, batch_size=16, lr=2e-3, diversity_weight=0.05, diversity_temperature=100.0),
    "64px": VQTrainSettings(steps=20_000, batch_size=128, lr=1e-3),
    "128px": VQTrainSettings(steps=50_000, batch_size=64, lr=5e-4),
}

WARMUP_FRACTION = 0.05  # short linear warm-up: the k-means-initialised codebook moves fast at first
MIN_LR_RATIO = 0.1  # cosine decays to 10% of the peak
PSNR_CAP_DB = 100.0  # a pixel-perfect image would have infinite PSNR; cap so means stay finite


def settings_for(config: VQConfig) -> VQTrainSettings:
    """The calibrated settings of the preset `config` equals (ignoring image_size), else the default's."""
    for name, preset in VQ_PRESETS.items():
        if dataclasses.replace(preset, image_size=config.image_size) == config and name in VQ_TRAIN_SETTINGS:
            return VQ_TRAIN_SETTINGS[name]
    return VQ_TRAIN_SETTINGS["default"]


def to_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) in 0..255, or float (N, 3, H, W) in [-1, 1] -> float (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3); found {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1]; found {tuple(images.shape)}")
        return images.float()
    raise ValueError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W); found dtype {images.dtype}")


def _as_uint8_chw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Either accepted image format -> uint8 (N, 3, H, W), compact for holding a data set in memory."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        to_float_images(images[:1])  # validates the (N, H, W, 3) layout
        return images.permute(0, 3, 1, 2).contiguous()
    x = to_float_images(images)
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def balance(per_corpus: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate image sets, repeating the smaller ones so that every corpus weighs the same in
    VQ-VAE training (digits are 7k images, shapes tens of thousands); returns (images, corpus id of each)."""
    largest = max(len(a) for a in per_corpus)
    rng = np.random.default_rng(seed)
    parts = [a if len(a) == largest else a[rng.integers(0, len(a), largest)] for a in per_corpus]
    return np.concatenate(parts), np.repeat(np.arange(len(parts)), largest)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the run, then cosine decay to MIN_LR_RATIO·lr."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t)))


def _psnr_from_mse(mse: torch.Tensor, peak: float) -> torch.Tensor:
    return (10 * torch.log10(peak**2 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP_DB)


def train_vqvae(
    train_images: torch.Tensor | np.ndarray,
    config: VQConfig,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    bf16: bool | None = None,
    time_limit_s: float | None = None,
    groups: torch.Tensor | np.ndarray | None = None,
    diversity_weight: float | None = None,
    diversity_temperature: float | None = None,
) -> VQVAE:
    """Train a VQVAE on `train_images` and return it in eval mode.

    train_images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1], H = W = config.image_size.
    steps/batch_size/lr/diversity_*: None takes the preset's calibrated value (`settings_for`).
    bf16: autocast the conv encoder/decoder (the quantizer always runs in float32); None = if it pays.
    time_limit_s: stop after this much wall time, the LR schedule following whichever of steps or
      time runs out first (for a hard budget on a busy machine; the result then depends on timing).
    groups: (N,) int corpus id of each training image, for the diversity term (None: one corpus).
    diversity_weight: weight of the per-corpus codebook diversity term (see `code_diversity_loss`).
    Loss: MSE on pixels + the quantizer's commitment loss (+ the diversity term). Raises on a
    non-finite loss, naming the step.
    """
    defaults = settings_for(config)
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    diversity_weight = defaults.diversity_weight if diversity_weight is None else diversity_weight
    diversity_temperature = defaults.diversity_temperature if diversity_temperature is None else diversity_temperature
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps ≥ 1, batch_size ≥ 1, lr > 0; found steps={steps}, batch_size={batch_size}, lr={lr}")
    if diversity_weight < 0 or not diversity_temperature > 0:
        raise ValueError(f"need diversity_weight ≥ 0 and diversity_temperature > 0; found {diversity_weight}, "
                         f"{diversity_temperature}")
    data = _as_uint8_chw(train_images)  # (N, 3, H, W) uint8
    n, s = len(data), config.image_size
    if n == 0:
        raise ValueError("train_vqvae got no images")
    if tuple(data.shape[1:]) != (3, s, s):
        raise ValueError(f"training images are {tuple(data.shape[2:])} pixels; config.image_size is {s} — "
                         "resize them (tokenizers_mm.images.to_rgb(img, size)) or change the config")
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long)
    groups = torch.as_tensor(groups, dtype=torch.long)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one corpus id per training image ({n}); found shape {tuple(groups.shape)}")
    device = torch.device(device)
    use_bf16 = bf16_pays(device) if bf16 is None else bf16

    torch.manual_seed(seed)
    model = VQVAE(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    # the first batch seeds the codebook by k-means: give it ~8 vectors per code
    # (with blank_code only the non-black patches count, about half in the shapes world: double it)
    first = max(batch_size, -(-config.codebook_size * 8 // config.num_tokens) * (2 if config.blank_code else 1))
    order = torch.randperm(n, generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc="vq-vae", disable=not progress, dynamic_ncols=True, leave=False)
    ema_loss = ema_psnr = None
    t_start = time.perf_counter()
    for step in bar:
        elapsed = time.perf_counter() - t_start
        if time_limit_s is not None and elapsed >= time_limit_s:
            break
        # with a time limit the schedule position is the further of step and wall-clock progress
        sched = step if time_limit_s is None else max(step, int(steps * elapsed / time_limit_s))
        b = first if step == 0 else batch_size
        parts, need = [], b
        while need > 0:  # epochs of a seeded permutation: every image once before any twice
            if pos >= n:
                order, pos = torch.randperm(n, generator=gen), 0
            take = order[pos:pos + need]
            parts.append(take)
            pos, need = pos + len(take), need - len(take)
        idx = torch.cat(parts)
        x = data[idx].to(device).float().div(127.5).sub(1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(min(sched, steps - 1), steps, lr)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(x)
        mse = F.mse_loss(out.recon.float(), x)
        loss = mse + out.commit_loss
        if diversity_weight > 0:
            loss = loss + diversity_weight * code_diversity_loss(model, out, groups[idx].to(device), diversity_temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VQ-VAE loss is {loss.item()} at step {step}; lower lr (now {lr}) or check the images")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        psnr = _psnr_from_mse(mse.detach(), peak=2.0).item()  # [-1, 1] has range 2, same as 255 on 0..255
        ema_loss = loss.item() if ema_loss is None else 0.9 * ema_loss + 0.1 * loss.item()
        ema_psnr = psnr if ema_psnr is None else 0.9 * ema_psnr + 0.1 * psnr
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{ema_loss:.4f}", psnr=f"{ema_psnr:.1f}dB")
    bar.close()
    return model.eval()


def code_diversity_loss(model: VQVAE, out: VQOutput, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 − H(p̄_g)/log K averaged over the corpora g in the batch: p̄_g is corpus g's mean soft
    assignment of its non-black patch vectors to the K codes, softmax(−temperature·‖z − c‖).

    Pushes each corpus, not only the mixture, to spread over the whole codebook (the batch-entropy
    term of e.g. MAGVIT-v2's LFQ, Yu et al. 2023, taken per corpus). Gradients reach the encoder
    only: the codebook itself is an EMA of the vectors assigned to it.
    """
    zc = model.vq.project_in(out.latents)  # (B, N, codebook_dim)
    codebook = model.vq.codebook.detach().float()  # (K, codebook_dim)
    dist = torch.cdist(zc, codebook[None].expand(len(zc), -1, -1))  # (B, N, K)
    prob = (-temperature * dist).softmax(-1)
    content = torch.ones(prob.shape[:2], dtype=torch.bool, device=prob.device) if out.blank is None else ~out.blank
    terms = []
    for g in groups.unique():
        keep = content & (groups == g)[:, None]
        if keep.sum() < 2:
            continue
        mean = prob[keep].mean(0)
        terms.append(1.0 + (mean * mean.clamp_min(1e-12).log()).sum() / math.log(len(codebook)))
    return torch.stack(terms).mean() if terms else prob.sum() * 0.0


@torch.no_grad()
def evaluate_vq(model: VQVAE, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> dict[str, float]:
    """Tokenizer quality on `images` (uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1]).

    codebook_usage: share of the codebook's codes used at least once on these images (0..1).
    perplexity: exp of the entropy of the code histogram (K for uniform use, 1 for a single code).
    blank_share, content_perplexity (tokenizers with the blank code only): share of patches that are
      black, and the perplexity of the other patches' codes.
    psnr_db: mean over images of each image's PSNR, on the 0..255 scale after rounding the
      reconstruction to uint8 (what a viewer sees), capped at 100 dB; psnr_db_set: PSNR of the
      whole set's pooled MSE (dominated by the worst images).
    """
    x = to_float_images(images)
    if len(x) == 0:
        raise ValueError("evaluate_vq got no images")
    ref = x.clamp(-1, 1).add(1).mul(127.5).round()
    k = model.config.codebook_size
    counts = torch.zeros(k, dtype=torch.long)
    se = []
    for chunk, ref_chunk in zip(x.split(batch_size), ref.split(batch_size)):
        codes = model.encode(chunk, batch_size=batch_size)
        counts += torch.bincount(codes.flatten().cpu(), minlength=k)
        rec = model.decode(codes, batch_size=batch_size).cpu().add(1).mul(127.5).round()
        se.append((rec - ref_chunk).pow(2).flatten(1).mean(1))
    mse = torch.cat(se)  # (N,) per-image MSE on 0..255
    extra = {}
    if model.blank_id is not None:  # how much of the picture is black, and how varied the rest is
        content = counts.clone()
        content[model.blank_id] = 0
        extra = {"blank_share": float(counts[model.blank_id] / counts.sum()),
                 "content_perplexity": _perplexity(content)}
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": k,
        "perplexity": _perplexity(counts),
        "psnr_db": float(_psnr_from_mse(mse, 255.0).mean()),
        "psnr_db_set": float(_psnr_from_mse(mse.mean(), 255.0)),
        "num_images": len(x),
        **extra,
    }


def _perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a histogram of code counts (1.0 for an empty histogram)."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float((-(p * p.log()).sum()).exp())


@torch.no_grad()
def reconstruction_grid(model: VQVAE, images: torch.Tensor | np.ndarray, n: int = 16) -> Image.Image:
    """The first `n` images (top row) above their reconstructions (bottom row), upscaled ×4 (nearest)."""
    x = to_float_images(images)[:n]
    if len(x) == 0:
        raise ValueError("reconstruction_grid got no images")
    rec = model.decode(model.encode(x))
    return image_grid([tensor_to_pil(x), tensor_to_pil(rec)], pad=2, scale=4)


@torch.no_grad()
def encode_throughput(model: VQVAE, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> float:
    """Images per second of batched `encode` on these images (float conversion excluded)."""
    x = to_float_images(images)
    t0 = time.perf_counter()
    model.encode(x, batch_size=batch_size)
    return len(x) / (time.perf_counter() - t0)


# ---- command line ------------------------------------------------------------------------------


def _corpora(image_size: int, shapes_train: int, shapes_eval: int, digits_augment: int, seed: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """{corpus: uint8 (N, H, W, 3)} for train and eval, from the project's data modules."""
    try:
        from train.data.digits import digits_documents
        from train.data.shapes import shapes_documents
    except ImportError as e:
        raise SystemExit(f"cannot import the corpora (train/data/shapes.py, train/data/digits.py): {e}") from None

    def arr(docs: list) -> np.ndarray:
        return np.stack([np.asarray(im, dtype=np.uint8) for d in docs for im in d.images])

    train = {"shapes": arr(shapes_documents("train", shapes_train, seed=seed, size=image_size)),
             "digits": arr(digits_documents("train", size=image_size, augment_copies=digits_augment, seed=seed))}
    evals = {"shapes": arr(shapes_documents("eval", shapes_eval, seed=seed, size=image_size)),
             "digits": arr(digits_documents("eval", size=image_size))}
    return train, evals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.vq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(VQ_PRESETS))
    p.add_argument("--out", required=True, type=Path, help="folder for the model, grids and report.json")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's calibrated value")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes-train", type=int, default=20_000, help="shapes documents for training")
    p.add_argument("--shapes-eval", type=int, default=1_000)
    p.add_argument("--digits-augment", type=int, default=4, help="augmented copies of each training digit")
    p.add_argument("--diversity", type=float, default=None, help="weight of the per-corpus codebook diversity term (default: the preset's)")
    p.add_argument("--diversity-temperature", type=float, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; use 1 when the machine is shared, LIBS.md)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # LIBS.md: denormals slowed float32 steps 4×

    config = VQ_PRESETS[args.preset]
    t0 = time.time()
    train, evals = _corpora(config.image_size, args.shapes_train, args.shapes_eval, args.digits_augment, args.seed)
    images, groups = balance(list(train.values()), args.seed)
    t_data = time.time() - t0
    print(f"[vq] data: train { {k: len(v) for k, v in train.items()} } -> {len(images)} balanced, "
          f"eval { {k: len(v) for k, v in evals.items()} } ({t_data:.1f}s)", file=sys.stderr)

    s = settings_for(config)
    steps, bs, lr = args.steps or s.steps, args.batch_size or s.batch_size, args.lr or s.lr
    t1 = time.time()
    model = train_vqvae(images, config, steps=steps, batch_size=bs, lr=lr, seed=args.seed,
                        progress=not args.no_progress, time_limit_s=args.time_limit, groups=groups,
                        diversity_weight=args.diversity, diversity_temperature=args.diversity_temperature)
    t_train = time.time() - t1
    model.save(args.out)

    report: dict = {"preset": args.preset, "config": config.to_dict(), "params": num_params(model),
                    "steps": steps, "batch_size": bs, "lr": lr, "seed": args.seed,
                    "diversity_weight": s.diversity_weight if args.diversity is None else args.diversity,
                    "diversity_temperature": s.diversity_temperature if args.diversity_temperature is None
                    else args.diversity_temperature,
                    "bf16_autocast": bf16_pays(torch.device("cpu")), "threads": torch.get_num_threads(),
                    "train_images": {k: len(v) for k, v in train.items()}, "train_seconds": round(t_train, 1),
                    "psnr_note": "psnr_db: mean over eval images of per-image PSNR on 0..255; "
                                 "psnr_db_set: PSNR of the pooled MSE", "eval": {}}
    for name, ev in evals.items():
        report["eval"][name] = evaluate_vq(model, ev)
        reconstruction_grid(model, ev, n=16).save(args.out / f"recon_{name}.png")
    report["eval"]["all"] = evaluate_vq(model, np.concatenate(list(evals.values())))
    bench = images[:10_000]  # batched encode of 10k training images
    report["encode_images_per_s"] = round(encode_throughput(model, bench), 1)
    report["encode_benchmark_images"] = len(bench)
    tmp = args.out / f".report.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out / "report.json")
    for name, m in report["eval"].items():
        print(f"[vq] {name}: usage {m['codebook_usage']:.1%} ({m['codes_used']}/{m['codebook_size']}), "
              f"perplexity {m['perplexity']:.0f}, PSNR {m['psnr_db']:.2f} dB (set {m['psnr_db_set']:.2f})")
    print(f"[vq] trained {steps} steps × {bs} in {t_train:.1f}s; encode {report['encode_images_per_s']:.0f} img/s; "
          f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
