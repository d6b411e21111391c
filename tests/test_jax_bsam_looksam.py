"""JAX/optax bSAM and LookSAM against the NumPy reference, against SAM, and their edge cases."""

import functools
import itertools
import math
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)  # float32 tests below use explicit float32 arrays

import jax.numpy as jnp  # noqa: E402

import parity  # noqa: E402
from jax_helpers import (  # noqa: E402
    as_jax,
    as_numpy,
    base_sgd,
    mlp_loss,
    poison,
    problem,
    two_gradients,
)
from sam_edu import reference as ref  # noqa: E402
from sam_edu.jax import (  # noqa: E402
    BSAMState,
    LookSAMState,
    bsam,
    bsam_mean,
    bsam_momentum,
    bsam_perturbation,
    bsam_precision,
    is_sam_step,
    looksam,
    looksam_direction,
    orthogonal_component,
    posterior_sample,
    sam,
    sample_posterior,
)


def _counting(grad_fn, counter):
    """``grad_fn`` that adds one to ``counter[0]`` each time it is *evaluated*.

    ``jax.debug.callback`` runs on the host when the computation runs, not when it is traced, and
    only in the branch of a ``lax.cond`` that is taken: it counts evaluations, under ``jax.jit``
    too (read the counter after ``jax.effects_barrier()``).
    """
    def counted(p):
        jax.debug.callback(lambda: counter.__setitem__(0, counter[0] + 1))
        return grad_fn(p)

    return counted


# --- bSAM ----------------------------------------------------------------------------------------

def bsam_from_case(bsam_kwargs):
    """The reference's ``lr`` is optax's ``learning_rate``; everything else has the same name."""
    kwargs = dict(bsam_kwargs)
    if "lr" in kwargs:
        kwargs["learning_rate"] = kwargs.pop("lr")
    return bsam(**kwargs)


def bsam_step(opt, params, state, x, y, noise):
    """One training step with ``bsam``: no ``grads``, a ``grad_fn`` for the batch."""
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    updates, state = opt.update(None, state, params, grad_fn=grad_fn, noise=noise)
    return optax.apply_updates(params, updates), state


def run_bsam(opt, dtype="float64", noises=None, jit=True, steps=parity.STEPS, resume=None):
    """Weights after each step on the parity batches (cycled), and the last state.

    ``noises`` (one draw per step) is fed through ``update(..., noise=...)``; ``None`` lets the
    optimizer draw from its key. ``resume = (start, params, state)`` continues a run at step
    ``start``.
    """
    step = functools.partial(JIT_BSAM_STEP if jit else bsam_step, opt)
    params = as_jax(parity.init_params(), dtype)
    start, params, state = resume or (0, params, opt.init(params))
    batches = itertools.islice(itertools.cycle(parity.batches()), start, start + steps)
    noises = noises if noises is not None else itertools.repeat(None)
    out = []
    for (x, y), noise in zip(batches, noises):
        noise = None if noise is None else as_jax(noise, dtype)
        params, state = step(params, state, jnp.asarray(x, dtype), jnp.asarray(y), noise)
        out.append(as_numpy(params))
    return out, state


JIT_BSAM_STEP = jax.jit(bsam_step, static_argnums=0)  # compiled once per optimizer


def bsam_reference(bsam_kwargs, noises, lrs=None):
    """The reference's weights after each step with the given noise (and ``lr_t`` per step)."""
    kwargs = dict(bsam_kwargs)
    params = parity.init_params()
    m, s = ref.bsam_init(params, kwargs.pop("s_init", 1.0))
    out = []
    for t, ((x, y), noise) in enumerate(zip(parity.batches(), noises)):
        if lrs is not None:
            kwargs["lr"] = lrs[t]
        params, m, s = ref.bsam_step(params, m, s, noise,
                                     lambda w: ref.mlp_loss_and_grad(w, x, y)[1], **kwargs)
        out.append(params)
    return out


def drawn_noise(seed, steps=parity.STEPS):
    """The noise :func:`bsam` draws from ``jax.random.key(seed)``: split, then one draw per leaf."""
    params = as_jax(parity.init_params())
    key, out = jax.random.key(seed), []
    for _ in range(steps):
        key, draw = jax.random.split(key)
        out.append(as_numpy(optax.tree_utils.tree_random_like(draw, params)))
    return out


