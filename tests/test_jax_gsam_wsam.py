"""JAX/optax GSAM and WSAM against the NumPy reference, against SAM, and their edge cases."""

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
    GSAMState,
    WSAMState,
    clip_by_global_norm,
    decompose,
    gsam,
    gsam_direction,
    gsam_perturbation,
    lr_proportional_rho,
    sam,
    sharpness_weight,
    wsam,
    wsam_direction,
)


def run(opt, dtype, jit=True):
    """Weights after each of ``parity.STEPS`` steps on ``parity.batches()``, and the last state."""
    def step(params, state, x, y):
        grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    params = as_jax(parity.init_params(), dtype)
    state = opt.init(params)
    out = []
    for x, y in parity.batches():
        params, state = step(params, state, jnp.asarray(x, dtype), jnp.asarray(y))
        out.append(as_numpy(params))
    return out, state


def linear_rho():
    return optax.linear_schedule(**parity.RHO_SCHEDULE)


def gsam_from_case(gsam_kwargs, base_kwargs):
    kwargs = dict(gsam_kwargs)
    if kwargs["rho"] == "linear":
        kwargs["rho"] = linear_rho()
    return gsam(base_sgd(**base_kwargs), **kwargs)


def wsam_from_case(wsam_kwargs, base_kwargs):
    return wsam(base_sgd(**base_kwargs), learning_rate=base_kwargs["lr"], **wsam_kwargs)


# --- parity with the reference ------------------------------------------------------------------

def test_linear_schedule_is_the_parity_schedule():
    """``optax.linear_schedule(**RHO_SCHEDULE)`` at ``count = t`` is ``parity.linear_rho(t)``.

    The count is JAX's default integer (int64 here), so the schedule evaluates in float64; an
    int32 count would give float32 values, off by about 1e-9.
    """
    params, _, _ = problem()
    count = gsam(optax.sgd(0.1), linear_rho()).init(params).count
    assert count.dtype == jnp.int64
    for t in range(parity.STEPS + 2):
        value = linear_rho()(count + t)
        assert value.dtype == jnp.float64
        assert abs(float(value) - parity.linear_rho(t)) < 1e-15, t


@parity.gsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gsam_parity_with_the_reference(gsam_kwargs, base_kwargs, dtype):
    got, state = run(gsam_from_case(gsam_kwargs, base_kwargs), dtype)
    assert got[-1][0].dtype == np.dtype(dtype)
    assert int(state.count) == parity.STEPS and int(state.notfinite_count) == 0
    parity.assert_trajectories_close(
        got, parity.gsam_reference_trajectory(gsam_kwargs, base_kwargs), parity.tolerance(dtype))


@parity.wsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_wsam_parity_with_the_reference(wsam_kwargs, base_kwargs, dtype):
    got, state = run(wsam_from_case(wsam_kwargs, base_kwargs), dtype)
    assert got[-1][0].dtype == np.dtype(dtype)
    assert int(state.count) == parity.STEPS and int(state.notfinite_count) == 0
    parity.assert_trajectories_close(
        got, parity.wsam_reference_trajectory(wsam_kwargs, base_kwargs), parity.tolerance(dtype))


def test_parity_unjitted():
    (_, g_kwargs, g_base), (_, w_kwargs, w_base) = parity.GSAM_CASES[1], parity.WSAM_CASES[-1]
    got, _ = run(gsam_from_case(g_kwargs, g_base), "float64", jit=False)
    parity.assert_trajectories_close(got, parity.gsam_reference_trajectory(g_kwargs, g_base),
                                     parity.tolerance("float64"))
    got, _ = run(wsam_from_case(w_kwargs, w_base), "float64", jit=False)
    parity.assert_trajectories_close(got, parity.wsam_reference_trajectory(w_kwargs, w_base),
                                     parity.tolerance("float64"))


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
def test_wsam_learning_rate_schedule_is_evaluated_at_the_count(decouple):
    """The base and WSAM share one lr schedule; the reference gets ``lr_t`` step by step.

    optax's own schedules count in int32 and so evaluate in float32 even under x64: the values
    here (0.25 down to 0.125 in steps of 1/32) are exact in float32, so the base's lr is exact.
    """
    schedule = optax.linear_schedule(0.25, 0.125, parity.STEPS - 1)
    kwargs = dict(rho=0.05, gamma=0.8, decouple=decouple, max_norm=None, adaptive=False)
    got, _ = run(wsam(optax.sgd(schedule, momentum=0.9), schedule, **kwargs), "float64")

    params, want = parity.init_params(), []
    buffers = ref.sgd_init(params)
    for t, (x, y) in enumerate(parity.batches()):
        lr = float(schedule(t))

        def base_update(w, d, lr=lr):
            nonlocal buffers
            new, buffers = ref.sgd_update(w, d, buffers, lr=lr, momentum=0.9)
            return new

        params = ref.wsam_step(params, lambda w: ref.mlp_loss_and_grad(w, x, y)[1], base_update,
                               lr=lr, **kwargs)
        want.append(params)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))


