"""Shared fixtures: small tokenizers and models built in seconds, CPU only, no network."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# one thread per test process: the CI machine has 2 cores and other work may share them (LIBS.md)
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = [
    "a small red circle in the top left", "a large blue square in the center", "a handwritten digit seven",
    "the number 7 written by hand", "it moves to the right.", "it turns blue.", "a green triangle above a red circle",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A MultimodalTokenizer with a BPE trained on a few captions and a tiny VQ-VAE briefly fitted
    to random shape images (enough for codes to vary)."""
    from tokenizers_mm.multimodal import MultimodalTokenizer
    from tokenizers_mm.text import train_bpe
    from tokenizers_mm.vqvae import VQ_PRESETS, VQVAE

    torch.manual_seed(0)
    bpe = train_bpe(CAPTIONS * 20, vocab_size=400)
    vq = VQVAE(VQ_PRESETS["tiny"])
    vq.train()
    with torch.no_grad():
        vq(torch.rand(64, 3, 32, 32) * 2 - 1)  # one pass initialises the codebook (k-means)
    return MultimodalTokenizer(bpe, vq.eval())


ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """Environment for the project's commands run as subprocesses: one thread, repo on the path."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """`make tokenize PRESET=tiny` into a temporary folder, as a user would run it."""
    out = tmp_path_factory.mktemp("artifacts")
    r = subprocess.run(["make", "-s", "tokenize", "PRESET=tiny", f"OUT={out}"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out


def _train_tiny(data: Path, run: Path, *settings: str) -> Path:
    """`python -m train --preset tiny` for 6 steps into `run`, with extra `--set` overrides."""
    cmd = [sys.executable, "-m", "train", "--preset", "tiny", "--data", str(data), "--out", str(run),
           *[a for x in settings for a in ("--set", x)],
           "--set", "steps=6", "--set", "sample_grid=false", "--set", "eval_every=1000"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_artifacts, tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on the tiny artifacts: a real, loadable run folder."""
    return _train_tiny(tiny_artifacts, tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="session")
def tiny_ra_run(tiny_artifacts, tmp_path_factory) -> Path:
    """A tiny model trained with retrieval augmentation (up to 2 neighbours; a context of 256 so
    that neighbours fit beside a 64-code image document)."""
    return _train_tiny(tiny_artifacts, tmp_path_factory.mktemp("run") / "tiny_ra", *RA_SETTINGS)


RA_SETTINGS = ("retrieved_max=2", "block_size=256")  # tiny preset + retrieval augmentation


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_url(tiny_run, tmp_path_factory) -> str:
    """The Gradio demo on the tiny run, launched on 127.0.0.1 at a free port (closed at the end)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from demo.app import build_demo, serve
    from sample.api import MultimodalModel

    demo = build_demo(MultimodalModel.from_pretrained(tiny_run), workdir=tmp_path_factory.mktemp("demo"))
    url = serve(demo, port=free_port(), block=False)
    yield url
    demo.close()
