"""``sam_edu.jax.adversarial_sam`` against ``optax.contrib.sam``: equal where optax is right, and
each of optax's sharp edges pinned by a test that shows optax's behaviour next to ours."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from sam_edu import reference as ref  # noqa: E402
from sam_edu.jax import AdversarialSAMState, adversarial_sam, normalize  # noqa: E402

START = jnp.array([-0.4, -0.4])  # the optax notebook's start on the two-basin problem
PLATEAU = jnp.array([40.0, 0.0])  # both exponentials underflow to 0: the gradient is exactly 0
RHO = 0.1


def two_basin_loss(w):
    """``sam_edu.reference.two_basin_loss`` in jnp: sharp minimum at (0, 0), flat one at (2, 0)."""
    x, y = w
    return -jnp.exp(-(x - 2) ** 2 - y ** 2) - jnp.exp(-(x ** 2 + 100 * y ** 2))


def mlp_loss(params, x, y):
    """``sam_edu.reference.mlp_loss`` in jnp: cross-entropy of ``tanh(x W1 + b1) W2 + b2``."""
    w1, b1, w2, b2 = params
    logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mlp_problem():
    params = [jnp.asarray(v) for v in ref.mlp_init((5, 4, 3), seed=0)]
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(16, 5))), jnp.asarray(rng.integers(0, 3, 16))
    return params, lambda p: mlp_loss(p, x, y)


def trajectory(opt, loss, params, steps, opaque=False):
    """The params before every call and after the last one (``steps + 1`` points), one jit."""
    grad = jax.grad(loss)

    def step(carry, _):
        params, state = carry
        if opaque:
            updates, state = opt.update(grad(params), state, params,
                                        grad_fn=lambda p, i: grad(p))
        else:
            updates, state = opt.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    @jax.jit
    def run(params):
        (_, state), path = jax.lax.scan(step, (params, opt.init(params)), length=steps)
        return jax.tree.map(lambda p0, ps: jnp.concatenate([p0[None], ps]), params, path), state

    return run(params)


def inner(name, rho=RHO, norm=optax.contrib.normalize):
    return {"sgd": optax.chain(norm(), optax.sgd(rho)),
            "adam": optax.chain(norm(), optax.adam(rho))}[name]


OUTER = {"sgd": lambda: optax.sgd(0.01), "momentum": lambda: optax.sgd(0.01, momentum=0.9),
         "adam": lambda: optax.adam(0.01)}


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- equal to optax.contrib.sam wherever optax is right -----------------------------------------

@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("sync_period", [2, 3, 5])
@pytest.mark.parametrize("outer,inner_name", [("sgd", "sgd"), ("momentum", "sgd"), ("adam", "sgd"),
                                              ("sgd", "adam"), ("adam", "adam")])
def test_matches_optax_on_two_basin(outer, inner_name, sync_period, opaque):
    kwargs = dict(sync_period=sync_period, opaque_mode=opaque)
    ours, ours_state = trajectory(adversarial_sam(OUTER[outer](), inner(inner_name), **kwargs),
                                  two_basin_loss, START, 60, opaque)
    peer, peer_state = trajectory(optax.contrib.sam(OUTER[outer](), inner(inner_name), **kwargs),
                                  two_basin_loss, START, 60, opaque)
    np.testing.assert_array_equal(ours, peer)
    assert tuple(ours_state._fields) == tuple(peer_state._fields)
    assert_trees_equal(tuple(ours_state), tuple(peer_state))  # the same state, field by field


@pytest.mark.parametrize("sync_period,reset_state,opaque", [
    (2, True, False), (3, False, False), (2, True, True), (4, False, True)])
def test_matches_optax_on_an_mlp(sync_period, reset_state, opaque):
    params, loss = mlp_problem()
    kwargs = dict(sync_period=sync_period, reset_state=reset_state, opaque_mode=opaque)
    ours, _ = trajectory(adversarial_sam(optax.adam(0.01), inner("adam", 0.05), **kwargs),
                         loss, params, 12, opaque)
    peer, _ = trajectory(optax.contrib.sam(optax.adam(0.01), inner("adam", 0.05), **kwargs),
                         loss, params, 12, opaque)
    assert_trees_equal(ours, peer)


def test_our_normalize_is_optax_normalize_away_from_zero():
    opt = adversarial_sam(optax.sgd(0.01), inner("sgd", norm=normalize), sync_period=3)
    ours, _ = trajectory(opt, two_basin_loss, START, 60)
    peer, _ = trajectory(optax.contrib.sam(optax.sgd(0.01), inner("sgd"), sync_period=3),
                         two_basin_loss, START, 60)
    np.testing.assert_array_equal(ours, peer)


def test_state_cycles_and_caches_the_outer_parameters():
    opt = adversarial_sam(optax.sgd(0.01), inner("sgd"), sync_period=3)
    path, _ = trajectory(opt, two_basin_loss, START, 7)
    state = opt.init(START)
    assert isinstance(state, AdversarialSAMState)
    params, seen = START, []
    for _ in range(7):
        seen.append(int(state.steps_since_sync))
        updates, state = opt.update(jax.grad(two_basin_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(state.cache, path[3 * ((len(seen) - 1) // 3)])
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    assert adversarial_sam(optax.sgd(0.01), inner("sgd"), opaque_mode=True).init(START).cache \
        is None


def test_extra_args_go_to_the_outer_optimizer():
    outer = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=0, factor=0.5))
    opt = adversarial_sam(outer, inner("sgd", norm=normalize), opaque_mode=True)
    params, state = START, opt.init(START)
    grad_fn = lambda p, i: jax.grad(two_basin_loss)(p)  # noqa: E731
    for _ in range(3):  # a constant value: no improvement, so the plateau halves the scale
        updates, state = opt.update(grad_fn(params, 0), state, params, grad_fn=grad_fn, value=1.0)
        params = optax.apply_updates(params, updates)
    assert float(state.opt_state[1].scale) < 1.0


# --- sharp edge (a): a zero gradient gives no NaN ------------------------------------------------

def test_a_normalize_zero_gradient():
    zero = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    peer, _ = optax.contrib.normalize().update(zero, optax.EmptyState())
    ours, _ = normalize().update(zero, optax.EmptyState())
    assert np.isnan(peer["w"]).all()  # optax: 0 / ||0|| = NaN
    assert_trees_equal(ours, zero)


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_a_plateau_start(opaque):
    """On a plateau (gradient exactly 0) optax's adversarial step is NaN; ours stays put."""
    assert not np.any(jax.grad(two_basin_loss)(PLATEAU))
    kwargs = dict(sync_period=2, opaque_mode=opaque)
    peer, _ = trajectory(optax.contrib.sam(optax.sgd(0.01), inner("sgd"), **kwargs),
                         two_basin_loss, PLATEAU, 4, opaque)
    ours, _ = trajectory(adversarial_sam(optax.sgd(0.01), inner("sgd", norm=normalize), **kwargs),
                         two_basin_loss, PLATEAU, 4, opaque)
    assert np.isnan(peer[-1]).all()
    np.testing.assert_array_equal(ours, np.broadcast_to(PLATEAU, ours.shape))


