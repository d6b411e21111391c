"""Calibration of a classifier's predicted probabilities (NumPy only).

A classifier is *calibrated* when, among the inputs it predicts with confidence ``c``, a fraction
``c`` is classified correctly. With predicted class probabilities ``p_i`` (one row per input) the
confidence is ``c_i = max_k p_ik`` and the prediction ``yhat_i = argmax_k p_ik``. Split ``[0, 1]``
into ``M`` bins of equal width, ``I_b = ((b - 1)/M, b/M]`` for ``b = 1..M`` (a confidence of
exactly 0 goes to the first bin), and let ``B_b`` be the inputs whose confidence falls in ``I_b``::

    acc(B_b)  = (1/|B_b|) sum_{i in B_b} 1[yhat_i = y_i]
    conf(B_b) = (1/|B_b|) sum_{i in B_b} c_i
    ECE       = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|

The expected calibration error is the average gap between confidence and accuracy, weighted by
how many inputs each bin holds; a reliability diagram plots ``acc(B_b)`` against the bins. ECE was
introduced with Bayesian binning by Naeini, Cooper & Hauskrecht (AAAI 2015); the equal-width form
with ``M = 15`` bins is the one of Guo, Pleiss, Sun & Weinberger, *On Calibration of Modern Neural
Networks* (ICML 2017, arXiv:1706.04599), eq. (3).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram; ``accuracy``/``confidence`` are NaN where empty."""

    edges: np.ndarray       # (M + 1,) bin edges 0, 1/M, ..., 1
    accuracy: np.ndarray    # (M,) acc(B_b)
    confidence: np.ndarray  # (M,) conf(B_b)
    count: np.ndarray       # (M,) |B_b|


def _validate(probs, labels, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` as an ``(n, K)`` float array of probability rows, ``labels`` as ``(n,)`` ints."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, K) with n >= 1 and K >= 2 classes, "
                         f"got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must hold probabilities in [0, 1] (apply softmax to logits)")
    if not np.allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-4):
        raise ValueError("probs: every row must sum to 1 (apply softmax to logits)")
    if labels.shape != (probs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {probs.shape[0]} integer class indices (one per row of "
                         f"probs), got dtype {labels.dtype} and shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}], "
                         f"got values from {labels.min()} to {labels.max()}")
    return probs, labels


def bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """``b - 1`` for ``c in ((b - 1)/M, b/M]``: equal-width bins, closed on the right (``c = 1``
    is in the last bin, ``c = 0`` in the first)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability_bins(probs, labels, n_bins: int = 15) -> ReliabilityBins:
    """``acc(B_b)``, ``conf(B_b)`` and ``|B_b|`` for each of ``n_bins`` equal-width confidence bins."""
    probs, labels = _validate(probs, labels, n_bins)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    b = bin_index(confidence, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore"):  # empty bins: 0/0 -> NaN, as documented
        accuracy = np.bincount(b, weights=correct, minlength=n_bins) / count
        mean_confidence = np.bincount(b, weights=confidence, minlength=n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), accuracy, mean_confidence, count)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """``ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` (Guo et al. 2017, eq. 3)."""
    bins = reliability_bins(probs, labels, n_bins)
    full = bins.count > 0
    weights = bins.count[full] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[full] - bins.confidence[full])))