@parity.bsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bsam_parity_with_the_reference(bsam_kwargs, dtype):
    got, state = run_bsam(bsam_from_case(bsam_kwargs), dtype, parity.bsam_noise())
    assert got[-1][0].dtype == np.dtype(dtype)
    assert int(state.count) == parity.STEPS and int(state.notfinite_count) == 0
    parity.assert_trajectories_close(got, parity.bsam_reference_trajectory(bsam_kwargs),
                                     parity.tolerance(dtype))


def test_bsam_parity_unjitted():
    _, bsam_kwargs = parity.BSAM_CASES[-1]
    got, _ = run_bsam(bsam_from_case(bsam_kwargs), "float64", parity.bsam_noise(), jit=False,
                      steps=2)
    parity.assert_trajectories_close(got, parity.bsam_reference_trajectory(bsam_kwargs)[:2],
                                     parity.tolerance("float64"))


def test_bsam_learning_rate_schedule_is_evaluated_at_the_count():
    schedule = optax.linear_schedule(0.5, 0.1, parity.STEPS - 1)
    got, _ = run_bsam(bsam(100, learning_rate=schedule), "float64", parity.bsam_noise())
    lrs = [float(schedule(t)) for t in range(parity.STEPS)]
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(0.1)
    parity.assert_trajectories_close(got, bsam_reference(dict(num_data=100), parity.bsam_noise(),
                                                         lrs), parity.tolerance("float64"))


def test_bsam_seeded_runs_are_reproducible_and_follow_the_reference():
    """The same seed gives the same run, another seed another; the draws are the documented ones.

    ``drawn_noise`` splits ``jax.random.key(seed)`` once per step and draws one standard normal
    array per leaf from the second half; the reference fed those draws is the seeded run.
    """
    first, _ = run_bsam(bsam(100, seed=7))
    again, _ = run_bsam(bsam(100, seed=7))
    other, _ = run_bsam(bsam(100, seed=8))
    parity.assert_trajectories_close(again, first, 0.0)
    assert np.max(np.abs(other[-1][0] - first[-1][0])) > 1e-6
    parity.assert_trajectories_close(first, bsam_reference(dict(num_data=100), drawn_noise(7)),
                                     parity.tolerance("float64"))


def test_bsam_noise_matters():
    """The parity test can fail: other noise gives another trajectory."""
    got, _ = run_bsam(bsam(100), "float64", drawn_noise(3))
    want = parity.bsam_reference_trajectory(dict(num_data=100))
    assert np.max(np.abs(got[-1][0] - want[-1][0])) > 1e-6


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bsam_with_lr_zero_never_moves_the_weights(jit):
    got, state = run_bsam(bsam(10, learning_rate=0.0), jit=jit, steps=4)
    for step in got:
        for w, w0 in zip(step, parity.init_params()):
            np.testing.assert_array_equal(w, w0)
    # the noise, the ascent and the precision did run: only the mean stayed put
    assert int(state.count) == 4
    assert any(np.any(np.asarray(m) != 0) for m in state.momentum)
    assert any(np.any(np.asarray(s) != 1.0) for s in state.precision)


def test_bsam_pure_functions_match_the_reference():
    params, g, g_adv = two_gradients()
    w, gn, gan = parity.init_params(), as_numpy(g), as_numpy(g_adv)
    noise = parity.bsam_noise()[0]
    s = [np.full_like(v, 1.5) + 0.1 * np.abs(n) for v, n in zip(w, noise)]
    m = [0.01 * n for n in noise]
    pairs = [
        (posterior_sample(params, as_jax(s), as_jax(noise), 50),
         ref.posterior_sample(w, s, noise, 50)),
        (bsam_perturbation(g, as_jax(s), 0.05), ref.bsam_perturbation(gn, s, 0.05)),
        (bsam_momentum(as_jax(m), g_adv, params, 0.9, 1e-3),
         ref.bsam_momentum(m, gan, w, 0.9, 1e-3)),
        (bsam_mean(params, as_jax(m), as_jax(s), 0.5), ref.bsam_mean(w, m, s, 0.5)),
        (bsam_precision(as_jax(s), g, 0.99, 0.1, 1e-3), ref.bsam_precision(s, gn, 0.99, 0.1, 1e-3)),
    ]
    for i, (got, want) in enumerate(pairs):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-15, err_msg=f"function {i}")


