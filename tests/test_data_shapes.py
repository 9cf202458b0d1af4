"""The shapes world keeps the DATA.md contract: palette, hold-out, disjoint splits, true captions."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from train.data import shapes as S
from train.data.shapes import (
    HOLDOUT_PAIRS, PALETTE, POSITIONS, SHAPES, Scene, ShapeSpec, analyze, caption_variants, check,
    check_scene, render, scenes_of, shapes_documents,
)


def _digest(img: Image.Image) -> str:
    return hashlib.sha1(img.tobytes()).hexdigest()


def _spec(o: dict) -> ShapeSpec:
    return ShapeSpec(o["shape"], o["colour"], o["size"], o["position"], tuple(o["jitter"]))


def _scene(doc, frame: int = 0) -> Scene:
    return scenes_of(doc)[frame]


@pytest.fixture(scope="module")
def train_docs():
    return shapes_documents("train", 4000, seed=0)


@pytest.fixture(scope="module")
def eval_docs():
    return shapes_documents("eval", 2000, seed=0)


def test_palette_shapes_and_positions_are_the_data_contract():
    assert PALETTE == {
        "red": (230, 25, 25), "green": (30, 180, 30), "blue": (40, 70, 240), "yellow": (240, 220, 20),
        "purple": (150, 40, 200), "orange": (250, 130, 0), "cyan": (0, 200, 220), "white": (240, 240, 240),
    }
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert POSITIONS == ("top left", "top", "top right", "left", "center", "right",
                         "bottom left", "bottom", "bottom right")
    assert HOLDOUT_PAIRS == {("purple", "triangle"), ("cyan", "circle")}


def test_same_seed_gives_identical_documents():
    a, b = shapes_documents("train", 150, seed=3), shapes_documents("train", 150, seed=3)
    assert [d.texts for d in a] == [d.texts for d in b]
    assert [d.meta for d in a] == [d.meta for d in b]
    assert [[_digest(i) for i in d.images] for d in a] == [[_digest(i) for i in d.images] for d in b]


def test_different_seeds_give_different_documents():
    a, b = shapes_documents("train", 100, seed=0), shapes_documents("train", 100, seed=1)
    assert sum(x.meta["images"] != y.meta["images"] for x, y in zip(a, b)) > 90


def test_a_longer_list_extends_a_shorter_one_and_test_is_an_alias_of_eval():
    short, long = shapes_documents("eval", 20), shapes_documents("test", 60)
    assert [d.meta for d in short] == [d.meta for d in long[:20]]


def test_documents_carry_source_kind_and_alternate_text_and_image(train_docs):
    for d in train_docs[:500]:
        assert d.source == "shapes" and d.meta["kind"] in ("single", "pair", "story")
        assert all(isinstance(s, str) == (i % 2 == 0) for i, s in enumerate(d.segments))
        assert len(d.images) == len(d.meta["images"])
        assert all(im.mode == "RGB" and im.size == (32, 32) for im in d.images)
        json.dumps(d.meta)  # ground truth is plain JSON


def test_default_mix_is_about_half_singles_and_a_quarter_each_pairs_and_stories(train_docs):
    kinds = [d.meta["kind"] for d in train_docs]
    assert abs(kinds.count("single") / len(kinds) - 0.5) < 0.04
    assert abs(kinds.count("pair") / len(kinds) - 0.25) < 0.04
    assert abs(kinds.count("story") / len(kinds) - 0.25) < 0.04
    only_pairs = shapes_documents("train", 50, mix={"pair": 1.0})
    assert {d.meta["kind"] for d in only_pairs} == {"pair"}


@pytest.mark.parametrize("mix", [{"single": -1.0}, {"single": 0.0, "pair": 0.0}, {"singel": 1.0}])
def test_bad_mix_is_refused(mix):
    with pytest.raises(ValueError, match="mix"):
        shapes_documents("train", 5, mix=mix)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        shapes_documents("valid", 5)


def test_holdout_pairs_never_occur_in_train_in_any_frame(train_docs):
    frames = [o for d in train_docs for img in d.meta["images"] for o in img]
    assert len(frames) > 5000
    assert not any((o["colour"], o["shape"]) in HOLDOUT_PAIRS for o in frames)
    assert not any(d.meta["holdout"] for d in train_docs)
    # and not by what the images show either
    for d in train_docs[:1500]:
        for img in d.images:
            assert not any((x.colour, x.shape) in HOLDOUT_PAIRS for x in analyze(img))


def test_holdout_pairs_occur_in_eval_singles_pairs_and_stories(eval_docs):
    seen = {(o["colour"], o["shape"], d.meta["kind"]) for d in eval_docs for img in d.meta["images"] for o in img}
    for (colour, shape), kind in itertools.product(HOLDOUT_PAIRS, ("single", "pair", "story")):
        assert (colour, shape, kind) in seen


def test_train_and_eval_never_share_an_image(train_docs, eval_docs):
    tr = {_digest(im) for d in train_docs for im in d.images}
    ev = {_digest(im) for d in eval_docs for im in d.images}
    assert tr and ev and not tr & ev


def test_every_possible_single_image_belongs_to_exactly_one_split():
    # exhaustive over all single scenes: rendering is injective and jitter parity splits them
    by_parity: dict[int, set[str]] = {0: set(), 1: set()}
    n = 0
    # two colours keep the test fast; other colours only recolour the same pixels
    for shape, colour, size in itertools.product(SHAPES, ("red", "cyan"), ("small", "large")):
        positions = POSITIONS if size == "small" else ("center",)
        m = S.MAX_JITTER[size]
        for pos, jx, jy in itertools.product(positions, range(-m, m + 1), range(-m, m + 1)):
            scene = Scene((ShapeSpec(shape, colour, size, pos, (jx, jy)),))
            by_parity[scene.jitter_parity].add(_digest(render(scene)))
            n += 1
    assert len(by_parity[0]) + len(by_parity[1]) == n
    assert not by_parity[0] & by_parity[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_render_draws_exact_palette_colours_on_black(shape):
    for size_name, fraction in S.SIZE_FRACTION.items():
        img = render(ShapeSpec(shape, "blue", size_name, "center"), size=32)
        arr = np.asarray(img)
        assert (arr[0, 0] == 0).all() and (arr[-1, -1] == 0).all()
        assert tuple(arr[16, 16]) == PALETTE["blue"]  # interior pixels are the exact colour
        cols = np.nonzero(arr.max(axis=(0, 2)) > 0)[0]
        assert abs((cols[-1] - cols[0] + 1) - fraction * 32) <= 2


def test_render_other_sizes_and_refuses_tiny_canvas():
    assert render(ShapeSpec("circle", "red"), size=64).size == (64, 64)
    with pytest.raises(ValueError, match="too small"):
        render(ShapeSpec("circle", "red"), size=8)


@pytest.mark.parametrize("bad", [
    dict(shape="star", colour="red"), dict(shape="circle", colour="pink"),
    dict(shape="circle", colour="red", size="large", position="top"),
    dict(shape="circle", colour="red", jitter=(3, 0)),
])
def test_invalid_shape_specs_are_refused(bad):
    with pytest.raises(ValueError):
        ShapeSpec(**bad)


def test_pair_positions_must_agree_with_the_relation():
    a, b = ShapeSpec("circle", "red", position="right"), ShapeSpec("square", "blue", position="left")
    with pytest.raises(ValueError, match="not to the left of"):
        Scene((a, b), "to the left of")
    Scene((b, a), "to the left of")


def test_caption_templates_give_at_least_four_singles_and_three_pairs():
    small, large = ShapeSpec("circle", "red", position="top left"), ShapeSpec("circle", "red", "large")
    assert len(set(caption_variants(small))) >= 4 and len(set(caption_variants(large))) >= 4
    assert "a small red circle in the top left" in caption_variants(small)
    assert "a red circle at the top left" in caption_variants(small)
    assert "there is a small red circle in the top left corner" in caption_variants(small)
    assert "a large red circle in the center" in caption_variants(large)
    pair = Scene((small, ShapeSpec("square", "orange", position="top right")), "to the left of")
    assert len(set(caption_variants(pair))) >= 3
    assert "a red circle to the left of an orange square" in caption_variants(pair)


_POS_WORDS = {  # what a caption must say about each position
    "top left": ("top left",), "top": ("top",), "top right": ("top right",), "left": ("left",),
    "center": ("center", "middle"), "right": ("right",), "bottom left": ("bottom left",),
    "bottom": ("bottom",), "bottom right": ("bottom right",),
}
_NOUN = re.compile(r"(red|green|blue|yellow|purple|orange|cyan|white) (circle|square|triangle)")


def _check_caption(caption: str, scene: Scene) -> None:
    named = _NOUN.findall(caption)
    assert len(named) == len(scene.objects), caption
    if len(scene.objects) == 1:
        o = scene.objects[0]
        assert named[0] == (o.colour, o.shape), caption
        if o.size == "large":
            assert "small" not in caption and any(w in caption for w in ("large", "big", "filling")), caption
        else:
            assert "large" not in caption and any(w in caption for w in _POS_WORDS[o.position]), caption
            # a named corner is exactly the position: "top left" is not said of "top"
            said = [p for p in POSITIONS if re.search(rf"\b{p}\b", caption)]
            assert o.position == "center" or max(said, key=len) == o.position, caption
        return
    a, b = scene.objects
    first_is_a = any(r in caption for r in ("to the left of", " above ", "on the left and", "on top and"))
    first_is_b = any(r in caption for r in ("to the right of", " below "))
    assert first_is_a != first_is_b, caption
    expect = [(a.colour, a.shape), (b.colour, b.shape)]
    assert named == (expect if first_is_a else expect[::-1]), caption
    (ra, ca), (rb, cb) = a.cell, b.cell
    assert (ra == rb and ca < cb) if scene.relation == "to the left of" else (ca == cb and ra < rb)


def test_every_caption_is_true_of_its_scene(train_docs, eval_docs):
    for d in train_docs[:1500] + eval_docs[:500]:
        if d.meta["kind"] != "story":
            _check_caption(d.texts[0], _scene(d))
            for variant in caption_variants(_scene(d)):
                _check_caption(variant, _scene(d))
        else:
            _check_caption(d.texts[0].rstrip("."), _scene(d))


def test_checker_recovers_ground_truth_of_at_least_99_percent_of_eval_singles(eval_docs):
    singles = [d for d in eval_docs if d.meta["kind"] == "single"]
    assert len(singles) > 800
    ok = sum(check(d.images[0], _spec(d.meta["images"][0][0])).all_ok for d in singles)
    assert ok / len(singles) >= 0.99


def test_scenes_of_gives_each_frame_its_objects_and_pairs_their_relation(eval_docs):
    for d in eval_docs[:200]:
        scenes = scenes_of(d)
        assert len(scenes) == len(d.images) == len(d.meta["images"])
        for scene, objs, img in zip(scenes, d.meta["images"], d.images):
            assert [o.to_meta() for o in scene.objects] == objs
            assert scene.relation == (d.meta["relation"] if d.meta["kind"] == "pair" else None)
            assert render(scene).tobytes() == img.tobytes()  # the scene redraws the very image


def test_checker_recovers_pairs_and_their_relation(eval_docs):
    pairs = [d for d in eval_docs if d.meta["kind"] == "pair"]
    results = [check_scene(d.images[0], _scene(d)) for d in pairs]
    assert sum(r.exact and r.relation_ok for r in results) / len(results) >= 0.99


def test_checker_flags_each_wrong_attribute():
    spec = ShapeSpec("triangle", "orange", "small", "bottom left", (1, -1))
    img = render(spec)
    assert check(img, spec).all_ok
    assert not check(img, ShapeSpec("triangle", "red", "small", "bottom left")).colour_ok
    assert not check(img, ShapeSpec("circle", "orange", "small", "bottom left")).shape_ok
    assert not check(img, ShapeSpec("triangle", "orange", "small", "bottom")).position_ok
    assert not check(img, ShapeSpec("triangle", "orange", "large", "center")).size_ok
    assert not check(Image.new("RGB", (32, 32)), spec).found
    a, b = ShapeSpec("circle", "red", position="left"), ShapeSpec("square", "blue", position="right")
    img = render(Scene((a, b), "to the left of"))
    assert check_scene(img, Scene((a, b), "to the left of")).relation_ok
    flipped = Scene((ShapeSpec("square", "blue", position="left"), ShapeSpec("circle", "red", position="right")),
                    "to the left of")
    assert not check_scene(img, flipped).relation_ok


def _diff(a: dict, b: dict) -> set[str]:
    return {k for k in ("shape", "colour", "size", "position") if a[k] != b[k]}


def test_story_frames_differ_by_exactly_one_attribute_and_the_sentence_says_which(train_docs, eval_docs):
    stories = [d for d in train_docs + eval_docs if d.meta["kind"] == "story"]
    assert len(stories) > 800
    kinds_seen = set()
    for d in stories:
        frames = [img[0] for img in d.meta["images"]]
        assert 2 <= len(frames) <= 4 and len(d.texts) == len(frames)
        for prev, nxt, change, sentence in zip(frames, frames[1:], d.meta["changes"], d.texts[1:]):
            kind = change["change"]
            kinds_seen.add(kind)
            changed = _diff(prev, nxt)
            assert len(changed) == 1 and nxt["jitter"] == prev["jitter"]
            attr = {"move": "position", "colour": "colour", "shape": "shape", "grow": "size", "shrink": "size"}[kind]
            assert changed == {attr}
            if kind == "move":
                (r0, c0), (r1, c1) = divmod(POSITIONS.index(prev["position"]), 3), divmod(POSITIONS.index(nxt["position"]), 3)
                assert abs(r0 - r1) + abs(c0 - c1) == 1
                word = {(0, 1): "right", (0, -1): "left", (-1, 0): "up", (1, 0): "down"}[(r1 - r0, c1 - c0)]
                assert word in sentence
            elif kind in ("colour", "shape"):
                assert nxt[attr] in sentence
            else:
                assert any(w in sentence for w in (("grows", "bigger") if kind == "grow" else ("shrinks", "smaller")))
    assert kinds_seen == {"move", "colour", "shape", "grow", "shrink"}


def test_story_images_show_what_the_meta_says(eval_docs):
    stories = [d for d in eval_docs if d.meta["kind"] == "story"][:150]
    for d in stories:
        for img, objs in zip(d.images, d.meta["images"]):
            assert check(img, _spec(objs[0])).all_ok


def test_generation_is_fast():
    t = time.perf_counter()
    shapes_documents("train", 1000, seed=5)
    # ~0.25 ms/doc on one core when idle; the bound is loose for a busy shared machine
    assert time.perf_counter() - t < 5.0


def test_checker_tolerates_the_blur_and_noise_of_generated_images(eval_docs):
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    singles = [d for d in eval_docs if d.meta["kind"] == "single"][:300]
    ok = 0
    for d in singles:
        arr = np.asarray(d.images[0].filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        noisy = Image.fromarray(np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8))
        ok += check(noisy, _spec(d.meta["images"][0][0])).all_ok
    assert ok / len(singles) >= 0.95
