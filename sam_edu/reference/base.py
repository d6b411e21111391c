"""Base optimizer steps used by the tests: SGD with optional heavy-ball momentum and weight decay.

The convention is PyTorch's ``torch.optim.SGD`` (``dampening=0``, ``nesterov=False``), which is
also ``optax.sgd(lr, momentum)``'s trace and Keras' ``SGD(momentum=...)`` up to sign bookkeeping::

    d_t = d + weight_decay * w          (weight decay lives in the base optimizer, SPEC.md)
    b_t = momentum * b_{t-1} + d_t      (b_0 = 0, so b_1 = d_1)
    w  <- w - lr * b_t
"""

from __future__ import annotations

import numpy as np


def sgd_init(params: list[np.ndarray]) -> list[np.ndarray]:
    """The momentum buffers ``b_0 = 0``, one per parameter tensor."""
    return [np.zeros_like(w) for w in params]


def sgd_update(
    params: list[np.ndarray],
    direction: list[np.ndarray],
    buffers: list[np.ndarray],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One SGD step ``w <- w - lr * b_t`` in the direction ``d``; returns ``(params, buffers)``."""
    new_params, new_buffers = [], []
    for w, d, b in zip(params, direction, buffers):
        d_t = d + weight_decay * w
        b_t = momentum * b + d_t
        new_params.append(w - lr * b_t)
        new_buffers.append(b_t)
    return new_params, new_buffers
