"""Datasets for the chapters. The CPU default is scikit-learn's handwritten digits, which ship
with scikit-learn (nothing to download)."""

from __future__ import annotations

import numpy as np


def digits(test_size: float = 0.3, seed: int = 0, label_noise: float = 0.0):
    """8x8 digits scaled to [0, 1], split stratified into ``(x_train, y_train, x_test, y_test)``.

    ``label_noise`` is the fraction of *training* labels replaced by a uniformly random class
    (drawn with ``seed``; the replacement may equal the true label). Test labels stay clean.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data / 16.0, data.target, test_size=test_size,
                                              random_state=0, stratify=data.target)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y_tr)) < label_noise
    y_tr = y_tr.copy()
    y_tr[flip] = rng.integers(0, 10, int(flip.sum()))
    return x_tr, y_tr, x_te, y_te
