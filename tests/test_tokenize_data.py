"""`make tokenize` on a user's JSONL: bad inputs are counted in the report, never fatal; a source
with nothing usable fails with a clear message."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from train.tokenize import main


def write_jsonl(folder, good: int, bad_lines: list[str]) -> str:
    (folder / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "text": f"picture number {i}"}))
    (folder / "img" / "empty.png").write_bytes(b"")
    path = folder / "docs.jsonl"
    path.write_text("\n".join(lines + bad_lines) + "\n")
    return str(path)


TINY = ["--preset", "tiny", "--set", "vq_steps=3", "--set", "shapes_train=0", "--set", "digits=false"]


def test_bad_lines_are_counted_in_the_report_and_the_rest_is_tokenized(tmp_path):
    bad = ['{"image": "img/missing.png", "text": "gone"}', "{not json", '{"image": "img/empty.png", "text": "x"}']
    data = write_jsonl(tmp_path, good=12, bad_lines=bad)
    out = tmp_path / "out"
    assert main([*TINY, "--out", str(out), "--data", data, "--data-mode", "replace"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bad_inputs"]["count"] == 3
    lines = sorted(b["line"] for b in report["bad_inputs"]["examples"])
    assert lines == [13, 14, 15] and all(b["file"].endswith("docs.jsonl") for b in report["bad_inputs"]["examples"])
    total = report["splits"]["train"]["docs"] + report["splits"]["eval"]["docs"]
    assert total == 12


def test_a_source_with_nothing_usable_fails_with_a_clear_error(tmp_path, capsys):
    data = write_jsonl(tmp_path, good=0, bad_lines=["{not json", '{"text": 5}'])
    code = main([*TINY, "--out", str(tmp_path / "out"), "--data", data, "--data-mode", "replace"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no usable document" in err and "docs.jsonl" in err
    assert not (tmp_path / "out" / "tokenizer").exists()
