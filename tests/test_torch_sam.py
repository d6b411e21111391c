"""sam_edu.torch.SAM: parity with the reference, a peer as a real client, and the optimizer API."""

import copy
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import parity  # noqa: E402
from torch_helpers import (  # noqa: E402
    DTYPES,
    assert_bit_identical,
    closure_step,
    explicit_step,
    leaves,
    mlp_loss,
    numpy,
    snapshot,
    torch_batches,
)
from sam_edu import reference as ref  # noqa: E402
from sam_edu.torch import SAM, disable_running_stats  # noqa: E402


# --- parity with the reference -------------------------------------------------------------------


@parity.case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("api", [explicit_step, closure_step], ids=["explicit", "closure"])
def test_matches_the_reference_at_every_step(sam_kwargs, base_kwargs, dtype, api):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = SAM(params, torch.optim.SGD, **sam_kwargs, **base_kwargs)
    got = []
    for x, y in torch_batches(DTYPES[dtype]):
        api(optimizer, params, x, y)
        got.append(numpy(params))
    want = parity.reference_trajectory(sam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_per_group_settings_match_the_reference_perturbation(adaptive):
    """Two groups, different rho (and ASAM on the first only): one global norm over both."""
    w0, (x, y) = parity.init_params(), parity.batches()[0]
    params = leaves(w0)
    optimizer = SAM([{"params": params[:2], "rho": 0.1, "adaptive": adaptive, "eta": 0.01},
                     {"params": params[2:], "rho": 0.3}], lr=0.1)
    mlp_loss(params, *torch_batches()[0]).backward()
    optimizer.first_step()
    g = ref.mlp_loss_and_grad(w0, x, y)[1]
    e = ref.perturbation(g, w0, rho=[0.1, 0.1, 0.3, 0.3], adaptive=[adaptive] * 2 + [False] * 2,
                         eta=[0.01, 0.01, 0.0, 0.0])
    for got, want in zip(numpy(params), ref.ascend(w0, e)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# --- a peer as a real client ---------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_matches_pytorch_optimizer_sam(adaptive, rho, momentum):
    """pytorch_optimizer 4.1.0's SAM, where the two agree: its adaptive form is ours with eta=0
    (``e = rho w^2 g / (||w g|| + eps)``), and it adds ``perturb_eps`` to the norm as we do.

    Tolerance: it accumulates the squared norm in float32 even for float64 tensors, so its scale
    ``rho / ||T g||`` carries a relative error of about 1e-7; over five steps that moves the
    weights by ~1e-9. Its ``step(closure)`` expects the caller to have run pass (1) already, so
    both run the explicit loop.
    """
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours, theirs = leaves(parity.init_params()), leaves(parity.init_params())
    opt_ours = SAM(ours, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=momentum)
    opt_theirs = pytorch_optimizer.SAM(theirs, torch.optim.SGD, rho=rho, adaptive=adaptive,
                                       lr=0.1, momentum=momentum)
    for step, (x, y) in enumerate(torch_batches(), start=1):
        explicit_step(opt_ours, ours, x, y)
        explicit_step(opt_theirs, theirs, x, y)
        for i, (a, b) in enumerate(zip(numpy(ours), numpy(theirs))):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-8, err_msg=f"step {step}, tensor {i}")


# --- the optimizer API ---------------------------------------------------------------------------


def test_step_returns_the_loss_at_w_and_evaluates_the_closure_twice():
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = SAM(params, lr=0.1)
    with torch.no_grad():
        loss_at_w = mlp_loss(params, x, y)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert len(calls) == 2
    assert loss.item() == loss_at_w.item()


def test_step_without_a_closure_names_it():
    optimizer = SAM(leaves(parity.init_params()), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()


def test_param_groups_and_state_are_the_base_optimizers():
    optimizer = SAM(leaves(parity.init_params()), lr=0.1, momentum=0.9)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.state is optimizer.base_optimizer.state


def test_saved_w_is_not_in_the_optimizer_state_so_adam_initialises():
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = SAM(params, torch.optim.Adam, lr=0.01)
    mlp_loss(params, x, y).backward()
    optimizer.first_step(zero_grad=True)
    assert len(optimizer.state) == 0
    mlp_loss(params, x, y).backward()
    optimizer.second_step()
    assert set(optimizer.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("api,attach_to_base", [(closure_step, False), (explicit_step, True)],
                         ids=["closure-scheduler-on-sam", "explicit-scheduler-on-base"])
def test_lr_scheduler_changes_the_lr_of_the_base_optimizer(api, attach_to_base):
    """With rho = 0 a SAM step is the base step, so the move shows which lr was used."""
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = SAM(params, torch.optim.SGD, rho=0.0, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer.base_optimizer if attach_to_base else optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        api(optimizer, params, x, y)
        scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    before = snapshot(params)
    g = torch.autograd.grad(mlp_loss(params, x, y), params)
    api(optimizer, params, x, y)
    for p, w, g_p in zip(params, before, g):
        torch.testing.assert_close(p.detach(), w - 0.05 * g_p, rtol=0, atol=1e-15)


# --- checkpoints ---------------------------------------------------------------------------------


def train(model, optimizer, batches):
    for x, y in batches:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def make_run(seed, base):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model.to(torch.float64)
    base_optimizer, base_kwargs = base
    return model, SAM(model.parameters(), base_optimizer, rho=0.05, **base_kwargs)


@pytest.mark.parametrize("base", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                  (torch.optim.Adam, dict(lr=0.01))], ids=["sgd-momentum", "adam"])
def test_resumed_run_equals_an_uninterrupted_one(base):
    batches = torch_batches() * 2
    uninterrupted, optimizer = make_run(0, base)
    train(uninterrupted, optimizer, batches)

    model, optimizer = make_run(0, base)
    train(model, optimizer, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model, resumed = make_run(1, base)  # another init: everything must come from disk
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.state is resumed.base_optimizer.state
    train(resumed_model, resumed, batches[5:])

    assert_bit_identical(resumed_model.parameters(), uninterrupted.parameters())


# --- validation and failures ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(rho=-0.1), "rho"),
    (dict(eta=-0.01), "eta"),
    (dict(perturb_eps=-1e-12), "perturb_eps"),
    (dict(base_optimizer=object), "base_optimizer"),
    (dict(base_optimizer=lambda params, **kw: torch.optim.SGD(params, **kw)), "base_optimizer"),
], ids=["rho", "eta", "perturb_eps", "not-an-optimizer", "not-a-class"])
def test_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SAM(leaves(parity.init_params()), lr=0.1, **kwargs)


@pytest.mark.parametrize("key", ["rho", "eta"])
def test_invalid_group_settings_are_named(key):
    params = leaves(parity.init_params())
    with pytest.raises(ValueError, match=rf"{key}.*group 1"):
        SAM([{"params": params[:2]}, {"params": params[2:], key: -1.0}], lr=0.1)


def with_gradients(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=p.dtype).clone()


def gradients(params, bad=None):
    """Finite gradients, or with one entry of the second tensor replaced by ``bad``."""
    grads = [np.full(p.shape, 0.1) for p in params]
    if bad is not None:
        grads[1][0] = bad
    return grads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_at_w_raises_and_leaves_the_weights(bad):
    params = leaves(parity.init_params())
    optimizer = SAM(params, lr=0.1)
    before = snapshot(params)
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.first_step()
    assert_bit_identical(params, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_at_w_plus_e_raises_and_restores_w(bad):
    params = leaves(parity.init_params())
    optimizer = SAM(params, rho=0.5, adaptive=True, lr=0.1, momentum=0.9)
    before = snapshot(params)
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite"):
        optimizer.second_step()
    assert_bit_identical(params, before)
    assert len(optimizer.state) == 0  # the base optimizer did not step


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_zero_gradient_does_not_move_the_weights(adaptive):
    params = leaves(parity.init_params())
    optimizer = SAM(params, adaptive=adaptive, eta=0.01, lr=0.1)
    before = snapshot(params)
    with_gradients(params, [np.zeros(p.shape) for p in params])
    optimizer.first_step()
    assert_bit_identical(params, before)


@pytest.mark.parametrize("first", [False, True], ids=["fresh", "after-a-step"])
def test_second_step_without_first_step_raises(first):
    params = leaves(parity.init_params())
    optimizer = SAM(params, lr=0.1)
    if first:
        with_gradients(params, gradients(params))
        optimizer.first_step()
        optimizer.second_step()
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.second_step()


def test_first_step_twice_raises_instead_of_losing_w():
    params = leaves(parity.init_params())
    optimizer = SAM(params, lr=0.1)
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()


def test_first_step_without_gradients_raises():
    optimizer = SAM(leaves(parity.init_params()), lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.first_step()


def test_second_step_without_gradients_restores_w_and_raises():
    params = leaves(parity.init_params())
    optimizer = SAM(params, lr=0.1)
    before = snapshot(params)
    with_gradients(params, gradients(params))
    optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="no gradient at w \\+ e"):
        optimizer.second_step()
    assert_bit_identical(params, before)


# --- BatchNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_running_statistics_come_from_pass_one_only(momentum):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4, momentum=momentum),
                                torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model(x)  # a first batch, so that running statistics are not at their initial values
    pass_one_only = copy.deepcopy(model)
    pass_one_only(x)

    optimizer = SAM(model.parameters(), rho=0.5, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    with disable_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)

    bn, want = model[1], pass_one_only[1]
    assert bn.momentum == momentum
    assert torch.equal(bn.running_mean, want.running_mean)
    assert torch.equal(bn.running_var, want.running_var)
    assert torch.equal(bn.num_batches_tracked, want.num_batches_tracked)


def test_a_group_added_later_gets_both_optimizers_settings_and_steps():
    first, later = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = SAM(first.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": later.parameters(), "rho": 0.2})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    group = opt.param_groups[1]
    assert group["rho"] == 0.2 and group["adaptive"] is False and group["momentum"] == 0.9
    before = [p.detach().clone() for p in later.parameters()]
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = later(first(x)).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(not torch.equal(b, p) for b, p in zip(before, later.parameters()))
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "rho": -1.0})
