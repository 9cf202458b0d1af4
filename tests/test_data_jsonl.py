"""A user's JSONL loads every image mode, and every bad line is reported with file and line."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.data.jsonl import BadInput, load_jsonl


def _png(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 40).astype(np.uint16))
    elif mode == "1":
        img = Image.new("L", size, 0).point(lambda v: 255).convert("1")
    else:
        img = Image.new("RGB", size, (200, 30, 60)).convert(mode)
    if mode == "CMYK":
        path = path.with_suffix(".jpg")  # PNG cannot hold CMYK
    img.save(path)
    return path


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def test_pairs_and_segments_load_as_documents_with_text_before_image(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "b.png")
    f = _write(tmp_path / "data.jsonl", [
        json.dumps({"image": "images/a.png", "text": "a red square"}),
        json.dumps({"segments": [{"text": "Step one:"}, {"image": "images/a.png"}, {"text": "step two:"}, {"image": "b.png"}]}),
    ])
    docs, bad = load_jsonl(f)
    assert bad == [] and len(docs) == 2
    assert docs[0].segments[0] == "a red square" and docs[0].is_pair()
    assert docs[1].texts == ["Step one:", "step two:"] and len(docs[1].images) == 2
    assert all(d.source == "jsonl:data.jsonl" for d in docs)
    assert [d.meta["line"] for d in docs] == [1, 2]
    assert all(im.mode == "RGB" and im.size == (32, 32) for d in docs for im in d.images)


def test_image_paths_are_relative_to_the_jsonl_file_not_the_working_directory(tmp_path, monkeypatch):
    _png(tmp_path / "sub" / "x.png")
    f = _write(tmp_path / "sub" / "d.jsonl", [json.dumps({"image": "x.png", "text": "x"})])
    monkeypatch.chdir(tmp_path)
    docs, _ = load_jsonl(f, size=16)
    assert docs[0].images[0].size == (16, 16)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "I;16", "CMYK", "1"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    p = _png(tmp_path / f"img_{mode.replace(';', '')}.png", mode)
    f = _write(tmp_path / "d.jsonl", [json.dumps({"image": p.name, "text": mode})])
    docs, bad = load_jsonl(f)
    assert bad == []
    img = docs[0].images[0]
    assert img.mode == "RGB" and img.size == (32, 32)


@pytest.mark.parametrize("size", [(7, 50), (50, 7), (1, 1), (33, 31), (300, 200)])
def test_odd_image_sizes_are_resized(tmp_path, size):
    p = _png(tmp_path / "odd.png", "RGB", size)
    f = _write(tmp_path / "d.jsonl", [json.dumps({"image": p.name, "text": "odd"})])
    docs, _ = load_jsonl(f)
    assert docs[0].images[0].size == (32, 32)


def _bad_line(tmp_path: Path, case: str) -> bytes | str:
    """A line exhibiting one problem; helper files are made in tmp_path."""
    if case == "non-utf8":
        return b'{"image": "ok.png", "text": "caf\xe9"}'
    if case == "malformed json":
        return '{"image": "ok.png", "text": "unclosed}'
    if case == "not an object":
        return '["ok.png", "text"]'
    if case == "unknown key":
        return json.dumps({"image": "ok.png", "caption": "x"})
    if case == "missing key":
        return json.dumps({"image": "ok.png"})
    if case == "empty segments":
        return json.dumps({"segments": []})
    if case == "bad segment":
        return json.dumps({"segments": [{"text": "a", "image": "ok.png"}]})
    if case == "empty text":
        return json.dumps({"image": "ok.png", "text": "  "})
    if case == "missing image":
        return json.dumps({"image": "nope.png", "text": "x"})
    if case == "zero-byte image":
        (tmp_path / "empty.png").write_bytes(b"")
        return json.dumps({"image": "empty.png", "text": "x"})
    if case == "truncated png":
        data = (tmp_path / "ok.png").read_bytes()
        (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
        return json.dumps({"segments": [{"text": "x"}, {"image": "trunc.png"}]})
    if case == "corrupt image":
        data = bytearray((tmp_path / "ok.png").read_bytes())
        at = data.index(b"IDAT") + 6
        data[at:at + 12] = b"\xff" * 12  # a valid header, then damaged pixel data
        (tmp_path / "corrupt.png").write_bytes(bytes(data))
        return json.dumps({"image": "corrupt.png", "text": "x"})
    if case == "not an image":
        (tmp_path / "notes.png").write_text("these are words, not pixels")
        return json.dumps({"image": "notes.png", "text": "x"})
    if case == "image is a folder":
        (tmp_path / "folder.png").mkdir()
        return json.dumps({"image": "folder.png", "text": "x"})
    raise AssertionError(case)


BAD_CASES = {
    "non-utf8": "UTF-8", "malformed json": "malformed JSON", "not an object": "JSON object",
    "unknown key": "unknown keys", "missing key": "missing keys", "empty segments": "segments is empty",
    "bad segment": "segment 0", "empty text": "text is empty", "missing image": "not found",
    "zero-byte image": "empty", "truncated png": "segment 1", "corrupt image": "corrupt.png",
    "not an image": "not an image", "image is a folder": "folder",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_line_is_reported_with_its_file_and_line_and_the_rest_loads(tmp_path, case):
    _png(tmp_path / "ok.png", size=(64, 64))
    good = json.dumps({"image": "ok.png", "text": "fine"})
    # line 2 is blank: skipped silently, but still counted in the line numbers
    f = _write(tmp_path / "d.jsonl", [good, "", _bad_line(tmp_path, case), good])
    with pytest.warns(UserWarning, match="1 bad lines skipped"):
        docs, bad = load_jsonl(f)
    assert len(docs) == 2 and [d.meta["line"] for d in docs] == [1, 4]
    assert len(bad) == 1 and isinstance(bad[0], BadInput)
    assert (bad[0].file, bad[0].line) == (str(f), 3)
    assert BAD_CASES[case] in bad[0].reason, bad[0].reason
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*on_error='skip'"):
        load_jsonl(f, on_error="raise")


def test_a_file_with_no_usable_document_fails_clearly(tmp_path):
    f = _write(tmp_path / "bad.jsonl", ["{not json", json.dumps({"image": "missing.png", "text": "x"}), "[]"])
    with pytest.raises(ValueError, match=r"no usable document in .*bad\.jsonl \(3 lines, 3 bad: first problems: .*bad\.jsonl:1"):
        load_jsonl(f)


def test_an_empty_or_missing_file_fails_clearly(tmp_path):
    f = _write(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(ValueError, match=r"no usable document .*\(0 lines, 0 bad\)"):
        load_jsonl(f)
    with pytest.raises(ValueError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(f, on_error="ignore")  # type: ignore[arg-type]


def test_a_clean_file_loads_without_warnings_and_blank_lines_are_not_errors(tmp_path):
    _png(tmp_path / "ok.png")
    f = _write(tmp_path / "d.jsonl", ["", json.dumps({"image": "ok.png", "text": "x"}), "  ", "\ufeff"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        docs, bad = load_jsonl(f)
    assert len(docs) == 1 and bad == []


def test_a_folder_loads_every_jsonl_file_in_name_order(tmp_path):
    _png(tmp_path / "ok.png")
    _write(tmp_path / "b.jsonl", [json.dumps({"image": "ok.png", "text": "from b"})])
    _write(tmp_path / "a.jsonl", [json.dumps({"image": "ok.png", "text": "from a"})])
    docs, _ = load_jsonl(tmp_path)
    assert [d.texts[0] for d in docs] == ["from a", "from b"]
    assert [d.source for d in docs] == ["jsonl:a.jsonl", "jsonl:b.jsonl"]
