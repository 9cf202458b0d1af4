"""The text tokenizer and the unified multimodal tokenizer: round trips, layout, persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_mm import special
from tokenizers_mm.document import Document
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.text import train_bpe

TRICKY = ["", " ", "  double  spaces", "line\nbreak\ttab", "ünïcødé ✓ 🙂 漢字", "<boi>", "<eos> and <pad>",
          "<mask:0> <infill>", "a red circle<break>"]


def img(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_special_tokens_take_the_first_ids_in_order(tiny_tokenizer):
    for i, name in enumerate(special.SPECIAL_TOKENS):
        assert tiny_tokenizer.text.token_to_id(name) == i


@pytest.mark.parametrize("text", TRICKY)
def test_text_round_trip_is_exact(tiny_tokenizer, text):
    assert tiny_tokenizer.decode_text(tiny_tokenizer.encode_text(text)) == text


@pytest.mark.parametrize("text", ["<boi>", "<eos>", "<pad>", "<break>", "<mask>"])
def test_text_that_looks_like_a_special_token_stays_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode_text(text)
    assert all(i >= len(special.SPECIAL_TOKENS) for i in ids)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(Document([text]))).segments == [text]


def test_vocabulary_layout_is_contiguous(tiny_tokenizer):
    t = tiny_tokenizer
    assert t.image_offset == t.text_vocab_size
    assert t.vocab_size == t.text_vocab_size + t.vq.config.codebook_size
    assert t.layout.is_image_id(t.image_offset) and not t.layout.is_image_id(t.image_offset - 1)
    assert not t.layout.is_text_id(special.EOS_ID) and t.layout.is_text_id(len(special.SPECIAL_TOKENS))


def test_an_image_is_boi_grid_codes_eoi(tiny_tokenizer):
    t = tiny_tokenizer
    ids = t.encode(Document([img(0)]), bos=False, eos=False)
    assert len(ids) == t.grid * t.grid + 2
    assert ids[0] == special.BOI_ID and ids[-1] == special.EOI_ID
    assert all(t.image_offset <= i < t.vocab_size for i in ids[1:-1])


def test_document_encodes_as_bos_segments_eos_and_decodes_back(tiny_tokenizer):
    t = tiny_tokenizer
    doc = Document(["a red circle", img(1), "it moves to the right.", img(2)])
    ids = t.encode(doc)
    assert ids[0] == special.BOS_ID and ids[-1] == special.EOS_ID
    back = t.decode(ids)
    assert [type(s) for s in back.segments] == [str, Image.Image, str, Image.Image]
    assert back.segments[0] == "a red circle" and back.segments[2] == "it moves to the right."
    # image codes round trip exactly through ids: re-encoding the decoded codes' ids is identical
    codes = t.encode_images([img(1), img(2)])
    assert ids[ids.index(special.BOI_ID) + 1 : ids.index(special.EOI_ID)] == (codes[0] + t.image_offset).tolist()


def test_image_codes_round_trip_through_ids(tiny_tokenizer):
    t = tiny_tokenizer
    codes = torch.randint(0, t.vq.config.codebook_size, (t.image_tokens,))
    ids = t.image_ids(codes)
    assert [i - t.image_offset for i in ids[1:-1]] == codes.tolist()


def test_batched_image_encoding_equals_one_by_one(tiny_tokenizer):
    images = [img(i) for i in range(5)]
    batched = tiny_tokenizer.encode_images(images, batch_size=3)
    single = torch.cat([tiny_tokenizer.encode_images([im]) for im in images])
    assert torch.equal(batched, single)
    assert batched.shape == (5, tiny_tokenizer.image_tokens)


def test_decode_rejects_a_truncated_image(tiny_tokenizer):
    t = tiny_tokenizer
    ids = t.encode(Document([img(3)]))
    with pytest.raises(ValueError, match="malformed image"):
        t.decode(ids[:-5])


def test_images_of_other_modes_and_sizes_are_converted(tiny_tokenizer):
    odd = [Image.new("L", (7, 50), 128), Image.new("RGBA", (40, 33), (255, 0, 0, 128)), Image.new("P", (32, 32))]
    assert tiny_tokenizer.encode_images(odd).shape == (3, tiny_tokenizer.image_tokens)


def test_save_and_from_pretrained_restore_the_same_tokenizer(tiny_tokenizer, tmp_path):
    t = tiny_tokenizer
    t.save(tmp_path / "tok")
    u = MultimodalTokenizer.from_pretrained(tmp_path / "tok")
    doc = Document(["a small red circle", img(4), "<boi> typed"])
    assert t.encode(doc) == u.encode(doc)
    assert u.vocab_size == t.vocab_size
    for name, tensor in t.vq.state_dict().items():
        assert torch.equal(tensor, u.vq.state_dict()[name]), name


def test_loading_an_incomplete_folder_names_what_is_missing(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        MultimodalTokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="not found"):
        MultimodalTokenizer.from_pretrained(tmp_path / "nowhere")


def test_loading_a_mismatched_layout_is_refused(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    meta_file = tmp_path / "tok" / "multimodal.json"
    meta = json.loads(meta_file.read_text())
    meta["codebook_size"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="codebook_size"):
        MultimodalTokenizer.from_pretrained(tmp_path / "tok")


def test_a_bpe_vocabulary_too_small_for_bytes_is_refused():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
