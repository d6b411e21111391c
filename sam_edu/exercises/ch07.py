"""Checks for chapter 7, *LookSAM: most of SAM at a fraction of the cost*."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sam_edu import reference as ref
from sam_edu.exercises.ch02 import _close, _random_tree


def _dot(a, b) -> float:
    return float(sum(np.sum(x * y) for x, y in zip(a, b)))


def _orthogonal_to(v, g) -> bool:
    """``v . g`` is zero relative to the sizes of ``v`` and ``g`` (global dot product)."""
    return abs(_dot(v, g)) <= 1e-9 * (ref.global_norm(v) * ref.global_norm(g) + 1e-30)


def check_orthogonal_component(orthogonal_component: Callable) -> None:
    """``orthogonal_component(g_adv, g)`` must return ``g_adv - (g_adv . g_hat) g_hat`` (global)."""
    for seed in (0, 1, 2):
        g_adv, g = _random_tree(seed + 10), _random_tree(seed)
        got = [np.asarray(v) for v in orthogonal_component(g_adv, g)]
        want = ref.orthogonal_component(g_adv, g)
        if len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want)) \
                and np.all(np.isfinite(np.concatenate([v.ravel() for v in got]))):
            if not _orthogonal_to(got, g):
                hint = ("g_v must be orthogonal to g, the plain gradient" +
                        (", but yours is orthogonal to g_adv: project g_adv onto g, not g onto "
                         "g_adv" if _orthogonal_to(got, g_adv) else ""))
                raise AssertionError(f"orthogonal_component (seed {seed}): {hint}")
            if all(_orthogonal_to([a], [b]) for a, b in zip(got, g)):
                raise AssertionError(
                    f"orthogonal_component (seed {seed}): every tensor of your g_v is orthogonal "
                    "to its own tensor of g: you projected tensor by tensor. LookSAM uses ONE dot "
                    "product and ONE norm over all tensors together")
        _close(got, want, f"orthogonal_component (seed {seed}) "
                          "(hint: g_v = g_adv - (g_adv . g_hat) g_hat with g_hat = g / ||g||)")
    g_adv = _random_tree(3)
    _close(orthogonal_component(g_adv, [2.5 * a for a in g_adv]), [np.zeros_like(a) for a in g_adv],
           "g_adv parallel to g (hint: nothing of g_adv is left orthogonal to g: g_v = 0)")
    _close(orthogonal_component(g_adv, [np.zeros_like(a) for a in g_adv]), g_adv,
           "a zero gradient g (hint: add eps to ||g|| so that g_hat = 0, not NaN, and g_v = g_adv)")
    print("check_orthogonal_component: correct")


def check_looksam_direction(looksam_direction: Callable) -> None:
    """``looksam_direction(g, g_v, alpha)`` must return ``g + alpha (||g|| / ||g_v||) g_v``."""
    for seed, alpha in [(0, 0.7), (1, 0.3), (2, 2.0)]:
        g, g_v = _random_tree(seed), [3.0 * v for v in _random_tree(seed + 10)]
        got = [np.asarray(v) for v in looksam_direction(g, g_v, alpha)]
        want = ref.looksam_direction(g, g_v, alpha)
        if len(got) == len(want) and all(a.shape == b.shape for a, b in zip(got, want)):
            added = [a - b for a, b in zip(got, g)]
            size = ref.global_norm(added)
            if np.isclose(size, alpha * ref.global_norm(g_v)):
                raise AssertionError(
                    f"looksam_direction (alpha={alpha}): you added alpha * g_v; rescale g_v to the "
                    "length of g first: alpha * (||g|| / ||g_v||) * g_v")
            if all(np.isclose(ref.global_norm([a]), alpha * ref.global_norm([b]))
                   for a, b in zip(added, g)):
                raise AssertionError(
                    f"looksam_direction (alpha={alpha}): you rescaled tensor by tensor; the "
                    "norms ||g|| and ||g_v|| are each ONE norm over all tensors together")
        _close(got, want, f"looksam_direction with alpha={alpha} "
                          "(hint: d = g + alpha * (||g|| / ||g_v||) * g_v, global norms)")
    g = _random_tree(3)
    _close(looksam_direction(g, [np.zeros_like(a) for a in g], 0.7), g,
           "a zero g_v (hint: add eps to ||g_v|| so that 0 / 0 never happens; d = g)")
    print("check_looksam_direction: correct")


def check_looksam_step(looksam_step: Callable) -> None:
    """``looksam_step(t, params, g_v, grad_fn, lr, rho, k, alpha) -> (params, g_v)``, SGD base."""
    lr, rho, k, alpha = 0.1, 0.1, 3, 0.7
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    calls = []

    def grad_fn(w):
        calls.append(1)
        return ref.mlp_loss_and_grad(w, x, y)[1]

    ref_grad_fn = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    sgd = lambda w, d: [wi - lr * di for wi, di in zip(w, d)]  # noqa: E731
    mine = ref.mlp_init((5, 4, 3), seed=8)
    want = [w.copy() for w in mine]
    mine_g_v = want_g_v = None
    for t in range(2 * k + 1):
        inputs, before = mine, [np.array(w, copy=True) for w in mine]
        calls.clear()
        mine, mine_g_v = looksam_step(t, inputs, mine_g_v, grad_fn, lr, rho, k, alpha)
        _close(inputs, before, "your looksam_step changed its input `params` in place; "
                               "return new arrays")
        expected_calls = 2 if t % k == 0 else 1
        if len(calls) != expected_calls:
            kind = "a full SAM step (t mod k == 0)" if t % k == 0 else "a cheap step"
            raise AssertionError(f"step t={t} with k={k} is {kind}: it must call grad_fn "
                                 f"{expected_calls} time(s), yours called it {len(calls)} time(s)")
        want, want_g_v = ref.looksam_step(t, want, want_g_v, ref_grad_fn, sgd,
                                          rho=rho, k=k, alpha=alpha)
        _close(mine, want, f"the weights after step t={t} (hint: on a SAM step d = g_adv and g_v "
                           "is computed from g_adv and g; on a cheap step d uses the KEPT g_v)")
        _close(mine_g_v, want_g_v, f"g_v after step t={t} (hint: recompute it on SAM steps only, "
                                   "return the old one unchanged on cheap steps)")
    print("check_looksam_step: correct")