def test_a_branch_selection_does_not_leak_nan():
    """A zero gradient on an *outer* call: both use optax's NaN-producing ``normalize()`` as the
    inner optimizer, whose result that call discards. ``cond * outer + (1 - cond) * adv`` is
    ``1 * outer + 0 * NaN = NaN``; ``lax.cond`` returns the outer update."""
    results = {}
    for name, sam in [("optax", optax.contrib.sam), ("ours", adversarial_sam)]:
        opt = sam(optax.sgd(0.01), inner("sgd"), sync_period=2)
        state = opt.init(START)
        updates, state = opt.update(jax.grad(two_basin_loss)(START), state, START)  # adversarial
        adv_point = optax.apply_updates(START, updates)
        updates, _ = opt.update(jnp.zeros(2), state, adv_point)  # outer call, zero gradient
        results[name] = optax.apply_updates(adv_point, updates)
    assert np.isnan(results["optax"]).all()
    np.testing.assert_allclose(results["ours"], START, rtol=0, atol=1e-15)  # sgd(0) from w


# --- sharp edge (b): transparent mode with sync_period=1 is the outer optimizer ------------------

@pytest.mark.parametrize("outer", ["sgd", "momentum", "adam"])
def test_b_sync_period_one_is_the_outer_optimizer(outer):
    plain, _ = trajectory(OUTER[outer](), two_basin_loss, START, 40)
    peer, _ = trajectory(optax.contrib.sam(OUTER[outer](), inner("sgd"), sync_period=1),
                         two_basin_loss, START, 40)
    ours, _ = trajectory(adversarial_sam(OUTER[outer](), inner("sgd"), sync_period=1),
                         two_basin_loss, START, 40)
    opaque, _ = trajectory(adversarial_sam(OUTER[outer](), inner("sgd"), sync_period=1,
                                           opaque_mode=True), two_basin_loss, START, 40, True)
    np.testing.assert_allclose(ours, plain, rtol=1e-13, atol=1e-15)  # XLA may fuse differently
    np.testing.assert_allclose(opaque, plain, rtol=1e-13, atol=1e-15)
    # optax steps from the params cached on the previous call: w_{t+1} = w_{t-1} + u(g(w_t))
    assert np.abs(peer - plain).max() > 1e-3
    g = jax.vmap(jax.grad(two_basin_loss))(jnp.asarray(peer[1:-1]))
    if outer == "sgd":
        np.testing.assert_allclose(peer[2:], peer[:-2] - 0.01 * g, rtol=1e-12, atol=1e-15)


