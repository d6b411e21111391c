"""The torch optimizers' foreach fast paths give the numbers of their readable per-tensor loops.

Each case runs the same steps twice from the same start, ``foreach=False`` and ``foreach=True``,
on a model with two parameter groups and a frozen tensor, and compares weights and state.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sam_edu.torch import BSAM, GSAM, SAM, WSAM, LookSAM
from sam_edu.torch.sam import SMALL, all_finite, all_finite_foreach

STEPS = 4


def make_params(dtype):
    torch.manual_seed(0)
    shapes = [(5, 4), (4,), (4, 3), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    frozen = torch.nn.Parameter(torch.randn(3, dtype=dtype), requires_grad=False)
    return params, frozen


def loss_fn(params, frozen, x):
    w1, b1, w2, b2 = params
    return (torch.tanh(x @ w1 + b1) @ w2 + b2 + frozen).pow(2).mean()


def run(make_optimizer, dtype, foreach):
    params, frozen = make_params(dtype)
    groups = [{"params": params[:2]}, {"params": params[2:] + [frozen], "lr": 0.05}]
    optimizer = make_optimizer(groups, foreach)
    x = torch.randn(8, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(params, frozen, x)
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
        assert optimizer.foreach_used is foreach
    return params, optimizer


CASES = {
    "sam": lambda g, fe: SAM(g, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, foreach=fe),
    "asam": lambda g, fe: SAM([{**g[0], "adaptive": True, "eta": 0.01}, {**g[1], "rho": 0.2}],
                              torch.optim.SGD, rho=0.5, lr=0.1, foreach=fe),
    "sam_adam": lambda g, fe: SAM(g, torch.optim.Adam, rho=0.05, lr=0.01, foreach=fe),
    "gsam": lambda g, fe: GSAM(g, torch.optim.SGD, rho=0.1, alpha=0.3, lr=0.1, foreach=fe),
    "gsam_scheduled_adaptive": lambda g, fe: GSAM(g, torch.optim.SGD, rho=lambda t: 0.1 - 0.02 * t,
                                                  adaptive=True, lr=0.1, foreach=fe),
    "wsam_decoupled": lambda g, fe: WSAM(g, torch.optim.SGD, rho=0.1, gamma=0.8, lr=0.1,
                                         momentum=0.9, foreach=fe),
    "wsam_coupled_max_norm": lambda g, fe: WSAM(g, torch.optim.SGD, rho=0.1, gamma=0.8,
                                                decouple=False, max_norm=0.05, lr=0.1,
                                                foreach=fe),
    "bsam": lambda g, fe: BSAM([{**g[0], "rho": 0.02, "damping": 0.2}, g[1]], num_data=50, lr=0.1,
                               seed=3, foreach=fe),
    "looksam_k1": lambda g, fe: LookSAM(g, torch.optim.SGD, rho=0.1, k=1, lr=0.1, foreach=fe),
    "looksam_k3": lambda g, fe: LookSAM(g, torch.optim.SGD, rho=0.1, k=3, alpha=0.5, lr=0.1,
                                        momentum=0.9, foreach=fe),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_foreach_gives_the_loops_numbers(name, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    loop_params, loop = run(CASES[name], dtype, False)
    fast_params, fast = run(CASES[name], dtype, True)
    for a, b in zip(loop_params, fast_params):
        torch.testing.assert_close(b, a, **tol)
    loop_state, fast_state = loop.state_dict(), fast.state_dict()
    assert loop_state.keys() == fast_state.keys()
    for index, entry in loop_state["state"].items():
        assert entry.keys() == fast_state["state"][index].keys()
        for key, value in entry.items():
            torch.testing.assert_close(fast_state["state"][index][key], value, **tol)


def test_none_takes_the_fast_path_for_cpu_float_tensors_and_the_loop_for_mixed_dtypes():
    p32 = torch.nn.Parameter(torch.randn(3))
    p64 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    for params, expected in (([p32], True), ([p32, p64], False)):
        optimizer = SAM(params, torch.optim.SGD, lr=0.1)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.first_step()
        optimizer.second_step()
        assert optimizer.foreach_used is expected
    optimizer = SAM([p32, p64], torch.optim.SGD, lr=0.1, foreach=True)
    with pytest.raises(ValueError, match="foreach=True"):
        optimizer.first_step()


@pytest.mark.parametrize("bad", ["yes", 1, 0])
def test_foreach_must_be_none_true_or_false(bad):
    with pytest.raises(ValueError, match="foreach"):
        SAM([torch.nn.Parameter(torch.randn(2))], torch.optim.SGD, lr=0.1, foreach=bad)


def test_state_dict_round_trip_on_the_fast_path():
    _, optimizer = run(CASES["looksam_k3"], torch.float64, True)
    state = optimizer.state_dict()
    clone = LookSAM([{"params": list(group["params"])} for group in optimizer.param_groups],
                    torch.optim.SGD, rho=0.1, k=3, alpha=0.5, lr=0.1, momentum=0.9)
    clone.load_state_dict(state)
    reloaded = clone.state_dict()
    assert reloaded["looksam_steps_taken"] == state["looksam_steps_taken"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(reloaded["state"][index][key], value)


@pytest.mark.parametrize("make", [CASES["sam"], CASES["gsam"], CASES["wsam_decoupled"],
                                  CASES["looksam_k3"], CASES["bsam"]])
@pytest.mark.parametrize("where", ["w", "w + e"])
def test_fast_path_non_finite_gradient_raises_and_restores_w(make, where):
    params, frozen = make_params(torch.float64)
    optimizer = make([{"params": params[:2]}, {"params": params[2:]}], True)
    before = [p.detach().clone() for p in params]
    if isinstance(optimizer, BSAM):
        optimizer.noisy_step()
    raise_non_finite(optimizer, params, where)
    for p, w in zip(params, before):
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("take", [True, False], ids=["g_taken", "g_in_buffers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wsam_decoupled_fast_path_with_g_taken_or_kept_gives_the_loops_numbers(take, dtype):
    """``first_step(zero_grad=True)`` lets decoupled WSAM point ``p.grad`` at ``g``; without it,
    ``g`` stays in buffers the caller's ``zero_grad(set_to_none=False)`` must not reach."""
    results = []
    for foreach in (False, True):
        params, frozen = make_params(dtype)
        optimizer = CASES["wsam_decoupled"]([{"params": params}], foreach)
        x = torch.randn(8, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
        for _ in range(STEPS):
            optimizer.zero_grad(set_to_none=False)
            loss_fn(params, frozen, x).backward()
            optimizer.first_step(zero_grad=take)
            optimizer.zero_grad(set_to_none=False)
            loss_fn(params, frozen, x).backward()
            optimizer.second_step()
        assert optimizer.foreach_used is foreach
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if dtype is torch.float32 else 1e-14)


BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", list(BITS))
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_all_finite_foreach_agrees_with_the_loop_and_leaves_every_bit(dtype, bad):
    """GradScaler's one-kernel check, with a scale of 1: the loop's verdict, values untouched
    (-0, a subnormal, the largest finite number, whose square overflows)."""
    finfo = torch.finfo(dtype)
    tree = [torch.tensor([1.0, -0.0, finfo.tiny / 4, finfo.max], dtype=dtype),
            torch.tensor([[2.0, -3.0]], dtype=dtype)]
    if bad is not None:
        tree[1][0, 1] = bad
    before = [t.clone() for t in tree]
    assert all_finite_foreach(tree) is all_finite(tree) is (bad is None)
    for t, b in zip(tree, before):
        assert torch.equal(t.view(BITS[dtype]), b.view(BITS[dtype]))


@pytest.mark.parametrize("foreach", [False, True])
def test_sam_takes_a_finite_g_adv_whose_squared_norm_overflows(foreach):
    """Only a NaN or an Inf stops the step: ``||g_adv||^2`` overflowing float32 does not."""
    params, _ = make_params(torch.float32)
    optimizer = SAM(params, torch.optim.SGD, rho=0.1, lr=1e-20, foreach=foreach)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.first_step()
    for p in params:
        p.grad = torch.full_like(p, 1e20)
    optimizer.second_step()
    for p, w in zip(params, before):
        torch.testing.assert_close(p.detach(), w - 1.0)


def raise_non_finite(optimizer, params, where):
    """A NaN in ``g`` (``where="w"``) or an Inf in ``g_adv``: the step raises."""
    for p in params:
        p.grad = torch.ones_like(p)
    if where == "w":
        params[1].grad[0] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite gradient at (w;|the noisy)"):
            optimizer.first_step()
        return
    assert optimizer.first_step() is not False
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="w was restored"):
        optimizer.second_step()


def test_saved_copies_are_reused_between_steps():
    params, optimizer = run(CASES["wsam_decoupled"], torch.float32, True)
    buffers = list(optimizer._w_buffers.tensors)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.first_step()
    optimizer.second_step()
    assert all(a is b for a, b in zip(optimizer._w_buffers.tensors, buffers))