# --- special cases: SAM and the base optimizer ---------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gsam_with_alpha_zero_and_constant_rho_is_sam(momentum):
    got, _ = run(gsam(base_sgd(0.1, momentum), rho=0.05, alpha=0.0), "float64")
    want, _ = run(sam(base_sgd(0.1, momentum), rho=0.05), "float64")
    parity.assert_trajectories_close(got, want, 1e-13)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_wsam_with_gamma_half_coupled_is_sam(momentum):
    got, _ = run(wsam(base_sgd(0.1, momentum), None, rho=0.05, gamma=0.5, decouple=False),
                 "float64")
    want, _ = run(sam(base_sgd(0.1, momentum), rho=0.05), "float64")
    parity.assert_trajectories_close(got, want, 1e-13)


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
def test_wsam_with_gamma_zero_is_the_base_optimizer(decouple):
    got, _ = run(wsam(base_sgd(0.1, 0.9), 0.1, rho=0.05, gamma=0.0, decouple=decouple),
                 "float64")
    params, want = as_jax(parity.init_params(), "float64"), []
    base = base_sgd(0.1, 0.9)
    state = base.init(params)
    for x, y in parity.batches():
        updates, state = base.update(jax.grad(mlp_loss)(params, jnp.asarray(x), jnp.asarray(y)),
                                     state, params)
        params = optax.apply_updates(params, updates)
        want.append(as_numpy(params))
    parity.assert_trajectories_close(got, want, 1e-13)


def test_gsam_and_wsam_differ_from_sam():
    """The special-case tests above can fail: away from them, both leave SAM's trajectory."""
    sam_traj, _ = run(sam(base_sgd(0.1, 0.9), rho=0.05), "float64")
    for opt in (gsam(base_sgd(0.1, 0.9), rho=0.05, alpha=0.4),
                wsam(base_sgd(0.1, 0.9), None, rho=0.05, gamma=0.9, decouple=False),
                wsam(base_sgd(0.1, 0.9), 0.1, rho=0.05, gamma=0.5, decouple=True)):
        got, _ = run(opt, "float64")
        assert np.max(np.abs(got[-1][0] - sam_traj[-1][0])) > 1e-6


@pytest.mark.parametrize("rho_min", [0.0, 0.01])
def test_lr_proportional_rho_matches_the_reference(rho_min):
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10, end_value=0.01)
    rho = lr_proportional_rho(lr, lr_max=0.1, lr_min=0.01, rho_max=0.05, rho_min=rho_min)
    for t in range(12):
        want = ref.lr_proportional_rho(float(lr(t)), 0.1, 0.01, 0.05, rho_min)
        assert abs(float(rho(jnp.asarray(t))) - want) < 1e-15, t
    # warm-up from lr = 0 < lr_min: rho_min (0.01) + 0.04 * (-1/9) > 0; 0.05 * (-1/9) clamped
    assert float(rho(jnp.asarray(0))) == pytest.approx(max(0.0, rho_min - (0.05 - rho_min) / 9))
    with pytest.raises(ValueError, match="lr_max and lr_min"):
        lr_proportional_rho(lr, 0.1, 0.1, 0.05)


# --- the pure functions against the reference ----------------------------------------------------

@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_perturbation_matches_the_reference(adaptive):
    params, g, _ = two_gradients()
    got = gsam_perturbation(g, params, 0.5, adaptive)
    want = ref.gsam_perturbation(as_numpy(g), parity.init_params(), 0.5, adaptive)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


