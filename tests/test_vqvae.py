"""VQ-VAE image tokenizer: config, encode/decode contract, checkpoint round trip, strict loading,
and that a short training run learns. Tiny preset only; CPU; a few seconds."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tokenizers_mm.vqvae import CONFIG_FILE, VQ_PRESETS, WEIGHTS_FILE, VQConfig, VQOutput, VQVAE
from train.vq import code_diversity_loss, evaluate_vq, lr_at, reconstruction_grid, train_vqvae

TINY = VQ_PRESETS["tiny"]


def _images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3): one or two coloured rectangles on black, a stand-in for the corpora."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, 24, 2)
            h, w = rng.integers(4, 12, 2)
            out[i, y:y + h, x:x + w] = rng.integers(40, 256, 3)
    return out


def _to_x(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@pytest.fixture(scope="module")
def train_images() -> np.ndarray:
    return _images(512, seed=0)


@pytest.fixture(scope="module")
def eval_x() -> torch.Tensor:
    return _to_x(_images(48, seed=1))


@pytest.fixture(scope="module")
def trained(train_images: np.ndarray) -> VQVAE:
    torch.set_num_threads(1)  # tests may run beside other work on a 2-core machine (LIBS.md)
    return train_vqvae(train_images, TINY, steps=60, batch_size=32, lr=3e-3, seed=0, progress=False)


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VQ_PRESETS))
def test_every_preset_is_a_valid_config_that_builds(name: str) -> None:
    cfg = VQ_PRESETS[name]
    assert cfg.grid == cfg.image_size // cfg.f and cfg.num_tokens == cfg.grid**2
    assert VQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    if name in ("tiny", "default"):  # the big ones take a while to build; their config is checked above
        VQVAE(cfg)


def test_default_preset_maps_32px_rgb_to_8x8_codes_from_512():
    cfg = VQ_PRESETS["default"]
    assert (cfg.image_size, cfg.grid, cfg.codebook_size) == (32, 8, 512)


@pytest.mark.parametrize("bad", [dict(f=3), dict(image_size=30), dict(channel_mult=(1, 2)), dict(decay=1.5),
                                 dict(num_groups=7), dict(codebook_size=0), dict(commitment_weight=-1.0),
                                 dict(channel_mult=(1, 2.5, 4)), dict(kmeans_init="yes")])
def test_config_rejects_invalid_values_with_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match="VQConfig|divisible|num_groups"):
        dataclasses.replace(TINY, **bad)


# ---- encode / decode contract -----------------------------------------------------------------


def test_codes_have_grid_shape_and_lie_in_the_codebook(trained: VQVAE, eval_x: torch.Tensor) -> None:
    codes = trained.encode(eval_x)
    assert codes.shape == (len(eval_x), TINY.grid, TINY.grid) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < TINY.codebook_size


def test_decoded_images_have_input_shape_and_lie_in_minus_one_to_one(trained: VQVAE, eval_x: torch.Tensor) -> None:
    rec = trained.decode(trained.encode(eval_x))
    assert rec.shape == eval_x.shape and rec.dtype == torch.float32
    assert float(rec.min()) >= -1.0 and float(rec.max()) <= 1.0


def test_encode_is_deterministic_and_batch_invariant(trained: VQVAE, eval_x: torch.Tensor) -> None:
    whole = trained.encode(eval_x)
    assert torch.equal(whole, trained.encode(eval_x))
    one_by_one = torch.cat([trained.encode(eval_x[i:i + 1]) for i in range(len(eval_x))])
    assert torch.equal(whole, one_by_one)
    assert torch.equal(whole, trained.encode(eval_x, batch_size=7))


def test_decode_of_encode_is_deterministic(trained: VQVAE, eval_x: torch.Tensor) -> None:
    assert torch.equal(trained.decode(trained.encode(eval_x)), trained.decode(trained.encode(eval_x)))


def test_eval_lookup_matches_the_library_quantizer(trained: VQVAE, eval_x: torch.Tensor) -> None:
    z = trained.encoder(eval_x).flatten(2).transpose(1, 2)
    ours_q, ours_idx = trained._quantize_eval(z, None)  # the learned codes alone
    lib_q, lib_idx, _ = trained.vq.eval()(z)
    assert torch.equal(ours_idx, lib_idx) and torch.allclose(ours_q, lib_q, atol=1e-5)


def test_encode_never_changes_the_codebook_even_untrained_in_train_mode(eval_x: torch.Tensor) -> None:
    model = VQVAE(TINY).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(eval_x)
    assert not model.is_trained and len(codes.unique()) > 1  # random codebook, not all code 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_encode_rejects_uint8_wrong_size_and_out_of_range_images(trained: VQVAE) -> None:
    with pytest.raises(ValueError, match="float"):
        trained.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        trained.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        trained.encode(torch.full((2, 3, 32, 32), 255.0))


def test_decode_rejects_out_of_range_codes_and_wrong_grid(trained: VQVAE) -> None:
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        trained.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        trained.decode(torch.zeros(1, 64, dtype=torch.long))


# ---- checkpoint --------------------------------------------------------------------------------


def test_save_then_from_pretrained_restores_every_tensor_and_gives_identical_codes(
        trained: VQVAE, eval_x: torch.Tensor, tmp_path: Path) -> None:
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # no temp files left
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config == trained.config and not loaded.training
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.encode(eval_x), trained.encode(eval_x))
    assert torch.equal(loaded.decode(trained.encode(eval_x)), trained.decode(trained.encode(eval_x)))


def test_from_pretrained_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        VQVAE.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_from_pretrained_rejects_a_folder_missing_a_file(trained: VQVAE, tmp_path: Path, missing: str) -> None:
    trained.save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        VQVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [("unknown", "unknown keys \\['dropout'\\]"),
                                           ("missing", "missing keys \\['decay'\\]"),
                                           ("wrong type", "VQConfig.f must be a positive integer; found '4'")])
def test_from_pretrained_rejects_a_config_with_unknown_missing_or_mistyped_keys(
        trained: VQVAE, tmp_path: Path, edit: str, message: str) -> None:
    trained.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    if edit == "unknown":
        cfg["dropout"] = 0.1
    elif edit == "missing":
        del cfg["decay"]
    else:
        cfg["f"] = "4"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        VQVAE.from_pretrained(tmp_path)


def test_a_folder_saved_before_encoder_norm_existed_loads_with_group_norm(trained: VQVAE, tmp_path: Path,
                                                                            eval_x: torch.Tensor) -> None:
    assert trained.config.encoder_norm == "group"
    trained.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    del cfg["encoder_norm"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config.encoder_norm == "group"
    assert torch.equal(loaded.encode(eval_x), trained.encode(eval_x))


def test_channel_norm_encoder_codes_ignore_image_wide_statistics() -> None:
    # GroupNorm pools statistics over the whole image, so adding a bright square in one corner
    # moves the latent of the opposite corner even in a network with only 1x1 convolutions;
    # a per-position channel norm does not
    torch.manual_seed(0)
    blank = -torch.ones(1, 3, 32, 32)
    marked = blank.clone()
    marked[:, :, :8, :8] = 1.0
    moved = {}
    for norm in ("group", "channel"):
        vq = VQVAE(dataclasses.replace(TINY, encoder_norm=norm)).eval()
        for m in vq.encoder.modules():  # receptive field of one pixel: only the norms can mix positions
            if isinstance(m, torch.nn.Conv2d):
                m.padding = (0, 0)
                m.weight.data = m.weight.data[:, :, :1, :1].clone() if m.stride == (1, 1) else m.weight.data
        with torch.no_grad():
            z0, z1 = vq.encoder.conv_in(blank), vq.encoder.conv_in(marked)
            for block in vq.encoder.blocks:
                if isinstance(block, torch.nn.Conv2d):
                    break
                z0, z1 = block(z0), block(z1)
        moved[norm] = float((z0 - z1)[..., -8:, -8:].abs().max())
    assert moved["group"] > 1e-3
    assert moved["channel"] < 1e-6


@pytest.mark.parametrize("edit", ["missing", "unexpected", "mismatched"])
def test_from_pretrained_rejects_weights_that_do_not_match_the_config(
        trained: VQVAE, tmp_path: Path, edit: str) -> None:
    trained.save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    if edit == "missing":
        del state["decoder.conv_out.bias"]
    elif edit == "unexpected":
        state["decoder.extra.weight"] = torch.zeros(3)
    else:
        state["decoder.conv_out.bias"] = torch.zeros(4)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    expected = {"missing": r"missing \['decoder.conv_out.bias'\]", "unexpected": r"unexpected \['decoder.extra.weight'\]",
                "mismatched": r"decoder.conv_out.bias: file \(4,\) vs config \(3,\)"}[edit]
    with pytest.raises(ValueError, match=expected):
        VQVAE.from_pretrained(tmp_path)


# ---- training and evaluation -------------------------------------------------------------------


def test_short_training_lowers_reconstruction_error_and_uses_many_codes(trained: VQVAE, eval_x: torch.Tensor) -> None:
    untrained = VQVAE(TINY).eval()
    err_before = F.mse_loss(untrained.decode(untrained.encode(eval_x)), eval_x).item()
    err_after = F.mse_loss(trained.decode(trained.encode(eval_x)), eval_x).item()
    assert trained.is_trained and err_after < 0.5 * err_before
    assert len(trained.encode(eval_x).unique()) > 8


def test_evaluate_vq_reports_usage_perplexity_and_psnr_in_range(trained: VQVAE) -> None:
    images = _images(32, seed=2)
    m = evaluate_vq(trained, images)  # uint8 (N, H, W, 3) accepted as is
    assert 0 < m["codebook_usage"] <= 1 and m["codes_used"] == round(m["codebook_usage"] * 64)
    assert 1 <= m["perplexity"] <= m["codes_used"] + 1e-6
    assert 10 < m["psnr_db"] < 100 and m["num_images"] == 32
    assert evaluate_vq(trained, _to_x(images)) == m  # float (N, 3, H, W) gives the same numbers


def test_reconstruction_grid_shows_originals_above_reconstructions_upscaled_4x(trained: VQVAE) -> None:
    grid = reconstruction_grid(trained, _images(5, seed=3), n=4)
    assert grid.size == (4 * (128 + 2) + 2, 2 * (128 + 2) + 2)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    lrs = [lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] < lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


# ---- the reserved code for black patches (VQConfig.blank_code) --------------------------------

BLANK_TINY = TINY  # the presets reserve the blank code
PLAIN_TINY = dataclasses.replace(TINY, blank_code=False, threshold_ema_dead_code=2.0)


@pytest.fixture(scope="module")
def trained_blank(trained: VQVAE) -> VQVAE:
    assert trained.config.blank_code
    return trained


@pytest.fixture(scope="module")
def trained_plain(train_images: np.ndarray) -> VQVAE:
    torch.set_num_threads(1)
    return train_vqvae(train_images, PLAIN_TINY, steps=60, batch_size=32, lr=3e-3, seed=0, progress=False)


def test_blank_mask_marks_exactly_the_patches_with_no_pixel_above_two() -> None:
    vq = VQVAE(BLANK_TINY)
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 1, 2, 0] = 2  # patch (0, 0): still black (resize rounding)
    img[0, 5, 6, 2] = 3  # patch (1, 1): one blue pixel at 3 makes it content
    img[0, 31, 31] = 255  # the last patch
    mask = vq.blank_mask(_to_x(img)).view(8, 8)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[1, 1] = expected[7, 7] = False
    assert torch.equal(mask, expected)
    assert VQVAE(PLAIN_TINY).blank_mask(_to_x(img)) is None


def test_black_patches_get_the_last_code_and_no_other_patch_does(trained_blank: VQVAE, eval_x: torch.Tensor) -> None:
    k = BLANK_TINY.codebook_size
    codes = trained_blank.encode(eval_x).flatten(1)
    blank = trained_blank.blank_mask(eval_x)
    assert 0.2 < blank.float().mean() < 0.95  # the fixture images do have both kinds
    assert bool((codes[blank] == k - 1).all())
    assert bool((codes[~blank] < k - 1).all())
    assert torch.equal(trained_blank.encode(-torch.ones(2, 3, 32, 32)), torch.full((2, 8, 8), k - 1))
    # the library's codebook holds only the learned codes; decode accepts every id below k
    assert trained_blank.vq.codebook.shape[0] == k - 1
    assert trained_blank.decode(torch.full((1, 8, 8), k - 1)).shape == (1, 3, 32, 32)


def test_the_blank_code_decodes_to_exact_black_and_content_codes_do_not(trained_blank: VQVAE) -> None:
    k = BLANK_TINY.codebook_size
    codes = torch.randint(0, k - 1, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    codes[0, :4] = k - 1  # top half blank
    img = trained_blank.decode(codes)
    assert bool((img[..., :16, :] == -1.0).all())
    assert float(img[..., 16:, :].max()) > -0.9
    # in training the loss sees exact black there too: reconstruction of black patches is perfect
    out = trained_blank.train()(-torch.ones(2, 3, 32, 32))
    trained_blank.eval()
    assert bool((out.recon == -1.0).all())


def test_a_training_batch_of_black_images_only_is_harmless() -> None:
    torch.manual_seed(0)
    vq = VQVAE(BLANK_TINY).train()
    out = vq(-torch.ones(4, 3, 32, 32))
    assert bool((out.indices == BLANK_TINY.codebook_size - 1).all()) and torch.isfinite(out.commit_loss)


def test_blank_code_tokenizer_saves_and_loads_identically(trained_blank: VQVAE, tmp_path: Path,
                                                          eval_x: torch.Tensor) -> None:
    trained_blank.save(tmp_path)
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config.blank_code and torch.equal(loaded.blank_embed, trained_blank.blank_embed)
    assert torch.equal(loaded.encode(eval_x), trained_blank.encode(eval_x))


def test_a_folder_saved_before_blank_code_existed_loads_without_it(trained_plain: VQVAE, tmp_path: Path,
                                                                   eval_x: torch.Tensor) -> None:
    trained = trained_plain
    trained.save(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    del cfg["blank_code"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config.blank_code is False
    assert torch.equal(loaded.encode(eval_x), trained.encode(eval_x))


# ---- per-corpus codebook diversity ---------------------------------------------------------------


def _output_with_latents(vq: VQVAE, latents: torch.Tensor) -> VQOutput:
    n = latents.shape[1]
    return VQOutput(recon=torch.zeros(0), indices=torch.zeros(len(latents), n, dtype=torch.long),
                    commit_loss=torch.zeros(()), latents=latents, blank=torch.zeros(len(latents), n, dtype=torch.bool))


def test_diversity_loss_is_zero_when_each_corpus_spreads_evenly_and_one_when_it_collapses() -> None:
    vq = VQVAE(dataclasses.replace(TINY, blank_code=False)).train()
    codebook = vq.vq.codebook.detach().float()  # (K, D); project_in is the identity at latent_dim == codebook_dim
    k = len(codebook)
    spread = codebook[None].repeat(2, 1, 1)  # corpus 0 and 1 each put one vector on every code
    groups = torch.tensor([0, 1])
    even = code_diversity_loss(vq, _output_with_latents(vq, spread), groups, temperature=1e4)
    assert float(even) == pytest.approx(0.0, abs=1e-3)
    # each corpus on its own single code: the mixture uses two codes, yet each corpus uses one -> loss 1
    collapsed = torch.stack([codebook[0].expand(k, -1), codebook[1].expand(k, -1)])
    assert float(code_diversity_loss(vq, _output_with_latents(vq, collapsed), groups, temperature=1e4)) == \
        pytest.approx(1.0, abs=1e-3)
    # the same vectors seen as one corpus: entropy log 2 of log K
    one = code_diversity_loss(vq, _output_with_latents(vq, collapsed), torch.tensor([0, 0]), temperature=1e4)
    assert float(one) == pytest.approx(1.0 - np.log(2) / np.log(k), abs=1e-3)


def test_diversity_loss_ignores_black_patches_and_reaches_only_the_encoder(eval_x: torch.Tensor) -> None:
    vq = VQVAE(TINY).train()
    out = vq(eval_x[:8])
    loss = code_diversity_loss(vq, out, torch.zeros(8, dtype=torch.long), temperature=50.0)
    assert 0.0 <= loss.item() <= 1.0
    loss.backward()
    assert vq.encoder.conv_in.weight.grad is not None and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vq.decoder.parameters())
    # black patches carry no vector of their own: a batch that is all black contributes nothing
    black = torch.full((2, 3, TINY.image_size, TINY.image_size), -1.0)
    assert float(code_diversity_loss(vq, vq(black), torch.zeros(2, dtype=torch.long), 50.0)) == 0.0


def test_diversity_raises_each_corpus_codebook_usage_in_a_short_training(train_images: torch.Tensor) -> None:
    half = len(train_images) // 2
    groups = torch.arange(len(train_images)) >= half
    usage = {}
    for weight in (0.0, 0.3):
        vq = train_vqvae(train_images, TINY, steps=40, batch_size=32, lr=3e-3, seed=0, progress=False,
                         groups=groups.long(), diversity_weight=weight)
        usage[weight] = min(evaluate_vq(vq, train_images[:half])["codes_used"],
                            evaluate_vq(vq, train_images[half:])["codes_used"])
    assert usage[0.3] > usage[0.0]


def test_train_vqvae_rejects_groups_of_the_wrong_length_and_negative_diversity(train_images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one corpus id per training image"):
        train_vqvae(train_images, TINY, steps=1, groups=torch.zeros(3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="diversity_weight"):
        train_vqvae(train_images, TINY, steps=1, diversity_weight=-1.0, progress=False)


def test_the_train_vq_command_writes_the_model_grids_and_a_report_with_its_settings(tmp_path: Path) -> None:
    from train.vq import main

    args = ["--preset", "tiny", "--out", str(tmp_path), "--steps", "5", "--shapes-train", "100", "--shapes-eval", "20",
            "--digits-augment", "0", "--no-progress", "--threads", "1", "--diversity", "0.1"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["diversity_weight"] == 0.1 and report["diversity_temperature"] == 100.0 and report["steps"] == 5
    assert set(report["eval"]) == {"shapes", "digits", "all"}
    assert (tmp_path / "recon_shapes.png").is_file() and (tmp_path / "recon_digits.png").is_file()
    assert VQVAE.from_pretrained(tmp_path).is_trained
