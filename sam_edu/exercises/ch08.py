"""Checks for chapter 8, *SAM with any inner and outer optimizer* (needs JAX and optax)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu.exercises.ch02 import _close, _random_tree

START = (-0.4, -0.4)  # the optax notebook's start on the two-basin problem


def _loss(params):
    import jax.numpy as jnp

    x, y = params
    return -jnp.exp(-(x - 2) ** 2 - y ** 2) - jnp.exp(-(x ** 2 + 100 * y ** 2))


def _path(opt, steps: int) -> np.ndarray:
    """The parameters after each of ``steps`` transparent calls on the two-basin loss."""
    import jax
    import jax.numpy as jnp
    import optax

    params = jnp.asarray(START)
    state = opt.init(params)
    grad = jax.jit(jax.grad(_loss))
    path = []
    for _ in range(steps):
        updates, state = opt.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        path.append(np.asarray(params, dtype=np.float64))
    return np.array(path)


def _sam_adam_mistakes(lr: float, rho: float, k: int) -> dict:
    """Typical wrong SAM-Adams, by what went wrong."""
    import optax
    from optax import contrib

    from sam_edu.jax import normalize

    def sam(outer, inner, sync_period=k):
        return contrib.sam(outer, inner, sync_period=sync_period)

    return {
        "no normalize() before the inner Adam": sam(optax.adam(lr), optax.adam(rho)),
        "an SGD inner optimizer instead of Adam": sam(
            optax.adam(lr), optax.chain(normalize(), optax.sgd(rho))),
        "an SGD outer optimizer instead of Adam": sam(
            optax.sgd(lr), optax.chain(normalize(), optax.adam(rho))),
        "lr and rho swapped": sam(optax.adam(rho), optax.chain(normalize(), optax.adam(lr))),
        "sync_period=2 instead of the one asked for": sam(
            optax.adam(lr), optax.chain(normalize(), optax.adam(rho)), sync_period=2),
        "plain Adam, no SAM at all": optax.adam(lr),
    }


def check_sam_adam(sam_adam: Callable) -> None:
    """``sam_adam(lr, rho, sync_period)``: Adam outer, normalised Adam inner, ``sync_period``."""
    import optax

    from sam_edu.jax import adversarial_sam, normalize

    for lr, rho, k in [(0.01, 0.03, 5), (0.05, 0.2, 3)]:
        steps = 6 * k
        opt = sam_adam(lr, rho, k)
        if not hasattr(opt, "init") or not hasattr(opt, "update"):
            raise AssertionError("sam_adam must return an optax GradientTransformation "
                                 "(hint: optax.contrib.sam(outer, inner, sync_period=...))")
        got = _path(opt, steps)
        want = _path(adversarial_sam(optax.adam(lr), optax.chain(normalize(), optax.adam(rho)),
                                     sync_period=k), steps)
        if not np.all(np.isfinite(got)):
            raise AssertionError(f"sam_adam({lr}, {rho}, {k}): NaN or inf in the parameters")
        if np.allclose(got, want, rtol=1e-5, atol=1e-7):
            continue
        for what, wrong in _sam_adam_mistakes(lr, rho, k).items():
            if np.allclose(got, _path(wrong, steps), rtol=1e-5, atol=1e-7):
                raise AssertionError(f"sam_adam({lr}, {rho}, {k}): your optimizer behaves like "
                                     f"one with {what}")
        raise AssertionError(
            f"sam_adam({lr}, {rho}, {k}): the path on the two-basin loss is off by up to "
            f"{np.abs(got - want).max():.3g} (hint: outer optax.adam(lr), inner "
            "chain(normalize(), adam(rho)), sync_period=sync_period)")
    print("check_sam_adam: correct")


def check_safe_normalize(safe_normalize: Callable) -> None:
    """``safe_normalize(eps)`` is an optax transformation ``g -> g / max(||g||, eps)`` (global)."""
    import optax

    for seed in (0, 1):
        grads = _random_tree(seed)
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        t = safe_normalize(1e-12)
        got, _ = t.update(grads, t.init(grads))
        got = [np.asarray(g, dtype=np.float64) for g in got]
        want = [g / norm for g in grads]
        if len(got) == len(want) and all(np.isclose(np.linalg.norm(g), 1.0) for g in got):
            raise AssertionError("safe_normalize: every tensor has norm 1: you normalised tensor "
                                 "by tensor; use ONE norm over all tensors together")
        _close(got, want, f"safe_normalize (seed {seed}) (hint: g / max(||g||, eps), global norm)")
    zeros = [np.zeros((3, 4)), np.zeros(4)]
    t = safe_normalize(1e-12)
    with np.errstate(all="ignore"):
        got, _ = t.update(zeros, t.init(zeros))
    _close(got, zeros, "a zero gradient (hint: this is the NaN of optax.contrib.normalize(): "
                       "divide by max(||g||, eps), so 0 / eps = 0)")
    t = safe_normalize(0.5)
    for g, norm in [(np.array([3.0, 4.0]), 5.0), (np.array([0.03, 0.04]), 0.5)]:
        got, _ = t.update([g], optax.EmptyState())
        _close(got, [g / norm], f"safe_normalize(eps=0.5) on {g} (hint: g / max(||g||, eps), "
                                "with the eps given; ||g|| + eps is another rule)")
    print("check_safe_normalize: correct")


def check_select(select: Callable) -> None:
    """``select(cond, if_true, if_false)``: the chosen pytree, untouched by the other (NaN) one."""
    import jax
    import jax.numpy as jnp

    a, b = _random_tree(0), _random_tree(1)
    nan = [np.full_like(x, np.nan) for x in a]
    for cond in (True, False):
        for jit in (False, True):
            fn = jax.jit(select) if jit else select
            c = jnp.asarray(cond)
            where = f"select({cond}, ...){' under jax.jit' if jit else ''}"
            _close(fn(c, a, b), a if cond else b, where)
            got = fn(c, a, nan) if cond else fn(c, nan, b)
            got = [np.asarray(g) for g in got]
            want = a if cond else b
            if any(np.isnan(g).any() for g in got):
                raise AssertionError(
                    f"{where}: the branch NOT selected is NaN and your result is NaN. "
                    "cond * a + (1 - cond) * b leaks it (0 * NaN = NaN): select, don't multiply "
                    "(jnp.where or jax.lax.cond)")
            _close(got, want, where)
    print("check_select: correct")


def check_project_to_ball(project_to_ball: Callable) -> None:
    """``project_to_ball(point, centre, radius)``: the nearest point of ``||a - centre|| <= r``."""
    centre = _random_tree(0)
    for seed, radius in [(1, 0.5), (2, 2.0)]:
        offset = _random_tree(seed)
        norm = np.sqrt(sum(np.sum(o * o) for o in offset))
        point = [c + o for c, o in zip(centre, offset)]
        got = [np.asarray(g, dtype=np.float64) for g in project_to_ball(point, centre, radius)]
        want = [c + radius / norm * o for c, o in zip(centre, offset)]
        if len(got) == len(want) and all(
                np.isclose(np.linalg.norm(g - c), radius) for g, c in zip(got, centre)):
            raise AssertionError("project_to_ball: every tensor is at distance radius from its "
                                 "centre: you projected tensor by tensor. The ball is ONE ball "
                                 "for all tensors together (global norm)")
        if len(got) == len(want) and all(
                np.allclose(g, radius / norm * o) for g, o in zip(got, offset)):
            raise AssertionError("project_to_ball: you returned the projected offset; add the "
                                 "centre back (a = centre + offset * radius / ||offset||)")
        _close(got, want, f"project_to_ball (radius {radius}) (hint: scale the offset "
                          "a - centre by radius / ||a - centre|| when it is outside)")
    inside = [c + 0.01 * o for c, o in zip(centre, _random_tree(3))]
    _close(project_to_ball(inside, centre, 1.0), inside,
           "a point inside the ball (hint: leave it where it is; project only when outside)")
    with np.errstate(all="ignore"):
        got = project_to_ball(centre, centre, 0.5)
    _close(got, centre, "the point at the centre (hint: ||a - centre|| = 0: select, don't "
                        "divide 0 by 0)")
    print("check_project_to_ball: correct")