# Swapping: the fast path keeps w by pointing the parameters at buffers holding w + e during
# pass (3), when the tensors are large enough (more than SMALL elements on average).
BIG = [(128, 96), (96,), (96, 64), (64,)]  # 4,648 elements per tensor on average


def run_big(make_optimizer, swap):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64) / 10) for s in BIG]
    optimizer = make_optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], True)
    optimizer.swap = swap
    x = torch.randn(8, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def closure():
        optimizer.zero_grad()
        w1, b1, w2, b2 = params
        loss = (torch.tanh(x @ w1 + b1) @ w2 + b2).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
    return params, optimizer


@pytest.mark.parametrize("name", sorted(CASES))
def test_swap_gives_the_numbers_of_the_copy(name):
    """Bit for bit: the same additions, written into a buffer instead of in place."""
    copy_params, copy = run_big(CASES[name], False)
    swap_params, swap = run_big(CASES[name], None)
    assert copy.swap_used is False
    assert swap.swap_used is True  # the last step is a SAM step for LookSAM too (t = 3, k = 3)
    for a, b in zip(copy_params, swap_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [CASES["sam"], CASES["asam"], CASES["gsam"],
                                  CASES["wsam_decoupled"], CASES["looksam_k1"]])
def test_swap_points_the_parameters_away_only_between_first_and_second_step(make):
    params, optimizer = run_big(make, None)
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.first_step()
    assert optimizer.swap_used
    assert all(p.data_ptr() != q for p, q in zip(params, pointers))
    assert not any(torch.equal(p.detach(), w) for p, w in zip(params, before))
    # w itself was never written: it is where it was
    for w_kept, w in zip(optimizer._saved_w, before):
        assert torch.equal(w_kept, w)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.second_step()
    assert [p.data_ptr() for p in params] == pointers


@pytest.mark.parametrize("where", ["w", "w + e"])
def test_swap_non_finite_gradient_raises_and_restores_w(where):
    params, optimizer = run_big(CASES["sam"], True)
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    raise_non_finite(optimizer, params, where)
    assert [p.data_ptr() for p in params] == pointers
    for p, w in zip(params, before):
        assert torch.equal(p.detach(), w)


def _view_param(n):
    p = torch.nn.Parameter(torch.randn(n))
    p.data = torch.zeros(2 * n)[:n]  # a view into a larger storage, as FSDP's parameters are
    return p


def _shared_param(n):
    return torch.nn.Parameter(torch.randn(n).share_memory_())


@pytest.mark.parametrize("make, expected", [
    (lambda: torch.nn.Parameter(torch.randn(SMALL + 1)), True),
    (lambda: torch.nn.Parameter(torch.randn(SMALL)), False),  # small: copying costs less
    (lambda: _view_param(SMALL + 1), False),
    (lambda: _shared_param(SMALL + 1), False),
], ids=["large", "small", "view", "shared"])
def test_swap_is_chosen_only_where_it_is_safe_and_cheaper(make, expected):
    p = make()
    optimizer = SAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.ones_like(p)
    optimizer.first_step()
    optimizer.second_step()
    assert optimizer.swap_used is expected
    if not expected:
        optimizer = SAM([p], torch.optim.SGD, lr=0.1, swap=True)
        with pytest.raises(ValueError, match="swap=True"):
            optimizer.first_step()


def test_swap_arguments_are_checked():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="swap must be None, True or False"):
        SAM([p], torch.optim.SGD, lr=0.1, swap="yes")
    with pytest.raises(ValueError, match="swap=True needs the fast path"):
        SAM([p], torch.optim.SGD, lr=0.1, swap=True, foreach=False)


