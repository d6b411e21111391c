"""WSAM, sharpness as a weighted regulariser, as an optax ``GradientTransformation`` (JAX).

WSAM (Yue et al., KDD 2023, arXiv:2305.15817) weighs the sharpness term of SAM's objective::

    L(w) + gamma / (1 - gamma) * [ max_{||e|| <= rho} L(w + e) - L(w) ],     0 <= gamma < 1

With the sharpness weight ``a = gamma / (1 - gamma)`` its gradient is ``g + a (g_adv - g)``:
``gamma = 0`` is the base optimizer, ``gamma = 1/2`` (``a = 1``) is SAM, a larger ``gamma`` weighs
sharpness more. The perturbation is SAM's (or ASAM's with ``eta = 0``)::

    e = rho g / (||g|| + eps),     g_adv = grad L_B(w + e)

* Coupled form (``decouple=False``): the base optimizer steps with ``d = g + a (g_adv - g)``.
* Decoupled form (``decouple=True``, the paper's): the base optimizer steps with ``g`` alone, and
  the sharpness term is added to its updates outside its preconditioning and momentum::

      updates = base_update(g) - lr_t * a * (g_adv - g)

  which is why :func:`wsam` needs the base optimizer's learning rate ``lr_t``.

``max_norm`` clips ``g_adv`` by its global norm before the two are combined, as the official code
does with ``torch.nn.utils.clip_grad_norm_``.

One step, numbered as every implementation in ``sam_edu`` numbers it:

1. gradient at the centre: ``g = grad L_B(w)``
2. ascend: ``w <- w + e(w)``
3. gradient at the perturbed point on the same batch: ``g_adv = grad L_B(w + e)``, clipped
4. restore ``w`` exactly
5. base step at ``w``: coupled with ``d = g + a (g_adv - g)``; decoupled with ``d = g``, then the
   sharpness term

This is ``sam_edu.reference.wsam`` written in JAX's idiom, with the conventions of
:func:`sam_edu.jax.sam`: pytrees, global norms, ``update(..., grad_fn=...)``, and a skipped step
instead of an exception when a gradient is not finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_edu.jax.sam import (
    Flags,
    Params,
    _check_non_negative,
    ascend,
    global_norm,
    perturbation,
    perturbation_norm,
    skip_unless_finite,
)


def sharpness_weight(gamma: float) -> float:
    """``a = gamma / (1 - gamma)``; ``gamma`` must lie in ``[0, 1)``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return gamma / (1.0 - gamma)


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all leaves by ``min(1, max_norm / (||g|| + 1e-6))``: the direction is kept.

    The ``1e-6`` is that of ``torch.nn.utils.clip_grad_norm_``, which the official WSAM code uses;
    ``optax.clip_by_global_norm`` scales by ``max_norm / ||g||`` instead, a different number.
    """
    factor = jnp.minimum(1.0, max_norm / (global_norm(grads) + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads)


def wsam_direction(grads: Params, g_adv: Params, a: float) -> Params:
    """The coupled direction ``d = g + a (g_adv - g)``."""
    return jax.tree.map(lambda g, ga: g + a * (ga - g), grads, g_adv)


def sharpness_step(grads: Params, g_adv: Params, a: float, lr: float | jax.Array) -> Params:
    """The decoupled sharpness term ``-lr * a * (g_adv - g)``, added to the base's updates.

    Each leaf keeps its dtype (``lr`` may come from a float64 schedule).
    """
    return jax.tree.map(lambda g, ga: (-lr * a * (ga - g)).astype(g.dtype), grads, g_adv)


class WSAMState(NamedTuple):
    """State of :func:`wsam`.

    Attributes:
      base_state: the base optimizer's state, untouched by the perturbation.
      count: how many updates were done, the step at which a ``learning_rate`` schedule is
        evaluated (JAX's default integer: int64 under ``jax_enable_x64``, so that optax schedules
        evaluate in float64 there). A skipped update does not count, so ``count`` stays in step
        with the base optimizer's own schedules, whose state a skipped update leaves unchanged.
      notfinite_count: how many updates were skipped because ``g`` or ``g_adv`` was not finite
        (a running total, never reset; int32 scalar).
    """

    base_state: optax.OptState
    count: jax.Array
    notfinite_count: jax.Array


def wsam(
    base: optax.GradientTransformation,
    learning_rate: float | optax.Schedule | None,
    rho: float = 0.05,
    gamma: float = 0.9,
    decouple: bool = True,
    max_norm: float | None = None,
    adaptive: Flags = False,
    perturb_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """WSAM around the base optimizer ``base``.

    ``update(grads, state, params, *, grad_fn, **extra_args)`` works as in :func:`sam_edu.jax.sam`:
    ``grads = grad L_B(w)``, ``grad_fn(params)`` the gradient on the **same** batch, called once,
    at ``w + e``; other keyword arguments go on to the base optimizer. A non-finite ``g`` or
    ``g_adv`` skips the step (zero updates, base state and ``count`` unchanged,
    ``notfinite_count`` incremented)::

        opt = wsam(optax.sgd(0.1, momentum=0.9), learning_rate=0.1, gamma=0.9)

    Args:
      base: the base optimizer (SGD, momentum, Adam, ...); it steps at the original ``w``.
      learning_rate: the base optimizer's learning rate, a float or the same optax schedule
        (evaluated at ``state.count``); the decoupled form scales the sharpness term by it. May be
        ``None`` with ``decouple=False``.
      rho: radius of the ball, ``rho >= 0``.
      gamma: weight of sharpness in the objective, ``0 <= gamma < 1`` (``a = gamma/(1-gamma)``).
      decouple: apply the sharpness term outside the base optimizer (the paper's form) or fold it
        into the base optimizer's direction.
      max_norm: if given (``> 0``), clip ``g_adv`` by its global norm to at most ``max_norm``.
      adaptive: ASAM's perturbation (``eta = 0``): one flag, a pytree of flags with the structure of
        the params, or a callable ``params -> pytree of flags``.
      perturb_eps: added to the norm so that a zero gradient gives ``e = 0``; ``>= 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`WSAMState`.
    """
    _check_non_negative("rho", rho)
    _check_non_negative("perturb_eps", perturb_eps)
    a = sharpness_weight(gamma)
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (or None), got {max_norm}")
    if decouple and learning_rate is None:
        raise ValueError("learning_rate is required with decouple=True: the sharpness term is "
                         "scaled by the base optimizer's learning rate")
    lr_at: Callable[[jax.Array], Any] = (
        learning_rate if callable(learning_rate) else (lambda _: learning_rate))
    base = optax.with_extra_args_support(base)

    def init_fn(params: Params) -> WSAMState:
        return WSAMState(base_state=base.init(params), count=jnp.zeros([], int),
                         notfinite_count=jnp.zeros([], jnp.int32))

    def step(g, g_adv, state: WSAMState, params: Params, extra_args: dict):
        """(5) the base step, coupled or decoupled (a static choice, not a traced one)."""
        if not decouple:
            return base.update(wsam_direction(g, g_adv, a), state.base_state, params,
                               **extra_args)
        updates, base_state = base.update(g, state.base_state, params, **extra_args)
        sharpness = sharpness_step(g, g_adv, a, lr_at(state.count))
        return jax.tree.map(lambda u, s: u + s, updates, sharpness), base_state

    def update_fn(grads, state: WSAMState, params: Params | None = None, *,
                  grad_fn: Callable[[Params], Params] | None = None, **extra_args):
        if grad_fn is None:
            raise ValueError("wsam: update needs grad_fn=..., a function params -> gradient on "
                             "the current batch")
        if params is None:
            raise ValueError("wsam: update needs params, the weights w the perturbation "
                             "starts from")
        # (1) gradient at the centre: the caller computed it on this batch
        g = grads
        # (2) ascend to w + e(w) (SAM, or ASAM with eta = 0); the norm that scales e also tells
        #     whether g is finite
        norm = perturbation_norm(g, params, adaptive)
        finite = jnp.isfinite(norm)
        perturbed = ascend(params, perturbation(g, params, rho, adaptive, 0.0, perturb_eps, norm))
        # (3) gradient at the perturbed point, same batch; checked before it is clipped
        g_adv = grad_fn(perturbed)
        finite = finite & jnp.isfinite(global_norm(g_adv))
        if max_norm is not None:
            g_adv = clip_by_global_norm(g_adv, max_norm)
        # (4) restore w: JAX is functional, so ``params`` was never changed
        # (5) base step at w, coupled or decoupled; a non-finite g or g_adv skips the step
        updates, base_state = step(g, g_adv, state, params, extra_args)
        updates, base_state = skip_unless_finite(finite, updates, base_state, state.base_state)
        return updates, WSAMState(
            base_state=base_state,
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
            notfinite_count=jnp.where(finite, state.notfinite_count, state.notfinite_count + 1),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
