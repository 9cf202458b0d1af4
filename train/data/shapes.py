"""The procedural shapes world of DATA.md §1: coloured shapes, captions, short stories, and an
exact checker for images that claim to show them.

Every image is drawn from a known `Scene`, so evaluation can judge a generated image or caption
exactly. Conventions fixed here (and relied on by `analyze`):

- canvas `size`×`size` RGB on black, drawn at 8× and box-downsampled (anti-aliased, and the
  pixel values are exact coverage fractions of the shape colour, which the checker uses);
- a small shape spans 28% of the side ("about 30%": 28% leaves a gap of at least 0.7 px
  between neighbouring cells, so the checker can separate the two shapes of a pair) and sits
  at the centre of one cell of a 3×3 grid; a large shape spans 60%, at the centre;
- `jitter` moves a shape by whole quarter-pixels *at 32 px* (units of 1/128 of the side): small
  shapes by up to ±0.5 px (±2 units, so neighbouring small shapes never touch and never leave
  the canvas), large single shapes by up to ±1 px (±4 units); stories keep one jitter for all
  their frames and use ±2 units so that the object can grow and shrink;
- pairs: "to the left of" = same row, any two columns; "above" = same column, any two rows;
  the two objects always differ in colour or shape so the caption names each unambiguously;
- train/eval disjointness: an image belongs to train iff the sum of all jitter components of
  its objects is even, to eval iff it is odd. Two equal images have equal parameters, so the
  splits can never share an image (tests also check it on rendered bytes);
- hold-out: (purple, triangle) and (cyan, circle) never appear in train, in any frame.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tokenizers_mm.document import Document

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 30),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 0),
    "cyan": (0, 200, 220),
    "white": (240, 240, 240),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# row-major 3×3 grid: index = 3 * row + col
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
RELATIONS: tuple[str, ...] = ("to the left of", "above")
HOLDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("cyan", "circle")})
KINDS: tuple[str, ...] = ("single", "pair", "story")
DEFAULT_MIX: dict[str, float] = {"single": 0.5, "pair": 0.25, "story": 0.25}

SIZE_FRACTION = {"small": 0.28, "large": 0.6}  # shape extent as a fraction of the canvas side
MAX_JITTER = {"small": 2, "large": 4}  # in units of 1/128 of the side (a quarter pixel at 32 px)
STORY_JITTER = 2  # stories keep their jitter when the object grows or shrinks
SUPERSAMPLE = 8
MIN_SIZE = 16  # below this, neighbouring jitters could render identically (see module docstring)

SPLITS = {"train": "train", "eval": "eval", "test": "eval"}  # "test" is an alias of "eval"

# position phrases: (in-phrase, at-phrase, long phrase)
_IN = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_AT = {p: "at the " + p for p in POSITIONS}
_LONG = {
    "top left": "in the top left corner", "top": "near the top edge",
    "top right": "in the top right corner", "left": "on the left side",
    "center": "in the middle", "right": "on the right side",
    "bottom left": "in the bottom left corner", "bottom": "near the bottom edge",
    "bottom right": "in the bottom right corner",
}
_DIRECTION = {(0, 1): "to the right", (0, -1): "to the left", (-1, 0): "up", (1, 0): "down"}


def canonical_split(split: str) -> str:
    """Map a split name to "train" or "eval" ("test" is accepted as an alias of "eval")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


