"""Checks for chapter 6, *bSAM: SAM as a relaxation of Bayes*."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu import reference as ref
from sam_edu.calibration import expected_calibration_error
from sam_edu.exercises.ch02 import _close, _random_tree


def _precision_tree(seed: int) -> list[np.ndarray]:
    """A positive precision per weight, spread over two orders of magnitude."""
    return [10.0 ** np.random.default_rng(seed + 100).uniform(-1, 1, t.shape)
            for t in _random_tree(seed)]


def check_posterior_sample(posterior_sample: Callable) -> None:
    """``posterior_sample(params, s, noise, num_data)`` must return ``w + n / sqrt(N s)``."""
    params, s, noise = _random_tree(0), _precision_tree(1), _random_tree(2)
    before = [p.copy() for p in params]
    for num_data in (1, 50, 1000):
        got = posterior_sample(params, s, noise, num_data)
        _close(params, before, "posterior_sample changed its input `params`; return new arrays")
        _close(got, ref.posterior_sample(params, s, noise, num_data),
               f"posterior_sample(num_data={num_data}) (hint: the variance is 1/(N s), so the "
               f"standard deviation that multiplies n is 1/sqrt(N s))")
    print("check_posterior_sample: correct")


def check_bsam_precision(bsam_precision: Callable) -> None:
    """``bsam_precision(s, grads, beta2, damping, weight_decay)``: update 7 of the chapter."""
    s, grads = _precision_tree(3), _random_tree(4)
    for beta2, damping, weight_decay in [(0.9, 0.1, 0.01), (0.5, 0.0, 0.0), (0.999, 1.0, 0.5)]:
        got = bsam_precision(s, grads, beta2, damping, weight_decay)
        _close(got, ref.bsam_precision(s, grads, beta2, damping, weight_decay),
               f"bsam_precision(beta2={beta2}, damping={damping}, weight_decay={weight_decay}) "
               f"(hint: the new term is sqrt(s) * |g| + damping + delta -- not s * g**2, "
               f"and |g|, so the precision never shrinks below its floor)")
    print("check_bsam_precision: correct")


def check_bsam_step(bsam_step: Callable) -> None:
    """``bsam_step(params, m, s, noise, grad_fn, num_data, lr, beta1, beta2, weight_decay, rho,
    damping)`` must return the new ``(w, m, s)`` of one bSAM step."""
    params = ref.mlp_init((5, 4, 3), seed=7)
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    m = [0.1 * rng.normal(size=p.shape) for p in params]       # state from earlier steps
    s = [rng.uniform(0.2, 2.0, size=p.shape) for p in params]
    noise = [rng.normal(size=p.shape) for p in params]
    grad_fn = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    hyper = dict(num_data=20, lr=0.5, beta1=0.9, beta2=0.9, weight_decay=0.01, rho=0.05,
                 damping=0.1)
    before = [p.copy() for p in params]
    got = bsam_step(params, m, s, noise, grad_fn, **hyper)
    _close(params, before, "bsam_step changed its input `params` in place; return new arrays")
    want = ref.bsam_step(params, m, s, noise, grad_fn, **hyper)
    if len(got) != 3:
        raise AssertionError(f"bsam_step must return (w, m, s), got {len(got)} values")
    _close(got[2], want[2], "the precision s (hint: update 7 uses g, the gradient at the NOISY "
           "point, and the old s)")
    _close(got[1], want[1], "the momentum m (hint: g_adv is taken at w + rho g / s, which starts "
           "from the mean w, not from the noisy point; the noise must not stay in the weights)")
    _close(got[0], want[0], "the mean w (hint: step from w, not from the noisy point, and divide "
           "by the OLD s)")
    print("check_bsam_step: correct")


def _predictions(confidence: np.ndarray, correct: np.ndarray, n_classes: int = 10):
    probs = np.repeat(((1 - confidence) / (n_classes - 1))[:, None], n_classes, axis=1)
    probs[:, 0] = confidence
    return probs, np.where(correct, 0, 1)


def check_expected_calibration_error(ece: Callable) -> None:
    """``ece(probs, labels, n_bins)`` must match ``sam_edu.calibration.expected_calibration_error``."""
    # worked example: 100 inputs at 0.95 with 70 correct, 300 at 0.55 with 150 correct
    probs, labels = _predictions(np.r_[np.full(100, 0.95), np.full(300, 0.55)],
                                 np.r_[np.arange(100) < 70, np.arange(300) < 150])
    got = ece(probs, labels, 15)
    if not np.isclose(got, 0.1):
        raise AssertionError(f"ECE of the worked example is 100/400 * 0.25 + 300/400 * 0.05 = 0.1, "
                             f"got {got} (hint: weight each bin by its share of the inputs)")
    # under- and overconfident bins must not cancel
    probs, labels = _predictions(np.array([0.3, 0.3, 0.9, 0.9]), np.array([1, 1, 0, 0], bool))
    got = ece(probs, labels, 10)
    if not np.isclose(got, 0.8):
        raise AssertionError(f"ECE with an underconfident and an overconfident bin is "
                             f"0.5 * 0.7 + 0.5 * 0.9 = 0.8, got {got} (hint: |acc - conf| per bin)")
    # confidence exactly 1 belongs to the last bin
    probs, labels = _predictions(np.array([1.0, 1.0, 0.5]), np.array([0, 1, 1], bool))
    got = ece(probs, labels, 10)
    want = expected_calibration_error(probs, labels, 10)
    if not np.isclose(got, want):
        raise AssertionError(f"with confidences [1, 1, 0.5] the ECE is {want}, got {got} "
                             f"(hint: bins are ((b-1)/M, b/M], so a confidence of 1.0 is in the "
                             f"last bin, not in an extra one)")
    # random softmax predictions, several bin counts
    rng = np.random.default_rng(9)
    logits = 3 * rng.normal(size=(500, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, 500)
    for n_bins in (1, 10, 15):
        got, want = ece(probs, labels, n_bins), expected_calibration_error(probs, labels, n_bins)
        if not np.isclose(got, want, rtol=1e-10, atol=1e-12):
            raise AssertionError(f"ECE of random predictions with n_bins={n_bins}: expected "
                                 f"{want}, got {got}")
    print("check_expected_calibration_error: correct")
