"""Bayes-rule classification math as pure functions of per-class log-likelihoods.

p(c | x) ∝ p(c) · p(x | c): the model supplies log p(x | c) (or log p(caption_c | x)); everything
here is arithmetic on those (N, C) tables, testable without a model.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def ensemble_templates(loglik: Tensor) -> Tensor:
    """Combine per-template log-likelihoods (T, N, C) into (N, C) by log-mean-exp.

    The template is treated as a latent variable drawn uniformly: p(x | c) = 1/T Σ_t p(x | t(c)).
    This is the likelihood Bayes' rule asks for (a mixture over phrasings), and it lets the
    best-fitting phrasing of each class dominate instead of averaging in poorly fitting ones.
    """
    if loglik.ndim != 3:
        raise ValueError(f"expected per-template log-likelihoods (T, N, C), got shape {tuple(loglik.shape)}")
    return torch.logsumexp(loglik, dim=0) - math.log(loglik.shape[0])


def check_prior(prior: Tensor | list[float] | None, num_classes: int) -> Tensor:
    """A prior over num_classes as a tensor; uniform when None. Raises ValueError naming the
    problem for a wrong length, a negative entry or a sum other than one."""
    if prior is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    p = torch.as_tensor(prior, dtype=torch.float64).flatten()
    if p.numel() != num_classes:
        raise ValueError(f"the prior has {p.numel()} values but there are {num_classes} labels")
    if (p < 0).any():
        raise ValueError(f"prior values must be non-negative, got {p.tolist()}")
    if abs(float(p.sum()) - 1.0) > 1e-3:
        raise ValueError(f"the prior must sum to 1, got {float(p.sum()):.4f}")
    return p / p.sum()


def posterior(loglik: Tensor, prior: Tensor | None = None) -> Tensor:
    """p(c | x) = softmax_c(log p(x | c) + log p(c)) for loglik (N, C). Rows sum to one."""
    log_prior = torch.log(check_prior(prior, loglik.shape[-1])).to(loglik.device)
    return torch.softmax(loglik.double() + log_prior, dim=-1)


def em_prior(loglik: Tensor, iters: int = 100, tol: float = 1e-8) -> Tensor:
    """Estimate the class prior of a set of unlabeled images by EM (Saerens et al. 2002):
    alternate posteriors under the current prior and the prior as the mean posterior."""
    C = loglik.shape[-1]
    prior = torch.full((C,), 1.0 / C, dtype=torch.float64)
    for _ in range(iters):
        new = posterior(loglik, prior).mean(0)
        if (new - prior).abs().max() < tol:
            return new
        prior = new
    return prior


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy − confidence| averaged over equal-width confidence bins,
    weighted by the share of samples in each bin."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - conf[inside].double().mean().item())
    return ece


def check_weights(weights: tuple[float, float]) -> tuple[float, float]:
    """The (image, text) weights of "both" as floats; ValueError unless both are non-negative and
    not both zero."""
    a, b = (float(w) for w in weights)
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"direction weights must be non-negative and not both zero, got {tuple(weights)!r}")
    return a, b


def combine_directions(image_ll: Tensor, text_ll: Tensor, weights: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """The "both" score: weights[0]·log p(x | c) + weights[1]·log p(caption_c | x), (N, C) each.

    Weights (1, 1) are the plain product of the two experts. Other weights temper each direction
    before the product (temperature scaling per expert, Guo et al. 2017); `fit_direction_weights`
    chooses them on labelled images.
    """
    a, b = check_weights(weights)
    return a * image_ll + b * text_ll


def fit_direction_weights(image_ll: Tensor, text_ll: Tensor, labels: Tensor, iters: int = 200,
                          l2: float = 1e-3) -> tuple[float, float]:
    """Weights (a, b) ≥ 0 minimising the negative log-likelihood of the true labels under
    softmax(a·image_ll + b·text_ll): temperature scaling of each direction fitted jointly.

    Two parameters fitted on a labelled calibration set (never the images being evaluated): the
    ratio a/b decides which direction leads the argmax, their size fixes calibration. A direction
    that only adds noise gets a weight near zero. `l2` keeps the weights finite when the
    calibration images are separated perfectly (the NLL then falls forever as the weights grow).
    """
    x = torch.stack([image_ll.double(), text_ll.double()], dim=-1)  # (N, C, 2)
    x = x - x.mean(dim=1, keepdim=True)  # softmax is shift-invariant per row; centring helps LBFGS
    y = torch.as_tensor(labels, dtype=torch.long)
    if x.shape[0] != y.shape[0] or x.ndim != 3:
        raise ValueError(f"expected (N, C) scores for N labels, got {tuple(image_ll.shape)}, {tuple(text_ll.shape)}, {tuple(y.shape)}")
    raw = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # weights = softplus(raw) ≥ 0
    opt = torch.optim.LBFGS([raw], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def nll() -> Tensor:
        opt.zero_grad()
        w = torch.nn.functional.softplus(raw)
        loss = torch.nn.functional.cross_entropy((x * w).sum(-1), y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(nll)
    a, b = torch.nn.functional.softplus(raw.detach()).tolist()
    return a, b