@dataclass(frozen=True)
class ShapeSpec:
    """One filled shape: what it is, where it is, and its sub-pixel jitter."""

    shape: str  # one of SHAPES
    colour: str  # one of PALETTE
    size: str = "small"  # "small" or "large"
    position: str = "center"  # one of POSITIONS; always "center" for a large shape
    jitter: tuple[int, int] = (0, 0)  # (dx, dy) in units of 1/128 of the side, see MAX_JITTER

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        if self.size == "large" and self.position != "center":
            raise ValueError(f"a large shape sits at the center; found position {self.position!r}")
        m = MAX_JITTER[self.size]
        if len(self.jitter) != 2 or any(abs(int(j)) > m for j in self.jitter):
            raise ValueError(f"jitter {self.jitter} out of range for a {self.size} shape; expected |dx|, |dy| <= {m}")

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the position in the 3×3 grid."""
        return divmod(POSITIONS.index(self.position), 3)

    @property
    def is_holdout(self) -> bool:
        """True if (colour, shape) is one of the held-out combinations."""
        return (self.colour, self.shape) in HOLDOUT_PAIRS

    def to_meta(self) -> dict[str, Any]:
        """Plain-dict ground truth (JSON-serialisable)."""
        d = asdict(self)
        d["jitter"] = list(self.jitter)
        return d


@dataclass(frozen=True)
class Scene:
    """What one image shows: one shape, or two small shapes with a relation
    (`objects[0] <relation> objects[1]`)."""

    objects: tuple[ShapeSpec, ...]
    relation: str | None = None  # None for a single shape, else one of RELATIONS

    def __post_init__(self) -> None:
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError(f"a single-shape scene has no relation; found {self.relation!r}")
            return
        if len(self.objects) != 2 or self.relation not in RELATIONS:
            raise ValueError(
                f"a scene is one shape, or two shapes with a relation in {RELATIONS}; "
                f"found {len(self.objects)} objects and relation {self.relation!r}"
            )
        a, b = self.objects
        if a.size != "small" or b.size != "small":
            raise ValueError("both shapes of a pair must be small")
        (ra, ca), (rb, cb) = a.cell, b.cell
        ok = (ra == rb and ca < cb) if self.relation == "to the left of" else (ca == cb and ra < rb)
        if not ok:
            raise ValueError(f"{a.position!r} is not {self.relation} {b.position!r} (same row/column expected)")

    @property
    def jitter_parity(self) -> int:
        """0 for a train image, 1 for an eval image (sum of all jitter components mod 2)."""
        return sum(j for o in self.objects for j in o.jitter) % 2


# ----------------------------------------------------------------------------- rendering

def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: int, fill: tuple[int, ...] | int) -> None:
    """Draw one shape of extent `d` (supersampled px) with its bounding box centred at (cx, cy)."""
    x0, y0 = round(cx - d / 2), round(cy - d / 2)
    x1, y1 = x0 + d - 1, y0 + d - 1  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles triangle, as tall as it is wide
        draw.polygon([(x0 + (d - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render(scene: Scene | ShapeSpec, size: int = 32) -> Image.Image:
    """Draw a scene as a `size`×`size` RGB image on black (8× supersampled, box-downsampled)."""
    if size < MIN_SIZE:
        raise ValueError(f"canvas size {size} is too small; expected >= {MIN_SIZE} px")
    if isinstance(scene, ShapeSpec):
        scene = Scene((scene,))
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cell, unit = big / 3, big / 128
    for o in scene.objects:
        row, col = o.cell
        cx = (col + 0.5) * cell + o.jitter[0] * unit
        cy = (row + 0.5) * cell + o.jitter[1] * unit
        _draw(draw, o.shape, cx, cy, round(SIZE_FRACTION[o.size] * big), PALETTE[o.colour])
    return img.reduce(SUPERSAMPLE)  # box filter: each pixel = exact coverage × colour


# ----------------------------------------------------------------------------- captions

def _a(word: str) -> str:
    """The word with its indefinite article: "a red", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption_variants(scene: Scene | ShapeSpec) -> list[str]:
    """Every caption phrasing of a scene (all true of it): 5 for a single shape, 4 for a pair."""
    if isinstance(scene, ShapeSpec):
        scene = Scene((scene,))
    if len(scene.objects) == 1:
        o = scene.objects[0]
        c, s = o.colour, o.shape
        if o.size == "large":
            return [
                f"a large {c} {s} in the center",
                f"a big {c} {s} in the middle",
                f"there is a large {c} {s} in the center",
                f"{_a(c)} {s} filling the middle of the picture",
                f"the picture shows a large {c} {s}",
            ]
        p = o.position
        return [
            f"a small {c} {s} {_IN[p]}",
            f"{_a(c)} {s} {_AT[p]}",
            f"there is a small {c} {s} {_LONG[p]}",
            f"the picture shows a small {c} {s} {_IN[p]}",
            f"{_IN[p]}, a small {c} {s}",
        ]
    a, b = scene.objects
    pa, pb = f"{_a(a.colour)} {a.shape}", f"{_a(b.colour)} {b.shape}"
    if scene.relation == "to the left of":
        return [
            f"{pa} to the left of {pb}",
            f"{pb} to the right of {pa}",
            f"there is a small {a.colour} {a.shape} to the left of a small {b.colour} {b.shape}",
            f"two shapes: {pa} on the left and {pb} on the right",
        ]
    return [
        f"{pa} above {pb}",
        f"{pb} below {pa}",
        f"there is a small {a.colour} {a.shape} above a small {b.colour} {b.shape}",
        f"two shapes: {pa} on top and {pb} underneath",
    ]


