"""sam_edu.torch.GSAM and WSAM: parity with the reference, special cases, peers, checkpoints."""

import io

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
from sam_edu.torch import GSAM, SAM, WSAM  # noqa: E402


def explicit_zeroing_in_place_step(optimizer, params, x, y):
    """Zeroing in place keeps the ``p.grad`` tensors for pass (3): ``g`` must have been copied."""
    mlp_loss(params, x, y).backward()  # (1)
    optimizer.first_step()  # (2)
    optimizer.zero_grad(set_to_none=False)
    mlp_loss(params, x, y).backward()  # (3)
    optimizer.second_step()  # (4), (5)
    optimizer.zero_grad(set_to_none=False)


def run(optimizer, params, api=explicit_step, dtype=torch.float64):
    """The weights after each parity step."""
    out = []
    for x, y in torch_batches(dtype):
        api(optimizer, params, x, y)
        out.append(numpy(params))
    return out


def gsam_kwargs_for_torch(gsam_kwargs):
    """``rho="linear"`` in the parity cases is the schedule :func:`parity.linear_rho`."""
    kwargs = dict(gsam_kwargs)
    if kwargs["rho"] == "linear":
        kwargs["rho"] = parity.linear_rho
    return kwargs


APIS = pytest.mark.parametrize("api", [explicit_step, closure_step, explicit_zeroing_in_place_step],
                               ids=["explicit", "closure", "explicit-zeroing-in-place"])


# --- parity with the reference -------------------------------------------------------------------


@parity.gsam_case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
@APIS
def test_gsam_matches_the_reference_at_every_step(gsam_kwargs, base_kwargs, dtype, api):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = GSAM(params, torch.optim.SGD, **gsam_kwargs_for_torch(gsam_kwargs), **base_kwargs)
    got = run(optimizer, params, api, DTYPES[dtype])
    want = parity.gsam_reference_trajectory(gsam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


@parity.wsam_case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
@APIS
def test_wsam_matches_the_reference_at_every_step(wsam_kwargs, base_kwargs, dtype, api):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = WSAM(params, torch.optim.SGD, **wsam_kwargs, **base_kwargs)
    got = run(optimizer, params, api, DTYPES[dtype])
    want = parity.wsam_reference_trajectory(wsam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def test_gsam_schedule_is_clamped_at_zero_and_written_into_the_groups():
    """A schedule below 0 gives rho_t = 0: the step is then the base step with d = g.

    ``g_adv = g``, so ``g_perp = g - g ||g||^2 / (||g|| + eps)^2`` is ``~2 eps/||g||`` of ``g``,
    not 0: ``perturb_eps`` moves the weights by ~1e-13 here.
    """
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = GSAM(params, rho=lambda step: -0.1, alpha=0.4, lr=0.1)
    before = snapshot(params)
    g = torch.autograd.grad(mlp_loss(params, x, y), params)
    explicit_step(optimizer, params, x, y)
    assert optimizer.param_groups[0]["rho"] == 0.0
    for p, w, g_p in zip(params, before, g):
        torch.testing.assert_close(p.detach(), w - 0.1 * g_p, rtol=0, atol=1e-12)


# --- special cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_gsam_with_alpha_zero_is_sam(rho, momentum):
    """``alpha = 0``, constant rho, not adaptive: ``d = g_adv`` and ``e`` is SAM's, bit for bit."""
    ours, sam = leaves(parity.init_params()), leaves(parity.init_params())
    got = run(GSAM(ours, rho=rho, alpha=0.0, lr=0.1, momentum=momentum), ours)
    want = run(SAM(sam, rho=rho, lr=0.1, momentum=momentum), sam)
    for g_step, w_step in zip(got, want):
        for g, w in zip(g_step, w_step):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_wsam_coupled_with_gamma_one_half_is_sam(adaptive, rho, momentum):
    """``gamma = 1/2`` gives ``a = 1`` and ``d = g + (g_adv - g)``: SAM up to one rounding of d."""
    ours, sam = leaves(parity.init_params()), leaves(parity.init_params())
    got = run(WSAM(ours, rho=rho, gamma=0.5, decouple=False, adaptive=adaptive, lr=0.1,
                   momentum=momentum), ours)
    want = run(SAM(sam, rho=rho, adaptive=adaptive, lr=0.1, momentum=momentum), sam)
    parity.assert_trajectories_close(got, want, 1e-14)


@pytest.mark.parametrize("decouple", [False, True], ids=["coupled", "decoupled"])
def test_wsam_with_gamma_zero_is_the_base_optimizer(decouple):
    ours, base = leaves(parity.init_params()), leaves(parity.init_params())
    opt_ours = WSAM(ours, gamma=0.0, decouple=decouple, lr=0.1, momentum=0.9)
    opt_base = torch.optim.SGD(base, lr=0.1, momentum=0.9)
    for x, y in torch_batches():
        explicit_step(opt_ours, ours, x, y)
        opt_base.zero_grad()
        mlp_loss(base, x, y).backward()
        opt_base.step()
    assert_bit_identical(snapshot(ours), snapshot(base))


def test_wsam_decoupled_term_uses_each_groups_lr():
    """Two groups, lr 0.1 and 0.3: the sharpness term of each moves with its own lr."""
    w0 = parity.init_params()
    x, y = torch_batches()[0]
    two, one = leaves(w0), leaves(w0)
    opt_two = WSAM([{"params": two[:2]}, {"params": two[2:], "lr": 0.3}], gamma=0.8, lr=0.1)
    opt_one = WSAM(one, gamma=0.8, lr=0.1)
    explicit_step(opt_two, two, x, y)
    explicit_step(opt_one, one, x, y)
    for i in (0, 1):
        assert torch.equal(two[i], one[i])
    for i in (2, 3):  # w - 0.3 g - 0.3 a (g_adv - g) = w - 3 (w - one), up to rounding
        want = w0[i] - 3 * (w0[i] - one[i].detach().numpy())
        np.testing.assert_allclose(two[i].detach().numpy(), want, rtol=0, atol=1e-14)


# --- peers as real clients -----------------------------------------------------------------------


class TanhMLP(torch.nn.Module):
    """The parity network as a module holding its four leaves, which both peers need (their
    closures call the model; running-statistics toggling and clipping walk its modules)."""

    def __init__(self, arrays):
        super().__init__()
        self.leaves = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.tensor(a, dtype=torch.float64)) for a in arrays])

    def forward(self, x):
        w1, b1, w2, b2 = self.leaves
        return torch.tanh(x @ w1 + b1) @ w2 + b2


