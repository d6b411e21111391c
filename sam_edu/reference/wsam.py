"""WSAM: sharpness as a weighted regulariser -- the reference math (NumPy, float64).

WSAM (Yue et al., KDD 2023, arXiv:2305.15817) weighs the sharpness term of SAM's objective::

    L(w) + gamma / (1 - gamma) * [ max_{||e|| <= rho} L(w + e) - L(w) ],     0 <= gamma < 1

With ``a = gamma / (1 - gamma)`` its gradient is ``g + a (g_adv - g)``: ``gamma = 0`` is the base
optimizer, ``gamma = 1/2`` (``a = 1``) is SAM, larger ``gamma`` weighs sharpness more.

* Coupled form (``decouple=False``): the base optimizer steps with ``d = g + a (g_adv - g)``.
* Decoupled form (``decouple=True``, the paper's): the base optimizer steps with ``g`` alone, and
  the sharpness term is applied afterwards outside its preconditioning and momentum::

      w <- base_update(w, g) - lr * a * (g_adv - g)

``max_norm`` clips the gradient at the perturbed point by its global norm before the two are
combined, as the official code does. ``adaptive`` uses ASAM's perturbation (with ``eta = 0``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.reference.sam import ascend, global_norm, perturbation

Params = list[np.ndarray]


def sharpness_weight(gamma: float) -> float:
    """``a = gamma / (1 - gamma)``; ``gamma`` must lie in ``[0, 1)``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return gamma / (1.0 - gamma)


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all tensors by ``min(1, max_norm / (||g|| + 1e-6))``: the direction is kept.

    The ``1e-6`` is that of ``torch.nn.utils.clip_grad_norm_``, which the official WSAM code uses.
    """
    return [g * min(1.0, max_norm / (global_norm(grads) + 1e-6)) for g in grads]


def wsam_direction(grads: Params, g_adv: Params, a: float) -> Params:
    """The coupled direction ``d = g + a (g_adv - g)``."""
    return [g + a * (ga - g) for g, ga in zip(grads, g_adv)]


def wsam_step(
    params: Params,
    grad_fn: Callable[[Params], Params],
    base_update: Callable[[Params, Params], Params],
    lr: float,
    rho: float = 0.05,
    gamma: float = 0.9,
    decouple: bool = True,
    max_norm: float | None = None,
    adaptive: bool = False,
    perturb_eps: float = 1e-12,
) -> Params:
    """One WSAM step; ``lr`` is the base optimizer's learning rate (the decoupled form needs it)."""
    a = sharpness_weight(gamma)
    # (1) gradient at the centre
    g = grad_fn(params)
    if not np.isfinite(global_norm(g)):
        raise FloatingPointError("non-finite gradient at w; the weights were not changed")
    # (2) ascend to w + e(w)
    perturbed = ascend(params, perturbation(g, params, rho, adaptive, 0.0, perturb_eps))
    # (3) gradient at the perturbed point, same batch
    g_adv = grad_fn(perturbed)
    if not np.isfinite(global_norm(g_adv)):
        raise FloatingPointError("non-finite gradient at w + e; the weights were not changed")
    if max_norm is not None:
        g_adv = clip_by_global_norm(g_adv, max_norm)
    # (4) restore w: the reference is functional, so ``params`` was never changed
    # (5) base step at w: coupled, d = g + a (g_adv - g); decoupled, d = g and then the
    #     sharpness term outside the base optimizer
    if not decouple:
        return base_update(params, wsam_direction(g, g_adv, a))
    stepped = base_update(params, g)
    return [w - lr * a * (ga - gi) for w, ga, gi in zip(stepped, g_adv, g)]