def change_variants(change: dict[str, str]) -> list[str]:
    """Sentence phrasings of one story step (see `_story` for the change dicts)."""
    kind, value = change["change"], change.get("to", "")
    if kind == "move":
        return [f"it moves {value}.", f"then it moves {value}.", f"it moves one step {value}."]
    if kind == "colour":
        return [f"it turns {value}.", f"now it is {value}.", f"then it turns {value}."]
    if kind == "shape":
        return [f"it becomes a {value}.", f"it turns into a {value}.", f"now it is a {value}."]
    if kind == "grow":
        return ["it grows.", "it gets bigger.", "then it grows."]
    if kind == "shrink":
        return ["it shrinks.", "it gets smaller.", "then it shrinks."]
    raise ValueError(f"unknown change {kind!r}")


# ----------------------------------------------------------------------------- sampling

def _jitter(rng: random.Random, m: int) -> list[int]:
    return [rng.randint(-m, m), rng.randint(-m, m)]


def _fix_parity(jitters: list[list[int]], parity: int, m: int) -> None:
    """Nudge one component by one unit so the total has the wanted parity (stays in range)."""
    if sum(sum(j) for j in jitters) % 2 != parity:
        j = jitters[-1]
        j[0] = j[0] - 1 if j[0] == m else j[0] + 1


def _colour_shape(rng: random.Random, train: bool) -> tuple[str, str]:
    while True:
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        if not (train and (c, s) in HOLDOUT_PAIRS):
            return c, s


def _single(rng: random.Random, train: bool) -> Scene:
    c, s = _colour_shape(rng, train)
    size = "large" if rng.random() < 0.25 else "small"
    pos = "center" if size == "large" else rng.choice(POSITIONS)
    m = MAX_JITTER[size]
    jit = [_jitter(rng, m)]
    _fix_parity(jit, 0 if train else 1, m)
    return Scene((ShapeSpec(s, c, size, pos, tuple(jit[0])),))


def _pair(rng: random.Random, train: bool) -> Scene:
    relation = rng.choice(RELATIONS)
    line = rng.randrange(3)
    i, k = rng.choice([(0, 1), (1, 2), (0, 2)])
    cells = [(line, i), (line, k)] if relation == "to the left of" else [(i, line), (k, line)]
    ca = _colour_shape(rng, train)
    while (cb := _colour_shape(rng, train)) == ca:  # the two objects must be distinguishable
        pass
    m = MAX_JITTER["small"]
    jit = [_jitter(rng, m), _jitter(rng, m)]
    _fix_parity(jit, 0 if train else 1, m)
    objs = tuple(
        ShapeSpec(s, c, "small", POSITIONS[3 * r + col], tuple(j))
        for (c, s), (r, col), j in zip((ca, cb), cells, jit)
    )
    return Scene(objs, relation)


