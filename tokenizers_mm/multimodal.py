"""The unified multimodal tokenizer: one vocabulary for text and images.

Vocabulary layout (DESIGN.md, "The token stream"):

    [0, 9)                               special tokens (special.py), ids fixed
    [9, text_vocab_size)                 byte-level BPE text tokens
    [image_offset, image_offset + K)     image codes, image_offset = text_vocab_size, K = codebook size

An image is always `<boi>` + grid×grid codes in raster order + `<eoi>`; codes become ids by
adding `image_offset`, never through the BPE. A document encodes as
`<bos> segment segment ... <eos>`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

from tokenizers_mm import special
from tokenizers_mm.atomic import write_atomic_folder
from tokenizers_mm.document import Document, Segment
from tokenizers_mm.images import pil_to_tensor, tensor_to_pil, to_rgb
from tokenizers_mm.text import configure
from tokenizers_mm.vqvae import VQVAE

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "multimodal.json")  # plus the VQ's own files (VQVAE.save)


@dataclass(frozen=True)
class VocabLayout:
    """Where each kind of token lives in the unified vocabulary."""

    text_vocab_size: int  # specials + BPE tokens, ids [0, text_vocab_size)
    codebook_size: int  # image codes, ids [image_offset, image_offset + codebook_size)

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.codebook_size

    def is_image_id(self, i: int) -> bool:
        return self.image_offset <= i < self.vocab_size

    def is_text_id(self, i: int) -> bool:
        """A BPE text token (not special, not image)."""
        return len(special.SPECIAL_TOKENS) <= i < self.text_vocab_size


class MultimodalTokenizer:
    """Documents (text and PIL image segments) <-> token ids of one vocabulary."""

    def __init__(self, text: Tokenizer, vq: VQVAE) -> None:
        self.text = configure(text)
        self.vq = vq.eval()
        self.layout = VocabLayout(text.get_vocab_size(with_added_tokens=True), vq.config.codebook_size)
        self.image_size: int = vq.config.image_size
        self.grid: int = vq.config.grid  # an image is grid×grid codes
        self.image_tokens: int = self.grid * self.grid  # codes per image, without boi/eoi

    def same_as(self, other: "MultimodalTokenizer") -> bool:
        """Whether `other` maps text and images to the very same ids: the same BPE, layout and VQ
        weights (models trained on one `make tokenize` output share it; a retokenized one does not)."""
        if self.layout != other.layout or self.text.to_str() != other.text.to_str():
            return False
        a, b = self.vq.state_dict(), other.vq.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def image_offset(self) -> int:
        return self.layout.image_offset

    @property
    def text_vocab_size(self) -> int:
        return self.layout.text_vocab_size

    # --- text ---------------------------------------------------------------------------------
    def encode_text(self, s: str) -> list[int]:
        """Text -> BPE ids. Special-token look-alikes stay text."""
        if not isinstance(s, str):
            raise TypeError(f"encode_text takes a str, got {type(s).__name__}")
        return self.text.encode(s, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched encode_text (the Rust encoder runs the batch in parallel)."""
        return [e.ids for e in self.text.encode_batch(list(texts), add_special_tokens=False)]

    def decode_text(self, ids: Sequence[int]) -> str:
        """BPE ids -> text. Raises ValueError on an id outside the text range."""
        bad = [i for i in ids if not self.layout.is_text_id(int(i))]
        if bad:
            raise ValueError(f"decode_text got non-text ids {bad[:5]} (text ids are 9..{self.text_vocab_size - 1})")
        return self.text.decode([int(i) for i in ids], skip_special_tokens=False)

    # --- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """RGB PIL images -> codes (N, grid*grid) int64 in [0, codebook_size), raster order.
        Images of another size or mode are converted first."""
        if len(images) == 0:
            return torch.zeros(0, self.image_tokens, dtype=torch.long)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [to_rgb(im, self.image_size) for im in images[i : i + batch_size]]
            out.append(self.vq.encode(pil_to_tensor(chunk)).flatten(1))
        return torch.cat(out).long()

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> list[Image.Image]:
        """Codes (N, grid*grid) in [0, codebook_size) -> RGB PIL images."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != self.image_tokens:
            raise ValueError(f"decode_images expects codes of shape (N, {self.image_tokens}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.layout.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.layout.codebook_size}), got [{codes.min()}, {codes.max()}]")
        x = self.vq.decode(codes.view(-1, self.grid, self.grid))
        return tensor_to_pil(x)

    def image_ids(self, codes: Sequence[int] | torch.Tensor) -> list[int]:
        """One image's codes -> `<boi>` + (codes + image_offset) + `<eoi>`."""
        codes = [int(c) for c in codes]
        if len(codes) != self.image_tokens:
            raise ValueError(f"an image has exactly {self.image_tokens} codes, got {len(codes)}")
        return [special.BOI_ID, *(c + self.image_offset for c in codes), special.EOI_ID]

    # --- documents ----------------------------------------------------------------------------
    def encode(self, document: Document | Sequence[Segment], *, bos: bool = True, eos: bool = True) -> list[int]:
        """Document -> ids: `<bos>` segments `<eos>` (each image as `<boi>` codes `<eoi>`)."""
        return self.encode_batch([document], bos=bos, eos=eos)[0]

    def encode_batch(
        self, documents: Sequence[Document | Sequence[Segment]], *, bos: bool = True, eos: bool = True
    ) -> list[list[int]]:
        """Encode many documents; all their images go through the VQ-VAE in large batches."""
        docs = [d.segments if isinstance(d, Document) else list(d) for d in documents]
        images = [s for d in docs for s in d if isinstance(s, Image.Image)]
        texts = [s for d in docs for s in d if isinstance(s, str)]
        codes = iter(self.encode_images(images).tolist())
        text_ids = iter(self.encode_texts(texts))
        out = []
        for d in docs:
            ids = [special.BOS_ID] if bos else []
            for seg in d:
                if isinstance(seg, str):
                    ids.extend(next(text_ids))
                elif isinstance(seg, Image.Image):
                    ids.extend(self.image_ids(next(codes)))
                else:
                    raise TypeError(f"a segment must be str or PIL.Image.Image, got {type(seg).__name__}")
            if eos:
                ids.append(special.EOS_ID)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> Document:
        """ids -> Document. `<bos>`, `<eos>` and `<pad>` are dropped; adjacent text merges; any
        other special token (break, mask, infill, eom) is kept in the text as its name so that
        nothing is lost. Raises ValueError on a malformed image (wrong code count, text inside)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        segments: list[Segment] = []
        text: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            if run:
                text.append(self.decode_text(run))
                run.clear()

        def flush_text() -> None:
            flush_run()
            if text:
                segments.append("".join(text))
                text.clear()

        pending_images: list[tuple[int, list[int]]] = []  # (segment index, codes)
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == special.BOI_ID:
                codes = ids[i + 1 : i + 1 + self.image_tokens]
                end = i + 1 + self.image_tokens
                if (
                    len(codes) != self.image_tokens
                    or not all(self.layout.is_image_id(c) for c in codes)
                    or end >= len(ids)
                    or ids[end] != special.EOI_ID
                ):
                    raise ValueError(
                        f"malformed image at position {i}: expected <boi> + {self.image_tokens} image codes + <eoi>"
                    )
                flush_text()
                pending_images.append((len(segments), [c - self.image_offset for c in codes]))
                segments.append("")  # placeholder, filled by one batched decode below
                i = end + 1
                continue
            if self.layout.is_text_id(t):
                run.append(t)
            elif t in (special.BOS_ID, special.EOS_ID, special.PAD_ID):
                pass
            elif t < len(special.SPECIAL_TOKENS):
                flush_run()
                text.append(special.SPECIAL_TOKENS[t])
            else:
                raise ValueError(f"id {t} at position {i} is not a text token here (image code outside <boi>..<eoi>, or beyond vocab {self.vocab_size})")
            i += 1
        flush_text()
        if pending_images:
            pics = self.decode_images([c for _, c in pending_images])
            for (j, _), pic in zip(pending_images, pics):
                segments[j] = pic
        return Document(segments)

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the self-contained tokenizer folder (tokenizer.json, multimodal.json and the
        VQ-VAE's config + safetensors weights). Atomic: written beside, then renamed."""
        def fill(tmp: Path) -> None:
            self.text.save(str(tmp / "tokenizer.json"))
            self.vq.save(tmp)
            meta = {
                "format_version": FORMAT_VERSION,
                "text_vocab_size": self.text_vocab_size,
                "codebook_size": self.layout.codebook_size,
                "image_offset": self.image_offset,
                "vocab_size": self.vocab_size,
                "image_size": self.image_size,
                "grid": self.grid,
                "special_tokens": list(special.SPECIAL_TOKENS),
            }
            (tmp / "multimodal.json").write_text(json.dumps(meta, indent=2))

        write_atomic_folder(path, fill)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MultimodalTokenizer":
        """Load a folder written by `save`, strictly: every file present, layout as recorded."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer folder not found: {path} — run `make tokenize` to create it")
        missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"tokenizer folder {path} is incomplete: missing {', '.join(missing)} — rerun `make tokenize`")
        try:
            meta = json.loads((path / "multimodal.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'multimodal.json'} is not valid JSON ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has tokenizer format {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
        if tuple(meta.get("special_tokens", ())) != special.SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens {meta.get('special_tokens')} differ from this code's {list(special.SPECIAL_TOKENS)}")
        try:
            text = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        tok = cls(text, VQVAE.from_pretrained(path))
        recorded = {k: meta.get(k) for k in ("text_vocab_size", "codebook_size", "vocab_size", "image_size", "grid")}
        actual = {
            "text_vocab_size": tok.text_vocab_size,
            "codebook_size": tok.layout.codebook_size,
            "vocab_size": tok.vocab_size,
            "image_size": tok.image_size,
            "grid": tok.grid,
        }
        if recorded != actual:
            diff = {k: (recorded[k], actual[k]) for k in actual if recorded[k] != actual[k]}
            raise ValueError(f"{path}: files disagree with multimodal.json (recorded, found): {diff}")
        return tok
