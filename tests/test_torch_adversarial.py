"""sam_edu.torch.AdversarialSAM: optax.contrib.sam's inner/outer formulation in PyTorch.

optax.contrib.sam (the installed one) is the peer: on the two-basin problem of its notebook, in
float64, every call of both modes must match it, where it is right. Where it is not (a zero
gradient, transparent mode with sync_period=1) the tests pin our behaviour and optax's.
"""

import functools
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adversarial_peer  # noqa: E402
from sam_edu import reference as ref  # noqa: E402
from sam_edu.torch import AdversarialSAM  # noqa: E402

START = (-0.4, -0.4)  # the notebook's starting point
SGD, Adam = torch.optim.SGD, torch.optim.Adam
P = functools.partial

# name: (torch outer, torch adversarial, optax outer, optax adversarial (before normalize), k)
CASES = {
    "drop-in-sam": (P(SGD, lr=0.01), P(SGD, lr=0.1),
                    lambda o: o.sgd(0.01), lambda o: o.sgd(0.1), 2),
    "sam-momentum": (P(SGD, lr=0.01, momentum=0.9), P(SGD, lr=0.1),
                     lambda o: o.sgd(0.01, momentum=0.9), lambda o: o.sgd(0.1), 2),
    "sam-adam": (P(Adam, lr=1e-3), P(Adam, lr=0.03),
                 lambda o: o.adam(1e-3), lambda o: o.adam(0.03), 5),
    "momentum-inside-k3": (P(SGD, lr=0.05, momentum=0.5), P(SGD, lr=0.05, momentum=0.5),
                           lambda o: o.sgd(0.05, momentum=0.5), lambda o: o.sgd(0.05, momentum=0.5),
                           3),
}


def two_basin(x, y):
    """The notebook's loss, ``-exp(-(x-2)^2 - y^2) - exp(-(x^2 + 100 y^2))``, as torch ops."""
    return -torch.exp(-(x - 2) ** 2 - y ** 2) - torch.exp(-(x ** 2 + 100 * y ** 2))


def leaves(point=START):
    """Two tensors, so the normalisation is a global norm over several parameters."""
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in point]


def numpy(params):
    return np.array([p.item() for p in params])


def backward(optimizer, params):
    optimizer.zero_grad()
    loss = two_basin(*params)
    loss.backward()
    return loss


def closure_for(optimizer, params):
    return lambda: backward(optimizer, params)


def run_torch(optimizer, params, calls, opaque):
    trajectory = []
    for _ in range(calls):
        if opaque:
            optimizer.step(closure_for(optimizer, params))
        else:
            backward(optimizer, params)
            optimizer.step()
        trajectory.append(numpy(params))
    return np.array(trajectory)


def run_optax(name, calls, opaque, **kwargs):
    """The JAX trajectory of case ``name`` (:func:`adversarial_peer.run_optax`)."""
    return adversarial_peer.run_optax(CASES[name][2:], START, calls, opaque, **kwargs)


def make(name, reset_state=True, sync_period=None, params=None, **kwargs):
    outer, adv, _, _, k = CASES[name]
    params = leaves() if params is None else params
    return AdversarialSAM(params, outer, adv, sync_period=sync_period or k,
                          reset_state=reset_state, **kwargs), params


# --- optax.contrib.sam as the peer ---------------------------------------------------------------


@pytest.mark.parametrize("reset_state", [True, False], ids=["reset", "keep-state"])
@pytest.mark.parametrize("name", list(CASES))
def test_transparent_mode_matches_optax_at_every_call(name, reset_state):
    """Every call, adversarial points included: the loop sees what optax's loop sees."""
    calls = 10 * CASES[name][4] * 4
    optimizer, params = make(name, reset_state)
    got = run_torch(optimizer, params, calls, opaque=False)
    want = run_optax(name, calls, opaque=False, reset_state=reset_state)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert not np.allclose(got[0], START)  # it moved


@pytest.mark.parametrize("reset_state", [True, False], ids=["reset", "keep-state"])
@pytest.mark.parametrize("name", list(CASES))
def test_opaque_mode_matches_optax_at_every_call(name, reset_state):
    calls = 40
    optimizer, params = make(name, reset_state)
    got = run_torch(optimizer, params, calls, opaque=True)
    want = run_optax(name, calls, opaque=True, reset_state=reset_state)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_opaque_mode_is_transparent_mode_at_the_outer_steps(name):
    k = CASES[name][4]
    transparent, p_t = make(name)
    opaque, p_o = make(name)
    got_t = run_torch(transparent, p_t, 20 * k, opaque=False)[k - 1::k]
    got_o = run_torch(opaque, p_o, 20, opaque=True)
    np.testing.assert_array_equal(got_t, got_o)


def test_the_first_call_of_drop_in_sam_is_the_sam_ascent():
    optimizer, params = make("drop-in-sam")
    backward(optimizer, params)
    optimizer.step()
    g = ref.two_basin_grad(np.array(START))
    np.testing.assert_allclose(numpy(params), START + 0.1 * g / np.linalg.norm(g),
                               rtol=0, atol=1e-15)
    assert optimizer.steps_since_sync == 1
    backward(optimizer, params)
    optimizer.step()
    g_adv = ref.two_basin_grad(START + 0.1 * g / np.linalg.norm(g))
    np.testing.assert_allclose(numpy(params), START - 0.01 * g_adv, rtol=0, atol=1e-15)
    assert optimizer.steps_since_sync == 0


