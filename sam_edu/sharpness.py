"""Measures of sharpness, on parameters given as lists of NumPy arrays.

* :func:`surrogate_gap` -- GSAM's ``h(w) = L(w + e(w)) - L(w)`` with SAM's ``e = rho g/||g||``.
* :func:`hessian_top_eigenvalue` -- ``lambda_max`` of the Hessian by power iteration on
  Hessian-vector products, each a central difference of two gradients:
  ``H v ~ (grad L(w + eps v) - grad L(w - eps v)) / (2 eps)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.reference.sam import ascend, global_norm, sam_perturbation

Params = list[np.ndarray]


def surrogate_gap(loss_and_grad: Callable[[Params], tuple[float, Params]], params: Params,
                  rho: float) -> float:
    """``h = L(w + rho g/||g||) - L(w)``: the quantity GSAM minimises besides ``L(w + e)``."""
    loss, g = loss_and_grad(params)
    return loss_and_grad(ascend(params, sam_perturbation(g, rho)))[0] - loss


def hessian_top_eigenvalue(grad_fn: Callable[[Params], Params], params: Params,
                           iters: int = 30, eps: float = 1e-4, seed: int = 0) -> float:
    """The largest eigenvalue of the Hessian at ``params`` by ``iters`` power iterations."""
    rng = np.random.default_rng(seed)
    v = [rng.normal(size=w.shape) for w in params]
    norm = global_norm(v)
    v = [t / norm for t in v]
    eigenvalue = 0.0
    for _ in range(iters):
        plus = grad_fn(ascend(params, [eps * t for t in v]))
        minus = grad_fn(ascend(params, [-eps * t for t in v]))
        hv = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
        eigenvalue = sum(float(np.sum(a * b)) for a, b in zip(v, hv))
        norm = global_norm(hv)
        v = [t / norm for t in hv]
    return eigenvalue
