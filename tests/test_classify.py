"""Bayes-rule classification: the math, and cached/batched scores equal to the naive loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Transformer, preset
from sample.bayes import (check_prior, combine_directions, em_prior, ensemble_templates, expected_calibration_error,
                          fit_direction_weights, posterior)
from sample.classify import check_labels, classify, image_loglik, naive_scores, text_loglik, trained_orders


def test_posteriors_sum_to_one_and_follow_the_likelihoods():
    ll = torch.randn(5, 4) * 10
    p = posterior(ll)
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(p.argmax(-1), ll.argmax(-1))


def test_the_prior_acts_as_bayes_rule_says():
    ll = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    p = posterior(ll, torch.tensor([0.8, 0.2]))
    assert torch.allclose(p[0], torch.tensor([0.8, 0.2], dtype=torch.float64))
    odds = p[1, 1] / p[1, 0]  # posterior odds = prior odds × likelihood ratio
    assert abs(odds.item() - (0.2 / 0.8) * torch.e) < 1e-9


@pytest.mark.parametrize("prior,message", [([0.5, 0.5], "2 values but there are 3"), ([0.5, 0.6, -0.1], "non-negative"),
                                           ([0.2, 0.2, 0.2], "sum to 1")])
def test_bad_priors_are_refused(prior, message):
    with pytest.raises(ValueError, match=message):
        check_prior(prior, 3)


def test_template_ensemble_is_log_mean_exp():
    ll = torch.log(torch.tensor([[[0.2, 0.4]], [[0.6, 0.0001]]]))
    out = ensemble_templates(ll)
    assert torch.allclose(out.exp(), torch.tensor([[0.4, 0.20005]]), atol=1e-6)


def test_em_recovers_a_skewed_prior():
    torch.manual_seed(0)
    labels = torch.cat([torch.zeros(800), torch.ones(200)]).long()
    means = torch.tensor([0.0, 1.5])
    x = means[labels] + torch.randn(1000)  # x | c ~ N(mean_c, 1): exact Gaussian log-likelihoods below
    ll = -0.5 * (x[:, None] - means[None]) ** 2
    est = em_prior(ll)
    assert abs(est[0].item() - 0.8) < 0.06


def test_ece_is_zero_for_perfectly_calibrated_confident_predictions_and_positive_otherwise():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([1, 1])) == pytest.approx(0.5)


def test_direction_weights_temper_each_expert_and_bad_weights_are_refused():
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(combine_directions(img, txt), img + txt)
    assert torch.allclose(combine_directions(img, txt, (0.25, 2.0)), 0.25 * img + 2.0 * txt)
    for bad in [(-1.0, 1.0), (0.0, 0.0)]:
        with pytest.raises(ValueError, match="non-negative"):
            combine_directions(img, txt, bad)


def test_fitted_direction_weights_mute_a_noisy_direction_and_lower_the_nll():
    torch.manual_seed(0)
    N, C = 2000, 10
    y = torch.randint(0, C, (N,))
    onehot = torch.nn.functional.one_hot(y, C).double()
    txt = 3.0 * onehot + torch.randn(N, C)  # informative and about calibrated
    img = 1.0 * onehot + 20.0 * torch.randn(N, C)  # barely informative and wildly over-confident
    a, b = fit_direction_weights(img, txt, y)
    assert a < 0.05 * b, (a, b)

    def nll(weights):
        return torch.nn.functional.cross_entropy(combine_directions(img, txt, weights), y).item()

    assert nll((a, b)) < min(nll((1.0, 1.0)), nll((0.0, 1.0)), nll((1.0, 0.0)))


@pytest.mark.parametrize("labels,templates,message", [
    ([], ["{}"], "no labels"), (["one"], ["{}"], "only one label"), (["a", "b", "a"], ["{}"], "duplicate"),
    (["a", "b"], ["a digit"], "has no {}")])
def test_bad_labels_and_templates_are_refused(labels, templates, message):
    with pytest.raises(ValueError, match=message):
        check_labels(labels, templates)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size, block_size=128)).eval()


@pytest.fixture(scope="module")
def codes(tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_tokenizer.layout.codebook_size, (5, tiny_tokenizer.image_tokens), generator=g)


CAPTIONS = ["a handwritten digit one", "a red circle", "the number 7 written by hand"]


def test_cached_batched_image_scores_equal_the_naive_loop(model, tiny_tokenizer, codes):
    fast = image_loglik(model, tiny_tokenizer, codes, CAPTIONS, bf16=False, batch_rows=7)
    slow = naive_scores(model, tiny_tokenizer, codes, CAPTIONS, "image")
    assert torch.allclose(fast, slow, atol=1e-3)


def test_cached_batched_text_scores_equal_the_naive_loop(model, tiny_tokenizer, codes):
    fast = text_loglik(model, tiny_tokenizer, codes, CAPTIONS, bf16=False, batch_rows=7)
    slow = naive_scores(model, tiny_tokenizer, codes, CAPTIONS, "text")
    assert torch.allclose(fast, slow, atol=1e-3)


def test_compiled_scoring_equals_the_naive_loop_in_both_directions(tiny_tokenizer, codes):
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size, block_size=128)).eval()
    m.compile_scoring()
    try:
        # two chunk sizes: dynamic shapes serve both without a second graph being wrong
        for rows in (7, 30):
            fast = image_loglik(m, tiny_tokenizer, codes, CAPTIONS, bf16=False, batch_rows=rows)
            assert torch.allclose(fast, naive_scores(m, tiny_tokenizer, codes, CAPTIONS, "image"), atol=1e-3)
        fast = text_loglik(m, tiny_tokenizer, codes, CAPTIONS, bf16=False, batch_rows=7)
        assert torch.allclose(fast, naive_scores(m, tiny_tokenizer, codes, CAPTIONS, "text"), atol=1e-3)
    finally:
        m.compile_scoring(False)


def test_image_orders_score_the_permuted_codes_and_classify_averages_them(model, tiny_tokenizer, codes):
    torch.manual_seed(0)  # a model with the 3 marker ids of a run trained with image_orders=4
    m = Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size + 3, block_size=128)).eval()
    assert trained_orders(m, tiny_tokenizer) == 4 and trained_orders(model, tiny_tokenizer) == 1
    per_order, captions = [], ["a handwritten digit one", "a handwritten digit 7"]
    for k in range(4):
        fast = image_loglik(m, tiny_tokenizer, codes, captions, bf16=False, batch_rows=7, order=k)
        assert torch.allclose(fast, naive_scores(m, tiny_tokenizer, codes, captions, "image", order=k), atol=1e-3)
        per_order.append(fast)
    assert not torch.allclose(per_order[0], per_order[1], atol=1e-2)  # another order is another sequence
    out = classify(m, tiny_tokenizer, codes, ["one", "7"], ["a handwritten digit {}"], mode="image", bf16=False, orders=4)
    assert torch.allclose(out.image_loglik, torch.stack(per_order).mean(0), atol=1e-4)
    with pytest.raises(ValueError, match="image_orders > 1"):
        image_loglik(model, tiny_tokenizer, codes, CAPTIONS, order=1)
    with pytest.raises(ValueError, match="orders must be an integer between 1 and 1"):
        classify(model, tiny_tokenizer, codes, ["one", "two"], mode="image", orders=2)


def test_pruning_keeps_the_exact_scores_of_the_kept_classes(model, tiny_tokenizer, codes):
    full = image_loglik(model, tiny_tokenizer, codes, CAPTIONS, bf16=False)
    pruned = image_loglik(model, tiny_tokenizer, codes, CAPTIONS, bf16=False, prune_after=8, keep=2)
    kept = torch.isfinite(pruned)
    assert kept.sum(-1).tolist() == [2] * len(codes)
    assert torch.allclose(pruned[kept], full[kept], atol=1e-4)


def test_classify_combines_directions_and_templates(model, tiny_tokenizer, codes):
    out = classify(model, tiny_tokenizer, codes, ["one", "two"], ["a handwritten digit {}", "the number {}"],
                   mode="both", bf16=False)
    assert out.posterior.shape == (5, 2)
    assert torch.allclose(out.posterior.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(out.loglik, out.image_loglik + out.text_loglik)
    assert len(out.predictions) == 5
    tempered = classify(model, tiny_tokenizer, codes, ["one", "two"], ["a handwritten digit {}"], mode="both",
                        bf16=False, weights=(0.5, 2.0))
    assert torch.allclose(tempered.loglik, 0.5 * tempered.image_loglik + 2.0 * tempered.text_loglik)
    with pytest.raises(ValueError, match="non-negative"):
        classify(model, tiny_tokenizer, codes, ["one", "two"], mode="both", weights=(-1.0, 1.0))


def test_shifted_views_start_with_the_image_and_move_content_by_whole_pixels():
    import numpy as np
    from PIL import Image

    from sample.classify import MAX_VIEWS, shifted_views

    arr = np.zeros((12, 12, 3), dtype=np.uint8)
    arr[5, 6] = (200, 10, 30)  # one bright pixel away from the border
    views = shifted_views(Image.fromarray(arr), MAX_VIEWS)
    assert len(views) == MAX_VIEWS
    assert np.array_equal(np.asarray(views[0]), arr)
    shifts = []
    for v in views:
        a = np.asarray(v)
        assert a.shape == arr.shape and a.sum() == arr.sum()  # black border fill adds nothing
        ys, xs = np.nonzero(a[..., 0])
        shifts.append((int(xs[0]) - 6, int(ys[0]) - 5))
        assert max(abs(shifts[-1][0]), abs(shifts[-1][1])) <= 2
    assert len(set(shifts)) == MAX_VIEWS  # every view a different shift
    assert set(shifts[1:5]) == {(1, 0), (-1, 0), (0, 1), (0, -1)}  # the one-pixel axis shifts come first
    edge = np.asarray(shifted_views(Image.fromarray(np.full((8, 8, 3), 90, np.uint8)), 9)[8])
    assert (edge == 90).all()  # the uncovered border repeats the edge, it is not black
    with pytest.raises(ValueError, match="views must be between 1 and"):
        shifted_views(Image.fromarray(arr), MAX_VIEWS + 1)


def test_views_average_each_direction_over_the_shifted_images(model, tiny_tokenizer):
    from PIL import Image

    from sample.classify import shifted_views

    g = torch.Generator().manual_seed(3)
    size = tiny_tokenizer.image_size
    images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(3)]
    labels, templates = ["one", "two", "three"], ["a handwritten digit {}", "the number {}"]
    out = classify(model, tiny_tokenizer, images, labels, templates, mode="both", views=3, bf16=False)
    per_view = [classify(model, tiny_tokenizer, [shifted_views(im, 3)[k] for im in images], labels, templates,
                         mode="both", bf16=False) for k in range(3)]
    assert out.views == 3
    assert torch.allclose(out.image_loglik, torch.stack([c.image_loglik for c in per_view]).mean(0), atol=1e-4)
    assert torch.allclose(out.text_loglik, torch.stack([c.text_loglik for c in per_view]).mean(0), atol=1e-4)
    assert torch.allclose(out.posterior.sum(-1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="views must be an integer between 1 and"):
        classify(model, tiny_tokenizer, images, labels, templates, views=0)
    with pytest.raises(ValueError, match="needs the images themselves"):
        classify(model, tiny_tokenizer, tiny_tokenizer.encode_images(images), labels, templates, views=2)


def test_brightness_levels_average_each_direction_over_the_dimmed_views(model, tiny_tokenizer):
    from PIL import Image

    from sample.classify import image_views, shifted_views

    g = torch.Generator().manual_seed(4)
    size = tiny_tokenizer.image_size
    images = [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(3)]
    arr = np.asarray(images[0])
    copies = image_views(images[0], 2, (1.0, 0.5))
    assert len(copies) == 4 and np.array_equal(np.asarray(copies[0]), arr)
    assert np.array_equal(np.asarray(copies[2]), np.round(arr.astype(np.float32) * 0.5).astype(np.uint8))
    assert np.array_equal(np.asarray(copies[3]), np.round(np.asarray(shifted_views(images[0], 2)[1]) * np.float32(0.5)).astype(np.uint8))
    labels, templates = ["one", "two", "three"], ["a handwritten digit {}"]
    out = classify(model, tiny_tokenizer, images, labels, templates, mode="both", brightness=(1.0, 0.6), bf16=False)
    dim = [Image.fromarray(np.round(np.asarray(im, dtype=np.float32) * 0.6).astype(np.uint8)) for im in images]
    per_level = [classify(model, tiny_tokenizer, ims, labels, templates, mode="both", bf16=False) for ims in (images, dim)]
    assert out.brightness == (1.0, 0.6) and out.views == 1
    assert not torch.allclose(per_level[0].image_loglik, per_level[1].image_loglik)  # dimming changes the codes read
    for name in ("image_loglik", "text_loglik"):
        want = torch.stack([getattr(c, name) for c in per_level]).mean(0)
        assert torch.allclose(getattr(out, name), want, atol=1e-4)
    for bad in ((), (1.0, 1.0), (0.0,), (1.2,), ("dim",)):
        with pytest.raises(ValueError, match="brightness must be"):
            classify(model, tiny_tokenizer, images, labels, templates, brightness=bad)


def test_several_models_average_each_direction_over_the_models(model, tiny_tokenizer, codes):
    torch.manual_seed(1)
    other = Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size, block_size=128)).eval()
    labels, templates = ["one", "two", "three"], ["a handwritten digit {}", "the number {}"]
    single = [classify(m, tiny_tokenizer, codes, labels, templates, mode="both", bf16=False) for m in (model, other)]
    both = classify([model, other], tiny_tokenizer, codes, labels, templates, mode="both", bf16=False)
    assert torch.allclose(both.image_loglik, (single[0].image_loglik + single[1].image_loglik) / 2, atol=1e-4)
    assert torch.allclose(both.text_loglik, (single[0].text_loglik + single[1].text_loglik) / 2, atol=1e-4)
    assert not torch.allclose(single[0].image_loglik, single[1].image_loglik, atol=1e-2)  # two different experts
    assert torch.allclose(both.posterior.sum(-1), torch.ones(len(codes), dtype=torch.float64))
    wrong = Transformer(preset("tiny", vocab_size=tiny_tokenizer.vocab_size - 1, block_size=128)).eval()
    with pytest.raises(ValueError, match="every model must be trained on this tokenizer"):
        classify([model, wrong], tiny_tokenizer, codes, labels, templates)
    with pytest.raises(ValueError, match="at least one model"):
        classify([], tiny_tokenizer, codes, labels, templates)
