"""bSAM, SAM as an optimal relaxation of Bayes, as an optax ``GradientTransformation`` (JAX).

bSAM (Moellenhoff & Khan, ICLR 2023, arXiv:2210.01620) shows that SAM's objective is a relaxation
of the Bayesian learning rule with a Gaussian posterior ``q(w) = N(m_w, 1/(N s))``: replacing the
expected loss under ``q`` by its worst case over a ball gives SAM, and keeping ``q`` gives an
Adam-like optimizer that learns a mean ``w`` *and* a precision ``s`` per weight. The posterior
``N(w, 1/(N s))`` is then used for Bayesian model averaging at test time
(:func:`sample_posterior`).

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
moves. The noise is an argument of every pure function here, so the tests can feed the same draw
to every framework; :func:`bsam` draws it from a PRNG key that lives in its state.

In ``sam_edu``'s numbering of the generic two-pass step, bSAM's pass 1 runs at ``w_noisy`` instead
of ``w``: (1) ``g`` at the noisy point, (2) ascend to ``w_adv``, (3) ``g_adv`` there, (4) restore
``w`` exactly, (5) the base step is bSAM's own update 5-7.

This is ``sam_edu.reference.bsam`` written in JAX's idiom, with the conventions of
:func:`sam_edu.jax.sam`: pytrees, ``update(..., grad_fn=...)``, and a skipped step instead of an
exception when a gradient is not finite. bSAM is a full optimizer, not a wrapper: it computes both
of its gradients itself, so ``update`` takes ``grads=None``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_edu.jax.sam import Params, _check_non_negative, ascend, global_norm, skip_unless_finite


def posterior_sample(params: Params, precision: Params, noise: Params, num_data: int) -> Params:
    """Update 1: ``w + n / sqrt(N s)``, a draw from ``N(w, 1/(N s))`` given ``n ~ N(0, I)``.

    ``precision`` is ``s``; each leaf keeps the dtype of ``w``.
    """
    return jax.tree.map(lambda w, s, n: (w + n / jnp.sqrt(num_data * s)).astype(w.dtype),
                        params, precision, noise)


def bsam_perturbation(grads: Params, s: Params, rho: float = 0.05) -> Params:
    """Update 3's ascent ``e = rho * g / s``: preconditioned by the precision, not normalised."""
    return jax.tree.map(lambda g, si: rho * g / si, grads, s)


def bsam_momentum(m: Params, g_adv: Params, params: Params, beta1: float = 0.9,
                  weight_decay: float = 1e-4) -> Params:
    """Update 5: ``m <- beta1 m + (1 - beta1)(g_adv + delta w)``."""
    return jax.tree.map(lambda mi, ga, w: beta1 * mi + (1 - beta1) * (ga + weight_decay * w),
                        m, g_adv, params)


def bsam_mean(params: Params, m: Params, s: Params, lr: float | jax.Array = 0.5) -> Params:
    """Update 6: ``w <- w - lr * m / s``.

    Each leaf keeps its dtype (``lr`` may come from a float64 schedule).
    """
    return jax.tree.map(lambda w, mi, si: (w - lr * mi / si).astype(w.dtype), params, m, s)


def bsam_precision(s: Params, grads: Params, beta2: float = 0.999, damping: float = 0.1,
                   weight_decay: float = 1e-4) -> Params:
    """Update 7: ``s <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)``.

    ``g`` is pass 1's gradient, at the noisy point.
    """
    return jax.tree.map(
        lambda si, g: beta2 * si + (1 - beta2) * (jnp.sqrt(si) * jnp.abs(g) + damping
                                                  + weight_decay),
        s, grads)


