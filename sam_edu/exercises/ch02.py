"""Checks for chapter 2, *SAM from the math*."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu import reference as ref


def _random_tree(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)), rng.normal(size=(4,)), rng.normal(size=(4, 2))]


def _close(got, want, what: str) -> None:
    if len(got) != len(want):
        raise AssertionError(f"{what}: expected {len(want)} arrays (one per tensor), got {len(got)}")
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        if g.shape != w.shape:
            raise AssertionError(f"{what}: tensor {i} has shape {g.shape}, expected {w.shape}")
        if not np.all(np.isfinite(g)):
            raise AssertionError(f"{what}: tensor {i} contains NaN or inf")
        if not np.allclose(g, w, rtol=1e-8, atol=1e-12):
            raise AssertionError(f"{what}: tensor {i} is off by up to {np.max(np.abs(g - w)):.3g}")


def check_sam_perturbation(sam_perturbation: Callable) -> None:
    """``sam_perturbation(grads, rho)`` must return ``rho * g / (||g|| + eps)`` with the global norm."""
    for seed, rho in [(0, 0.05), (1, 0.5), (2, 2.0)]:
        grads = _random_tree(seed)
        _close(sam_perturbation(grads, rho), ref.sam_perturbation(grads, rho),
               f"sam_perturbation(grads, rho={rho}) (hint: one norm over ALL tensors together)")
    zeros = [np.zeros((3, 4)), np.zeros(4)]
    _close(sam_perturbation(zeros, 0.05), zeros,
           "a zero gradient (hint: add a small epsilon to the norm so 0/0 never happens)")
    print("check_sam_perturbation: correct")


def check_sam_step(sam_step: Callable) -> None:
    """``sam_step(params, grad_fn, lr, rho)`` must make one SAM step with plain SGD as the base."""
    params = ref.mlp_init((5, 4, 3), seed=3)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    before = [p.copy() for p in params]
    grad_fn = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    sgd = lambda w, d: [wi - 0.1 * di for wi, di in zip(w, d)]  # noqa: E731
    got = sam_step(params, grad_fn, 0.1, 0.05)
    _close(params, before, "your sam_step changed its input `params` in place; return new arrays")
    _close(got, ref.sam_step(params, grad_fn, sgd, rho=0.05),
           "sam_step (hint: the gradient for the update is taken at w + e, the step starts at w)")
    print("check_sam_step: correct")
