"""The JAX side of the AdversarialSAM tests: ``optax.contrib.sam`` (or ``sam_edu.jax``'s
``adversarial_sam``) on the two-basin problem, the trajectory every framework is compared with."""

import numpy as np
import pytest


def run_optax(case, start, calls, opaque, reset_state=True, sync_period=None, normalize=True,
              peer="optax", **kwargs):
    """optax.contrib.sam (or ``peer="sam_edu.jax"``: our JAX ``adversarial_sam`` with its
    ``normalize(eps)`` and ``kwargs`` such as ``max_radius``) from ``start``: the parameters after
    every ``update``. ``case = (outer, adv, sync_period)`` with ``outer(optax)``, ``adv(optax)``
    building the optax optimizers."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    outer, adv, k = case
    if peer == "optax":
        sam_fn, normalize_fn = optax.contrib.sam, optax.contrib.normalize
    else:
        from sam_edu import jax as samjax

        sam_fn, normalize_fn = samjax.adversarial_sam, samjax.normalize
    adv = optax.chain(normalize_fn(), adv(optax)) if normalize else adv(optax)
    sam = sam_fn(outer(optax), adv, sync_period=sync_period or k, reset_state=reset_state,
                 opaque_mode=opaque, **kwargs)

    def loss(params):
        x, y = params
        return -jnp.exp(-(x - 2) ** 2 - y ** 2) - jnp.exp(-(x ** 2 + 100 * y ** 2))

    grad = jax.grad(loss)

    @jax.jit
    def step(params, state):
        extra = dict(grad_fn=lambda p, _: grad(p)) if opaque else {}
        updates, state = sam.update(grad(params), state, params, **extra)
        return optax.apply_updates(params, updates), state

    params = tuple(jnp.asarray(v, dtype=jnp.float64) for v in start)
    state = sam.init(params)
    trajectory = []
    for _ in range(calls):
        params, state = step(params, state)
        trajectory.append(np.array([float(v) for v in params]))
    return np.array(trajectory)
