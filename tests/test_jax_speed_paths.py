"""The JAX fast paths give the same numbers as the plain code (no timings are asserted).

LookSAM's pass 2 sits in a ``lax.cond`` branch, where XLA:CPU leaves the backward pass's
convolutions in layouts its fast kernels do not take; ``canonical_convolutions`` writes them in
the canonical layout itself. These tests hold it to the plain function's numbers and check, in
the compiled program, that no convolution is left in another layout.
"""

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from sam_edu.jax import looksam, sam  # noqa: E402
from sam_edu.jax.looksam import canonical_convolutions  # noqa: E402



def is_canonical(label):
    """``b01f_01io->b01f`` (two spatial dimensions; XLA may add one for grouped convolutions)."""
    return re.fullmatch(r"b(\d+)f_\1io->b\1f", label) is not None


def conv_params(key, groups):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "c1": jax.random.normal(k1, (3, 3, 3, 8), jnp.float32) * 0.3,    # HWIO
        "c2": jax.random.normal(k2, (8, 8 // groups, 3, 3), jnp.float32) * 0.3,  # OIHW
        "c3": jax.random.normal(k3, (2, 2, 8, 6), jnp.float32) * 0.3,    # strided, dilated
        "dense": jax.random.normal(k4, (6, 5), jnp.float32) * 0.3,
    }


@jax.jit  # a nested jit: its convolutions are rewritten too
def _oihw(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=8 // w.shape[1],
                                    dimension_numbers=("NHWC", "OIHW", "NHWC"))


def conv_loss(params, x, y):
    """A small network whose convolutions use three layouts, groups (``c2``), strides and
    dilation."""
    h = jax.nn.relu(lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    h = jnp.tanh(_oihw(h, params["c2"]))
    h = jnp.transpose(h, (0, 3, 1, 2))  # NCHW for the last one
    h = lax.conv_general_dilated(h, params["c3"], (2, 2), [(1, 0), (0, 1)], rhs_dilation=(2, 1),
                                 dimension_numbers=("NCHW", "HWIO", "NCHW"))
    logits = jnp.mean(h, axis=(2, 3)) @ params["dense"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def problem(seed=0, groups=2):
    kp, kx = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (4, 9, 9, 3), jnp.float32)
    y = jnp.arange(4) % 5
    return conv_params(kp, groups), x, y


def conv_layouts(compiled_text):
    """The ``dim_labels`` of every convolution in a compiled program."""
    return re.findall(r" convolution\(.*?dim_labels=([^,\n]+),", compiled_text)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_canonical_convolutions_gives_the_plain_gradient(jit):
    params, x, y = problem()
    grad_fn = jax.grad(lambda p: conv_loss(p, x, y))
    rewritten = canonical_convolutions(grad_fn)
    if jit:
        grad_fn, rewritten = jax.jit(grad_fn), jax.jit(rewritten)
    want, got = grad_fn(params), rewritten(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_canonical_convolutions_keeps_the_outer_trace_and_effects():
    """Closed-over tracers of an outer ``jit`` (the batch) and a callback still work."""
    params, x, y = problem(1)
    calls = []

    def step(p, x, y):
        def grad_fn(q):
            jax.debug.callback(lambda: calls.append(1))
            return jax.grad(lambda r: conv_loss(r, x, y))(q)
        return canonical_convolutions(grad_fn)(p)

    got = jax.jit(step)(params, x, y)
    jax.effects_barrier()
    assert calls == [1]
    want = jax.grad(lambda p: conv_loss(p, x, y))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layouts are XLA:CPU's")
def test_plain_cond_branch_leaves_convolutions_non_canonical():
    """The finding behind the rewrite: XLA:CPU canonicalises top-level convolutions only.

    Without groups: a grouped convolution's kernel gradient is rewritten by XLA after the
    canonical layout is written (see ``canonical_convolutions``)."""
    params, x, y = problem(groups=1)
    grad_fn = jax.grad(lambda p: conv_loss(p, x, y))

    def in_branch(fn):
        return jax.jit(lambda p, c: lax.cond(c, lambda: fn(p), lambda: p))

    top = conv_layouts(jax.jit(grad_fn).lower(params).compile().as_text())
    plain = conv_layouts(in_branch(grad_fn).lower(params, True).compile().as_text())
    rewritten = conv_layouts(
        in_branch(canonical_convolutions(grad_fn)).lower(params, True).compile().as_text())
    assert top and all(map(is_canonical, top)), top
    assert not all(map(is_canonical, plain)), plain  # if XLA fixes this, the rewrite can go
    assert rewritten and all(map(is_canonical, rewritten)), rewritten


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layouts are XLA:CPU's")
def test_looksam_update_has_only_canonical_convolutions():
    params, x, y = problem(groups=1)
    opt = looksam(optax.sgd(0.1, momentum=0.9), k=3)

    def step(p, state, x, y):
        grad_fn = jax.grad(lambda q: conv_loss(q, x, y))
        updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

    text = jax.jit(step).lower(params, opt.init(params), x, y).compile().as_text()
    layouts = conv_layouts(text)
    assert layouts and all(map(is_canonical, layouts)), layouts


def test_looksam_on_a_cnn_with_k_one_is_sam():
    """Every step of LookSAM with ``k = 1`` is SAM's, through the rewritten pass 2."""
    params, x, y = problem(2)
    results = []
    for opt in (looksam(optax.sgd(0.1, momentum=0.9), rho=0.05, k=1, alpha=0.7),
                sam(optax.sgd(0.1, momentum=0.9), rho=0.05)):
        @jax.jit
        def step(p, state):
            grad_fn = jax.grad(lambda q: conv_loss(q, x, y))
            updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
            return optax.apply_updates(p, updates), state

        p, state = params, opt.init(params)
        for _ in range(4):
            p, state = step(p, state)
        results.append(p)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
