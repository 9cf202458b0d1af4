"""VQ-VAE image tokenizer: an image (B, 3, H, W) in [-1, 1] <-> a grid of codes (B, H/f, W/f).

A small convolutional encoder maps the image to a (H/f × W/f) grid of vectors, each snapped to the
nearest entry of a learned codebook (`vector_quantize_pytorch.VectorQuantize`, EMA codebook); the
decoder maps the grid of code vectors back to pixels. The code grid, read in raster order, is what
the transformer sees as image tokens.

    vq = VQVAE(VQ_PRESETS["default"])           # train it with train.vq.train_vqvae
    codes = vq.encode(pil_to_tensor(images))    # (B, 8, 8) int64 in [0, 512)
    images = tensor_to_pil(vq.decode(codes))
    vq.save("artifacts/vq"); vq = VQVAE.from_pretrained("artifacts/vq")

Numerics: the conv encoder/decoder may run under bf16 autocast; the quantizer always runs in
float32 outside autocast (LIBS.md: under CPU autocast its distances run partly in bf16).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers_mm.weights import load_weights_strict, read_config, save_config_and_weights
from vector_quantize_pytorch import VectorQuantize

try:  # k-means init logs through loguru; keep training output to our own progress bar (LIBS.md)
    from loguru import logger as _loguru_logger

    _loguru_logger.disable("vector_quantize_pytorch")
except ImportError:  # pragma: no cover - loguru ships with vector-quantize-pytorch
    pass

CONFIG_FILE = "vq_config.json"
WEIGHTS_FILE = "vq.safetensors"


@dataclass
class VQConfig:
    """Everything needed to rebuild a VQVAE; saved as `vq_config.json` next to its weights."""

    image_size: int = 32  # side of the square RGB input in pixels
    f: int = 4  # downsample factor, a power of 2: the code grid is image_size // f per side
    channels: int = 32  # conv width at full resolution; level i uses channels * channel_mult[i]
    # one entry per resolution level (log2(f) + 1 levels); width grows as resolution falls, because
    # full-resolution convs dominate the CPU step time (measured: 64@32² cost 1.8× 32@32² per step)
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1  # residual blocks per resolution level (encoder and decoder each)
    num_groups: int = 8  # GroupNorm groups; must divide every level's width
    # encoder normalisation: "group" (GroupNorm: statistics over the whole image, so a blank patch's
    # code depends on what else is in the picture) or "channel" (per-position norm over channels:
    # a code depends only on its receptive field, so blank background gets the same few codes in
    # every image, a far more predictable token stream for the transformer)
    encoder_norm: str = "group"
    # reserve the last code for patches whose f×f pixels are all black (≤ BLANK_MAX_PIXEL of 255 in
    # every channel), decided from the pixels, never learned. Without it the EMA codebook with dead-code
    # re-seeding spread the shapes world's black background (77% of its patches) over ~6 bits of
    # near-identical codes that depend on the rest of the picture: noise the transformer must model
    # and that Bayes-rule scores and retrieval copying inherit. Images without black patches (photos)
    # never use the code, so the tokenizer is then a plain VQ-VAE with codebook_size - 1 codes.
    blank_code: bool = True
    latent_dim: int = 64  # width of the encoder output / decoder input (`dim` of VectorQuantize)
    codebook_size: int = 512  # number of codes K: image tokens take ids 0..K-1
    codebook_dim: int = 64  # width of codebook vectors; != latent_dim adds linear projections in/out
    decay: float = 0.95  # EMA decay of the codebook; LIBS.md: 0.9-0.99 kept 510/512 codes alive
    commitment_weight: float = 0.25  # β of van den Oord et al. 2017 (VQ-VAE), eq. 3
    # codes whose EMA cluster size falls below this are re-seeded from the batch. Measured on the
    # default mixture (1200 steps × 16 images, eval split, shapes/digits). Without blank_code:
    # 2.0 -> 32.1/34.3 dB, usage 96/70%; 0.1 -> 33.3/36.1 dB, usage 98/74%; 0 (never) -> 32.8/34.6 dB,
    # usage 47/36%. With blank_code the black patches (77% of shapes patches) leave the statistics,
    # ~500 content vectors per batch meet 511 codes, and 2.0 re-seeded codes every step: 29.8/33.8 dB,
    # usage 83/84%; 0.5 -> 32.7/35.2 dB, usage 88/83%; 0.1 -> 33.3/36.1 dB, usage 96/65%.
    threshold_ema_dead_code: float = 0.5
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch (LIBS.md: avoids collapse)
    kmeans_iters: int = 10  # k-means iterations for that init
    rotation_trick: bool = True  # gradient through the quantizer by the rotation trick (Fifty et al. 2024), else STE
    sync_codebook: bool = False  # all-reduce codebook statistics across DDP ranks; set True under torchrun

    def __post_init__(self) -> None:
        if not isinstance(self.channel_mult, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) for m in self.channel_mult):
            raise ValueError(f"VQConfig.channel_mult must be a list of integers; found {self.channel_mult!r}")
        self.channel_mult = tuple(self.channel_mult)  # JSON gives a list
        for name in ("image_size", "f", "channels", "num_res_blocks", "num_groups", "latent_dim",
                     "codebook_size", "codebook_dim", "kmeans_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VQConfig.{name} must be a positive integer; found {v!r}")
        if self.f < 2 or self.f & (self.f - 1):
            raise ValueError(f"VQConfig.f (downsample factor) must be a power of 2 ≥ 2; found {self.f}")
        if self.image_size % self.f:
            raise ValueError(
                f"VQConfig.image_size={self.image_size} is not divisible by f={self.f}; "
                f"pick an image size that is a multiple of {self.f}"
            )
        levels = int(math.log2(self.f)) + 1
        if len(self.channel_mult) != levels:
            raise ValueError(
                f"VQConfig.channel_mult has {len(self.channel_mult)} entries {self.channel_mult}; "
                f"f={self.f} needs log2(f)+1 = {levels} (one per resolution level)"
            )
        for m in self.channel_mult:
            width = self.channels * m
            if m < 1 or width % self.num_groups:
                raise ValueError(
                    f"level width channels*mult = {self.channels}*{m} = {width} must be positive and "
                    f"divisible by num_groups={self.num_groups}; change channels, channel_mult or num_groups"
                )
        if self.codebook_size < 2:
            raise ValueError(f"VQConfig.codebook_size must be ≥ 2; found {self.codebook_size}")
        for name in ("decay", "commitment_weight", "threshold_ema_dead_code"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"VQConfig.{name} must be a number; found {v!r}")
        if self.encoder_norm not in ("group", "channel"):
            raise ValueError(f"VQConfig.encoder_norm must be 'group' or 'channel'; found {self.encoder_norm!r}")
        for name in ("kmeans_init", "rotation_trick", "sync_codebook", "blank_code"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VQConfig.{name} must be true or false; found {getattr(self, name)!r}")
        if self.blank_code and self.codebook_size < 2:
            raise ValueError("VQConfig.blank_code reserves one code, so codebook_size must be ≥ 2")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"VQConfig.decay must be in (0, 1); found {self.decay} (LIBS.md: 0.9-0.99 works)")
        if self.commitment_weight < 0:
            raise ValueError(f"VQConfig.commitment_weight must be ≥ 0; found {self.commitment_weight}")
        if self.threshold_ema_dead_code < 0:
            raise ValueError(f"VQConfig.threshold_ema_dead_code must be ≥ 0; found {self.threshold_ema_dead_code}")

    @property
    def grid(self) -> int:
        """Codes per side: image_size // f."""
        return self.image_size // self.f

    @property
    def num_tokens(self) -> int:
        """Codes per image: grid * grid (raster order)."""
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQConfig":
        """Build from a dict that must hold exactly this dataclass's fields."""
        if not isinstance(d, dict):
            raise ValueError(f"VQ config must be a JSON object; found {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        d = {**ADDED_LATER, **d}  # folders saved before these fields existed meant their old behaviour
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(
                f"VQ config does not match VQConfig: unknown keys {unknown}, missing keys {missing}; "
                "it was written by another version of the code — re-save it with VQVAE.save()"
            )
        return cls(**d)


# fields added after the first release, with the value that reproduces the older behaviour
ADDED_LATER: dict[str, Any] = {"encoder_norm": "group", "blank_code": False}
# (folders saved before blank_code existed store threshold_ema_dead_code explicitly: 2.0 then)

# a patch is blank when no pixel of it exceeds this value (0..255) in any channel: exact black plus
# the rounding noise of resizing and JPEG-free PNG round trips
BLANK_MAX_PIXEL = 2

# Named presets. Param counts are for the whole VQVAE (encoder + decoder + codebook projections).
VQ_PRESETS: dict[str, VQConfig] = {
    # tests only: trains in a few seconds; 81k params
    "tiny": VQConfig(image_size=32, f=4, channels=16, channel_mult=(1, 1, 2), num_res_blocks=1, num_groups=4,
                     latent_dim=16, codebook_size=64, codebook_dim=16),
    # the CPU default: 32×32 RGB -> 8×8 codes from 512; 1.10M params; calibrated for `make tokenize`
    # (train/vq.py VQ_TRAIN_SETTINGS: 1200 steps × 16, ≤ 145 s on one core, ≥ 32 dB shapes / 34 dB digits)
    "default": VQConfig(),
    # GPU: 64×64 -> 8×8 codes (f=8) from 1024; 9.1M params
    "64px": VQConfig(image_size=64, f=8, channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                     num_groups=32, latent_dim=128, codebook_size=1024, codebook_dim=64, decay=0.99),
    # GPU: 128×128 -> 16×16 codes (f=8) from 4096; 31.6M params
    "128px": VQConfig(image_size=128, f=8, channels=128, channel_mult=(1, 1, 2, 4), num_res_blocks=2,
                      num_groups=32, latent_dim=256, codebook_size=4096, codebook_dim=64, decay=0.99),
}


class VQOutput(NamedTuple):
    """What `VQVAE.forward` returns."""

    recon: torch.Tensor  # (B, 3, H, W) float, unclamped reconstruction
    indices: torch.Tensor  # (B, grid, grid) int64 codes
    commit_loss: torch.Tensor  # scalar, already weighted by commitment_weight
    latents: torch.Tensor  # (B, grid*grid, latent_dim) float32 encoder output before quantization
    blank: torch.Tensor | None  # (B, grid*grid) bool, True at black patches (None without blank_code)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position of a (B, C, H, W) map: no spatial statistics."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind: str, channels: int, num_groups: int) -> nn.Module:
    """"group": GroupNorm(num_groups); "channel": ChannelNorm (see VQConfig.encoder_norm)."""
    return ChannelNorm(channels) if kind == "channel" else nn.GroupNorm(num_groups, channels)


class ResBlock(nn.Module):
    """Norm -> SiLU -> conv3x3, twice, plus a (1x1-projected if needed) skip."""

    def __init__(self, c_in: int, c_out: int, num_groups: int, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = make_norm(norm, c_in, num_groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = make_norm(norm, c_out, num_groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, latent_dim, H/f, W/f)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, cfg.num_groups, cfg.encoder_norm))
                c = w
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # learned 2× downsample
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = make_norm(cfg.encoder_norm, c, cfg.num_groups)
        self.conv_out = nn.Conv2d(c, cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """(B, latent_dim, H/f, W/f) -> (B, 3, H, W), mirror of the encoder."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        c = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_dim, c, 3, padding=1)
        blocks: list[nn.Module] = []
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, cfg.num_groups))
                c = w
            if i < len(widths) - 1:
                # nearest upsample + conv avoids the checkerboard of transposed convs
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.num_groups, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class VQVAE(nn.Module):
    """Image tokenizer: `encode` images to code grids, `decode` code grids to images."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        if not isinstance(config, VQConfig):
            raise ValueError(f"VQVAE needs a VQConfig; found {type(config).__name__} (see VQ_PRESETS)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # with blank_code the library's codebook holds the learned codes 0..K-2 and id K-1 means
        # "black patch", decoded from one learned latent vector
        self.blank_id = config.codebook_size - 1 if config.blank_code else None
        self.vq = VectorQuantize(
            dim=config.latent_dim,
            codebook_size=config.codebook_size - (1 if config.blank_code else 0),
            codebook_dim=config.codebook_dim,
            decay=config.decay,
            commitment_weight=config.commitment_weight,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            threshold_ema_dead_code=config.threshold_ema_dead_code,
            rotation_trick=config.rotation_trick,
            # explicit: the library caches its "am I distributed" check at first construction (LIBS.md)
            sync_codebook=config.sync_codebook,
            accept_image_fmap=False,  # we flatten to (B, h*w, C) ourselves
        )
        if config.blank_code:
            self.blank_embed = nn.Parameter(torch.zeros(config.latent_dim))
        if config.kmeans_init:
            # the library starts a k-means codebook at zeros (every code identical) until the first
            # training batch; random codes make an untrained model's codes varied instead of all 0
            with torch.no_grad():
                self.vq._codebook.embed.normal_()

    # ---- core -----------------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"expected images as a float tensor (B, 3, {s}, {s}) in [-1, 1]; found {shape} — "
                "convert PIL images with tokenizers_mm.images.pil_to_tensor"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"expected float images in [-1, 1]; found dtype {x.dtype} — use pil_to_tensor, or x/127.5 - 1"
            )

    def blank_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) in [-1, 1] -> (B, grid·grid) bool, True where the f×f patch is black; None
        without blank_code. Raster order, like the codes."""
        if not self.config.blank_code:
            return None
        brightest = x.float().amax(dim=1, keepdim=True)  # (B, 1, H, W): a patch is black iff every channel is
        peak = F.max_pool2d(brightest, self.config.f)  # (B, 1, g, g)
        return (peak <= BLANK_MAX_PIXEL / 127.5 - 1.0 + 1e-6).flatten(1)

    def _with_blank(self, quantized: torch.Tensor, indices: torch.Tensor, blank: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the blank code (index and latent) where `blank` (B, N) is True."""
        if blank is None:
            return quantized, indices
        quantized = torch.where(blank[..., None], self.blank_embed.to(quantized.dtype), quantized)
        return quantized, indices.masked_fill(blank, self.blank_id)

    def _black_out(self, images: torch.Tensor, blank: torch.Tensor | None) -> torch.Tensor:
        """Set the pixels of blank patches to exact black: the code says they are black, so the
        decoder needs no capacity for them (and in training gets no loss there)."""
        if blank is None:
            return images
        g, f = self.config.grid, self.config.f
        pixels = blank.view(-1, 1, g, g).repeat_interleave(f, 2).repeat_interleave(f, 3)
        return images.masked_fill(pixels, -1.0)

    def _quantize_eval(self, z: torch.Tensor, blank: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code lookup without touching the codebook's state: (B, N, D) -> (quantized, indices),
        with the blank code where `blank` (B, N) is True (see blank_mask).

        The library's forward would k-means-initialise an untrained codebook even in eval mode, so
        inference does the (identical, Euclidean) lookup itself.
        """
        zc = self.vq.project_in(z.float())  # (B, N, codebook_dim)
        codebook = self.vq.codebook.float()  # (K, codebook_dim)
        # ‖z−c‖² up to a per-row constant; float64 so argmin ties don't depend on batch blocking
        zc64, cb64 = zc.double(), codebook.double()
        dist = cb64.pow(2).sum(-1) - 2.0 * zc64 @ cb64.t()  # (B, N, K)
        indices = dist.argmin(-1)
        quantized = self.vq.project_out(codebook[indices])  # (B, N, latent_dim)
        return self._with_blank(quantized, indices, blank)

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Reconstruct images; in train mode this also updates the EMA codebook.

        x: (B, 3, H, W) in [-1, 1]. Conv parts follow any enclosing autocast; the quantizer runs in float32.
        """
        self._check_images(x)
        z = self.encoder(x)  # (B, D, g, g)
        b, d, g, _ = z.shape
        z = z.float().flatten(2).transpose(1, 2)  # (B, g*g, D)
        blank = self.blank_mask(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.training and not (blank is not None and blank.all()):
                # black patches take no part in k-means, EMA, re-seeding or the commitment loss
                quantized, indices, commit_loss = self.vq(z, mask=None if blank is None else ~blank)
                quantized, indices = self._with_blank(quantized, indices, blank)
            else:  # evaluation, or a training batch of black images only
                quantized, indices = self._quantize_eval(z, blank)
                keep = ~blank if blank is not None else torch.ones_like(indices, dtype=torch.bool)
                commit_loss = self.config.commitment_weight * F.mse_loss(z[keep], quantized[keep].detach()) \
                    if keep.any() else z.sum() * 0.0
        zq = quantized.transpose(1, 2).reshape(b, d, g, g)
        recon = self._black_out(self.decoder(zq), blank)
        return VQOutput(recon=recon, indices=indices.reshape(b, g, g).long(), commit_loss=commit_loss.sum(),
                        latents=z, blank=blank)

    # ---- public tokenizer API --------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1] -> codes (B, grid, grid) int64 in [0, codebook_size).

        Deterministic and batch-invariant; never changes the codebook (safe in train or eval mode).
        """
        self._check_images(x)
        if x.numel() and (x.min() < -1.01 or x.max() > 1.01):
            raise ValueError(
                f"expected pixel values in [-1, 1]; found [{x.min().item():.3g}, {x.max().item():.3g}] — "
                "uint8 images must be scaled: pil_to_tensor does it"
            )
        dev = self.vq.codebook.device
        g = self.config.grid
        out = []
        for chunk in x.split(batch_size):
            chunk = chunk.to(dev).float()
            z = self.encoder(chunk).float().flatten(2).transpose(1, 2)
            _, idx = self._quantize_eval(z, self.blank_mask(chunk))
            out.append(idx.reshape(-1, g, g))
        if not out:
            return torch.empty(0, g, g, dtype=torch.long, device=dev)
        return torch.cat(out).long()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Codes (B, grid, grid) int in [0, codebook_size) -> images (B, 3, H, W) float clamped to [-1, 1]."""
        g, k = self.config.grid, self.config.codebook_size
        if not torch.is_tensor(indices) or indices.ndim != 3 or tuple(indices.shape[1:]) != (g, g):
            shape = tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__
            raise ValueError(f"expected codes of shape (B, {g}, {g}); found {shape} — reshape a raster "
                             f"sequence of {g * g} codes with .view(-1, {g}, {g})")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer codes; found dtype {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= k):
            raise ValueError(f"codes must lie in [0, {k}); found [{indices.min().item()}, {indices.max().item()}] — "
                             "subtract the image-token offset before decoding")
        dev = self.vq.codebook.device
        out = []
        # project_out(codebook[idx]) equals the forward pass's output (LIBS.md: get_output_from_indices
        # breaks for image fmaps with codebook_dim != dim); the blank latent, if any, is the last row
        table = self.vq.project_out(self.vq.codebook.float())  # (K or K-1, D)
        if self.config.blank_code:
            table = torch.cat([table, self.blank_embed.float()[None]])
        for chunk in indices.split(batch_size):
            chunk = chunk.to(dev).long()
            q = table[chunk]  # (b, g, g, D)
            blank = chunk.flatten(1) == self.blank_id if self.config.blank_code else None
            out.append(self._black_out(self.decoder(q.permute(0, 3, 1, 2).contiguous()), blank).clamp(-1, 1))
        if not out:
            s = self.config.image_size
            return torch.empty(0, 3, s, s, device=dev)
        return torch.cat(out)

    @property
    def is_trained(self) -> bool:
        """False until the codebook has been k-means-initialised by a training step (always True without kmeans_init)."""
        return bool(self.vq._codebook.initted.item())

    # ---- checkpoint ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write `vq_config.json` and `vq.safetensors` into `directory` (created), each atomically."""
        save_config_and_weights(self, self.config.to_dict(), directory, CONFIG_FILE, WEIGHTS_FILE, "vqvae")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "VQVAE":
        """Load a folder written by `save`, strictly; returns the model in eval mode."""
        cfg_dict = read_config(directory, CONFIG_FILE, WEIGHTS_FILE, "VQ-VAE",
                               f"train one with `python -m train.vq --out {directory}`")
        try:
            config = VQConfig.from_dict(cfg_dict)
        except ValueError as e:
            raise ValueError(f"{Path(directory) / CONFIG_FILE}: {e}") from None
        model = cls(config)
        load_weights_strict(model, directory, CONFIG_FILE, WEIGHTS_FILE, "model")
        return model.to(device).eval()


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
