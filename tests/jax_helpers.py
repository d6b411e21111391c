"""Helpers shared by the JAX test files: the parity problem's network in JAX, conversions, the
base optimizer of the parity cases, and a gradient to poison with NaN or Inf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import parity


def mlp_loss(params, x, y):
    """The parity network: mean softmax cross-entropy of ``tanh(x W1 + b1) W2 + b2``."""
    w1, b1, w2, b2 = params
    logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def as_jax(tree, dtype="float64"):
    return [jnp.asarray(v, dtype) for v in tree]


def as_numpy(tree):
    return [np.asarray(v) for v in tree]


def base_sgd(lr, momentum):
    return optax.sgd(lr, momentum=momentum or None)


def problem(dtype="float64"):
    """Parameters, the gradient at them, and a ``grad_fn`` for the first parity batch."""
    params = as_jax(parity.init_params(), dtype)
    x, y = parity.batches()[0]
    grad_fn = jax.grad(lambda p: mlp_loss(p, jnp.asarray(x, dtype), jnp.asarray(y)))
    return params, grad_fn(params), grad_fn


def poison(tree, value):
    """``tree`` with ``value`` (NaN or Inf) in one element of its second leaf."""
    return [v.at[0].set(value) if i == 1 else v for i, v in enumerate(tree)]


def two_gradients():
    params, g, grad_fn = problem()
    g_adv = grad_fn(jax.tree.map(lambda w, gi: w + 0.3 * gi, params, g))
    return params, g, g_adv