def _story_step(rng: random.Random, o: ShapeSpec, train: bool) -> tuple[ShapeSpec, dict[str, str]]:
    """One change of exactly one attribute (position, colour, shape or size)."""
    options: list[tuple[ShapeSpec, dict[str, str]]] = []
    if o.size == "small":
        r, c = o.cell
        for (dr, dc), word in _DIRECTION.items():
            if 0 <= r + dr < 3 and 0 <= c + dc < 3:
                moved = ShapeSpec(o.shape, o.colour, "small", POSITIONS[3 * (r + dr) + c + dc], o.jitter)
                options.append((moved, {"change": "move", "to": word}))
        if o.position == "center":  # grow only from the center, so that nothing else changes
            options.append((ShapeSpec(o.shape, o.colour, "large", "center", o.jitter), {"change": "grow"}))
    else:
        options.append((ShapeSpec(o.shape, o.colour, "small", "center", o.jitter), {"change": "shrink"}))
    for col in COLOURS:
        if col != o.colour and not (train and (col, o.shape) in HOLDOUT_PAIRS):
            options.append((ShapeSpec(o.shape, col, o.size, o.position, o.jitter), {"change": "colour", "to": col}))
    for s in SHAPES:
        if s != o.shape and not (train and (o.colour, s) in HOLDOUT_PAIRS):
            options.append((ShapeSpec(s, o.colour, o.size, o.position, o.jitter), {"change": "shape", "to": s}))
    # pick the kind of change first, so moves (up to 4 options) don't crowd out grow/shrink
    kinds = sorted({ch["change"] for _, ch in options})
    kind = rng.choice(kinds)
    return rng.choice([opt for opt in options if opt[1]["change"] == kind])


def _story(rng: random.Random, train: bool, size: int) -> Document:
    c, s = _colour_shape(rng, train)
    # start at the center more often than uniform so that grow/shrink steps happen
    sz = "large" if rng.random() < 0.2 else "small"
    pos = "center" if sz == "large" or rng.random() < 0.25 else rng.choice(POSITIONS)
    jit = [_jitter(rng, STORY_JITTER)]
    _fix_parity(jit, 0 if train else 1, STORY_JITTER)
    obj = ShapeSpec(s, c, sz, pos, tuple(jit[0]))
    frames, changes = [obj], []
    for _ in range(rng.randint(2, 4) - 1):
        obj, change = _story_step(rng, obj, train)
        frames.append(obj)
        changes.append(change)
    segments: list[str | Image.Image] = [rng.choice(caption_variants(frames[0])) + ".", render(frames[0], size)]
    for f, ch in zip(frames[1:], changes):
        segments += [rng.choice(change_variants(ch)), render(f, size)]
    meta = {
        "kind": "story",
        "images": [[f.to_meta()] for f in frames],
        "changes": changes,
        "holdout": any(f.is_holdout for f in frames),
    }
    return Document(segments, source="shapes", meta=meta)


def _scene_document(scene: Scene, kind: str, rng: random.Random, size: int) -> Document:
    meta: dict[str, Any] = {
        "kind": kind,
        "images": [[o.to_meta() for o in scene.objects]],
        "holdout": any(o.is_holdout for o in scene.objects),
    }
    if scene.relation is not None:
        meta["relation"] = scene.relation  # objects[0] <relation> objects[1]
    return Document([rng.choice(caption_variants(scene)), render(scene, size)], source="shapes", meta=meta)


def shapes_document(split: str, index: int, seed: int = 0, size: int = 32,
                    mix: dict[str, float] | None = None) -> Document:
    """The `index`-th document of a split: depends only on (seed, split, index, mix, size)."""
    split = canonical_split(split)
    weights = _check_mix(mix)
    # a string seed is hashed with sha512 by `random`, so this is stable across processes
    rng = random.Random(f"shapes:{seed}:{split}:{index}")
    kind = rng.choices(KINDS, weights=[weights[k] for k in KINDS])[0]
    train = split == "train"
    if kind == "single":
        doc = _scene_document(_single(rng, train), kind, rng, size)
    elif kind == "pair":
        doc = _scene_document(_pair(rng, train), kind, rng, size)
    else:
        doc = _story(rng, train, size)
    doc.meta.update(split=split, index=index)
    return doc