def assert_close_every_step(ours, theirs, step, tol):
    for i, (a, b) in enumerate(zip(numpy(ours), numpy(theirs))):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"step {step}, tensor {i}")


def float64_global_gradient_norm(param_groups, device=None, *, weight_adaptive=False):
    """pytorch_optimizer's squared global gradient norm, accumulated in the tensors' dtype."""
    grads = [p.grad * p.abs() if weight_adaptive and group.get("adaptive", False) else p.grad
             for group in param_groups for p in group["params"] if p.grad is not None]
    return sum(torch.sum(g * g) for g in grads).reshape(1)


# pytorch_optimizer 4.1.0 accumulates the squared global gradient norm in float32 even for float64
# tensors (``get_global_gradient_norm``): ``rho / ||g||`` and GSAM's ``g_par`` carry a relative
# error of ~1e-7, which momentum carries over five steps to ~1e-8 in the weights. As shipped, the
# peers are compared at 3e-8; with that one function accumulating in float64 the remaining
# difference (they restore ``w`` by subtracting ``e``; eps enters GSAM's cosine differently) is
# ~1e-13, compared at 1e-12. The second run shows that the float32 norm is all of the first
# tolerance.
PEER_NORMS = pytest.mark.parametrize("peer_norm_dtype,tol", [("float32", 3e-8), ("float64", 1e-12)])


@pytest.fixture
def peer_norms(monkeypatch, peer_norm_dtype):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    if peer_norm_dtype == "float64":
        monkeypatch.setattr("pytorch_optimizer.optimizer.sam.get_global_gradient_norm",
                            float64_global_gradient_norm)
    return pytorch_optimizer


@PEER_NORMS
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.9])  # the peer requires alpha < 1
def test_gsam_matches_pytorch_optimizer_gsam_with_a_constant_rho(alpha, momentum, peer_norms, tol):
    """pytorch_optimizer 4.1.0's GSAM, not adaptive (its adaptive form is ASAM's, not the JAX
    code's). It takes a base optimizer *instance*, the model, and a rho scheduler: its own
    ``ProportionScheduler`` with ``max_value = min_value = rho`` over a constant LR gives a
    constant rho. Its ``step()`` runs both passes with the closure ``set_closure`` builds.
    """
    from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

    rho = 0.05
    ours, model = leaves(parity.init_params()), TanhMLP(parity.init_params())
    theirs = list(model.parameters())
    opt_ours = GSAM(ours, rho=rho, alpha=alpha, lr=0.1, momentum=momentum)
    base = torch.optim.SGD(theirs, lr=0.1, momentum=momentum)
    rho_scheduler = ProportionScheduler(torch.optim.lr_scheduler.ConstantLR(base, factor=1.0),
                                        max_lr=0.1, min_lr=0.1, max_value=rho, min_value=rho)
    opt_theirs = peer_norms.GSAM(theirs, base, model, rho_scheduler, alpha=alpha)
    for step, (x, y) in enumerate(torch_batches(), start=1):
        explicit_step(opt_ours, ours, x, y)
        opt_theirs.set_closure(F.cross_entropy, x, y)
        opt_theirs.step()
        opt_theirs.update_rho_t()
        assert opt_theirs.rho_t == rho
        assert_close_every_step(ours, theirs, step, tol)


