"""Shared fixtures: small tokenizers and models built in seconds, CPU only, no network."""
from __future__ import annotations

import os

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
