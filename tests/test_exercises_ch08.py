"""The chapter 8 checks catch typical mistakes with SAM's inner/outer formulation, and pass the
correct functions."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from optax import contrib  # noqa: E402

from sam_edu.exercises import ch08  # noqa: E402
from sam_edu.jax import adversarial_sam, normalize  # noqa: E402


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(t * t) for t in tree))


def _good_sam_adam(lr, rho, k):
    return contrib.sam(optax.adam(lr), optax.chain(contrib.normalize(), optax.adam(rho)),
                       sync_period=k)


SAM_ADAM_MISTAKES = {
    "no normalize": lambda lr, rho, k: contrib.sam(optax.adam(lr), optax.adam(rho),
                                                   sync_period=k),
    "sgd inner": lambda lr, rho, k: contrib.sam(
        optax.adam(lr), optax.chain(normalize(), optax.sgd(rho)), sync_period=k),
    "sgd outer": lambda lr, rho, k: contrib.sam(
        optax.sgd(lr), optax.chain(normalize(), optax.adam(rho)), sync_period=k),
    "lr and rho swapped": lambda lr, rho, k: contrib.sam(
        optax.adam(rho), optax.chain(normalize(), optax.adam(lr)), sync_period=k),
    "default sync_period": lambda lr, rho, k: contrib.sam(
        optax.adam(lr), optax.chain(normalize(), optax.adam(rho))),
    "plain adam": lambda lr, rho, k: optax.adam(lr),
    "inner and outer swapped": lambda lr, rho, k: contrib.sam(
        optax.chain(normalize(), optax.adam(rho)), optax.adam(lr), sync_period=k),
    "reset_state=False": lambda lr, rho, k: contrib.sam(
        optax.adam(lr), optax.chain(normalize(), optax.adam(rho)), sync_period=k,
        reset_state=False),
}


@pytest.mark.parametrize("name", SAM_ADAM_MISTAKES)
def test_sam_adam_check_catches_mistakes(name):
    with pytest.raises(AssertionError):
        ch08.check_sam_adam(SAM_ADAM_MISTAKES[name])


def test_sam_adam_check_names_the_mistake():
    with pytest.raises(AssertionError, match="no normalize"):
        ch08.check_sam_adam(SAM_ADAM_MISTAKES["no normalize"])


@pytest.mark.parametrize("good", [
    _good_sam_adam,
    lambda lr, rho, k: adversarial_sam(optax.adam(lr), optax.chain(normalize(), optax.adam(rho)),
                                       sync_period=k),
])
def test_sam_adam_check_passes_correct(good):
    ch08.check_sam_adam(good)


def _transformation(fn):
    return optax.GradientTransformation(lambda p: optax.EmptyState(),
                                        lambda u, s, p=None: (fn(u), s))


NORMALIZE_MISTAKES = {
    "optax's normalize, no epsilon": lambda eps=1e-12: _transformation(
        lambda u: [g / _norm(u) for g in u]),
    "per-tensor norm": lambda eps=1e-12: _transformation(
        lambda u: [g / (jnp.linalg.norm(g) + eps) for g in u]),
    "eps ignored (fixed 1e-12)": lambda eps=1e-12: _transformation(
        lambda u: [g / (_norm(u) + 1e-12) for g in u]),
    "squared norm": lambda eps=1e-12: _transformation(
        lambda u: [g / (_norm(u) ** 2 + eps) for g in u]),
    "eps multiplies the norm": lambda eps=1e-12: _transformation(
        lambda u: [g / (_norm(u) * (1 + eps)) for g in u]),
}


@pytest.mark.parametrize("name", NORMALIZE_MISTAKES)
def test_safe_normalize_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch08.check_safe_normalize(NORMALIZE_MISTAKES[name])


def test_safe_normalize_check_passes_ours():
    ch08.check_safe_normalize(normalize)


SELECT_MISTAKES = {
    "arithmetic selection (optax)": lambda c, t, f: jax.tree.map(
        lambda a, b: c * a + (1 - c) * b, t, f),
    "branches swapped": lambda c, t, f: jax.tree.map(lambda a, b: jnp.where(c, b, a), t, f),
    "nan_to_num afterwards": lambda c, t, f: jax.tree.map(
        lambda a, b: jnp.nan_to_num(c * a + (1 - c) * b), t, f),
    "always the first": lambda c, t, f: t,
}


@pytest.mark.parametrize("name", SELECT_MISTAKES)
def test_select_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch08.check_select(SELECT_MISTAKES[name])


def test_select_check_catches_arithmetic_and_says_why():
    with pytest.raises(AssertionError, match="0 \\* NaN"):
        ch08.check_select(SELECT_MISTAKES["arithmetic selection (optax)"])


@pytest.mark.parametrize("good", [
    lambda c, t, f: jax.tree.map(lambda a, b: jnp.where(c, a, b), t, f),
    lambda c, t, f: jax.lax.cond(c, lambda: t, lambda: f),
])
def test_select_check_passes_correct(good):
    ch08.check_select(good)


def _project(point, centre, radius, *, per_tensor=False, no_centre=False, always=False,
             divide=False):
    offset = [a - c for a, c in zip(point, centre)]
    if per_tensor:
        scales = [jnp.where(jnp.linalg.norm(o) > radius, radius / jnp.linalg.norm(o), 1.0)
                  for o in offset]
        return [c + s * o for c, s, o in zip(centre, scales, offset)]
    norm = _norm(offset)
    if divide:  # 0 / 0 at the centre
        scale = jnp.minimum(1.0, radius / norm) * norm / norm
    elif always:
        scale = radius / jnp.maximum(norm, 1e-12)
    else:
        scale = jnp.where(norm > radius, radius / jnp.maximum(norm, 1e-12), 1.0)
    if no_centre:
        return [scale * o for o in offset]
    return [c + scale * o for c, o in zip(centre, offset)]


PROJECT_MISTAKES = {
    "per-tensor balls": lambda p, c, r: _project(p, c, r, per_tensor=True),
    "centre not added back": lambda p, c, r: _project(p, c, r, no_centre=True),
    "inside points pushed to the sphere": lambda p, c, r: _project(p, c, r, always=True),
    "0 / 0 at the centre": lambda p, c, r: _project(p, c, r, divide=True),
    "not projected": lambda p, c, r: p,
}


@pytest.mark.parametrize("name", PROJECT_MISTAKES)
def test_project_to_ball_check_catches_mistakes(name):
    with np.errstate(all="ignore"), pytest.raises(AssertionError):
        ch08.check_project_to_ball(PROJECT_MISTAKES[name])


def test_project_to_ball_check_passes_correct():
    ch08.check_project_to_ball(_project)