def test_sample_posterior_has_the_posterior_spread():
    """Many draws: mean ``w`` and standard deviation ``1/sqrt(N s)``, element by element."""
    num_data = 100
    params = as_jax(parity.init_params())
    state = bsam(num_data).init(params)
    # a precision that differs from weight to weight, so each element has its own spread
    precision = [jax.random.uniform(k, w.shape, w.dtype, 0.25, 4.0)
                 for k, w in zip(jax.random.split(jax.random.key(5), 4), params)]
    state = state._replace(precision=precision)
    keys = jax.random.split(jax.random.key(6), 20_000)
    draws = jax.jit(jax.vmap(lambda k: sample_posterior(k, params, state, num_data)))(keys)
    for d, w, s in zip(draws, params, precision):
        spread = 1.0 / np.sqrt(num_data * np.asarray(s))
        np.testing.assert_allclose(np.std(d, axis=0), spread, rtol=0.04)
        np.testing.assert_allclose(np.mean(d, axis=0), w, rtol=0, atol=0.03 * spread.max())
    # the same key gives the same draw, another key another; the mean itself is not changed
    a, b = (sample_posterior(jax.random.key(i), params, state, num_data) for i in (1, 1))
    c = sample_posterior(jax.random.key(2), params, state, num_data)
    parity.assert_trajectories_close([as_numpy(a)], [as_numpy(b)], 0.0)
    assert np.max(np.abs(np.asarray(a[0]) - np.asarray(c[0]))) > 1e-3
    parity.assert_trajectories_close([as_numpy(params)], [parity.init_params()], 0.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bsam_evaluates_grad_fn_twice_per_update(jit):
    params, _, grad_fn = problem()
    counter = [0]
    opt = bsam(100)
    update = jax.jit(opt.update, static_argnames="grad_fn") if jit else opt.update
    state = opt.init(params)
    counted = _counting(grad_fn, counter)
    for n in (1, 2, 3):
        _, state = update(None, state, params, grad_fn=counted)
        jax.effects_barrier()
        assert counter[0] == 2 * n


def test_bsam_grad_fn_sees_the_noisy_point_then_the_ascent_from_w():
    """Pass 1 at ``w + n / sqrt(N s)``, pass 2 at ``w + rho g / s`` (from w, not w_noisy)."""
    params, _, grad_fn = problem()
    calls = []

    def recorder(p):
        calls.append(p)
        return grad_fn(p)

    noise = as_jax(parity.bsam_noise()[0])
    opt = bsam(100, rho=0.05, s_init=2.0)
    opt.update(None, opt.init(params), params, grad_fn=recorder, noise=noise)
    noisy = ref.posterior_sample(parity.init_params(), [np.full_like(w, 2.0) for w in params],
                                 as_numpy(noise), 100)
    g = as_numpy(grad_fn(as_jax(noisy)))
    ascent = [w + 0.05 * gi / 2.0 for w, gi in zip(parity.init_params(), g)]
    assert len(calls) == 2
    parity.assert_trajectories_close([as_numpy(calls[0]), as_numpy(calls[1])], [noisy, ascent],
                                     1e-15)


def test_bsam_checkpoint_resume_equals_the_uninterrupted_run():
    """The key, ``m``, ``s`` and the count are all in the state: pickle it, resume, same run."""
    opt = bsam(100, learning_rate=optax.linear_schedule(0.5, 0.1, 4), seed=3)
    full, _ = run_bsam(opt, steps=5)
    head, state = run_bsam(opt, steps=2)
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    tail, _ = run_bsam(opt, steps=3, resume=(2, as_jax(head[-1]), restored))
    parity.assert_trajectories_close(head + tail, full, 0.0)


def test_bsam_state_is_a_named_tuple():
    params, _, _ = problem("float32")
    state = bsam(100, s_init=2.0, seed=4).init(params)
    assert isinstance(state, BSAMState) and isinstance(state, tuple)
    assert BSAMState._fields == ("count", "key", "momentum", "precision", "notfinite_count")
    assert int(state.count) == 0 and state.notfinite_count.dtype == jnp.int32
    assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(state.key),
                                  jax.random.key_data(jax.random.key(4)))
    for w, m, s in zip(params, state.momentum, state.precision):
        assert m.dtype == s.dtype == w.dtype == jnp.float32
        assert np.all(np.asarray(m) == 0) and np.all(np.asarray(s) == 2.0)


