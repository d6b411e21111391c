"""Checks for chapter 5, *WSAM: sharpness as a weighted regulariser*."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu import reference as ref
from sam_edu.exercises.ch02 import _close


def check_sharpness_weight(sharpness_weight: Callable) -> None:
    """``sharpness_weight(gamma)`` must return ``gamma / (1 - gamma)`` and reject gamma outside [0, 1)."""
    for gamma in (0.0, 0.5, 0.9):
        got = sharpness_weight(gamma)
        if not np.isclose(got, gamma / (1 - gamma)):
            raise AssertionError(f"sharpness_weight({gamma}) = {got}, expected {gamma / (1 - gamma)}")
    for gamma in (1.0, -0.1):
        try:
            sharpness_weight(gamma)
        except ValueError:
            continue
        raise AssertionError(f"sharpness_weight({gamma}) must raise ValueError: gamma is in [0, 1)")
    print("check_sharpness_weight: correct")


def check_wsam_decoupled_step(wsam_decoupled_step: Callable) -> None:
    """``wsam_decoupled_step(params, grad_fn, lr, rho, gamma)``: SGD with momentum 0.9 as base."""
    params = ref.mlp_init((5, 4, 3), seed=5)
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    grad_fn = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    buffers = [rng.normal(size=p.shape) for p in params]  # a momentum buffer from earlier steps
    base = lambda w, d: ref.sgd_update(w, d, buffers, lr=0.1, momentum=0.9)[0]  # noqa: E731
    got = wsam_decoupled_step(params, grad_fn, base, 0.1, 0.05, 0.9)
    _close(got, ref.wsam_step(params, grad_fn, base, lr=0.1, rho=0.05, gamma=0.9, decouple=True),
           "the decoupled step (hint: the base optimizer sees g only; then subtract "
           "lr * a * (g_adv - g))")
    print("check_wsam_decoupled_step: correct")