def test_bsam_swap_points_away_for_both_passes_and_back():
    """bSAM's parameters point at a buffer holding the noisy point (pass 1), then ``w + e``
    (pass 3), and back at ``w`` after the step; a parameter without a gradient at the noisy
    point is at ``w`` for pass 3, as on the copying path."""
    params, optimizer = run_big(CASES["bsam"], None)
    assert optimizer.swap_used
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    optimizer.noisy_step()
    noisy = [p.detach().clone() for p in params]
    assert all(p.data_ptr() != q for p, q in zip(params, pointers))
    assert not any(torch.equal(a, w) for a, w in zip(noisy, before))
    for p in params[:3]:  # the last parameter gets no gradient at the noisy point
        p.grad = torch.ones_like(p)
    optimizer.first_step(zero_grad=True)
    assert torch.equal(params[3].detach(), before[3]) and params[3].data_ptr() == pointers[3]
    assert not torch.equal(params[0].detach(), before[0])
    for p in params[:3]:
        p.grad = torch.ones_like(p)
    optimizer.second_step()
    assert [p.data_ptr() for p in params] == pointers
    copied_params, copied = run_big(CASES["bsam"], False)
    copied.zero_grad()
    copied.noisy_step()
    for p in copied_params[:3]:
        p.grad = torch.ones_like(p)
    copied.first_step(zero_grad=True)
    for p in copied_params[:3]:
        p.grad = torch.ones_like(p)
    copied.second_step()
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["w", "w + e"])
def test_bsam_swap_non_finite_gradient_raises_and_restores_w(where):
    params, optimizer = run_big(CASES["bsam"], True)
    pointers = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer.noisy_step()
    raise_non_finite(optimizer, params, where)
    assert [p.data_ptr() for p in params] == pointers
    for p, w in zip(params, before):
        assert torch.equal(p.detach(), w)


def test_bsam_swap_arguments_are_checked():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="swap must be None, True or False"):
        BSAM([p], num_data=10, swap=1)
    with pytest.raises(ValueError, match="swap=True needs the fast path"):
        BSAM([p], num_data=10, swap=True, foreach=False)


def _looksam_steps(optimizer, params, frozen, x, steps, without_grad=None):
    """``steps`` closure steps; ``without_grad`` (an index) leaves that parameter's gradient None."""
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(params, frozen, x).backward()
        if without_grad is not None:
            params[without_grad].grad = None
        return 0.0
    for _ in range(steps):
        optimizer.step(closure)


def test_looksam_cheap_steps_reuse_the_sam_steps_norm_of_g_v(monkeypatch):
    """On the fast path ``||g_v||`` is computed once, on the SAM step, not on each cheap step."""
    import sam_edu.torch.looksam as looksam_module
    params, frozen = make_params(torch.float64)
    optimizer = CASES["looksam_k3"]([{"params": params}], True)
    x = torch.randn(8, 5, dtype=torch.float64)
    _looksam_steps(optimizer, params, frozen, x, 1)  # t = 0, a SAM step: g_v and its norm
    norms_of = []
    real = looksam_module.global_norm_foreach

    def counting(tree):
        norms_of.append(len(tree))
        return real(tree)
    monkeypatch.setattr(looksam_module, "global_norm_foreach", counting)
    _looksam_steps(optimizer, params, frozen, x, 2)  # t = 1, 2: cheap steps
    assert norms_of == [4, 4]  # ||g|| of each cheap step only; ||g_v|| is not read again
    assert optimizer.steps_taken == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_looksam_cheap_step_without_a_gradient_takes_the_norm_of_the_g_v_it_uses(dtype):
    """A parameter with ``g_v`` but no gradient on a cheap step leaves ``||g_v||`` over the
    others, as on the readable path: the SAM step's norm, over all of them, is not reused."""
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    x = torch.randn(8, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
    finals = []
    for foreach in (False, True):
        params, frozen = make_params(dtype)
        optimizer = CASES["looksam_k3"]([{"params": params}], foreach)
        _looksam_steps(optimizer, params, frozen, x, 1)
        _looksam_steps(optimizer, params, frozen, x, 2, without_grad=1)
        assert optimizer.foreach_used is foreach
        finals.append(params)
    for a, b in zip(*finals):
        torch.testing.assert_close(b, a, **tol)


def test_looksam_resumed_on_the_fast_path_continues_bit_for_bit():
    """An optimizer loaded between a SAM step and its cheap steps computes ``||g_v||`` from the
    loaded ``g_v``, not its own earlier one, and takes exactly the original's steps."""
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params, frozen = make_params(torch.float64)
    optimizer = CASES["looksam_k3"]([{"params": params}], True)
    _looksam_steps(optimizer, params, frozen, x, 1)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    clone = CASES["looksam_k3"]([{"params": twin}], True)
    _looksam_steps(clone, twin, frozen, 2 * x, 1)  # a SAM step of its own: another g_v
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as torch.save/torch.load
    with torch.no_grad():
        for p, w in zip(twin, params):
            p.copy_(w)
    _looksam_steps(optimizer, params, frozen, x, 3)
    _looksam_steps(clone, twin, frozen, x, 3)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
