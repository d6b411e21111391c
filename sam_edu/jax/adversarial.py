"""SAM as an inner (adversarial) and an outer optimizer: the formulation of ``optax.contrib.sam``.

SAM (Foret et al., ICLR 2021, arXiv:2010.01412) minimises ``max_{||e|| <= rho} L(w + e)``. The
formulation of ``optax.contrib.sam`` splits one SAM step between two ordinary optimizers:

* the **inner (adversarial) optimizer** climbs the loss from the outer parameters ``w``. It takes
  ``sync_period - 1`` ascent steps (updates with the sign flipped), each at the gradient of the
  point it has reached::

      a_0 = w,     a_{i+1} = a_i - inner_update(grad L(a_i)),     i = 0, ..., sync_period - 2

* the **outer optimizer** then steps from ``w`` (not from ``a``) with the gradient of the last
  adversarial point, ``g_adv = grad L(a_{sync_period - 1})``::

      w <- w + outer_update(g_adv)

With ``inner = chain(normalize(), sgd(rho))`` and ``sync_period = 2`` the single adversarial step
is ``a_1 = w + rho * g / ||g||``, so this is drop-in SAM::

    sam_opt = adversarial_sam(optax.sgd(lr), optax.chain(normalize(), optax.sgd(rho)))

Any optimizer fits either slot: momentum or Adam as the outer optimizer, Adam as the inner one
(with more adversarial steps, e.g. ``sync_period=5``). ``sync_period = 1`` has no adversarial step
at all: the outer optimizer alone.

**Two modes.** A cycle needs ``sync_period`` gradients (one at ``w``, one per adversarial point).

* *Transparent* (default): one gradient per ``update`` call, so a cycle is ``sync_period`` calls.
  Calls ``0, ..., sync_period - 2`` of a cycle are adversarial (the parameters the loop sees are
  the adversarial points); call ``sync_period - 1`` is the outer step (it returns the update that
  takes the loop's parameters back to ``w`` and on to ``w + outer_update``). The state caches ``w``.
* *Opaque* (``opaque_mode=True``): one call is one whole cycle; ``update(g, state, w,
  grad_fn=...)`` calls ``grad_fn(a_i, i)`` for each adversarial point and returns the outer update.
  The loop never sees an adversarial point, which is necessary when anything else changes on each
  call (BatchNorm statistics, step counters, logging).

**What this version fixes**, against ``optax.contrib.sam`` (the tests pin each one):

(a) :func:`normalize` divides by ``max(||g||, eps)``, so a zero gradient gives a zero step, not
    ``0 / 0 = NaN``; and the transparent mode *selects* the adversarial or the outer branch with
    ``jax.lax.cond`` instead of ``cond * a + (1 - cond) * b``, which is NaN whenever the unused
    branch ``b`` is NaN (``0 * NaN = NaN``).
(b) In transparent mode with ``sync_period = 1`` every call is both the first and the last call of
    a cycle; optax steps from the ``w`` cached on the *previous* call, we cache first and step from
    the current ``w``, so ``sync_period = 1`` is exactly the outer optimizer.
(c) ``max_radius=rho`` projects every adversarial point onto the ball ``||a - w|| <= rho``. One
    normalised step of length ``rho`` stays on the ball by construction, but ``sync_period - 1 > 1``
    steps (or an Adam inner optimizer, whose steps are not of length ``rho``) leave it: the
    adversarial point is no longer the one SAM's ``max_{||e|| <= rho}`` asks for.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_edu.jax.sam import global_norm

Params = Any  # a pytree of arrays


def normalize(eps: float = 1e-12) -> optax.GradientTransformation:
    """``g -> g / max(||g||, eps)`` with the global L2 norm; a zero gradient gives a zero update.

    Wherever ``||g|| >= eps`` this is ``optax.contrib.normalize()`` exactly, which divides by
    ``||g||`` alone and turns a zero gradient into NaN. The same rule as ``normalize`` in
    ``sam_edu.torch`` and ``sam_edu.tf``'s ``AdversarialSAM``.
    """
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps must be a number > 0 (the smallest norm divided by), got {eps!r}")

    def init_fn(params: Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Params, state: optax.EmptyState, params: Params | None = None):
        del params
        scale = 1.0 / jnp.maximum(global_norm(updates), eps)
        return jax.tree.map(lambda g: scale * g, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


class AdversarialSAMState(NamedTuple):
    """State of :func:`adversarial_sam`; the fields of ``optax.contrib.SAMState``.

    Attributes:
      steps_since_sync: calls since the last outer step, ``0 <= . < sync_period`` (int32 scalar;
        always 0 in opaque mode, where one call is one cycle).
      opt_state: the outer optimizer's state, changed by outer steps only.
      adv_state: the inner (adversarial) optimizer's state.
      cache: the outer parameters ``w`` of the current cycle (transparent mode); ``None`` in
        opaque mode, where ``w`` is the ``params`` of the call.
    """

    steps_since_sync: jax.Array
    opt_state: optax.OptState
    adv_state: optax.OptState
    cache: Params | None


def _project_to_ball(point: Params, centre: Params, radius: float) -> Params:
    """The point of the ball ``||a - centre|| <= radius`` nearest to ``point``."""
    offset = jax.tree.map(lambda a, w: a - w, point, centre)
    norm = global_norm(offset)
    scale = jnp.where(norm > radius, radius / norm, 1.0)  # selected: no 0 / 0 reaches the result
    return jax.tree.map(lambda w, e: w + scale * e, centre, offset)


def adversarial_sam(
    optimizer: optax.GradientTransformation,
    adv_optimizer: optax.GradientTransformation,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
    batch_axis_name: str | None = None,
    max_radius: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM with any outer ``optimizer`` and any inner ``adv_optimizer`` (see the module docstring).

    A drop-in for ``optax.contrib.sam``: the same arguments, state fields and calls, and bit for
    bit the same numbers and states wherever optax's are finite, except transparent mode with
    ``sync_period = 1`` (fix (b)). ``reset_state`` re-initialises the inner optimizer at ``w``
    (optax's transparent mode: at the last adversarial point; the same state for every optimizer
    whose ``init`` reads only shapes and dtypes). Transparent mode::

        updates, state = opt.update(grad_fn(params), state, params)

    Opaque mode (``grad_fn(params, i)`` is the gradient for adversarial step ``i``; ignoring ``i``
    reuses the same batch)::

        grad_fn = jax.grad(lambda p, i: loss(p, batch))
        updates, state = opt.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)

    Other keyword arguments of ``update`` (e.g. ``value=``) go on to the outer optimizer.

    Args:
      optimizer: the outer optimizer; it steps from the outer parameters ``w``.
      adv_optimizer: the inner optimizer; its updates are negated (ascent), e.g.
        ``chain(normalize(), sgd(rho))``.
      sync_period: one cycle = ``sync_period - 1`` adversarial steps + one outer step; ``>= 1``.
      reset_state: re-initialise ``adv_optimizer`` after every outer step (a fresh climb from
        every ``w``); otherwise its state carries over from cycle to cycle.
      opaque_mode: run a whole cycle inside one ``update`` call, with ``grad_fn``.
      batch_axis_name: opaque mode under data parallelism (``shard_map``/``pmap``): the gradients
        from ``grad_fn`` are averaged with ``jax.lax.pmean`` over this axis. The gradient passed to
        ``update`` is not: average it in the loop for a global perturbation, or leave it local for
        one perturbation per device (the original paper's m-sharpness). Unused in transparent mode,
        where the loop averages every gradient it passes, as in optax.
      max_radius: ``None`` (optax's behaviour) or the radius ``rho >= 0`` of the ball around ``w``
        onto which every adversarial point is projected.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`AdversarialSAMState`.
    """
    if isinstance(sync_period, bool) or not isinstance(sync_period, numbers.Integral) \
            or sync_period < 1:
        raise ValueError(f"sync_period must be an integer >= 1, got {sync_period!r}")
    if max_radius is not None and not (isinstance(max_radius, numbers.Real) and max_radius >= 0):
        raise ValueError(f"max_radius must be None or a number >= 0, got {max_radius!r}")
    optimizer = optax.with_extra_args_support(optimizer)

    def init_fn(params: Params) -> AdversarialSAMState:
        return AdversarialSAMState(
            steps_since_sync=jnp.zeros([], jnp.int32),
            opt_state=optimizer.init(params),
            adv_state=adv_optimizer.init(params),
            cache=None if opaque_mode else params,
        )

    def adversarial_step(grads: Params, adv_state: optax.OptState, point: Params, outer: Params):
        """One ascent step of the inner optimizer at ``point``: the update to add, the new state."""
        adv_updates, adv_state = adv_optimizer.update(grads, adv_state, point)
        ascent = jax.tree.map(jnp.negative, adv_updates)  # the inner optimizer descends: negate
        if max_radius is not None:
            projected = _project_to_ball(optax.apply_updates(point, ascent), outer, max_radius)
            ascent = jax.tree.map(lambda a, p: a - p, projected, point)
        return ascent, adv_state

    def next_adv_state(adv_state: optax.OptState, outer: Params) -> optax.OptState:
        """The inner state for the next cycle: fresh (``reset_state``) or carried over."""
        return adv_optimizer.init(outer) if reset_state else adv_state

    def transparent_update(grads, state: AdversarialSAMState, params=None, *, grad_fn=None,
                           **extra_args):
        del grad_fn  # transparent mode: the loop computes every gradient itself
        if params is None:
            raise ValueError("adversarial_sam: update needs params, the current point")
        # (1) where are we in the cycle? Call 0 starts at w and caches it (before it is used: with
        #     sync_period=1 call 0 is also the outer step, which must start from this w)
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == sync_period - 1
        cache = jax.tree.map(lambda p, c: jnp.where(first, p, c), params, state.cache)

        # (2) adversarial call: one ascent step from the current point; the outer state waits
        def adversarial_branch():
            updates, adv_state = adversarial_step(grads, state.adv_state, params, cache)
            return updates, state.opt_state, adv_state

        # (3) outer call: the outer optimizer steps from w = cache with the gradient of the last
        #     adversarial point; the update takes the loop's params back to w and on from there
        def outer_branch():
            outer_updates, opt_state = optimizer.update(grads, state.opt_state, cache, **extra_args)
            updates = jax.tree.map(lambda c, p, u: c - p + u, cache, params, outer_updates)
            return updates, opt_state, next_adv_state(state.adv_state, cache)

        # (4) run one branch only (lax.cond selects; arithmetic selection would leak NaN)
        updates, opt_state, adv_state = jax.lax.cond(last, outer_branch, adversarial_branch)
        return updates, AdversarialSAMState(
            steps_since_sync=(state.steps_since_sync + 1) % sync_period,
            opt_state=opt_state,
            adv_state=adv_state,
            cache=cache,
        )

    def opaque_update(grads, state: AdversarialSAMState, params=None, *, grad_fn=None,
                      **extra_args):
        if grad_fn is None:
            raise ValueError("adversarial_sam: opaque_mode=True needs update(..., grad_fn=...), "
                             "a function (params, i) -> gradient at adversarial step i")
        if params is None:
            raise ValueError("adversarial_sam: update needs params, the outer parameters w")
        # (1) the adversarial climb from a_0 = w, with the gradient the loop passed at w
        point, adv_state = params, state.adv_state
        for i in range(sync_period - 1):
            ascent, adv_state = adversarial_step(grads, adv_state, point, params)
            point = optax.apply_updates(point, ascent)
            # (2) the gradient at the new adversarial point, averaged over devices if asked
            grads = grad_fn(point, i)
            if batch_axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name=batch_axis_name)
        # (3) the outer step from w with the last gradient (at w itself if sync_period=1)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, **extra_args)
        return updates, AdversarialSAMState(
            steps_since_sync=jnp.zeros([], jnp.int32),
            opt_state=opt_state,
            adv_state=next_adv_state(adv_state, params),
            cache=None,
        )

    update_fn = opaque_update if opaque_mode else transparent_update
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
