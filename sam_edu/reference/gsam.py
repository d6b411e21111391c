"""GSAM: surrogate gap guided SAM -- the reference math (NumPy, float64).

GSAM (Zhuang et al., ICLR 2022, arXiv:2203.08065) observes that SAM minimises the perturbed loss
``L_p(w) = L(w + e(w))`` but not the *surrogate gap* ``h(w) = L_p(w) - L(w)``, which measures
sharpness: a point can have a low perturbed loss while still sitting in a sharp valley. GSAM
keeps SAM's descent on ``L_p`` and adds an ascent on ``L`` along the part of the clean gradient
that does not change ``L_p`` to first order::

    g_par  = (g . g_adv_hat) g_adv_hat,     g_adv_hat = g_adv / ||g_adv||
    g_perp = g - g_par
    d      = g_adv - alpha * g_perp

Moving along ``-d`` lowers ``L_p`` as SAM does, while the ``+alpha g_perp`` part raises ``L``
without touching ``L_p`` (to first order), so the gap ``h = L_p - L`` shrinks.

``rho`` may follow the learning rate (the paper's schedule)::

    rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

clamped at 0 (a warm-up can push ``lr_t`` below ``lr_min``). ``alpha = 0`` with a constant ``rho``
is exactly SAM. Adaptive GSAM follows the official JAX code: ``e = rho |w| g / ||g||``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.reference.sam import ascend, global_norm

Params = list[np.ndarray]


def lr_proportional_rho(lr: float, lr_max: float, lr_min: float, rho_max: float,
                        rho_min: float = 0.0) -> float:
    """``rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min)``, clamped at 0."""
    if lr_max == lr_min:
        raise ValueError(f"lr_max and lr_min must differ, got {lr_max} for both")
    return max(0.0, rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min))


def gsam_perturbation(grads: Params, params: Params, rho: float, adaptive: bool = False,
                      perturb_eps: float = 1e-12) -> Params:
    """``e = rho g / (||g|| + eps)``, or ``e = rho |w| g / (||g|| + eps)`` when ``adaptive``."""
    scale = max(rho, 0.0) / (global_norm(grads) + perturb_eps)
    return [scale * (np.abs(w) if adaptive else 1.0) * g for w, g in zip(params, grads)]


def decompose(grads: Params, g_adv: Params,
              perturb_eps: float = 1e-12) -> tuple[Params, Params]:
    """Split ``g`` into ``g_par`` along ``g_adv`` and ``g_perp`` orthogonal to it."""
    norm = global_norm(g_adv) + perturb_eps
    unit = [a / norm for a in g_adv]
    along = sum(float(np.sum(g * u)) for g, u in zip(grads, unit))
    g_par = [along * u for u in unit]
    return g_par, [g - p for g, p in zip(grads, g_par)]


def gsam_direction(grads: Params, g_adv: Params, alpha: float = 0.4,
                   perturb_eps: float = 1e-12) -> Params:
    """``d = g_adv - alpha * g_perp``."""
    _, g_perp = decompose(grads, g_adv, perturb_eps)
    return [a - alpha * p for a, p in zip(g_adv, g_perp)]


def gsam_step(
    params: Params,
    grad_fn: Callable[[Params], Params],
    base_update: Callable[[Params, Params], Params],
    rho: float = 0.05,
    alpha: float = 0.4,
    adaptive: bool = False,
    perturb_eps: float = 1e-12,
) -> Params:
    """One GSAM step with this step's ``rho`` (evaluate a schedule before calling)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    # (1) gradient at the centre
    g = grad_fn(params)
    if not np.isfinite(global_norm(g)):
        raise FloatingPointError("non-finite gradient at w; the weights were not changed")
    # (2) ascend to w + e(w)
    perturbed = ascend(params, gsam_perturbation(g, params, rho, adaptive, perturb_eps))
    # (3) gradient at the perturbed point, same batch
    g_adv = grad_fn(perturbed)
    if not np.isfinite(global_norm(g_adv)):
        raise FloatingPointError("non-finite gradient at w + e; the weights were not changed")
    # (4) restore w: the reference is functional, so ``params`` was never changed
    # (5) base step at w with d = g_adv - alpha * g_perp
    return base_update(params, gsam_direction(g, g_adv, alpha, perturb_eps))
