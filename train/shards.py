"""Memory-mappable token shards: tokenized documents on disk, read without loading them.

A shard is a folder per split (`artifacts/shards/train/`, `.../eval/`):

    tokens.bin     all segments' token ids back to back, little-endian uint16 (int32 if the
                   vocabulary exceeds 65,535); text segments hold BPE ids, image segments hold
                   image ids (code + image_offset) without <boi>/<eoi>
    segments.npy   int64 (num_segments, 3): kind (0 text, 1 image), start offset, length
    docs.npy       int64 (num_docs, 2): first segment, number of segments
    meta.jsonl     one JSON object per document: {"source": ..., "meta": {...}} (labels etc.)
    index.json     format version, dtype, counts, and the tokenizer's vocabulary layout

Documents keep their segment structure so that the training pipeline can build sequences in
either order (caption→image, image→caption), drop captions, or cut spans, at training time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

FORMAT_VERSION = 1
TEXT, IMAGE = 0, 1


@dataclass(frozen=True)
class ShardSegment:
    """One segment of a tokenized document."""

    kind: int  # TEXT or IMAGE
    ids: np.ndarray  # (length,) token ids; image ids already offset, no <boi>/<eoi>

    @property
    def is_image(self) -> bool:
        return self.kind == IMAGE


class ShardWriter:
    """Append tokenized documents, then `close()` to write the index (atomically, last)."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, layout: dict) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "index.json").unlink(missing_ok=True)  # a shard without index is unfinished
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
        self.layout = dict(layout, vocab_size=vocab_size)
        self._tokens = open(self.path / "tokens.bin", "wb")
        self._meta = open(self.path / "meta.jsonl", "w", encoding="utf-8")
        self._segments: list[tuple[int, int, int]] = []
        self._docs: list[tuple[int, int]] = []
        self._offset = 0
        self.counts = {"text_tokens": 0, "image_tokens": 0, "images": 0}

    def add(self, segments: list[tuple[int, list[int]]], source: str, meta: dict) -> None:
        """Append one document given as [(kind, ids), ...]."""
        if not segments:
            raise ValueError("a document needs at least one segment")
        self._docs.append((len(self._segments), len(segments)))
        for kind, ids in segments:
            arr = np.asarray(ids, dtype=self.dtype)
            self._tokens.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            self._segments.append((kind, self._offset, len(arr)))
            self._offset += len(arr)
            if kind == IMAGE:
                self.counts["image_tokens"] += len(arr)
                self.counts["images"] += 1
            else:
                self.counts["text_tokens"] += len(arr)
        self._meta.write(json.dumps({"source": source, "meta": meta}) + "\n")

    def close(self) -> dict:
        """Finish the shard; returns its index (also written to index.json)."""
        self._tokens.close()
        self._meta.close()
        np.save(self.path / "segments.npy", np.asarray(self._segments, dtype=np.int64).reshape(-1, 3))
        np.save(self.path / "docs.npy", np.asarray(self._docs, dtype=np.int64).reshape(-1, 2))
        index = {
            "format_version": FORMAT_VERSION,
            "dtype": np.dtype(self.dtype).name,
            "num_docs": len(self._docs),
            "num_segments": len(self._segments),
            "num_tokens": self._offset,
            **self.counts,
            "layout": self.layout,
        }
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.path / "index.json")
        return index


class Shard:
    """Read-only, memory-mapped view of a shard folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise ValueError(f"no finished shard at {self.path} (index.json missing) — run `make tokenize`")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"shard {self.path} has format {self.index.get('format_version')}, expected {FORMAT_VERSION}")
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        n = self.index["num_tokens"]
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        self.segments = np.load(self.path / "segments.npy", mmap_mode="r")
        self.docs = np.load(self.path / "docs.npy", mmap_mode="r")
        self._meta: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, i: int) -> list[ShardSegment]:
        """Segments of document i, token ids as int64 arrays."""
        first, count = self.docs[i]
        out = []
        for kind, start, length in self.segments[first : first + count]:
            out.append(ShardSegment(int(kind), np.asarray(self.tokens[start : start + length], dtype=np.int64)))
        return out

    def meta(self, i: int) -> dict:
        """{"source": ..., "meta": {...}} of document i (read on first use)."""
        if self._meta is None:
            with open(self.path / "meta.jsonl", encoding="utf-8") as f:
                self._meta = [json.loads(line) for line in f]
        return self._meta[i]

    def __iter__(self) -> Iterator[list[ShardSegment]]:
        return (self.document(i) for i in range(len(self)))