@PEER_NORMS
@pytest.mark.parametrize("max_norm", [None, 0.3])
@pytest.mark.parametrize("decouple", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_wsam_matches_pytorch_optimizer_wsam(adaptive, rho, decouple, max_norm, peer_norms, tol):
    """pytorch_optimizer 4.1.0's WSAM (base class, model for its clipping, explicit loop). Its
    clipping is ``clip_grad_norm_`` over the model, ours the same formula."""
    ours, model = leaves(parity.init_params()), TanhMLP(parity.init_params())
    theirs = list(model.parameters())
    kwargs = dict(rho=rho, gamma=0.8, decouple=decouple, max_norm=max_norm, adaptive=adaptive,
                  lr=0.1, momentum=0.9)
    opt_ours = WSAM(ours, torch.optim.SGD, **kwargs)
    opt_theirs = peer_norms.WSAM(model, theirs, torch.optim.SGD, **kwargs)
    for step, (x, y) in enumerate(torch_batches(), start=1):
        explicit_step(opt_ours, ours, x, y)
        explicit_step(opt_theirs, theirs, x, y)
        assert_close_every_step(ours, theirs, step, tol)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_wsam_clipping_is_active_in_the_peer_comparison(adaptive, rho):
    """With ``max_norm=0.3`` the clipped run differs from the unclipped one (the clip acts)."""
    clipped, free = leaves(parity.init_params()), leaves(parity.init_params())
    kwargs = dict(rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9)
    got = run(WSAM(clipped, max_norm=0.3, **kwargs), clipped)
    want = run(WSAM(free, **kwargs), free)
    assert not np.allclose(got[0][0], want[0][0], rtol=0, atol=1e-6)


def test_wsam_clipping_never_scales_up():
    """A ``max_norm`` above every ``||g_adv||`` leaves the steps as they are: the scale is capped
    at 1, the global norm only shrinks."""
    clipped, free = leaves(parity.init_params()), leaves(parity.init_params())
    got = run(WSAM(clipped, max_norm=100.0, lr=0.1, momentum=0.9), clipped)
    want = run(WSAM(free, lr=0.1, momentum=0.9), free)
    parity.assert_trajectories_close(got, want, 0.0)


# --- the optimizer API ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda p: GSAM(p, lr=0.1, momentum=0.9),
                                  lambda p: WSAM(p, lr=0.1, momentum=0.9)], ids=["gsam", "wsam"])
def test_param_groups_and_state_are_the_base_optimizers_and_g_is_not_in_state(make):
    params = leaves(parity.init_params())
    optimizer = make(params)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.state is optimizer.base_optimizer.state
    x, y = torch_batches()[0]
    mlp_loss(params, x, y).backward()
    optimizer.first_step(zero_grad=True)
    assert len(optimizer.state) == 0
    mlp_loss(params, x, y).backward()
    optimizer.second_step()
    assert set(optimizer.state[params[0]]) == {"momentum_buffer"}


@pytest.mark.parametrize("cls", [GSAM, WSAM])
def test_step_returns_the_loss_at_w_and_needs_a_closure(cls):
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = cls(params, lr=0.1)
    with torch.no_grad():
        loss_at_w = mlp_loss(params, x, y)

    def closure():
        optimizer.zero_grad()
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == loss_at_w.item()
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()


# --- checkpoints ---------------------------------------------------------------------------------


def train(model, optimizer, batches):
    for x, y in batches:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def rho_schedule(step):
    """Falls over the ten steps of the test, and below 0 at the end (clamped)."""
    return 0.1 - 0.012 * step


