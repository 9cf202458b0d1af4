"""The Gradio demo against a tiny trained run, launched on 127.0.0.1 and called as clients do:
every tab's endpoint, bad uploads, bounds on queue and time, 20 concurrent requests, and
`python -m demo` as a user starts it."""
from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, env, free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def client(demo_url) -> Client:
    return Client(demo_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad uploads."""
    d = tmp_path_factory.mktemp("uploads")
    Image.new("RGB", (32, 32), (230, 25, 25)).save(d / "red.png")
    Image.new("RGBA", (48, 20), (40, 70, 240, 128)).save(d / "odd_mode.png")
    Image.new("RGB", (6000, 4000), (30, 180, 30)).save(d / "huge.png")  # 24 MP, a small file
    (d / "notes.txt").write_text("a text file, not an image\n")
    (d / "fake.png").write_bytes(b"GIF89a? no, just bytes pretending to be a picture")
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "red.png").read_bytes()[:60])
    # a decompression bomb: a valid PNG header claiming 30000×30000 pixels, no real pixel data
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)))
    ihdr = struct.pack(">IIBBBBB", 12000, 10000, 8, 2, 0, 0, 0)  # over our limit, under PIL's own
    (d / "bomb_120mp.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)))
    (d / "too_big.png").write_bytes(b"\x89PNG" + b"\0" * (11 * 1024 * 1024))  # over the 10 MB upload limit
    return {p.name: p for p in d.iterdir()}


def resend(history: list[dict]) -> list[dict]:
    """A chat history as the client got it (files as local paths) turned back into an input."""
    out = []
    for m in history:
        content = [{"type": "file", "file": handle_file(c["file"])} if c.get("type") == "file" else c
                   for c in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


# ------------------------------------------------------------------ structure

def test_build_demo_returns_unlaunched_blocks_with_one_endpoint_per_tab(tiny_run, tmp_path):
    import gradio as gr

    import demo.app as app
    from sample.api import MultimodalModel

    blocks = app.build_demo(MultimodalModel.from_pretrained(tiny_run), workdir=tmp_path)
    assert isinstance(blocks, gr.Blocks) and not getattr(blocks, "is_running", False)
    names = {fn.api_name for fn in blocks.fns.values() if fn.api_name}
    assert {"text_to_image", "caption", "story", "classify", "retrieve"} <= names  # tiny artifacts carry a retriever
    # nothing built at import: no model, Blocks or lock in the module, no file written next to it
    assert not [k for k, v in vars(app).items() if isinstance(v, (gr.Blocks, MultimodalModel, type(threading.Lock())))]
    assert not (ROOT / "demo" / "app.pyi").exists()
    assert sorted(p.name for p in (tmp_path / "examples").iterdir())[:2] == ["digit_0.png", "digit_1.png"]


# ------------------------------------------------------------------ each tab

def test_text_to_image_streams_each_image_as_it_is_finished(client):
    job = client.submit("a small red circle in the top left", 3, 3.0, 1.0, 7, api_name="/text_to_image")
    final_gallery, status = job.result(timeout=60)
    counts = [len(gallery or []) for gallery, _ in job.outputs()]
    assert counts == sorted(counts) and {1, 2, 3} <= set(counts), counts  # one more image per update
    assert len(final_gallery) == 3 and status.startswith("3 of 3")
    for item in final_gallery:
        assert Image.open(item["image"]).size == (256, 256)  # 32 px upscaled 8× for display


def test_image_to_text_returns_one_caption_per_sample(client, files):
    text = client.predict(handle_file(files["red.png"]), 3, 0.8, 0, api_name="/caption")
    lines = text.splitlines()
    assert [l.split(".")[0] for l in lines] == ["1", "2", "3"], text


def test_story_chat_answers_with_an_image_and_continues_from_the_history(client, files):
    history, box, status = client.predict({"text": "a red circle.", "files": [handle_file(files["red.png"])]}, [],
                                          "image", 0.7, 0, api_name="/story")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert [c["type"] for c in history[0]["content"]] == ["text", "file"]
    answer = history[1]["content"]
    assert [c["type"] for c in answer] == ["file"] and Image.open(answer[0]["file"]).size == (256, 256)
    assert "65 new tokens" in status  # <boi> was in the prompt: 64 codes + <eoi>
    history, _, _ = client.predict({"text": "it moves to the right.", "files": []}, resend(history), "text", 0.7, 1,
                                   api_name="/story")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert all(c["type"] == "text" for c in history[3]["content"])


def test_classification_gives_a_posterior_over_the_labels_and_its_top_label(client, files):
    label, plot, top = client.predict(handle_file(files["red.png"]), "red, green, blue", "a small {} circle",
                                      "0.2, 0.3, 0.5", "both", api_name="/classify")
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {"red", "green", "blue"}
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-6)
    assert label["label"] == max(confidences, key=confidences.get) and top.startswith(f"**{label['label']}**")
    assert {row[0]: row[1] for row in plot["data"]} == pytest.approx(confidences)
    assert "prior given" in top


def test_retrieval_tab_shows_the_documents_retrieved_for_a_prompt_with_their_scores(client, files):
    gallery, listing = client.predict("a handwritten digit seven", None, 3, api_name="/retrieve")
    lines = listing.splitlines()
    assert [l.split(".")[0] for l in lines] == ["1", "2", "3"], listing
    scores = [float(l.split("**")[1]) for l in lines]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert len(gallery) >= 3 and all(Image.open(g["image"]).size == (256, 256) for g in gallery)
    assert gallery[0]["caption"].startswith("1. ")
    _, listing = client.predict("", handle_file(files["red.png"]), 2, api_name="/retrieve")  # an image alone
    assert len(listing.splitlines()) == 2
    with pytest.raises(Exception, match="type a prompt or upload an image"):
        client.predict("", None, 2, api_name="/retrieve")


@pytest.mark.parametrize("labels, template, prior, message", [
    ("red", "a {} circle", "", "only one label"),
    ("red, red", "a {} circle", "", "duplicate labels"),
    ("red, blue", "a circle", "", "has no {}"),
    ("red, blue", "a {} circle", "1, 2, 3", "the prior has 3 values"),
    ("red, blue", "a {} circle", "a, b", "comma-separated numbers"),
])
def test_classification_refuses_bad_labels_and_priors_with_a_message(client, files, labels, template, prior, message):
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(files["red.png"]), labels, template, prior, "both", api_name="/classify")


# ------------------------------------------------------------------ uploads

BAD_UPLOADS = {
    "notes.txt": "is not an image", "fake.png": "is not an image", "empty.png": "is not an image",
    "truncated.png": "could not be read", "bomb.png": "more than the demo's limit", "bomb_120mp.png": "more than the demo's limit",
}


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
@pytest.mark.parametrize("endpoint", ["caption", "classify", "story"])
def test_a_bad_upload_gets_a_clear_message_and_the_app_keeps_serving(client, files, name, endpoint):
    upload = handle_file(files[name])
    args = {"caption": (upload, 1, 0.0, 0), "classify": (upload, "red, blue", "a {} circle", "", "both"),
            "story": ({"text": "look:", "files": [upload]}, [], "auto", 0.7, 0)}[endpoint]
    with pytest.raises(Exception, match=BAD_UPLOADS[name]) as e:
        client.predict(*args, api_name=f"/{endpoint}")
    assert name in str(e.value)  # the message names the user's file, not a server path
    assert client.predict(handle_file(files["red.png"]), 1, 0.0, 0, api_name="/caption")  # still serving


def test_huge_and_odd_images_are_downscaled_and_converted(client, files):
    for name in ("huge.png", "odd_mode.png"):
        assert client.predict(handle_file(files[name]), 1, 0.0, 0, api_name="/caption")


def test_an_upload_over_the_size_limit_is_refused_before_any_handler(client, files):
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(files["too_big.png"]), 1, 0.0, 0, api_name="/caption")


def test_missing_inputs_get_a_message_not_a_crash(client):
    with pytest.raises(Exception, match="no image given"):
        client.predict(None, 1, 0.0, 0, api_name="/caption")
    with pytest.raises(Exception, match="type a caption"):
        client.predict("  ", 1, 3.0, 1.0, 0, api_name="/text_to_image")
    with pytest.raises(Exception, match="greater than maximum value 8"):  # gradio's own slider check
        client.predict("a red circle", 50, 3.0, 1.0, 0, api_name="/text_to_image")
    with pytest.raises(Exception, match="write a sentence or attach an image"):
        client.predict({"text": "", "files": []}, [], "auto", 0.7, 0, api_name="/story")


# ------------------------------------------------------------------ load and bounds

def test_twenty_concurrent_requests_all_get_answers(client, files, capsys):
    red = handle_file(files["red.png"])
    calls = [("/text_to_image", ("a handwritten digit seven", 1, 3.0, 1.0, i)) for i in range(5)]
    calls += [("/caption", (red, 1, 0.7, i)) for i in range(5)]
    calls += [("/classify", (red, "red, green, blue", "a small {} circle", "", "both")) for _ in range(5)]
    calls += [("/story", ({"text": "a red circle.", "files": [red]}, [], "auto", 0.7, i)) for i in range(5)]
    start = threading.Barrier(len(calls))  # 20 users connected first, then all asking at once

    def call(c: tuple[str, tuple]) -> tuple[object, float]:
        user = Client(client.src, verbose=False)
        start.wait(timeout=60)
        t = time.monotonic()
        return user.predict(*c[1], api_name=c[0]), time.monotonic() - t

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(call, calls, timeout=120))
    assert len(results) == 20
    for (name, _), (out, _) in zip(calls, results):
        if name == "/text_to_image":
            assert len(out[0]) == 1
        elif name == "/caption":
            assert isinstance(out, str)
        elif name == "/classify":
            assert out[0]["label"] in ("red", "green", "blue")
        else:
            assert [m["role"] for m in out[0]] == ["user", "assistant"]
    latencies = sorted(t for _, t in results)
    assert latencies[-1] < 90
    with capsys.disabled():
        print(f"\n[load] 20 concurrent requests (5 per tab) all answered; latency median {latencies[10]:.2f} s, "
              f"max {latencies[-1]:.2f} s")


@pytest.fixture(scope="module")
def bounded_url(tiny_run, tmp_path_factory):
    """A second app with a queue of 2 and a time budget too short to finish anything."""
    from demo.app import DemoLimits, build_demo, serve
    from sample.api import MultimodalModel

    limits = DemoLimits(queue_size=2, max_seconds=1e-3)
    demo = build_demo(MultimodalModel.from_pretrained(tiny_run), limits, workdir=tmp_path_factory.mktemp("bounded"))
    yield serve(demo, port=free_port(), block=False)
    demo.close()


def test_generation_stops_at_the_time_limit_with_a_message(bounded_url, files):
    c = Client(bounded_url, verbose=False)
    gallery, status = c.predict("a red circle", 8, 3.0, 1.0, 0, api_name="/text_to_image")
    assert len(gallery or []) < 8 and "time limit" in status
    with pytest.raises(Exception, match="time limit"):
        c.predict(handle_file(files["red.png"]), 1, 0.0, 0, api_name="/caption")


def test_the_queue_is_bounded_and_turns_the_excess_away(bounded_url, files):
    # classification of 32 labels holds the model for a while; with one request running and
    # a queue of 2, most of 12 sent at once must be refused, and the rest answered
    c = Client(bounded_url, verbose=False)
    labels = ", ".join(f"label {i}" for i in range(32))
    jobs = [c.submit(handle_file(files["red.png"]), labels, "a {} circle", "", "both", api_name="/classify")
            for _ in range(12)]
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=120)
            outcomes.append("ok")
        except Exception as e:
            outcomes.append(str(e))
    refused = [o for o in outcomes if o != "ok"]
    assert "ok" in outcomes
    assert refused and all("queue" in o.lower() and "full" in o.lower() for o in refused), outcomes


# ------------------------------------------------------------------ python -m demo

def test_python_m_demo_without_a_checkpoint_says_to_train_first(tmp_path):
    r = subprocess.run([sys.executable, "-m", "demo", "--ckpt", str(tmp_path / "runs" / "default")], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "make tokenize train" in r.stderr


def test_python_m_demo_serves_the_checkpoint_on_localhost(tiny_run, files):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "demo", "--ckpt", str(tiny_run), "--port", str(port)], cwd=ROOT,
                         env=dict(env(), GRADIO_ANALYTICS_ENABLED="False"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while f"http://127.0.0.1:{port}" not in line and time.monotonic() < deadline and p.poll() is None:
            line = p.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        c = None
        while c is None and time.monotonic() < deadline:
            try:
                c = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                time.sleep(0.3)
        assert c is not None and c.predict(handle_file(files["red.png"]), 1, 0.0, 0, api_name="/caption")
    finally:
        p.terminate()
        p.wait(timeout=30)