def test_decompose_and_gsam_direction_match_the_reference():
    _, g, g_adv = two_gradients()
    g_par, g_perp = decompose(g, g_adv)
    want_par, want_perp = ref.decompose(as_numpy(g), as_numpy(g_adv))
    for a, b in zip(g_par + g_perp, want_par + want_perp):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    # g_perp is orthogonal to g_adv (up to the eps in the unit vector, about 1e-12 here)
    assert abs(sum(float(jnp.sum(g * a)) for g, a in zip(g, g_adv))) > 1e-2
    assert abs(sum(float(jnp.sum(p * a)) for p, a in zip(g_perp, g_adv))) < 1e-10
    for a, b in zip(gsam_direction(g, g_adv, 0.4), ref.gsam_direction(as_numpy(g),
                                                                       as_numpy(g_adv), 0.4)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("max_norm", [0.01, 100.0], ids=["clips", "keeps"])
def test_clip_and_wsam_direction_match_the_reference(max_norm):
    _, g, g_adv = two_gradients()
    for a, b in zip(clip_by_global_norm(g_adv, max_norm),
                    ref.clip_by_global_norm(as_numpy(g_adv), max_norm)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    a = sharpness_weight(0.7)
    assert a == ref.sharpness_weight(0.7)
    for x, y in zip(wsam_direction(g, g_adv, a),
                    ref.wsam_direction(as_numpy(g), as_numpy(g_adv), a)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-15)


def test_clip_is_torchs_formula_not_optax():
    """``min(1, max_norm / (||g|| + 1e-6))`` differs from optax's ``max_norm / ||g||``."""
    g = [jnp.asarray([3.0, 4.0])]  # norm 5
    ours = clip_by_global_norm(g, 1.0)[0]
    np.testing.assert_allclose(ours, np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-15)
    theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert not np.allclose(ours, theirs[0], rtol=0, atol=1e-9)


# --- rho schedules and zero perturbations --------------------------------------------------------

def _perturbation_as_update(params):
    """``grad_fn`` and base under which a GSAM update with ``alpha=0`` *is* ``e``, under jit.

    ``grad_fn(w + e)`` returns ``e``, ``d = g_adv - 0 * g_perp = e``, and ``optax.identity()``
    hands it back as the update.
    """
    return (lambda p: jax.tree.map(lambda a, b: a - b, p, params)), optax.identity()


@pytest.mark.parametrize("rho,nonzero", [
    pytest.param(lambda count: -0.1 + 0.0 * count, False, id="negative-schedule"),
    pytest.param(lambda count: 0.1 + 0.0 * count, True, id="positive-schedule"),
    pytest.param(0.1, True, id="constant"),
])
def test_gsam_rho_schedule_is_clamped_at_zero(rho, nonzero):
    params, g, _ = problem()
    e_fn, identity = _perturbation_as_update(params)
    opt = gsam(identity, rho, alpha=0.0)
    e, state = jax.jit(opt.update, static_argnames="grad_fn")(g, opt.init(params), params,
                                                              grad_fn=e_fn)
    if nonzero:
        want = ref.sam_perturbation(as_numpy(g), 0.1)
        for a, b in zip(e, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)
    else:
        for ei in jax.tree.leaves(e):
            assert np.all(np.asarray(ei) == 0)
    assert int(state.count) == 1


def test_gsam_rho_schedule_reads_the_count():
    """Step t uses ``rho(t)``: two steps of a schedule ``0.1, 0.3`` perturb by those radii."""
    params, g, _ = problem()
    e_fn, identity = _perturbation_as_update(params)
    opt = gsam(identity, lambda count: 0.1 + 0.2 * count, alpha=0.0)
    update = jax.jit(opt.update, static_argnames="grad_fn")
    state = opt.init(params)
    for rho in (0.1, 0.3):
        e, state = update(g, state, params, grad_fn=e_fn)
        np.testing.assert_allclose(float(jnp.sqrt(sum(jnp.sum(v * v) for v in e))), rho,
                                   rtol=1e-10)


@pytest.mark.parametrize("opt_name", ["gsam", "wsam"])
def test_zero_gradient_gives_zero_perturbation(opt_name):
    """A zero ``g`` gives ``e = 0`` and finite updates (never a NaN from 0 / 0)."""
    params, _, _ = problem()
    zeros = jax.tree.map(jnp.zeros_like, params)
    calls = []

    def grad_fn(p):
        calls.append(p)
        return zeros

    opt = (gsam(optax.sgd(0.1), 0.05, adaptive=True) if opt_name == "gsam"
           else wsam(optax.sgd(0.1), 0.1, 0.05, adaptive=True))
    updates, state = opt.update(zeros, opt.init(params), params, grad_fn=grad_fn)
    for p, w in zip(calls[0], params):
        np.testing.assert_array_equal(p, w)
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0)
    assert int(state.notfinite_count) == 0


# --- conventions shared with sam: grad_fn once, skip-and-count, state, extra args ----------------

OPTIMIZERS = {
    "gsam": lambda: gsam(optax.sgd(0.1, momentum=0.9), linear_rho(), alpha=0.4),
    "gsam-adaptive": lambda: gsam(optax.sgd(0.1, momentum=0.9), 0.5, alpha=0.2, adaptive=True),
    "wsam-decoupled": lambda: wsam(optax.sgd(0.1, momentum=0.9), 0.1, gamma=0.9, max_norm=0.3),
    "wsam-coupled": lambda: wsam(optax.sgd(0.1, momentum=0.9), None, gamma=0.9, decouple=False),
}
optimizers = pytest.mark.parametrize("name", list(OPTIMIZERS))


@optimizers
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_fn_is_called_once_per_update(name, jit):
    params, g, grad_fn = problem()
    calls = []

    def recorder(p):
        calls.append(p)
        return grad_fn(p)

    opt = OPTIMIZERS[name]()
    update = jax.jit(opt.update, static_argnames="grad_fn") if jit else opt.update
    state = opt.init(params)
    for n in (1, 2):
        _, state = update(g, state, params, grad_fn=recorder)
        # under jit the function is traced once and the second call reuses the trace
        assert len(calls) == (1 if jit else n)


@optimizers
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["centre", "perturbed"])
def test_non_finite_gradient_skips_the_step(name, where, value):
    params = as_jax(parity.init_params(), "float64")
    x, y = (jnp.asarray(v) for v in parity.batches()[1])
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    opt = OPTIMIZERS[name]()

    def step(params, state, bad):
        g, g_fn = grad_fn(params), grad_fn
        if bad == "centre":
            # a grad_fn that does not propagate the NaN of w + e, so only the check of g can see it
            g, g_fn = poison(g, value), lambda _: grad_fn(params)
        elif bad == "perturbed":
            g_fn = lambda p: poison(grad_fn(p), value)  # noqa: E731
        updates, state = opt.update(g, state, params, grad_fn=g_fn)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step, static_argnames="bad")
    params, state, _ = step(params, opt.init(params), None)  # a finite step fills the momentum
    assert int(state.notfinite_count) == 0 and int(state.count) == 1
    new_params, new_state, updates = step(params, state, where)

    assert int(new_state.notfinite_count) == 1
    assert int(new_state.count) == 1  # a skipped update does not advance the schedules
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0)
    for a, b in zip(new_params, params):
        np.testing.assert_array_equal(a, b)
    momentum = jax.tree.leaves(state.base_state)
    assert any(np.any(np.asarray(m) != 0) for m in momentum)
    for a, b in zip(jax.tree.leaves(new_state.base_state), momentum):
        np.testing.assert_array_equal(a, b)

    # the count is a running total: a later finite step moves the weights and keeps it
    after, final, _ = step(new_params, new_state, None)
    assert int(final.notfinite_count) == 1 and int(final.count) == 2
    assert not np.allclose(after[0], new_params[0])