def test_bsam_works_on_a_dict_of_params():
    """The state and the noise follow the params' own pytree structure (here a dict, as in Flax)."""
    params, _, _ = problem()
    names = ["w1", "b1", "w2", "b2"]
    x, y = (jnp.asarray(v) for v in parity.batches()[0])
    noise = as_jax(parity.bsam_noise()[0])
    opt = bsam(100)
    as_list, _ = opt.update(None, opt.init(params), params, noise=noise,
                            grad_fn=jax.grad(lambda p: mlp_loss(p, x, y)))
    tree = dict(zip(names, params))
    as_dict, _ = opt.update(None, opt.init(tree), tree, noise=dict(zip(names, noise)),
                            grad_fn=jax.grad(lambda p: mlp_loss([p[n] for n in names], x, y)))
    for n, u in zip(names, as_list):
        np.testing.assert_array_equal(as_dict[n], u)


def test_bsam_sits_in_a_chain_with_extra_args():
    """Extra keyword arguments pass by bSAM to the transforms after it (here the loss as value=)."""
    params, _, grad_fn = problem()
    opt = optax.chain(bsam(100), optax.contrib.reduce_on_plateau())

    @jax.jit
    def update(state, params, value):
        return opt.update(None, state, params, grad_fn=grad_fn, value=value)

    updates, state = update(opt.init(params), params, jnp.asarray(0.75))
    assert float(state[1].best_value) == 0.75
    assert int(state[0].count) == 1 and all(np.all(np.isfinite(u)) for u in updates)


@pytest.mark.parametrize("where,value", [("noisy", np.nan), ("perturbed", np.inf)],
                         ids=["noisy-nan", "perturbed-inf"])
def test_bsam_non_finite_gradient_skips_the_step(where, value):
    params = as_jax(parity.init_params())
    x, y = (jnp.asarray(v) for v in parity.batches()[1])
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    opt = bsam(100)

    def step(params, state, bad):
        calls = []  # a trace-time count: pass 1 is the first call, pass 2 the second

        def g_fn(p):
            calls.append(p)
            if bad == "noisy" and len(calls) == 1:
                return poison(grad_fn(p), value)
            if bad == "noisy":  # pass 2 ignores the NaN point, so only the check of g can see it
                return grad_fn(params)
            return poison(grad_fn(p), value) if bad == "perturbed" else grad_fn(p)

        updates, state = opt.update(None, state, params, grad_fn=g_fn)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step, static_argnames="bad")
    params, state, _ = step(params, opt.init(params), None)  # a finite step fills m and s
    assert int(state.notfinite_count) == 0 and int(state.count) == 1
    new_params, new_state, updates = step(params, state, where)

    assert int(new_state.notfinite_count) == 1 and int(new_state.count) == 1
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0)
    for a, b in zip(new_params, params):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(new_state.momentum + new_state.precision, state.momentum + state.precision):
        np.testing.assert_array_equal(a, b)
    # the key still advances, so the next step draws new noise
    assert np.any(np.asarray(jax.random.key_data(new_state.key))
                  != np.asarray(jax.random.key_data(state.key)))

    # the count is a running total: a later finite step moves the weights and keeps it
    after, final, _ = step(new_params, new_state, None)
    assert int(final.notfinite_count) == 1 and int(final.count) == 2
    assert not np.allclose(after[0], new_params[0])


def test_bsam_update_refuses_grads():
    params, g, grad_fn = problem()
    opt = bsam(100)
    with pytest.raises(ValueError, match="grads must be None"):
        opt.update(g, opt.init(params), params, grad_fn=grad_fn)


