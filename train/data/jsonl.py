"""A user's own documents in the JSONL format of DATA.md §3.

One document per line, UTF-8, image paths relative to the JSONL file:

    {"image": "images/0001.png", "text": "a dog running on a beach"}
    {"segments": [{"text": "Step one:"}, {"image": "a.png"}, {"text": "step two:"}, {"image": "b.png"}]}

A pair becomes the document [text, image] (text first, like every other corpus of the project).
Every problem is reported as a `BadInput(file, line, reason)` and counted; nothing is dropped
silently. Blank lines are not documents and are skipped without a report.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from tokenizers_mm.document import Document
from tokenizers_mm.images import load_image

log = logging.getLogger(__name__)

PAIR_KEYS = frozenset({"image", "text"})
SEGMENTS_KEYS = frozenset({"segments"})
FORMAT_HINT = 'expected {"image": PATH, "text": STR} or {"segments": [{"text": STR} | {"image": PATH}, ...]}'


@dataclass(frozen=True)
class BadInput:
    """One rejected line: which file, which line (1-based), and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class _Bad(Exception):
    """Internal: a line cannot become a document (the message is the reason)."""


def _image(value: Any, base: Path, size: int, where: str) -> Image.Image:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"{where} must be a non-empty path string; found {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    try:
        return load_image(p, size)
    except ValueError as e:  # missing, empty, truncated, corrupt or not an image
        raise _Bad(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can trip any decoder error; one line, not the run
        raise _Bad(f"{where}: cannot read image {p}: {type(e).__name__}: {e}") from None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} must be a string; found {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"{where} is empty")
    return value


def _parse(obj: Any, base: Path, size: int) -> list[str | Image.Image]:
    """A decoded JSON value -> document segments, or _Bad naming the problem."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object; found {type(obj).__name__} ({FORMAT_HINT})")
    keys = set(obj)
    if keys == PAIR_KEYS:
        return [_text(obj["text"], "text"), _image(obj["image"], base, size, "image")]
    if keys == SEGMENTS_KEYS:
        segs = obj["segments"]
        if not isinstance(segs, list):
            raise _Bad(f"segments must be a list; found {type(segs).__name__}")
        if not segs:
            raise _Bad("segments is empty; a document needs at least one segment")
        out: list[str | Image.Image] = []
        for k, seg in enumerate(segs):
            if not isinstance(seg, dict) or len(seg) != 1 or not set(seg) <= PAIR_KEYS:
                raise _Bad(f'segment {k} must be {{"text": STR}} or {{"image": PATH}}; found {json.dumps(seg)[:80]}')
            (key, value), = seg.items()
            where = f"segment {k} {key}"
            out.append(_text(value, where) if key == "text" else _image(value, base, size, where))
        return out
    unknown, missing = sorted(keys - PAIR_KEYS - SEGMENTS_KEYS), sorted(PAIR_KEYS - keys)
    if unknown:
        detail = f"unknown keys {unknown}"
    elif "segments" in keys:
        detail = "both 'segments' and pair keys"
    else:
        detail = f"missing keys {missing}"
    raise _Bad(f"{detail}; found keys {sorted(keys)} ({FORMAT_HINT})")


def _read_file(path: Path, size: int, raise_first: bool) -> tuple[list[Document], list[BadInput], int]:
    """Documents, problems and the number of non-blank lines of one JSONL file."""
    docs: list[Document] = []
    bad: list[BadInput] = []
    n_lines = 0
    with path.open("rb") as f:  # bytes, so one non-UTF-8 line doesn't spoil the rest of the file
        for no, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8").lstrip("\ufeff")  # tolerate a byte-order mark
                except UnicodeDecodeError as e:
                    raise _Bad(f"line is not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
                if not line.strip():
                    continue  # blank lines are not documents
                n_lines += 1
                try:
                    obj = json.loads(line.strip())
                except json.JSONDecodeError as e:
                    raise _Bad(f"malformed JSON ({e.msg}, column {e.colno})") from None
                segments = _parse(obj, path.parent, size)
            except _Bad as e:
                if raise_first:
                    raise ValueError(
                        f"{path}:{no}: {e}. Fix or delete this line, or load with on_error='skip' "
                        "to skip bad lines with a report"
                    ) from None
                bad.append(BadInput(str(path), no, str(e)))
                continue
            docs.append(Document(segments, source=f"jsonl:{path.name}", meta={"file": str(path), "line": no}))
    return docs, bad, n_lines


def load_jsonl(path: str | os.PathLike, size: int = 32,
               on_error: Literal["skip", "raise"] = "skip") -> tuple[list[Document], list[BadInput]]:
    """Load documents from a JSONL file (or every *.jsonl file of a folder, sorted by name).

    Images of any format and mode are converted to RGB `size`×`size`. on_error="skip" skips bad
    lines and returns them as `BadInput`s (with a warning summarising them); on_error="raise"
    raises ValueError at the first bad line, naming file:line. Raises ValueError if nothing
    usable is found.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; found {on_error!r}")
    root = Path(path)
    if root.is_dir():
        files = sorted(root.glob("*.jsonl"))
        if not files:
            raise ValueError(f"folder {root} has no *.jsonl file; give a .jsonl file or a folder of them")
    elif root.is_file():
        files = [root]
    else:
        raise ValueError(f"JSONL file not found: {root}")
    docs: list[Document] = []
    bad: list[BadInput] = []
    n_lines = 0
    for f in files:
        d, b, n = _read_file(f, size, on_error == "raise")
        docs += d
        bad += b
        n_lines += n
    first = "; ".join(str(b) for b in bad[:3])
    if not docs:
        raise ValueError(
            f"no usable document in {root} ({n_lines} lines, {len(bad)} bad"
            + (f": first problems: {first})" if bad else ")")
            + f"; {FORMAT_HINT}"
        )
    summary = f"{root}: {len(docs)} documents loaded, {len(bad)} bad lines skipped"
    if bad:
        warnings.warn(f"{summary} (first problems: {first})", stacklevel=2)
    else:
        log.info(summary)
    return docs, bad