@pytest.mark.parametrize("make", [
    lambda ps: GSAM(ps, rho=rho_schedule, alpha=0.4, lr=0.1, momentum=0.9),
    lambda ps: WSAM(ps, rho=0.05, gamma=0.8, decouple=True, lr=0.1, momentum=0.9),
    lambda ps: WSAM(ps, torch.optim.Adam, rho=0.05, gamma=0.8, decouple=True, lr=0.01),
], ids=["gsam-schedule-momentum", "wsam-decoupled-momentum", "wsam-decoupled-adam"])
def test_resumed_run_equals_an_uninterrupted_one(make):
    def make_run(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 3)).to(torch.float64)
        return model, make(model.parameters())

    batches = torch_batches() * 2
    uninterrupted, optimizer = make_run(0)
    train(uninterrupted, optimizer, batches)

    model, optimizer = make_run(0)
    train(model, optimizer, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model, resumed = make_run(1)  # another init: everything must come from disk
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.state is resumed.base_optimizer.state
    train(resumed_model, resumed, batches[5:])

    assert_bit_identical(resumed_model.parameters(), uninterrupted.parameters())


def test_gsam_step_count_is_in_the_checkpoint():
    """Without the step count a resumed schedule would restart at rho(0)."""
    params = leaves(parity.init_params())
    optimizer = GSAM(params, rho=parity.linear_rho, lr=0.1)
    run(optimizer, params)
    assert optimizer.steps_taken == parity.STEPS
    fresh = GSAM(leaves(parity.init_params()), rho=parity.linear_rho, lr=0.1)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.steps_taken == parity.STEPS


# --- validation and failures ---------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,name", [
    (GSAM, dict(rho=-0.1), "rho"),
    (GSAM, dict(alpha=-0.1), "alpha"),
    (GSAM, dict(perturb_eps=-1e-12), "perturb_eps"),
    (GSAM, dict(base_optimizer=object), "base_optimizer"),
    (WSAM, dict(rho=-0.1), "rho"),
    (WSAM, dict(gamma=1.0), "gamma"),
    (WSAM, dict(gamma=-0.1), "gamma"),
    (WSAM, dict(max_norm=0.0), "max_norm"),
    (WSAM, dict(max_norm=-1.0), "max_norm"),
    (WSAM, dict(perturb_eps=-1e-12), "perturb_eps"),
], ids=["gsam-rho", "gsam-alpha", "gsam-perturb_eps", "gsam-base", "wsam-rho", "wsam-gamma-1",
        "wsam-gamma-negative", "wsam-max_norm-0", "wsam-max_norm-negative", "wsam-perturb_eps"])
def test_invalid_arguments_are_named(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(leaves(parity.init_params()), lr=0.1, **kwargs)


def with_gradients(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=p.dtype).clone()


def gradients(params, bad=None):
    """Finite gradients, or with one entry of the second tensor replaced by ``bad``."""
    grads = [np.full(p.shape, 0.1) for p in params]
    if bad is not None:
        grads[1][0] = bad
    return grads


OPTIMIZERS = pytest.mark.parametrize("make", [
    lambda p: GSAM(p, rho=0.5, adaptive=True, lr=0.1, momentum=0.9),
    lambda p: WSAM(p, decouple=True, lr=0.1, momentum=0.9),
    lambda p: WSAM(p, decouple=False, max_norm=0.3, lr=0.1, momentum=0.9),
], ids=["gsam", "wsam-decoupled", "wsam-coupled-clipped"])
BAD = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


@OPTIMIZERS
@BAD
def test_non_finite_gradient_at_w_raises_and_leaves_the_weights(make, bad):
    params = leaves(parity.init_params())
    optimizer = make(params)
    before = snapshot(params)
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at w;"):
        optimizer.first_step()
    assert_bit_identical(params, before)


@OPTIMIZERS
@BAD
def test_non_finite_gradient_at_w_plus_e_raises_and_restores_w(make, bad):
    """Decoupled WSAM steps with the finite ``g``: ``g_adv`` must be checked, not the direction."""
    params = leaves(parity.init_params())
    optimizer = make(params)
    before = snapshot(params)
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at w \\+ e"):
        optimizer.second_step()
    assert_bit_identical(params, before)
    assert len(optimizer.state) == 0  # the base optimizer did not step


@OPTIMIZERS
def test_zero_gradients_give_no_nan(make):
    """Zero ``g`` and ``g_adv``: ``e = 0``, ``g_adv_hat = 0``, ``d = 0``; nothing moves."""
    params = leaves(parity.init_params())
    optimizer = make(params)
    before = snapshot(params)
    with_gradients(params, [np.zeros(p.shape) for p in params])
    optimizer.first_step()
    assert_bit_identical(params, before)
    with_gradients(params, [np.zeros(p.shape) for p in params])
    optimizer.second_step()
    assert_bit_identical(params, before)


@OPTIMIZERS
def test_steps_must_alternate(make):
    params = leaves(parity.init_params())
    optimizer = make(params)
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.second_step()
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.first_step()
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()


@OPTIMIZERS
def test_second_step_without_gradients_restores_w_and_raises(make):
    params = leaves(parity.init_params())
    optimizer = make(params)
    before = snapshot(params)
    with_gradients(params, gradients(params))
    optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="no gradient at w \\+ e"):
        optimizer.second_step()
    assert_bit_identical(params, before)
    with pytest.raises(RuntimeError, match="first_step"):  # the pair is over
        optimizer.second_step()