def test_opaque_step_evaluates_the_closure_sync_period_times_and_returns_the_loss_at_w():
    optimizer, params = make("sam-adam")
    calls = []

    def closure():
        calls.append(numpy(params))
        return backward(optimizer, params)

    loss = optimizer.step(closure)
    assert len(calls) == 5
    np.testing.assert_array_equal(calls[0], START)
    assert loss.item() == ref.two_basin_loss(np.array(START))



@pytest.mark.parametrize("sync_period", [None, 1], ids=["k", "k=1"])
@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-adam"])
def test_matches_the_jax_version(name, opaque, sync_period):
    """sam_edu.jax.adversarial_sam, sync_period=1 included. Its ``normalize`` divides by
    ``||g|| + eps`` where ours divides by ``max(||g||, eps)``: a relative 1e-11 apart."""
    calls = 30
    optimizer, variables = make(name, sync_period=sync_period)
    got = run_torch(optimizer, variables, calls, opaque)
    want = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)

# --- optax's sharp edges, fixed ------------------------------------------------------------------


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-momentum", "sam-adam"])
def test_sync_period_one_is_the_outer_optimizer(name, opaque):
    optimizer, params = make(name, sync_period=1)
    got = run_torch(optimizer, params, 30, opaque=opaque)
    plain_params = leaves()
    plain = CASES[name][0](plain_params)
    want = run_torch(plain, plain_params, 30, opaque=False)
    np.testing.assert_array_equal(got, want)
    # optax's opaque mode agrees; its transparent mode steps from the previous call's parameters
    optax_got = run_optax(name, 30, opaque=opaque, sync_period=1)
    if opaque:
        np.testing.assert_allclose(optax_got, want, rtol=0, atol=1e-12)
    else:
        assert np.max(np.abs(optax_got - want)) > 1e-4


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-adam"])
def test_a_zero_gradient_gives_no_nan(name, opaque):
    optimizer, params = make(name)
    for _ in range(2 * CASES[name][4]):
        if opaque:
            optimizer.step(lambda: (0 * two_basin(*params)).backward())
        else:
            optimizer.zero_grad()
            (0 * two_basin(*params)).backward()
            optimizer.step()
        np.testing.assert_array_equal(numpy(params), START)
    # optax.contrib.normalize() divides by the norm with no epsilon: 0/0
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax").numpy
    updates, _ = optax.contrib.normalize().update((jnp.zeros(()), jnp.zeros(())), None)
    assert np.all(np.isnan(np.array(updates)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("at_call", [0, 1, 4], ids=["at-w", "adversarial", "outer"])
def test_a_non_finite_gradient_raises_and_restores_w(bad, at_call):
    optimizer, params = make("sam-adam")
    for _ in range(at_call):
        backward(optimizer, params)
        optimizer.step()
    backward(optimizer, params)
    params[1].grad.fill_(bad)
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.step()
    np.testing.assert_array_equal(numpy(params), START)
    assert optimizer.steps_since_sync == 0


def adversarial_distances(max_radius, opaque, cycles=20):
    """``||a - w||`` for every adversarial point of drop-in SAM's optimizers with
    ``sync_period=5`` (four normalised steps of length 0.1), seen by the loop or the closure."""
    optimizer, params = make("drop-in-sam", sync_period=5, max_radius=max_radius)
    seen = []  # every point a gradient is taken at: w, then the four adversarial points

    def closure():
        seen.append(numpy(params))
        return backward(optimizer, params)

    for _ in range(cycles):
        if opaque:
            optimizer.step(closure)
            continue
        for _ in range(5):
            closure()
            optimizer.step()
    seen = np.array(seen).reshape(cycles, 5, 2)
    return np.linalg.norm(seen[:, 1:] - seen[:, :1], axis=-1)


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_max_radius_keeps_the_adversarial_points_in_the_ball(opaque):
    assert adversarial_distances(None, opaque).max() > 2 * 0.1  # optax's: four steps leave it
    assert adversarial_distances(0.1, opaque).max() <= 0.1 * (1 + 1e-12)


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name,sync_period,max_radius", [
    ("drop-in-sam", 5, 0.1), ("sam-adam", 5, 0.03), ("momentum-inside-k3", 3, 0.05)])
def test_max_radius_matches_the_jax_version(name, sync_period, max_radius, opaque):
    calls = 40
    optimizer, params = make(name, sync_period=sync_period, max_radius=max_radius)
    got = run_torch(optimizer, params, calls, opaque)
    want = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax",
                     max_radius=max_radius)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    unprojected = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax")
    assert np.max(np.abs(unprojected - want)) > 1e-6  # the projection did act


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_max_radius_rho_leaves_drop_in_sam_unchanged(opaque):
    """One normalised step has length rho: the projection changes nothing (up to rounding)."""
    optimizer, params = make("drop-in-sam", max_radius=0.1)
    got = run_torch(optimizer, params, 40, opaque)
    plain, plain_params = make("drop-in-sam")
    np.testing.assert_allclose(got, run_torch(plain, plain_params, 40, opaque), rtol=0,
                               atol=1e-15)