@pytest.mark.parametrize("bad", [
    pytest.param(lambda n: n[:3], id="too-few-leaves"),
    pytest.param(lambda n: [n[0][:2]] + n[1:], id="wrong-shape"),
    pytest.param(lambda n: [v[..., None] for v in n], id="extra-axis"),
    pytest.param(lambda n: [v.sum() for v in n], id="scalars"),  # would broadcast silently
])
def test_bsam_noise_must_be_shaped_like_the_params(bad):
    params, _, grad_fn = problem()
    opt = bsam(100)
    noise = bad(as_jax(parity.bsam_noise()[0]))
    with pytest.raises(ValueError, match="noise must be a pytree shaped like params"):
        opt.update(None, opt.init(params), params, grad_fn=grad_fn, noise=noise)


@pytest.mark.parametrize("missing", ["grad_fn", "params"])
def test_bsam_update_without_grad_fn_or_params_names_it(missing):
    params, _, grad_fn = problem()
    opt = bsam(100)
    kwargs = dict(params=params, grad_fn=grad_fn)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=f"needs {missing}"):
        opt.update(None, opt.init(params), **kwargs)


@pytest.mark.parametrize("name,value", [
    ("num_data", 0), ("num_data", 1.5), ("num_data", True), ("num_data", "100"),
    ("learning_rate", -0.1), ("beta1", 1.0), ("beta1", -0.1), ("beta2", 1.0),
    ("beta2", float("nan")), ("weight_decay", -1e-4), ("rho", -0.05), ("rho", float("nan")),
    ("damping", -0.1), ("s_init", 0.0), ("s_init", -1.0), ("seed", 1.5), ("seed", None),
])
def test_bsam_invalid_hyperparameters_name_the_argument(name, value):
    kwargs = {"num_data": 100, name: value}
    with pytest.raises(ValueError, match=name):
        bsam(**kwargs)


# --- LookSAM -------------------------------------------------------------------------------------

def looksam_step(opt, params, state, x, y):
    """One training step: ``grads`` at w, ``grad_fn`` for the same batch."""
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state


JIT_LOOKSAM_STEP = jax.jit(looksam_step, static_argnums=0)  # compiled once per optimizer


def run_looksam(opt, dtype="float64", jit=True, steps=parity.STEPS, resume=None):
    """Weights after each step on the parity batches (cycled), and the last state.

    ``resume = (start, params, state)`` continues a run at step ``start``.
    """
    step = functools.partial(JIT_LOOKSAM_STEP if jit else looksam_step, opt)
    params = as_jax(parity.init_params(), dtype)
    start, params, state = resume or (0, params, opt.init(params))
    out = []
    for x, y in itertools.islice(itertools.cycle(parity.batches()), start, start + steps):
        params, state = step(params, state, jnp.asarray(x, dtype), jnp.asarray(y))
        out.append(as_numpy(params))
    return out, state


@parity.looksam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_looksam_parity_with_the_reference(looksam_kwargs, base_kwargs, dtype):
    got, state = run_looksam(looksam(base_sgd(**base_kwargs), **looksam_kwargs), dtype)
    assert got[-1][0].dtype == np.dtype(dtype)
    assert int(state.count) == parity.STEPS and int(state.notfinite_count) == 0
    parity.assert_trajectories_close(
        got, parity.looksam_reference_trajectory(looksam_kwargs, base_kwargs),
        parity.tolerance(dtype))


def test_looksam_parity_unjitted():
    _, looksam_kwargs, base_kwargs = parity.LOOKSAM_CASES[1]
    got, _ = run_looksam(looksam(base_sgd(**base_kwargs), **looksam_kwargs), jit=False, steps=2)
    parity.assert_trajectories_close(
        got, parity.looksam_reference_trajectory(looksam_kwargs, base_kwargs)[:2],
        parity.tolerance("float64"))


