"""JAX/optax SAM and ASAM against the NumPy reference, optax.contrib.sam, and their edge cases."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)  # float32 tests below use explicit float32 arrays

import jax.numpy as jnp  # noqa: E402

import parity  # noqa: E402
from jax_helpers import (  # noqa: E402
    as_jax,
    base_sgd,
    mlp_loss,
    poison,
    problem,
)
from sam_edu import reference as ref  # noqa: E402
from sam_edu.jax import (  # noqa: E402
    SAMState,
    keep_finite,
    perturbation,
    perturbation_norm,
    sam,
    skip_unless_finite,
)


def make_step(opt, jit=True):
    """One training step with our ``sam``: ``grads`` at w, ``grad_fn`` for the same batch."""
    def step(params, state, x, y):
        grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state
    return jax.jit(step) if jit else step


def run(opt, dtype, jit=True):
    """Weights after each of ``parity.STEPS`` steps on ``parity.batches()``."""
    params = as_jax(parity.init_params(), dtype)
    state = opt.init(params)
    step = make_step(opt, jit)
    out = []
    for x, y in parity.batches():
        params, state = step(params, state, jnp.asarray(x, dtype), jnp.asarray(y))
        out.append([np.asarray(v) for v in params])
    return out


@parity.case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_with_the_reference(sam_kwargs, base_kwargs, dtype):
    got = run(sam(base_sgd(**base_kwargs), **sam_kwargs), dtype)
    assert got[-1][0].dtype == np.dtype(dtype)
    parity.assert_trajectories_close(got, parity.reference_trajectory(sam_kwargs, base_kwargs),
                                     parity.tolerance(dtype))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_parity_with_weight_decay_at_the_original_weights(momentum):
    """Weight decay reads ``params``: the base must step at ``w``, not at ``w + e``.

    ``optax.sgd`` alone never reads ``params``, so only a base that does (here
    ``add_decayed_weights``, the reference's ``weight_decay``) can tell the two points apart.
    """
    sam_kwargs = dict(rho=0.05, adaptive=False, eta=0.0)
    base_kwargs = dict(lr=0.1, momentum=momentum, weight_decay=0.05)
    base = optax.chain(optax.add_decayed_weights(base_kwargs["weight_decay"]),
                       base_sgd(base_kwargs["lr"], momentum))
    got = run(sam(base, **sam_kwargs), "float64")
    parity.assert_trajectories_close(got, parity.reference_trajectory(sam_kwargs, base_kwargs),
                                     parity.tolerance("float64"))


def test_parity_unjitted():
    _, sam_kwargs, base_kwargs = parity.CASES[-1]  # ASAM with eta and momentum: every path
    got = run(sam(base_sgd(**base_kwargs), **sam_kwargs), "float64", jit=False)
    parity.assert_trajectories_close(got, parity.reference_trajectory(sam_kwargs, base_kwargs),
                                     parity.tolerance("float64"))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_optax_contrib_sam(momentum):
    """optax's drop-in SAM: an outer optimizer and one normalized-SGD ascent step (opaque mode).

    Its ``normalize()`` divides by ``||g||`` with no epsilon, ours by ``||g|| + 1e-12``: the two
    perturbations differ by a relative 1e-12 / ||g|| (||g|| is about 0.3 here), and the weights
    agree to about 1e-14, far inside the float64 tolerance of 1e-10; a rho off by 20% already
    moves them by more than 5e-4.
    """
    lr, rho = 0.1, 0.05
    peer = optax.contrib.sam(
        base_sgd(lr, momentum),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )

    @jax.jit
    def peer_step(params, state, x, y):
        loss = lambda p: mlp_loss(p, x, y)  # noqa: E731
        updates, state = peer.update(jax.grad(loss)(params), state, params,
                                     grad_fn=lambda p, _: jax.grad(loss)(p))
        return optax.apply_updates(params, updates), state

    params = as_jax(parity.init_params(), "float64")
    state = peer.init(params)
    want = []
    for x, y in parity.batches():
        params, state = peer_step(params, state, jnp.asarray(x), jnp.asarray(y))
        want.append([np.asarray(v) for v in params])
    got = run(sam(base_sgd(lr, momentum), rho), "float64")
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))


def _recording(grad_fn):
    """``grad_fn`` that records every point it is called at (a Python side effect)."""
    calls = []

    def wrapped(p):
        calls.append(p)
        return grad_fn(p)

    return wrapped, calls


FLAGS = [True, False, True, False]  # scale the weight matrices, not the biases


@pytest.mark.parametrize("adaptive", [
    pytest.param(FLAGS, id="pytree"),
    pytest.param(lambda p: jax.tree.map(lambda w: w.ndim > 1, p), id="callable"),
    pytest.param(True, id="all"),
    pytest.param(False, id="none"),
])
def test_asam_mask_matches_the_reference(adaptive):
    rho, eta = 0.5, 0.01
    params, g, grad_fn = problem()
    flags = adaptive if isinstance(adaptive, bool) else FLAGS
    want = ref.perturbation([np.asarray(v) for v in g], parity.init_params(), rho,
                            adaptive=flags, eta=eta)

    recorder, calls = _recording(grad_fn)
    opt = sam(optax.sgd(0.1), rho, adaptive=adaptive, eta=eta)
    opt.update(g, opt.init(params), params, grad_fn=recorder)
    e_update = [p - w for p, w in zip(calls[0], params)]
    e_pure = perturbation(g, params, rho, adaptive, eta)
    for i, (a, b, w) in enumerate(zip(e_update, e_pure, want)):
        np.testing.assert_allclose(a, w, rtol=0, atol=1e-12, err_msg=f"update, tensor {i}")
        np.testing.assert_allclose(b, w, rtol=0, atol=1e-14, err_msg=f"pure, tensor {i}")


def test_asam_mask_on_a_dict_of_params():
    """Masks follow the params' own pytree structure (here a dict, as in Flax)."""
    params, g, _ = problem()
    names = ["w1", "b1", "w2", "b2"]
    tree, grads = dict(zip(names, params)), dict(zip(names, g))
    mask = {n: n.startswith("w") for n in names}
    e = perturbation(grads, tree, 0.5, mask, 0.01)
    want = ref.perturbation([np.asarray(v) for v in g], parity.init_params(), 0.5,
                            adaptive=FLAGS, eta=0.01)
    for n, w in zip(names, want):
        np.testing.assert_allclose(e[n], w, rtol=0, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_fn_is_called_once_per_update(jit):
    params, g, grad_fn = problem()
    recorder, calls = _recording(grad_fn)
    opt = sam(optax.sgd(0.1, momentum=0.9), 0.05)
    update = jax.jit(opt.update, static_argnames="grad_fn") if jit else opt.update
    state = opt.init(params)
    for n in (1, 2):
        _, state = update(g, state, params, grad_fn=recorder)
        # under jit the function is traced once and the second call reuses the trace
        assert len(calls) == (1 if jit else n)


@pytest.mark.parametrize("sam_kwargs", [dict(rho=0.05), dict(rho=0.5, adaptive=True)],
                         ids=["sam", "asam"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["centre", "perturbed"])
def test_non_finite_gradient_skips_the_step(where, value, sam_kwargs):
    """The check of ``g`` goes through ``||T g||`` (ASAM's norm too), that of ``g_adv`` through
    ``||g_adv||``; a skipped step selects the old state leaf by leaf (``jnp.where``)."""
    params = as_jax(parity.init_params(), "float64")
    x, y = (jnp.asarray(v) for v in parity.batches()[1])
    grad_fn = jax.grad(lambda p: mlp_loss(p, x, y))
    opt = sam(optax.sgd(0.1, momentum=0.9), **sam_kwargs)

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
    assert int(state.notfinite_count) == 0
    new_params, new_state, updates = step(params, state, where)

    assert int(new_state.notfinite_count) == 1
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
    assert int(final.notfinite_count) == 1
    assert not np.allclose(after[0], new_params[0])


@pytest.mark.parametrize("adaptive", [False, True, FLAGS], ids=["sam", "asam", "masked"])
def test_perturbation_with_a_precomputed_norm_is_the_same(adaptive):
    """``sam`` computes ``||T g||`` once, for its check and for ``e``: the same ``e``."""
    params, g, _ = problem()
    norm = perturbation_norm(g, params, adaptive, 0.01)
    t_g = [np.asarray(v) * (np.abs(np.asarray(w)) + 0.01 if a else 1.0)
           for v, w, a in zip(g, params, FLAGS if adaptive is FLAGS else [adaptive] * 4)]
    np.testing.assert_allclose(norm, np.sqrt(sum(np.sum(v * v) for v in t_g)), rtol=1e-12)
    for a, b in zip(perturbation(g, params, 0.5, adaptive, 0.01, norm=norm),
                    perturbation(g, params, 0.5, adaptive, 0.01)):
        np.testing.assert_array_equal(a, b)


def test_keep_finite_selects_without_leaking_nan():
    """``skip_unless_finite``: zero updates and the old state when not finite, no NaN leaks."""
    new = [jnp.array([np.nan, 1.0]), jnp.array([np.inf])]
    old = [jnp.array([2.0, 3.0]), jnp.array([4.0])]
    updates, state = skip_unless_finite(jnp.asarray(False), new, new, old)
    assert all(np.all(np.asarray(u) == 0) for u in updates)
    for a, b in zip(state, old):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(keep_finite(jnp.asarray(True), new, old), new):
        np.testing.assert_array_equal(a, b)


def test_skip_unless_finite_under_vmap_selects_per_example():
    """A batched ``finite`` (``vmap`` turns the state's ``cond`` into a select) picks per row."""
    finite = jnp.asarray([True, False])
    new = {"m": jnp.asarray([[1.0, 2.0], [np.nan, 5.0]])}
    old = {"m": jnp.asarray([[7.0, 8.0], [9.0, 10.0]])}
    updates, state = jax.vmap(skip_unless_finite)(finite, new, new, old)
    np.testing.assert_array_equal(updates["m"], [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(state["m"], [[1.0, 2.0], [9.0, 10.0]])


def _momentum_sam_step(n, **sam_kwargs):
    """A jittable SAM step (SGD with momentum) on a two-layer net of width ``n``, and its inputs."""
    params = {"w1": jnp.ones((n, n), jnp.float32) / n, "w2": jnp.ones((n, 4), jnp.float32) / n}
    opt = sam(optax.sgd(0.1, momentum=0.9), **{"rho": 0.05, **sam_kwargs})

    def step(p, state, x):
        grad_fn = jax.grad(lambda q: jnp.mean((jnp.tanh(x @ q["w1"]) @ q["w2"]) ** 2))
        updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state
    return step, (params, opt.init(params), jnp.ones((8, n), jnp.float32))


def test_base_step_is_outside_the_state_selection():
    """The ``cond`` that keeps or drops the new state only passes buffers through.

    The base step's arithmetic stays outside it, where XLA fuses it with ``apply_updates``.
    """
    step, args = _momentum_sam_step(16)
    conds = [e for e in jax.make_jaxpr(step)(*args).jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    assert all(len(branch.jaxpr.eqns) == 0 for branch in conds[0].params["branches"])


def test_jitted_step_does_not_copy_the_donated_state_first():
    """XLA:CPU does not copy the old momentum before the step it will overwrite.

    Selected with ``jnp.where``, the state was copied first (21 MB per step on the benchmark's
    MLP); now the only copy is the taken branch's, of the new state into place.
    """
    step, args = _momentum_sam_step(64)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()
    entry = hlo.split("ENTRY")[1]
    assert " copy(" not in entry, [line for line in entry.splitlines() if " copy(" in line]


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_step_writes_no_weight_sized_buffer_beyond_sams(eta):
    """XLA:CPU's scratch for an ASAM step is SAM's: ``|w| + eta`` is not written out for the norm.

    Written as ``sum ((|w| + eta) g)^2``, the broadcast ``eta`` kept the sum from fusing, and
    ``|w| + eta`` was computed before pass 1 into a buffer the size of the weights, held until
    the norm (on the benchmark's MLP it took the scratch past glibc's 32 MiB mmap threshold).
    """
    n = 512

    def scratch(**kwargs):
        step, args = _momentum_sam_step(n, **kwargs)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    w1_bytes = n * n * 4
    assert scratch(rho=0.5, adaptive=True, eta=eta) < scratch() + w1_bytes // 2


def _perturbation_as_update(params):
    """``grad_fn`` and base under which the update *is* ``e``, observable under jit.

    ``grad_fn(w + e)`` returns ``e`` and ``optax.identity()`` hands it back as the update.
    """
    return (lambda p: jax.tree.map(lambda a, b: a - b, p, params)), optax.identity()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sam_kwargs", [
    dict(rho=0.05),
    dict(rho=0.5, adaptive=True, eta=0.01),
    dict(rho=0.5, adaptive=FLAGS, eta=0.0),
], ids=["sam", "asam", "masked"])
def test_zero_gradient_gives_zero_perturbation(sam_kwargs, jit):
    params, _, _ = problem()
    zeros = jax.tree.map(jnp.zeros_like, params)
    e_fn, identity = _perturbation_as_update(params)
    opt = sam(identity, **sam_kwargs)
    update = jax.jit(opt.update, static_argnames="grad_fn") if jit else opt.update
    e, state = update(zeros, opt.init(params), params, grad_fn=e_fn)
    for ei in jax.tree.leaves(e):
        assert np.all(np.isfinite(ei)) and np.all(np.asarray(ei) == 0)
    assert int(state.notfinite_count) == 0


def test_perturbation_as_update_sees_a_nonzero_perturbation():
    """The observation trick of the zero-gradient test can tell a non-zero ``e`` from zero."""
    params, g, _ = problem()
    e_fn, identity = _perturbation_as_update(params)
    opt = sam(identity, 0.05)
    e, _ = jax.jit(opt.update, static_argnames="grad_fn")(g, opt.init(params), params,
                                                          grad_fn=e_fn)
    want = ref.sam_perturbation([np.asarray(v) for v in g], 0.05)
    for a, b in zip(e, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_state_is_a_named_tuple_holding_the_base_state():
    params, _, _ = problem()
    base = optax.sgd(0.1, momentum=0.9)
    state = sam(base, 0.05).init(params)
    assert isinstance(state, SAMState) and isinstance(state, tuple)
    assert jax.tree.structure(state.base_state) == jax.tree.structure(base.init(params))
    assert state.notfinite_count.dtype == jnp.int32


def test_extra_args_reach_the_base_optimizer():
    """A real client of extra args: reduce_on_plateau reads the loss as ``value=``."""
    params, g, grad_fn = problem()
    opt = sam(optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau()), 0.05)

    @jax.jit
    def update(g, state, params, value):
        return opt.update(g, state, params, grad_fn=grad_fn, value=value)

    _, state = update(g, opt.init(params), params, jnp.asarray(0.75))
    assert float(state.base_state[1].best_value) == 0.75


def test_base_without_extra_args_ignores_them():
    params, g, grad_fn = problem()
    opt = sam(optax.sgd(0.1), 0.05)
    plain, _ = opt.update(g, opt.init(params), params, grad_fn=grad_fn)
    extra, _ = opt.update(g, opt.init(params), params, grad_fn=grad_fn, value=1.0)
    for a, b in zip(plain, extra):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,value", [
    ("rho", -0.1), ("rho", float("nan")), ("eta", -0.01), ("perturb_eps", -1e-12),
])
def test_invalid_hyperparameters_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        sam(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize("missing", ["grad_fn", "params"])
def test_update_without_grad_fn_or_params_names_it(missing):
    params, g, grad_fn = problem()
    opt = sam(optax.sgd(0.1))
    kwargs = dict(params=params, grad_fn=grad_fn)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=f"needs {missing}"):
        opt.update(g, opt.init(params), **kwargs)


def test_adaptive_mask_must_match_the_params():
    params, g, grad_fn = problem()
    opt = sam(optax.sgd(0.1), 0.5, adaptive=[True, False])
    with pytest.raises(ValueError, match="adaptive"):
        opt.update(g, opt.init(params), params, grad_fn=grad_fn)
