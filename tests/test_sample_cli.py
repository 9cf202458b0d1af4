"""`python -m sample generate|classify` as a script runs it: outputs, formats, bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, env


def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sample", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (32, 32), (230, 25, 25)).save(d / "red.png")
    Image.new("LA", (50, 20), (128, 200)).save(d / "odd.png")
    (d / "bad.png").write_bytes(b"not an image")
    return d


def test_generate_writes_images_result_json_and_a_page(tiny_run, images, tmp_path):
    out = tmp_path / "out"
    r = run("generate", "--ckpt", str(tiny_run), "--prompt", "a red circle <image> it moves to the right.",
            "--image", str(images / "red.png"), "--next", "image", "--n", "2", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert [list(x) for x in result["prompt"]] == [["text"], ["image"], ["text"]]
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert len(sample) == 1 and "image" in sample[0]
        assert Image.open(out / sample[0]["image"]).size == (32, 32)
    assert (out / "index.html").read_text().count("<img") >= 3


def test_generate_text_after_an_odd_mode_image(tiny_run, images, tmp_path):
    r = run("generate", "--ckpt", str(tiny_run), "--image", str(images / "odd.png"), "--next", "text",
            "--n", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    sample = json.loads((tmp_path / "o" / "result.json").read_text())["samples"][0]
    assert all("text" in x for x in sample)


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x <image> <image>", "--image", "IMG"], "placeholders"),
    (["--prompt", "x", "--n", "0"], "--n must be"),
    (["--prompt", "x", "--guidance", "-1"], "guidance"),
    (["--prompt", "x <image>", "--image", "BAD"], "not an image"),
])
def test_generate_refuses_bad_input_with_a_message(tiny_run, images, tmp_path, args, message):
    args = [a.replace("IMG", str(images / "red.png")).replace("BAD", str(images / "bad.png")) for a in args]
    r = run("generate", "--ckpt", str(tiny_run), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_generate_refuses_a_missing_or_incomplete_checkpoint(tiny_run, tmp_path):
    r = run("generate", "--ckpt", str(tmp_path / "nowhere"), "--prompt", "x")
    assert r.returncode == 2 and "make tokenize train" in r.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    r = run("generate", "--ckpt", str(tmp_path / "broken"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_classify_prints_one_json_object_per_image_with_a_normalised_posterior(tiny_run, images, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    r = run("classify", "--ckpt", str(tiny_run), "--labels", f"@{labels}", "--template", "a {} square",
            "--template", "a {} circle", "--images", str(images / "red.png"), str(images / "odd.png"), "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"image", "prediction", "posterior", "loglik"}
        assert abs(sum(row["posterior"].values()) - 1) < 1e-4
        assert row["prediction"] == max(row["posterior"], key=row["posterior"].get)


def test_classify_compiled_gives_the_eager_posteriors(tiny_run, images):
    args = ("classify", "--ckpt", str(tiny_run), "--labels", "red,green,blue", "--template", "a {} circle",
            "--images", str(images / "red.png"), str(images / "odd.png"), "--views", "2", "--json")
    eager, compiled = run(*args), run(*args, "--compile", timeout=400)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    for e, c in zip(eager.stdout.splitlines(), compiled.stdout.splitlines()):
        assert json.loads(c)["posterior"] == pytest.approx(json.loads(e)["posterior"], abs=2e-3)


@pytest.mark.parametrize("args,message", [
    (["--labels", "one"], "only one label"), (["--labels", "a,b,a"], "duplicate"),
    (["--labels", "a,b", "--template", "no slot"], "has no {}"), (["--labels", "a,b", "--prior", "0.5"], "1 values"),
    (["--labels", "a,b", "--prior", "0.5,0.7"], "sum to 1"), (["--labels", ","], "no labels"),
    (["--labels", "a,b", "--views", "0"], "--views must be between 1 and 25"),
    (["--labels", "a,b", "--orders", "2"], "--orders must be between 1 and 1"),
    (["--labels", "a,b", "--weights", "0.5"], "two comma-separated numbers"),
    (["--labels", "a,b", "--weights=-1,1"], "non-negative"), (["--labels", "a,b", "--weights", "0,0"], "not both zero"),
    (["--labels", "a,b", "--brightness", "1,1.5"], "--brightness: brightness must be"),
    (["--labels", "a,b", "--brightness", "dim"], "--brightness takes comma-separated factors"),
])
def test_classify_refuses_bad_input_with_a_message(tiny_run, images, args, message):
    r = run("classify", "--ckpt", str(tiny_run), "--images", str(images / "red.png"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_classify_calibrates_the_direction_weights_on_a_labelled_folder(tiny_run, tmp_path):
    for label, colour in (("red", (230, 25, 25)), ("blue", (40, 70, 240))):
        (tmp_path / "cal" / label).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (32, 32), tuple(max(0, c - 20 * k) for c in colour)).save(tmp_path / "cal" / label / f"{k}.png")
    Image.new("RGB", (32, 32), (230, 25, 25)).save(tmp_path / "query.png")
    r = run("classify", "--ckpt", str(tiny_run), "--labels", "red,blue", "--template", "a {} square",
            "--images", str(tmp_path / "query.png"), "--calibrate", str(tmp_path / "cal"), "--views", "1", "--json")
    assert r.returncode == 0, r.stderr
    fitted = re.search(r"calibrated on 4 labelled images: --weights ([\d.e-]+),([\d.e-]+)", r.stderr)
    assert fitted, r.stderr
    a, b = float(fitted.group(1)), float(fitted.group(2))
    row = json.loads(r.stdout)
    # the weights printed are the ones used: rerun with them explicitly gives the same posterior
    again = run("classify", "--ckpt", str(tiny_run), "--labels", "red,blue", "--template", "a {} square",
                "--images", str(tmp_path / "query.png"), "--weights", f"{a},{b}", "--views", "1", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["posterior"] == pytest.approx(row["posterior"], abs=2e-3)


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "not a folder"), (lambda d: (d / "green").mkdir(parents=True), "not among the labels"),
    (lambda d: (d / "red").mkdir(parents=True), "found 0 example images")])
def test_classify_refuses_a_bad_calibration_folder(tiny_run, images, tmp_path, make, message):
    make(tmp_path / "cal")
    r = run("classify", "--ckpt", str(tiny_run), "--labels", "red,blue", "--images", str(images / "red.png"),
            "--calibrate", str(tmp_path / "cal"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_classify_refuses_an_unreadable_image(tiny_run, images):
    r = run("classify", "--ckpt", str(tiny_run), "--labels", "a,b", "--images", str(images / "bad.png"))
    assert r.returncode == 2 and "bad.png" in r.stderr


def test_generate_rerank_keeps_n_samples_of_images_and_of_captions(tiny_run, images, tmp_path):
    r = run("generate", "--ckpt", str(tiny_run), "--prompt", "a red circle", "--next", "image", "--n", "2",
            "--rerank", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "o" / "result.json").read_text())["samples"]) == 2
    r = run("generate", "--ckpt", str(tiny_run), "--prompt", "<image>", "--image", str(images / "red.png"),
            "--next", "text", "--n", "2", "--rerank", "3", "--max-new-tokens", "6", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    samples = json.loads((tmp_path / "c" / "result.json").read_text())["samples"]
    assert len(samples) == 2 and all("image" not in x for s in samples for x in s)
    # new text is scored against the prompt's image: a prompt without one is refused
    r = run("generate", "--ckpt", str(tiny_run), "--prompt", "a red circle", "--next", "text", "--rerank", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "--image" in r.stderr and "Traceback" not in r.stderr


def test_classify_averages_several_checkpoints_of_one_tokenizer(tiny_run, images, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    args = ("classify", "--labels", "red,green,blue", "--template", "a {} circle", "--images",
            str(images / "red.png"), "--views", "1", "--json")
    one = run(*args, "--ckpt", str(tiny_run))
    two = run(*args, "--ckpt", str(tiny_run), str(tiny_run))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    # the same checkpoint twice: the average of two equal scores is the score
    assert json.loads(two.stdout)["loglik"] == pytest.approx(json.loads(one.stdout)["loglik"], abs=1e-3)
    # a copy whose VQ-VAE weights differ: same vocabulary, other image codes, refused
    other = tmp_path / "other"
    shutil.copytree(tiny_run / (tiny_run / "latest").read_text().strip(), other)
    vq = load_file(other / "tokenizer" / "vq.safetensors")
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in vq.items()}, other / "tokenizer" / "vq.safetensors")
    r = run(*args, "--ckpt", str(tiny_run), str(other))
    assert r.returncode == 2 and "trained on another tokenizer" in r.stderr and "Traceback" not in r.stderr