@pytest.mark.parametrize("kwargs", [
    dict(rho=0.05, momentum=0.0), dict(rho=0.05, momentum=0.9),
    dict(rho=0.5, momentum=0.9, adaptive=True),
], ids=["sgd", "momentum", "adaptive"])
def test_looksam_with_k_one_is_sam(kwargs):
    kwargs = dict(kwargs)
    base = base_sgd(0.1, kwargs.pop("momentum"))
    got, _ = run_looksam(looksam(base, k=1, alpha=0.7, **kwargs), steps=6)
    want, _ = run_looksam(sam(base, **kwargs), steps=6)
    parity.assert_trajectories_close(got, want, 1e-13)


def test_looksam_with_k_above_one_differs_from_sam():
    """The k = 1 test can fail: with cheap steps LookSAM leaves SAM's trajectory."""
    got, _ = run_looksam(looksam(base_sgd(0.1, 0.9), rho=0.05, k=2))
    want, _ = run_looksam(sam(base_sgd(0.1, 0.9), rho=0.05))
    assert np.max(np.abs(got[-1][0] - want[-1][0])) > 1e-6


@pytest.mark.parametrize("k,jit,steps", [
    (1, True, 12), (2, True, 12), (3, True, 12), (10, True, 12), (3, False, 5),
], ids=["k1-jit", "k2-jit", "k3-jit", "k10-jit", "k3-eager"])
def test_looksam_evaluates_n_plus_ceil_n_over_k_gradients(k, jit, steps):
    """The loop's own gradient every step plus ``grad_fn`` on SAM steps only (``lax.cond``)."""
    counter = [0]
    opt = looksam(base_sgd(0.1, 0.9), k=k)

    def step(params, state, x, y):
        grad_fn = _counting(jax.grad(lambda p: mlp_loss(p, x, y)), counter)
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    params = as_jax(parity.init_params())
    state = opt.init(params)
    batches = itertools.islice(itertools.cycle(parity.batches()), steps)
    for n, (x, y) in enumerate(batches, start=1):
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
        jax.effects_barrier()
        assert counter[0] == n + math.ceil(n / k), n
    assert int(state.count) == steps


