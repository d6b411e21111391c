"""LookSAM: most of SAM at a fraction of its cost -- the reference math (NumPy, float64).

LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, arXiv:2203.02714) notes that SAM's gradient
``g_adv`` differs from the plain gradient ``g`` mostly by a component ``g_v`` orthogonal to ``g``,
and that this component changes slowly from step to step. So it computes ``g_adv`` only every
``k``-th step and reuses ``g_v`` in between::

    t mod k == 0 (a full SAM step):
        g_hat = g / ||g||
        g_v   = g_adv - (g_adv . g_hat) g_hat          (kept for the next k - 1 steps)
        d     = g_adv
    otherwise (one forward/backward only):
        d     = g + alpha * (||g|| / ||g_v||) * g_v

A step costs ``1 + 1/k`` gradient evaluations on average instead of SAM's 2. ``k = 1`` is exactly
SAM. All norms and dot products are global, over all tensors as one vector (the paper's
formulation; a per-tensor projection is a variant).

The SAM steps follow the generic numbering (1)-(5); a cheap step is (1) and (5) only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.reference.sam import ascend, global_norm, perturbation

Params = list[np.ndarray]


def check_looksam_arguments(rho: float, k: int, alpha: float) -> None:
    """``ValueError`` naming the first argument out of its range."""
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"k must be an integer >= 1 (a full SAM step every k steps), got {k!r}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


def is_sam_step(t: int, k: int) -> bool:
    """Step ``t = 0, 1, ...`` is a full SAM step when ``t mod k == 0`` (so the first one is)."""
    return t % k == 0


def orthogonal_component(g_adv: Params, grads: Params, perturb_eps: float = 1e-12) -> Params:
    """``g_v = g_adv - (g_adv . g_hat) g_hat`` with ``g_hat = g / (||g|| + eps)``."""
    norm = global_norm(grads) + perturb_eps
    unit = [g / norm for g in grads]
    along = sum(float(np.sum(a * u)) for a, u in zip(g_adv, unit))
    return [a - along * u for a, u in zip(g_adv, unit)]


def looksam_direction(grads: Params, g_v: Params, alpha: float = 0.7,
                      perturb_eps: float = 1e-12) -> Params:
    """The cheap step's ``d = g + alpha * (||g|| / (||g_v|| + eps)) * g_v``."""
    scale = alpha * global_norm(grads) / (global_norm(g_v) + perturb_eps)
    return [g + scale * v for g, v in zip(grads, g_v)]


def looksam_step(
    t: int,
    params: Params,
    g_v: Params | None,
    grad_fn: Callable[[Params], Params],
    base_update: Callable[[Params, Params], Params],
    rho: float = 0.1,
    k: int = 10,
    alpha: float = 0.7,
    adaptive: bool = False,
    perturb_eps: float = 1e-12,
) -> tuple[Params, Params]:
    """Step ``t`` (0 for the first); returns ``(params, g_v)``.

    ``g_v`` is ``None`` before the first SAM step. ``grad_fn`` is called twice when
    ``t mod k == 0`` and once otherwise. ``adaptive`` uses ASAM's perturbation (``eta = 0``).
    """
    check_looksam_arguments(rho, k, alpha)
    # (1) gradient at the centre
    g = grad_fn(params)
    if not np.isfinite(global_norm(g)):
        raise FloatingPointError("non-finite gradient at w; the weights were not changed")
    if not is_sam_step(t, k):
        # (5) only: base step at w with g plus the stored orthogonal component, rescaled
        return base_update(params, looksam_direction(g, g_v, alpha, perturb_eps)), g_v
    # (2) ascend to w + e(w)
    perturbed = ascend(params, perturbation(g, params, rho, adaptive, 0.0, perturb_eps))
    # (3) gradient at the perturbed point, same batch
    g_adv = grad_fn(perturbed)
    if not np.isfinite(global_norm(g_adv)):
        raise FloatingPointError("non-finite gradient at w + e; the weights were not changed")
    # (4) restore w: the reference is functional, so ``params`` was never changed
    # (5) base step at w with d = g_adv, keeping g_v for the next k - 1 steps
    return base_update(params, g_adv), orthogonal_component(g_adv, g, perturb_eps)
