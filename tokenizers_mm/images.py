"""Image I/O and conversions shared by the tokenizer, the data sources and the sampler.

Every image entering the project goes through `load_image` or `to_rgb`, so that every PIL mode
(L, LA, P, RGBA, I;16, I, F, CMYK, 1, ...) and every size becomes an RGB image of the configured
size, and an unreadable file becomes one clear `ValueError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# decompression-bomb guard: refuse absurd images instead of exhausting memory (PIL warns at 89 MP)
MAX_PIXELS = 64_000_000


def to_rgb(img: Image.Image, size: int | None = None) -> Image.Image:
    """Convert any PIL image to RGB (alpha composited on black) and, if `size` is given,
    resize to size×size (center crop to square first, Lanczos/box filtering)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit depth: rescale the actual range to 0..255 rather than clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # the project's background is black
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS)
    return img


def load_image(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Open an image file of any common format and mode as RGB of `size`×`size`.

    Raises ValueError naming the file for a missing, empty, truncated or non-image file.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"image file not found: {p}")
    if p.is_dir():
        raise ValueError(f"image path is a folder, not a file: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {p}")
    try:
        with Image.open(p) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"image {p} is {w}×{h}, larger than {MAX_PIXELS:,} pixels; downscale it first")
            img.load()  # force decoding now so truncated files fail here
            return to_rgb(img, size)
    except UnidentifiedImageError:
        raise ValueError(f"not an image file (PIL cannot identify it): {p}") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot read image {p}: {e}") from None


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> float tensor (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(to_rgb(im), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> RGB PIL images (values clipped)."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), mode="RGB") for a in arr]


def image_grid(rows: list[list[Image.Image]], pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile rows of equally sized images into one picture (grey padding), optionally upscaled
    with nearest-neighbour so small images stay crisp to look at."""
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError("image_grid needs at least one image")
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (96, 96, 96))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            if scale != 1:
                im = im.resize((w, h), Image.Resampling.NEAREST)
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid
