"""One document representation for every source: an ordered list of text and image segments.

A pair ("a red circle", <image>) and a four-frame story are the same type; training sequences,
the tokenizer and the sampler all speak it. Images are held as PIL RGB images at the configured
size; `meta` carries ground truth that evaluation may use (labels, shape parameters) and is never
fed to the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from PIL import Image

Segment = Union[str, Image.Image]


@dataclass
class Document:
    """An interleaved document: text segments (str) and image segments (PIL RGB images)."""

    segments: list[Segment]
    source: str = ""  # which corpus produced it: "shapes", "digits", "jsonl:<path>", ...
    meta: dict[str, Any] = field(default_factory=dict)  # ground truth for evaluation only

    def __post_init__(self) -> None:
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, (str, Image.Image)):
                raise TypeError(
                    f"segment {i} is a {type(seg).__name__}; a document holds only str (text) "
                    "and PIL.Image.Image (image) segments"
                )

    @property
    def texts(self) -> list[str]:
        """The text segments, in order."""
        return [s for s in self.segments if isinstance(s, str)]

    @property
    def images(self) -> list[Image.Image]:
        """The image segments, in order."""
        return [s for s in self.segments if isinstance(s, Image.Image)]

    def is_pair(self) -> bool:
        """True for an image-caption pair: exactly one text and one image segment."""
        return len(self.segments) == 2 and len(self.texts) == 1 and len(self.images) == 1

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)


def is_image(segment: Segment) -> bool:
    """True if the segment is an image."""
    return isinstance(segment, Image.Image)