def _check_mix(mix: dict[str, float] | None) -> dict[str, float]:
    if mix is None:
        return DEFAULT_MIX
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown document kinds {sorted(unknown)} in mix; expected keys among {KINDS}")
    w = {k: float(mix.get(k, 0.0)) for k in KINDS}
    if any(v < 0 or not math.isfinite(v) for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"mix weights must be finite, >= 0 and not all zero; found {mix}")
    return w


def shapes_documents(split: str, n: int, seed: int = 0, size: int = 32,
                     mix: dict[str, float] | None = None) -> list[Document]:
    """`n` documents of the shapes world for split "train" or "eval" (alias "test").

    mix: proportions of "single", "pair" and "story" documents (default 0.5 / 0.25 / 0.25).
    Deterministic: document i depends only on (seed, split, i), so a longer list extends a
    shorter one. Each document has `source="shapes"` and `meta` = {"kind", "images" (per image
    a list of {shape, colour, size, position, jitter}), "relation" (pairs), "changes" (stories),
    "holdout", "split", "index"}.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; found {n}")
    if size < MIN_SIZE:
        raise ValueError(f"canvas size {size} is too small; expected >= {MIN_SIZE} px")
    return [shapes_document(split, i, seed, size, mix) for i in range(n)]


# ----------------------------------------------------------------------------- checker

@dataclass(frozen=True)
class DetectedObject:
    """One shape found in an image by `analyze`."""

    shape: str
    colour: str
    size: str
    position: str
    area: float  # in pixels (sum of coverage)
    fill: float  # area / (width × height) of the shape's extent: ≈1 square, ≈π/4 circle, ≈½ triangle
    extent: float  # max(width, height) as a fraction of the side
    centroid: tuple[float, float]  # (x, y) in pixels


@dataclass(frozen=True)
class CheckResult:
    """How a generated single-shape image matches its spec, attribute by attribute."""

    found: bool
    colour_ok: bool
    shape_ok: bool
    size_ok: bool
    position_ok: bool

    @property
    def all_ok(self) -> bool:
        return self.found and self.colour_ok and self.shape_ok and self.size_ok and self.position_ok


_PALETTE_ARR = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage  # scipy ships with scikit-learn

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=int))


def _best_template(cov: np.ndarray, size_name: str, cx: float, cy: float) -> str:
    """The shape whose ideal drawing (at this size, centroid on the blob's) overlaps the blob's
    coverage best (soft IoU). Unlike the fill ratio alone, this survives blur and noise."""
    h, w = cov.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        tpl = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
        d = round(SIZE_FRACTION[size_name] * min(h, w) * SUPERSAMPLE)
        # a triangle's centroid sits d/6 below the centre of its box
        shift = d / 6 if shape == "triangle" else 0.0
        _draw(ImageDraw.Draw(tpl), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE - shift, d, 255)
        t = np.asarray(tpl.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0
        iou = float(np.minimum(cov, t).sum() / max(np.maximum(cov, t).sum(), 1e-9))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def analyze(img: Image.Image, min_area: float = 0.1) -> list[DetectedObject]:
    """Find the shapes in an image on a black background, largest first.

    Colour: nearest palette colour of the brightest pixels of each connected blob. Area: sum of
    each pixel's coverage of that colour. Extent: coverage projections on x and y. Size: extent
    < 45% of the side is small. Shape: the best soft-IoU match among ideal drawings of the three
    shapes at that size, centred on the blob's centroid (`fill` is reported too: ≈1 square,
    ≈π/4 circle, ≈½ triangle). Position: the grid cell of the coverage centroid. Blobs smaller
    than `min_area` × the area of a small triangle are ignored as noise.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w, _ = arr.shape
    side = float(min(h, w))
    bright = arr.max(axis=2)
    labels, n = _components(bright >= 128)
    out: list[DetectedObject] = []
    min_px = min_area * 0.5 * (SIZE_FRACTION["small"] * side) ** 2
    for k in range(1, n + 1):
        blob = labels == k
        core = blob & (bright >= 0.75 * bright[blob].max())
        mean = arr[core].mean(axis=0)
        ci = int(np.argmin(((_PALETTE_ARR - mean) ** 2).sum(axis=1)))
        colour = np.array(PALETTE[COLOURS[ci]], dtype=np.float64)
        # grow the blob by one pixel to catch faint anti-aliased edges, but not into other blobs
        grown = blob.copy()
        grown[1:] |= blob[:-1]; grown[:-1] |= blob[1:]
        grown[:, 1:] |= grown[:, :-1].copy(); grown[:, :-1] |= grown[:, 1:].copy()
        grown &= (labels == 0) | blob
        cov = np.clip(arr @ colour / (colour @ colour), 0.0, 1.0) * grown
        area = float(cov.sum())
        if area < min_px:
            continue
        width, height = float(cov.max(axis=0).sum()), float(cov.max(axis=1).sum())
        fill = area / max(width * height, 1e-9)
        ys, xs = np.mgrid[0:h, 0:w]
        cx, cy = float((cov * (xs + 0.5)).sum() / area), float((cov * (ys + 0.5)).sum() / area)
        col, row = min(int(cx / (w / 3)), 2), min(int(cy / (h / 3)), 2)
        extent = max(width, height) / side
        size_name = "small" if extent < 0.45 else "large"
        shape = _best_template(cov, size_name, cx, cy)
        out.append(DetectedObject(
            shape=shape, colour=COLOURS[ci], size=size_name,
            position=POSITIONS[3 * row + col], area=area, fill=fill, extent=extent, centroid=(cx, cy),
        ))
    return sorted(out, key=lambda d: -d.area)