def test_looksam_keeps_the_orthogonal_component_of_the_sam_step():
    """After step 0 (a SAM step) ``g_v`` is the reference's; a cheap step 1 keeps it."""
    params, g, grad_fn = problem()
    opt = looksam(optax.sgd(0.1), rho=0.1, k=2)
    _, state = opt.update(g, opt.init(params), params, grad_fn=grad_fn)
    e = ref.perturbation(as_numpy(g), parity.init_params(), 0.1)
    g_adv = grad_fn(as_jax(ref.ascend(parity.init_params(), e)))
    want = ref.orthogonal_component(as_numpy(g_adv), as_numpy(g))
    for a, b in zip(state.g_v, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    _, cheap = opt.update(g, state, params, grad_fn=grad_fn)
    for a, b in zip(cheap.g_v, state.g_v):
        np.testing.assert_array_equal(a, b)
    assert int(cheap.count) == 2


def test_looksam_pure_functions_match_the_reference():
    _, g, g_adv = two_gradients()
    g_v = orthogonal_component(g_adv, g)
    want = ref.orthogonal_component(as_numpy(g_adv), as_numpy(g))
    for a, b in zip(g_v, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    # g_v is orthogonal to g (up to the eps in the unit vector)
    assert abs(sum(float(jnp.sum(a * b)) for a, b in zip(g_adv, g))) > 1e-2
    assert abs(sum(float(jnp.sum(a * b)) for a, b in zip(g_v, g))) < 1e-10
    for a, b in zip(looksam_direction(g, g_v, 0.7),
                    ref.looksam_direction(as_numpy(g), want, 0.7)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    assert [bool(is_sam_step(jnp.asarray(t), 3)) for t in range(7)] == \
        [ref.is_sam_step(t, 3) for t in range(7)]


def test_looksam_checkpoint_resume_equals_the_uninterrupted_run():
    """``g_v``, the count and the base state are all in the state: pickle it, resume, same run."""
    opt = looksam(base_sgd(0.1, 0.9), rho=0.05, k=3)
    full, final = run_looksam(opt, steps=8)
    head, state = run_looksam(opt, steps=4)  # t = 3 was a SAM step, t = 4 and 5 are cheap
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    tail, resumed = run_looksam(opt, steps=4, resume=(4, as_jax(head[-1]), restored))
    parity.assert_trajectories_close(head + tail, full, 0.0)
    assert int(resumed.count) == int(final.count) == 8


def test_looksam_state_is_a_named_tuple_holding_the_base_state():
    params, _, _ = problem("float32")
    base = optax.sgd(0.1, momentum=0.9)
    state = looksam(base).init(params)
    assert isinstance(state, LookSAMState) and isinstance(state, tuple)
    assert LookSAMState._fields == ("base_state", "count", "g_v", "notfinite_count")
    assert jax.tree.structure(state.base_state) == jax.tree.structure(base.init(params))
    assert int(state.count) == 0 and state.notfinite_count.dtype == jnp.int32
    for v, w in zip(state.g_v, params):
        assert v.dtype == w.dtype and np.all(np.asarray(v) == 0)


@pytest.mark.parametrize("t", [0, 1], ids=["sam-step", "cheap-step"])
def test_looksam_extra_args_reach_the_base_optimizer(t):
    """A real client of extra args: reduce_on_plateau reads the loss as ``value=``."""
    params, g, grad_fn = problem()
    opt = looksam(optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau()), k=2)

    @jax.jit
    def update(g, state, params, value):
        return opt.update(g, state, params, grad_fn=grad_fn, value=value)

    state = opt.init(params)._replace(count=jnp.asarray(t))
    _, state = update(g, state, params, jnp.asarray(0.75))
    assert float(state.base_state[1].best_value) == 0.75


@pytest.mark.parametrize("where,value", [
    ("centre-cheap", np.nan), ("centre-sam", np.inf), ("perturbed-sam", np.nan),
], ids=["centre-cheap-nan", "centre-sam-inf", "perturbed-sam-nan"])
def test_looksam_non_finite_gradient_skips_the_step(where, value):
    params = as_jax(parity.init_params())
    x, y = (jnp.asarray(v) for v in parity.batches()[1])
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    opt = looksam(optax.sgd(0.1, momentum=0.9), rho=0.05, k=2)

    def step(params, state, bad):
        g, g_fn = grad_fn(params), grad_fn
        if bad.startswith("centre"):
            # a grad_fn that does not propagate the NaN of w + e, so only the check of g can see it
            g, g_fn = poison(g, value), lambda _: grad_fn(params)
        elif bad == "perturbed-sam":
            g_fn = lambda p: poison(grad_fn(p), value)  # noqa: E731
        updates, state = opt.update(g, state, params, grad_fn=g_fn)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step, static_argnames="bad")
    state = opt.init(params)
    finite_steps = 1 if where == "centre-cheap" else 2  # t = 1 is cheap, t = 2 a SAM step
    for _ in range(finite_steps):
        params, state, _ = step(params, state, "none")
    new_params, new_state, updates = step(params, state, where)

    assert int(new_state.notfinite_count) == 1 and int(new_state.count) == finite_steps
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0)
    for a, b in zip(new_params, params):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new_state.base_state) + new_state.g_v,
                    jax.tree.leaves(state.base_state) + state.g_v):
        np.testing.assert_array_equal(a, b)

    # the skipped step is retried: a SAM step refreshes g_v, a cheap one keeps it
    after, final, _ = step(new_params, new_state, "none")
    assert int(final.notfinite_count) == 1 and int(final.count) == finite_steps + 1
    assert not np.allclose(after[0], new_params[0])
    refreshed = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(final.g_v, state.g_v))
    assert refreshed == where.endswith("sam")


@pytest.mark.parametrize("name,value", [
    ("rho", -0.1), ("rho", float("nan")), ("k", 0), ("k", -1), ("k", 1.5), ("k", True),
    ("alpha", -0.7), ("alpha", float("nan")), ("perturb_eps", -1e-12),
])
def test_looksam_invalid_hyperparameters_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        looksam(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize("missing", ["grad_fn", "params"])
def test_looksam_update_without_grad_fn_or_params_names_it(missing):
    params, g, grad_fn = problem()
    opt = looksam(optax.sgd(0.1))
    kwargs = dict(params=params, grad_fn=grad_fn)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=f"needs {missing}"):
        opt.update(g, opt.init(params), **kwargs)
