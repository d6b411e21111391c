"""bSAM: SAM as an optimal relaxation of Bayes -- the reference math (NumPy, float64).

bSAM (Moellenhoff & Khan, ICLR 2023, arXiv:2210.01620) shows that SAM's objective is a relaxation
of the Bayesian learning rule with a Gaussian posterior ``q(w) = N(m_w, 1/(N s))``: replacing the
expected loss under ``q`` by its worst case over a ball gives SAM, and keeping ``q`` gives an
Adam-like optimizer that learns a mean ``w`` *and* a precision ``s`` per weight. The posterior
``N(w, 1/(N s))`` is then used for Bayesian model averaging at test time.

With ``N = num_data`` and ``delta = weight_decay`` (the prior precision divided by ``N``), one step
from the state ``(w, m, s)`` with standard normal noise ``n`` is::

    1. w_noisy = w + n / sqrt(N s)                    (a draw from the posterior)
    2. g       = grad L_B(w_noisy)                     (pass 1, at the noisy point)
    3. w_adv   = w + rho * g / s                       (from w; scaled by 1/s, not by 1/||g||)
    4. g_adv   = grad L_B(w_adv)                       (pass 2)
    5. m      <- beta1 m + (1 - beta1)(g_adv + delta w)
    6. w      <- w - lr * m / s                        (with the old s)
    7. s      <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)

Neither the noise nor the perturbation stays in the weights: with ``lr = 0`` the mean ``w`` never
moves. The noise is an argument of every function here, so the tests can feed the same draw to
every framework.

In ``sam_edu``'s numbering of the generic two-pass step, bSAM's pass 1 runs at ``w_noisy`` instead
of ``w``: (1) ``g`` at the noisy point, (2) ascend to ``w_adv``, (3) ``g_adv`` there, (4) restore
``w`` exactly, (5) the base step is bSAM's own update 5-7.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.reference.sam import global_norm

Params = list[np.ndarray]


def check_bsam_arguments(num_data: int, lr: float, beta1: float, beta2: float,
                         weight_decay: float, rho: float, damping: float,
                         s_init: float = 1.0, where: str = "") -> None:
    """``ValueError`` naming the first argument out of its range (``where``: e.g. its group)."""
    if not (isinstance(num_data, (int, np.integer)) and not isinstance(num_data, bool)
            and num_data >= 1):
        raise ValueError(f"num_data must be an integer >= 1 (the training set size), "
                         f"got {num_data!r}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("rho", rho),
                        ("damping", damping)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0{where}, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1){where}, got {value}")
    if not s_init > 0:
        raise ValueError(f"s_init must be > 0 (a precision), got {s_init}")


def bsam_init(params: Params, s_init: float = 1.0) -> tuple[Params, Params]:
    """The state ``(m, s)``: momentum ``m = 0`` and precision ``s = s_init``, one per tensor."""
    if not s_init > 0:
        raise ValueError(f"s_init must be > 0 (a precision), got {s_init}")
    return [np.zeros_like(w) for w in params], [np.full_like(w, s_init) for w in params]


def posterior_sample(params: Params, s: Params, noise: Params, num_data: int) -> Params:
    """Update 1: ``w + n / sqrt(N s)``, a draw from ``N(w, 1/(N s))`` given ``n ~ N(0, I)``."""
    return [w + n / np.sqrt(num_data * si) for w, si, n in zip(params, s, noise)]


def bsam_perturbation(grads: Params, s: Params, rho: float = 0.05) -> Params:
    """Update 3's ascent ``e = rho * g / s``: preconditioned by the precision, not normalised."""
    return [rho * g / si for g, si in zip(grads, s)]


def bsam_momentum(m: Params, g_adv: Params, params: Params, beta1: float = 0.9,
                  weight_decay: float = 1e-4) -> Params:
    """Update 5: ``m <- beta1 m + (1 - beta1)(g_adv + delta w)``."""
    return [beta1 * mi + (1 - beta1) * (ga + weight_decay * w)
            for mi, ga, w in zip(m, g_adv, params)]


def bsam_mean(params: Params, m: Params, s: Params, lr: float = 0.5) -> Params:
    """Update 6: ``w <- w - lr * m / s``."""
    return [w - lr * mi / si for w, mi, si in zip(params, m, s)]


def bsam_precision(s: Params, grads: Params, beta2: float = 0.999, damping: float = 0.1,
                   weight_decay: float = 1e-4) -> Params:
    """Update 7: ``s <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)``, ``g`` from pass 1."""
    return [beta2 * si + (1 - beta2) * (np.sqrt(si) * np.abs(g) + damping + weight_decay)
            for si, g in zip(s, grads)]


def bsam_step(
    params: Params,
    m: Params,
    s: Params,
    noise: Params,
    grad_fn: Callable[[Params], Params],
    num_data: int,
    lr: float = 0.5,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-4,
    rho: float = 0.05,
    damping: float = 0.1,
) -> tuple[Params, Params, Params]:
    """One bSAM step with the standard normal draw ``noise``; returns ``(w, m, s)``."""
    check_bsam_arguments(num_data, lr, beta1, beta2, weight_decay, rho, damping)
    # (1) gradient at the noisy point w + n / sqrt(N s)
    g = grad_fn(posterior_sample(params, s, noise, num_data))
    if not np.isfinite(global_norm(g)):
        raise FloatingPointError("non-finite gradient at the noisy point; "
                                 "the weights were not changed")
    # (2) ascend from w (not from the noisy point) to w + rho g / s
    perturbed = [w + e for w, e in zip(params, bsam_perturbation(g, s, rho))]
    # (3) gradient at the perturbed point, same batch
    g_adv = grad_fn(perturbed)
    if not np.isfinite(global_norm(g_adv)):
        raise FloatingPointError("non-finite gradient at w + e; the weights were not changed")
    # (4) restore w: the reference is functional, so ``params`` was never changed
    # (5) bSAM's own step: momentum, mean (with the old s), then precision
    m = bsam_momentum(m, g_adv, params, beta1, weight_decay)
    new_params = bsam_mean(params, m, s, lr)
    return new_params, m, bsam_precision(s, g, beta2, damping, weight_decay)