def test_normalize_false_feeds_the_raw_gradient():
    optimizer = AdversarialSAM(params := leaves(), P(SGD, lr=0.01), P(SGD, lr=0.1),
                               normalize=False)
    run = run_torch(optimizer, params, 20, opaque=False)
    np.testing.assert_allclose(run, run_optax("drop-in-sam", 20, opaque=False, normalize=False),
                               rtol=0, atol=1e-12)


# --- the optimizer API ---------------------------------------------------------------------------


def test_param_groups_and_state_are_the_outer_optimizers():
    optimizer, params = make("sam-momentum")
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert optimizer.state is optimizer.optimizer.state
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.adv_optimizer.param_groups[0]["lr"] == 0.1
    assert optimizer.adv_optimizer.param_groups[0]["params"] == params


def test_reset_state_clears_the_adversarial_state_at_the_outer_step():
    for reset_state in (True, False):
        optimizer, params = make("sam-adam", reset_state)
        for call in range(5):
            backward(optimizer, params)
            optimizer.step()
            if call < 4:
                assert optimizer.adv_optimizer.state[params[0]]["step"].item() == call + 1
        assert (len(optimizer.adv_optimizer.state) == 0) is reset_state
        assert optimizer.state[params[0]]["step"].item() == 1


def test_a_scheduler_on_it_changes_the_outer_learning_rate():
    optimizer, params = make("drop-in-sam")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(closure_for(optimizer, params))
    scheduler.step()
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert optimizer.adv_optimizer.param_groups[0]["lr"] == 0.1


def test_opaque_step_in_the_middle_of_a_transparent_cycle_raises():
    optimizer, params = make("drop-in-sam")
    backward(optimizer, params)
    optimizer.step()
    with pytest.raises(RuntimeError, match="middle of a transparent cycle"):
        optimizer.step(closure_for(optimizer, params))


def test_a_failing_closure_leaves_w():
    optimizer, params = make("sam-adam")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("data")
        return backward(optimizer, params)

    with pytest.raises(KeyError):
        optimizer.step(closure)
    np.testing.assert_array_equal(numpy(params), START)
    assert optimizer.steps_since_sync == 0


def test_step_without_gradients_raises():
    optimizer, _ = make("drop-in-sam")
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.step()


@pytest.mark.parametrize("kwargs,name", [
    (dict(sync_period=0), "sync_period"),
    (dict(sync_period=2.0), "sync_period"),
    (dict(sync_period=True), "sync_period"),
    (dict(eps=0.0), "eps"),
    (dict(max_radius=-0.1), "max_radius"),
    (dict(max_radius=float("nan")), "max_radius"),
    (dict(max_radius="0.1"), "max_radius"),
    (dict(optimizer=SGD(leaves(), lr=0.1)), "optimizer"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(optimizer=lambda params: None), "optimizer"),
    (dict(adv_optimizer=SGD(leaves(), lr=0.1)), "adv_optimizer"),
    (dict(adv_optimizer=42), "adv_optimizer"),
], ids=["sync_period-0", "sync_period-float", "sync_period-bool", "eps", "max_radius-negative",
         "max_radius-nan", "max_radius-string", "optimizer-instance",
        "optimizer-string", "optimizer-builds-none", "adv-instance", "adv-number"])
def test_invalid_arguments_are_named(kwargs, name):
    arguments = dict(optimizer=P(SGD, lr=0.01), adv_optimizer=P(SGD, lr=0.1)) | kwargs
    with pytest.raises(ValueError, match=rf"^{name} "):
        AdversarialSAM(leaves(), **arguments)


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("split", [5, 7], ids=["at-a-sync", "mid-cycle"])
@pytest.mark.parametrize("name", ["sam-momentum", "sam-adam", "momentum-inside-k3"])
def test_resumed_run_equals_an_uninterrupted_one(name, split, opaque):
    calls = 15
    optimizer, params = make(name, reset_state=False)
    want = run_torch(optimizer, params, calls, opaque)

    optimizer, params = make(name, reset_state=False)
    run_torch(optimizer, params, split, opaque)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, resumed_params = make(name, reset_state=False, params=leaves((1.0, 1.0)))
    with torch.no_grad():
        for p, saved in zip(resumed_params, checkpoint["params"]):
            p.copy_(saved)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups is resumed.optimizer.param_groups
    assert resumed.state is resumed.optimizer.state
    got = run_torch(resumed, resumed_params, calls - split, opaque)
    np.testing.assert_array_equal(got, want[split:])


def test_a_checkpoint_from_another_cycle_length_is_refused():
    optimizer, params = make("sam-adam")
    for _ in range(3):
        backward(optimizer, params)
        optimizer.step()
    other, _ = make("drop-in-sam", params=params)
    with pytest.raises(ValueError, match="sync_period=2"):
        other.load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(SGD(params).state_dict())
