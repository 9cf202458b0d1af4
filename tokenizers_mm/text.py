"""Byte-level BPE text tokenizer (Hugging Face `tokenizers`), with the project's special tokens.

Byte-level means every string, in any script, encodes without unknown tokens and decodes back
exactly. The special tokens take ids 0..8 (see special.py); a user typing "<boi>" gets the bytes
of that text, never the special id (`encode_special_tokens = True`).
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenizers_mm.special import SPECIAL_TOKENS


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`. The result's vocabulary is at most `vocab_size`
    (smaller when the corpus runs out of merges, as the embedded captions do)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"bpe vocab_size={vocab_size} is too small: it must hold the {len(SPECIAL_TOKENS)} special "
            f"tokens and the 256 byte symbols (at least {len(SPECIAL_TOKENS) + 256})"
        )
    tok = Tokenizer(models.BPE())
    # no prefix space: decode(encode(s)) must give s back exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # without it decode yields 'Ġ' characters (LIBS.md)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..8
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    configure(tok)
    return tok


def configure(tok: Tokenizer) -> Tokenizer:
    """Settings that must hold for every text tokenizer the project uses, trained or loaded."""
    check_special_tokens(tok)
    tok.encode_special_tokens = True  # typed "<boi>" stays text
    tok.no_padding()
    tok.no_truncation()
    return tok


def check_special_tokens(tok: Tokenizer) -> None:
    """Raise ValueError unless the special tokens hold ids 0..8 in the project's order."""
    for i, name in enumerate(SPECIAL_TOKENS):
        found = tok.token_to_id(name)
        if found != i:
            raise ValueError(
                f"text tokenizer has special token {name!r} at id {found}, expected {i}; "
                "it was not trained by tokenizers_mm.text.train_bpe — retrain it with `make tokenize`"
            )
