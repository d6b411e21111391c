"""SAM and ASAM: the reference math (NumPy, float64).

SAM (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021, arXiv:2010.01412) minimises the worst loss in a
ball of radius ``rho`` around the weights::

    min_w  max_{||e|| <= rho}  L_B(w + e)

A first-order Taylor expansion of the inner maximum gives its solution in closed form (the dual
norm of the L2 norm is the L2 norm)::

    e(w) = rho * g / ||g||,        g = grad L_B(w)

and the gradient of the SAM objective, dropping the second-order term, is ``grad L_B(w + e(w))``.

ASAM (Kwon, Kim, Park, Choi, ICML 2021, arXiv:2102.11600) measures the ball in a weight-scaled
metric with the element-wise operator ``T_w = |w| + eta``, which makes sharpness invariant to
rescalings of the weights that leave the network's function unchanged::

    e(w) = rho * T_w^2 g / ||T_w g||

One generic step, numbered as every implementation in ``sam_edu`` numbers it:

1. gradient at the centre: ``g = grad L_B(w)``
2. ascend: ``w <- w + e(w)``
3. gradient at the perturbed point on the same batch: ``g_adv = grad L_B(w + e)``
4. restore ``w`` exactly
5. base step at ``w`` with the direction ``d = g_adv``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Params = list[np.ndarray]


def global_norm(tree: Params) -> float:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together."""
    return float(np.sqrt(sum(np.sum(v * v) for v in tree)))


def _per_tensor(value, n: int) -> list:
    """Broadcast a scalar setting to one value per tensor (or check a per-tensor sequence)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-tensor values, got {len(value)}")
        return list(value)
    return [value] * n


def scale_operator(params: Params, eta: float | Sequence[float] = 0.0,
                   adaptive: bool | Sequence[bool] = True) -> Params:
    """ASAM's element-wise operator ``T_w = |w| + eta`` (``T_w = 1`` for tensors left unscaled).

    ``adaptive`` may be one flag or one flag per tensor: the official ASAM code scales weight
    tensors only and leaves biases and BatchNorm shifts unscaled.
    """
    etas = _per_tensor(eta, len(params))
    flags = _per_tensor(adaptive, len(params))
    return [np.abs(w) + e if a else np.ones_like(w) for w, e, a in zip(params, etas, flags)]


def sam_perturbation(grads: Params, rho: float = 0.05, perturb_eps: float = 1e-12) -> Params:
    """SAM's ascent step ``e = rho * g / (||g|| + perturb_eps)``; a zero gradient gives ``e = 0``."""
    scale = rho / (global_norm(grads) + perturb_eps)
    return [scale * g for g in grads]


def asam_perturbation(grads: Params, params: Params, rho: float = 0.05, eta: float = 0.0,
                      adaptive: bool | Sequence[bool] = True,
                      perturb_eps: float = 1e-12) -> Params:
    """ASAM's ascent step ``e = rho * T_w^2 g / (||T_w g|| + perturb_eps)``."""
    t = scale_operator(params, eta, adaptive)
    scale = rho / (global_norm([tw * g for tw, g in zip(t, grads)]) + perturb_eps)
    return [scale * tw * tw * g for tw, g in zip(t, grads)]


def centralize_gradient(grad: np.ndarray, out_axis: int = -1) -> np.ndarray:
    """Gradient centralisation: subtract the mean over every axis except the output-channel axis.

    Vectors (biases) are left alone. Keras kernels keep the output axis last (``out_axis=-1``);
    PyTorch weights keep it first (``out_axis=0``).
    """
    if grad.ndim < 2:
        return grad
    axes = tuple(a for a in range(grad.ndim) if a != out_axis % grad.ndim)
    return grad - grad.mean(axis=axes, keepdims=True)


def perturbation(grads: Params, params: Params, rho: float | Sequence[float] = 0.05,
                 adaptive: bool | Sequence[bool] = False, eta: float | Sequence[float] = 0.0,
                 perturb_eps: float = 1e-12) -> Params:
    """The perturbation ``e(w)`` with settings per tensor, as the framework optimizers allow.

    ``e_i = rho_i * T_i^2 g_i / (||T g|| + perturb_eps)``, the norm global over all tensors and
    ``T_i = |w_i| + eta_i`` where ``adaptive_i`` (ASAM) else ``1`` (SAM). With one ``rho`` and
    ``adaptive=False`` this is :func:`sam_perturbation`; with ``adaptive=True``,
    :func:`asam_perturbation`.
    """
    rhos = _per_tensor(rho, len(params))
    t = scale_operator(params, eta, adaptive)
    norm = global_norm([tw * g for tw, g in zip(t, grads)])
    return [r * tw * tw * g / (norm + perturb_eps) for r, tw, g in zip(rhos, t, grads)]


def ascend(params: Params, e: Params) -> Params:
    """Step (2): the perturbed point ``w + e``."""
    return [w + ew for w, ew in zip(params, e)]


def sam_step(
    params: Params,
    grad_fn: Callable[[Params], Params],
    base_update: Callable[[Params, Params], Params],
    rho: float | Sequence[float] = 0.05,
    adaptive: bool | Sequence[bool] = False,
    eta: float | Sequence[float] = 0.0,
    perturb_eps: float = 1e-12,
) -> Params:
    """One SAM (or ASAM) step.

    ``grad_fn(w)`` returns ``grad L_B(w)`` on the current batch; ``base_update(w, d)`` applies one
    step of the base optimizer at ``w`` in the direction ``d`` and returns the new weights
    (close over the base optimizer's state to keep it).
    """
    # (1) gradient at the centre
    g = grad_fn(params)
    if not np.isfinite(global_norm(g)):
        raise FloatingPointError("non-finite gradient at w; the weights were not changed")
    # (2) ascend to w + e(w)
    perturbed = ascend(params, perturbation(g, params, rho, adaptive, eta, perturb_eps))
    # (3) gradient at the perturbed point, same batch
    g_adv = grad_fn(perturbed)
    if not np.isfinite(global_norm(g_adv)):
        raise FloatingPointError("non-finite gradient at w + e; the weights were not changed")
    # (4) restore w: the reference is functional, so ``params`` was never changed
    # (5) base step at w with d = g_adv
    return base_update(params, g_adv)