# --- sharp edge (c): max_radius keeps the adversarial points inside the rho-ball ------------------

def distances_from_outer(path, sync_period):
    """``||a - w||`` for every adversarial point of every full cycle in a transparent path."""
    cycles = path[: (len(path) - 1) // sync_period * sync_period].reshape(-1, sync_period, 2)
    return np.linalg.norm(cycles[:, 1:] - cycles[:, :1], axis=-1)


@pytest.mark.parametrize("inner_name,rho", [("sgd", 0.1), ("adam", 0.03)])
def test_c_max_radius_transparent(inner_name, rho):
    kwargs = dict(sync_period=5)
    peer, _ = trajectory(optax.contrib.sam(optax.adam(0.01), inner(inner_name, rho), **kwargs),
                         two_basin_loss, START, 100)
    ours, _ = trajectory(adversarial_sam(optax.adam(0.01), inner(inner_name, rho, normalize),
                                         max_radius=rho, **kwargs), two_basin_loss, START, 100)
    assert distances_from_outer(np.asarray(peer), 5).max() > 2 * rho  # 4 steps leave the ball
    assert distances_from_outer(np.asarray(ours), 5).max() <= rho * (1 + 1e-12)


def test_c_max_radius_opaque():
    points = []  # unjitted, so grad_fn sees the concrete adversarial points

    def grad_fn(p, i):
        points.append((i, p))
        return jax.grad(two_basin_loss)(p)

    for max_radius in (None, RHO):
        opt = adversarial_sam(optax.sgd(0.01), inner("sgd"), sync_period=4, opaque_mode=True,
                              max_radius=max_radius)
        params, state, points[:], distances = START, opt.init(START), [], []
        for _ in range(3):
            outer = params
            updates, state = opt.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
            params = optax.apply_updates(params, updates)
            distances += [float(jnp.linalg.norm(p - outer)) for _, p in points[-3:]]
        assert [i for i, _ in points] == [0, 0, 1, 2] * 3  # the loop's call, then 3 adversarial
        if max_radius is None:
            assert max(distances) > 2 * RHO  # optax's behaviour: 3 steps of length rho
        else:
            assert max(distances) <= RHO * (1 + 1e-12)


def test_c_max_radius_is_inactive_for_drop_in_sam():
    """One normalised step has length rho: the projection changes nothing (up to rounding)."""
    peer, _ = trajectory(optax.contrib.sam(optax.sgd(0.01), inner("sgd")), two_basin_loss,
                         START, 60)
    ours, _ = trajectory(adversarial_sam(optax.sgd(0.01), inner("sgd"), max_radius=RHO),
                         two_basin_loss, START, 60)
    np.testing.assert_allclose(ours, peer, rtol=1e-12, atol=1e-14)


# --- bad arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(sync_period=0), "sync_period"), (dict(sync_period=2.5), "sync_period"),
    (dict(sync_period=True), "sync_period"), (dict(max_radius=-0.1), "max_radius"),
    (dict(max_radius=float("nan")), "max_radius"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adversarial_sam(optax.sgd(0.1), inner("sgd"), **kwargs)


def test_bad_eps_and_missing_call_arguments():
    for eps in (-1.0, 0.0):
        with pytest.raises(ValueError, match="eps"):
            normalize(eps=eps)
    opaque = adversarial_sam(optax.sgd(0.1), inner("sgd"), opaque_mode=True)
    with pytest.raises(ValueError, match="grad_fn"):
        opaque.update(jnp.ones(2), opaque.init(START), START)
    transparent = adversarial_sam(optax.sgd(0.1), inner("sgd"))
    with pytest.raises(ValueError, match="params"):
        transparent.update(jnp.ones(2), transparent.init(START))


# --- batch_axis_name under data parallelism (4 simulated CPU devices) ----------------------------

DATA_PARALLEL = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    from sam_edu import reference as ref
    from sam_edu.jax import adversarial_sam, normalize
    assert jax.device_count() == 4, jax.devices()

    def loss(params, x, y):
        w1, b1, w2, b2 = params
        logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(16, 5))), jnp.asarray(rng.integers(0, 3, 16))
    params0 = [jnp.asarray(v) for v in ref.mlp_init((5, 4, 3), seed=0)]
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def make(sam, opaque, axis):
        # momentum, not Adam, outside: Adam is blind to a gradient scaled by 4 (a psum instead
        # of a pmean), and its g / (sqrt(v) + 1e-8) multiplies rounding differences by lr / 1e-8
        return sam(optax.sgd(0.1, momentum=0.9), optax.chain(normalize(), optax.sgd(0.05)),
                   sync_period=3,
                   opaque_mode=opaque, batch_axis_name=axis)

    def run(opt, opaque, axis, steps=9):
        def one_step(params, state, x, y):
            grad = lambda p: jax.grad(loss)(p, x, y)
            g = grad(params) if axis is None else jax.lax.pmean(grad(params), axis)
            if opaque:
                updates, state = opt.update(g, state, params, grad_fn=lambda p, i: grad(p))
            else:
                updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state
        if axis is not None:  # check_vma=False: grad gives each device's own gradient, as
            # pmap does; with check_vma=True, jax.grad of replicated params already psums them
            one_step = jax.shard_map(one_step, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis)),
                                     out_specs=(P(), P()), check_vma=False)
        one_step = jax.jit(one_step)
        params, state = params0, opt.init(params0)
        for _ in range(steps):
            params, state = one_step(params, state, x, y)
        return [np.asarray(p) for p in params]

    for opaque in (False, True):
        single = run(make(adversarial_sam, opaque, None), opaque, None)
        ours = run(make(adversarial_sam, opaque, "batch"), opaque, "batch")
        peer = run(make(optax.contrib.sam, opaque, "batch"), opaque, "batch")
        assert not np.allclose(single[0], params0[0])
        for a, b, c in zip(ours, single, peer):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)  # the full-batch run
            np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-14)  # optax's batch_axis_name
    print("OK")
""")


def test_batch_axis_name_under_shard_map_on_four_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-3000:]