class BSAMState(NamedTuple):
    """State of :func:`bsam`.

    Attributes:
      count: how many updates were done, the step at which a ``learning_rate`` schedule is
        evaluated (JAX's default integer: int64 under ``jax_enable_x64``, so that optax schedules
        evaluate in float64 there). A skipped update does not count.
      key: the PRNG key the noise is drawn from; every update splits it, a skipped one too, so a
        skipped step is not retried with the same noise.
      momentum: ``m``, one array per leaf of the params, initially 0.
      precision: ``s``, one array per leaf of the params, initially ``s_init``; the posterior is
        ``N(w, 1/(N s))``.
      notfinite_count: how many updates were skipped because ``g`` or ``g_adv`` was not finite
        (a running total, never reset; int32 scalar).
    """

    count: jax.Array
    key: jax.Array
    momentum: Params
    precision: Params
    notfinite_count: jax.Array


def sample_posterior(key: jax.Array, params: Params, state: BSAMState, num_data: int) -> Params:
    """A draw ``w + n / sqrt(N s)`` from the posterior ``N(w, 1/(N s))``, ``n ~ N(0, I)``.

    ``n`` is drawn from ``key``, one standard normal array per leaf. For Bayesian model
    averaging, average the predictions of several draws, each with its own key (e.g.
    ``jax.vmap`` over ``jax.random.split(key, 32)``). ``params`` are the mean ``w``, ``state`` is
    the :class:`BSAMState` of the same run, ``num_data`` the ``N`` given to :func:`bsam`.
    """
    noise = optax.tree_utils.tree_random_like(key, params)
    return posterior_sample(params, state.precision, noise, num_data)


def _check_bsam_arguments(num_data: Any, learning_rate: Any, beta1: Any, beta2: Any,
                          weight_decay: Any, rho: Any, damping: Any, s_init: Any,
                          seed: Any) -> None:
    """``ValueError`` naming the first argument out of its range (a schedule is not checked)."""
    if isinstance(num_data, bool) or not (isinstance(num_data, (int, np.integer))
                                          and num_data >= 1):
        raise ValueError(f"num_data must be an integer >= 1 (the training set size), "
                         f"got {num_data!r}")
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay),
                        ("rho", rho), ("damping", damping)):
        _check_non_negative(name, value)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, numbers.Real) and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if isinstance(s_init, numbers.Real) and not s_init > 0:
        raise ValueError(f"s_init must be > 0 (a precision), got {s_init}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer (the PRNG seed), got {seed!r}")