def check(img: Image.Image, spec: ShapeSpec) -> CheckResult:
    """Judge an image that should show exactly the single shape `spec` (largest blob is used)."""
    found = analyze(img)
    if not found:
        return CheckResult(False, False, False, False, False)
    d = found[0]
    return CheckResult(
        found=True,
        colour_ok=d.colour == spec.colour,
        shape_ok=d.shape == spec.shape,
        size_ok=d.size == spec.size,
        position_ok=d.position == spec.position,
    )


@dataclass(frozen=True)
class SceneCheck:
    """How a generated image matches a whole scene (one shape or a pair)."""

    count_ok: bool  # as many shapes found as the scene has
    objects_ok: bool  # the same (colour, shape) objects, ignoring where they are
    relation_ok: bool  # pairs: the objects stand in the stated relation (True for singles)
    exact: bool  # every attribute of every object right, positions included


def scenes_of(doc: Document) -> list[Scene]:
    """The ground-truth scene of each image of a shapes document, from its `meta`."""
    scenes = []
    for objs in doc.meta["images"]:
        specs = tuple(ShapeSpec(**{**o, "jitter": tuple(o["jitter"])}) for o in objs)
        scenes.append(Scene(specs, doc.meta.get("relation") if len(specs) == 2 else None))
    return scenes


def check_scene(img: Image.Image, scene: Scene | ShapeSpec) -> SceneCheck:
    """Judge an image against a scene: counts, objects, the pair's relation, exact match."""
    if isinstance(scene, ShapeSpec):
        scene = Scene((scene,))
    found = analyze(img)
    count_ok = len(found) == len(scene.objects)
    key = lambda x: (x.colour, x.shape)  # noqa: E731
    objects_ok = count_ok and sorted(map(key, found)) == sorted(map(key, scene.objects))
    exact = objects_ok and sorted((key(d), d.size, d.position) for d in found) == sorted(
        (key(o), o.size, o.position) for o in scene.objects)
    relation_ok = objects_ok
    if objects_ok and scene.relation is not None:
        a, b = scene.objects
        da = next(d for d in found if key(d) == key(a))
        db = next(d for d in found if key(d) == key(b))
        axis = 0 if scene.relation == "to the left of" else 1
        relation_ok = da.centroid[axis] < db.centroid[axis]
    return SceneCheck(count_ok, objects_ok, relation_ok, exact)
