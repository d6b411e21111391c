"""The chapter 7 checks catch typical LookSAM mistakes, and pass the correct functions."""

import numpy as np
import pytest

from sam_edu import reference as ref
from sam_edu.exercises import ch07


def _norm(tree):
    return np.sqrt(sum(np.sum(t * t) for t in tree))


def _dot(a, b):
    return sum(np.sum(x * y) for x, y in zip(a, b))


def _unit(tree, eps=1e-12):
    return [t / (_norm(tree) + eps) for t in tree]


PROJECTION_MISTAKES = {
    "per-tensor projection": lambda g_adv, g, eps=1e-12: [
        a - np.sum(a * b) / (np.sum(b * b) + eps) * b for a, b in zip(g_adv, g)],
    "g projected off g_adv (reversed)": lambda g_adv, g, eps=1e-12: [
        b - _dot(g, _unit(g_adv, eps)) * u for b, u in zip(g, _unit(g_adv, eps))],
    "the parallel part, not the orthogonal one": lambda g_adv, g, eps=1e-12: [
        _dot(g_adv, _unit(g, eps)) * u for u in _unit(g, eps)],
    "g not normalised": lambda g_adv, g, eps=1e-12: [
        a - _dot(g_adv, g) * b for a, b in zip(g_adv, g)],
    "no epsilon (NaN at zero)": lambda g_adv, g, eps=1e-12: [
        a - _dot(g_adv, _unit(g, 0.0)) * u for a, u in zip(g_adv, _unit(g, 0.0))],
}


@pytest.mark.parametrize("name", PROJECTION_MISTAKES)
def test_orthogonal_component_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch07.check_orthogonal_component(PROJECTION_MISTAKES[name])


DIRECTION_MISTAKES = {
    "g_v not rescaled": lambda g, g_v, alpha, eps=1e-12: [
        a + alpha * b for a, b in zip(g, g_v)],
    "rescaled tensor by tensor": lambda g, g_v, alpha, eps=1e-12: [
        a + alpha * np.linalg.norm(a) / (np.linalg.norm(b) + eps) * b for a, b in zip(g, g_v)],
    "ratio inverted": lambda g, g_v, alpha, eps=1e-12: [
        a + alpha * _norm(g_v) / (_norm(g) + eps) * b for a, b in zip(g, g_v)],
    "unit g_v without ||g||": lambda g, g_v, alpha, eps=1e-12: [
        a + alpha / (_norm(g_v) + eps) * b for a, b in zip(g, g_v)],
    "no epsilon (NaN at g_v = 0)": lambda g, g_v, alpha, eps=1e-12: [
        a + alpha * _norm(g) / _norm(g_v) * b for a, b in zip(g, g_v)],
}


@pytest.mark.parametrize("name", DIRECTION_MISTAKES)
def test_looksam_direction_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch07.check_looksam_direction(DIRECTION_MISTAKES[name])


def _step(mistake=None):
    """``looksam_step(t, params, g_v, grad_fn, lr, rho, k, alpha)`` with SGD, right or wrong."""
    def step(t, params, g_v, grad_fn, lr, rho, k, alpha):
        sgd = lambda w, d: [a - lr * b for a, b in zip(w, d)]  # noqa: E731
        g = grad_fn(params)
        sam_step = {"always SAM": True,
                    "SAM at the end of the cycle": t % k == k - 1 or g_v is None}.get(
            mistake, t % k == 0)
        if not sam_step:
            if mistake == "two passes on cheap steps":
                grad_fn(ref.ascend(params, ref.sam_perturbation(g, rho)))
            return sgd(params, ref.looksam_direction(g, g_v, alpha)), g_v
        g_adv = grad_fn(ref.ascend(params, ref.sam_perturbation(g, rho)))
        if mistake == "g_v from g and g_adv swapped":
            return sgd(params, g_adv), ref.orthogonal_component(g, g_adv)
        if mistake == "SAM step with g":
            return sgd(params, g), ref.orthogonal_component(g_adv, g)
        return sgd(params, g_adv), ref.orthogonal_component(g_adv, g)
    return step


def test_looksam_step_check_passes_the_reference_composition():
    ch07.check_looksam_step(_step())


@pytest.mark.parametrize("mistake", ["always SAM", "SAM at the end of the cycle",
                                     "two passes on cheap steps", "g_v from g and g_adv swapped",
                                     "SAM step with g"])
def test_looksam_step_check_catches_mistakes(mistake):
    with pytest.raises(AssertionError):
        ch07.check_looksam_step(_step(mistake))