def bsam(
    num_data: int,
    learning_rate: float | optax.Schedule = 0.5,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-4,
    rho: float = 0.05,
    damping: float = 0.1,
    s_init: float = 1.0,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """bSAM, a full optimizer that learns a mean ``w`` and a precision ``s`` per weight.

    ``update(None, state, params, *, grad_fn, noise=None)`` draws the noise, calls ``grad_fn``
    twice (at ``w + n / sqrt(N s)`` and at ``w + rho g / s``) and returns the updates
    ``w_new - w``. ``grad_fn(params)`` returns the gradient on the **same** batch both times::

        opt = bsam(num_data=len(train_set))
        grad_fn = jax.grad(lambda p: loss(p, batch))
        updates, state = opt.update(None, state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)

    ``grads`` must be ``None``: pass 1 runs at a noisy point that only the optimizer knows, so a
    gradient the loop computed at ``w`` would be the wrong one. ``noise`` (a pytree of standard
    normal draws shaped like the params) replaces the draw from ``state.key``, which is split
    either way; the tests use it to feed every framework the same noise. Other keyword arguments
    are accepted and not used, so that ``bsam`` can sit in an ``optax.chain`` with transforms that
    read them (e.g. ``value=`` for ``optax.contrib.reduce_on_plateau``).

    If ``g`` or ``g_adv`` is not finite (NaN or Inf, detected through the global norm) the step is
    skipped, as ``optax.apply_if_finite`` does: the updates are zero, ``m``, ``s`` and ``count``
    are kept, the key still advances and ``state.notfinite_count`` is incremented.

    Args:
      num_data: ``N``, the number of training examples, an integer ``>= 1``; the posterior's
        variance is ``1/(N s)``.
      learning_rate: ``lr >= 0``, or an optax schedule evaluated at ``state.count``.
      beta1: decay of the momentum ``m``, in ``[0, 1)``.
      beta2: decay of the precision ``s``, in ``[0, 1)``.
      weight_decay: ``delta >= 0``, the prior precision divided by ``N``.
      rho: size of the ascent ``rho g / s``, ``>= 0``.
      damping: added to the precision's update, ``>= 0``.
      s_init: the initial precision, ``> 0``.
      seed: an integer; ``init`` sets ``state.key = jax.random.key(seed)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`BSAMState`.
    """
    _check_bsam_arguments(num_data, learning_rate, beta1, beta2, weight_decay, rho, damping,
                          s_init, seed)
    lr_at: Callable[[jax.Array], Any] = (
        learning_rate if callable(learning_rate) else (lambda _: learning_rate))

    def init_fn(params: Params) -> BSAMState:
        return BSAMState(
            count=jnp.zeros([], int),
            key=jax.random.key(seed),
            momentum=jax.tree.map(jnp.zeros_like, params),
            precision=jax.tree.map(lambda w: jnp.full_like(w, s_init), params),
            notfinite_count=jnp.zeros([], jnp.int32),
        )

    def step(g, g_adv, state: BSAMState, params: Params):
        """(5) momentum, mean (with the old ``s``), then precision; updates are ``w_new - w``."""
        m = bsam_momentum(state.momentum, g_adv, params, beta1, weight_decay)
        new_params = bsam_mean(params, m, state.precision, lr_at(state.count))
        updates = jax.tree.map(lambda new, w: new - w, new_params, params)
        return updates, m, bsam_precision(state.precision, g, beta2, damping, weight_decay)

    def update_fn(grads, state: BSAMState, params: Params | None = None, *,
                  grad_fn: Callable[[Params], Params] | None = None,
                  noise: Params | None = None, **extra_args):
        del extra_args  # bSAM reads none; accepted so that it can sit in an optax.chain
        if grads is not None:
            raise ValueError("bsam: update computes both gradients itself (pass 1 is at the noisy "
                             "point w + n / sqrt(N s) it draws), so grads must be None; pass "
                             "grad_fn=... instead")
        if grad_fn is None:
            raise ValueError("bsam: update needs grad_fn=..., a function params -> gradient on "
                             "the current batch")
        if params is None:
            raise ValueError("bsam: update needs params, the mean w")
        key, draw = jax.random.split(state.key)
        if noise is None:  # a static choice: whether the caller passed a draw
            noise = optax.tree_utils.tree_random_like(draw, params)
        elif jax.tree.map(jnp.shape, noise) != jax.tree.map(jnp.shape, params):
            raise ValueError(
                "bsam: noise must be a pytree shaped like params (one standard normal draw per "
                f"weight), got shapes {jax.tree.map(jnp.shape, noise)} for params "
                f"{jax.tree.map(jnp.shape, params)}")
        s = state.precision
        # (1) gradient at the noisy point w + n / sqrt(N s)
        g = grad_fn(posterior_sample(params, s, noise, num_data))
        finite = jnp.isfinite(global_norm(g))
        # (2) ascend from w (not from the noisy point) to w + rho g / s
        perturbed = ascend(params, bsam_perturbation(g, s, rho))
        # (3) gradient at the perturbed point, same batch
        g_adv = grad_fn(perturbed)
        finite = finite & jnp.isfinite(global_norm(g_adv))
        # (4) restore w: JAX is functional, so ``params`` was never changed
        # (5) bSAM's own step; a non-finite g or g_adv skips it instead (selected leaf by leaf,
        #     so no NaN can leak through arithmetic)
        updates, m, s_new = step(g, g_adv, state, params)
        updates, (m, s) = skip_unless_finite(finite, updates, (m, s_new), (state.momentum, s))
        return updates, BSAMState(
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
            key=key,
            momentum=m,
            precision=s,
            notfinite_count=jnp.where(finite, state.notfinite_count, state.notfinite_count + 1),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