@optimizers
def test_state_is_a_named_tuple_holding_the_base_state(name):
    params, _, _ = problem()
    state = OPTIMIZERS[name]().init(params)
    assert isinstance(state, GSAMState if name.startswith("gsam") else WSAMState)
    base_state = optax.sgd(0.1, momentum=0.9).init(params)
    assert jax.tree.structure(state.base_state) == jax.tree.structure(base_state)
    assert state.notfinite_count.dtype == jnp.int32 and int(state.count) == 0


@pytest.mark.parametrize("opt_name", ["gsam", "wsam-decoupled", "wsam-coupled"])
def test_extra_args_reach_the_base_optimizer(opt_name):
    """A real client of extra args: reduce_on_plateau reads the loss as ``value=``."""
    params, g, grad_fn = problem()
    base = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau())
    opt = {"gsam": lambda: gsam(base),
           "wsam-decoupled": lambda: wsam(base, 0.1),
           "wsam-coupled": lambda: wsam(base, None, decouple=False)}[opt_name]()

    @jax.jit
    def update(g, state, params, value):
        return opt.update(g, state, params, grad_fn=grad_fn, value=value)

    _, state = update(g, opt.init(params), params, jnp.asarray(0.75))
    assert float(state.base_state[1].best_value) == 0.75


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("rho", -0.1), ("rho", float("nan")), ("alpha", -0.4), ("perturb_eps", -1e-12),
])
def test_gsam_invalid_hyperparameters_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        gsam(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize("name,value", [
    ("rho", -0.1), ("gamma", -0.1), ("gamma", 1.0), ("gamma", float("nan")), ("max_norm", 0.0),
    ("max_norm", -1.0), ("perturb_eps", -1e-12), ("learning_rate", None),
])
def test_wsam_invalid_hyperparameters_name_the_argument(name, value):
    kwargs = {"learning_rate": 0.1, name: value}
    with pytest.raises(ValueError, match=name):
        wsam(optax.sgd(0.1), **kwargs)


def test_wsam_coupled_needs_no_learning_rate():
    params, g, grad_fn = problem()
    opt = wsam(optax.sgd(0.1), None, decouple=False)
    updates, _ = opt.update(g, opt.init(params), params, grad_fn=grad_fn)
    assert all(np.all(np.isfinite(u)) for u in updates)


@pytest.mark.parametrize("opt_name", ["gsam", "wsam"])
@pytest.mark.parametrize("missing", ["grad_fn", "params"])
def test_update_without_grad_fn_or_params_names_it(opt_name, missing):
    params, g, grad_fn = problem()
    opt = gsam(optax.sgd(0.1)) if opt_name == "gsam" else wsam(optax.sgd(0.1), 0.1)
    kwargs = dict(params=params, grad_fn=grad_fn)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=f"needs {missing}"):
        opt.update(g, opt.init(params), **kwargs)
