"""sam_edu.torch.BSAM and LookSAM: parity with the reference, the optimizer API, checkpoints."""

import copy
import io
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import parity  # noqa: E402
from torch_helpers import (  # noqa: E402
    DTYPES,
    assert_bit_identical,
    explicit_step,
    leaves,
    mlp_loss,
    numpy,
    snapshot,
    torch_batches,
)
from sam_edu import reference as ref  # noqa: E402
from sam_edu.torch import BSAM, SAM, LookSAM, disable_running_stats  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a busy machine torch's thread pool only adds contention (each
    backward pass took ~50x longer with the default pool here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def closure_for(optimizer, params, x, y, calls=None):
    """The closure of ``step()``; appends to ``calls`` once per gradient evaluation."""
    def closure():
        if calls is not None:
            calls.append(1)
        optimizer.zero_grad()
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss

    return closure


def with_gradients(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=p.dtype).clone()


def gradients(params, bad=None):
    """Finite gradients, or with one entry of the second tensor replaced by ``bad``."""
    grads = [np.full(p.shape, 0.1) for p in params]
    if bad is not None:
        grads[1][0] = bad
    return grads


BAD = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


# =================================================================================================
# bSAM
# =================================================================================================


def bsam_explicit_step(optimizer, params, x, y, noise=None):
    optimizer.noisy_step(noise)  # update 1
    mlp_loss(params, x, y).backward()  # (1)
    optimizer.first_step(zero_grad=True)  # (2)
    mlp_loss(params, x, y).backward()  # (3)
    optimizer.second_step(zero_grad=True)  # (4), (5)


def bsam_explicit_zeroing_in_place_step(optimizer, params, x, y, noise=None):
    """Zeroing in place keeps the ``p.grad`` tensors for pass (3): ``g`` must have been copied."""
    optimizer.noisy_step(noise)
    mlp_loss(params, x, y).backward()  # (1)
    optimizer.first_step()  # (2)
    optimizer.zero_grad(set_to_none=False)
    mlp_loss(params, x, y).backward()  # (3)
    optimizer.second_step()  # (4), (5)
    optimizer.zero_grad(set_to_none=False)


def bsam_run(optimizer, params, noises=None, dtype=torch.float64, api=bsam_explicit_step):
    """The weights after each parity step; ``noises=None`` lets the optimizer draw."""
    noises = noises or [None] * parity.STEPS
    out = []
    for (x, y), noise in zip(torch_batches(dtype), noises):
        api(optimizer, params, x, y, noise)
        out.append(numpy(params))
    return out


def bsam_reference_with(noises, bsam_kwargs, lrs=None):
    """The reference's weights after each step with the given noise (and per-step ``lr``)."""
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


def generator_noise(seed, dtype=torch.float64, steps=parity.STEPS):
    """The noise ``BSAM(seed=seed)`` draws on the CPU: one ``randn`` per tensor, in order."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(w.shape, generator=generator, dtype=dtype).numpy()
             for w in parity.init_params()] for _ in range(steps)]


# --- parity with the reference -------------------------------------------------------------------


@parity.bsam_case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("api", [bsam_explicit_step, bsam_explicit_zeroing_in_place_step],
                         ids=["explicit", "explicit-zeroing-in-place"])
def test_bsam_matches_the_reference_at_every_step(bsam_kwargs, dtype, api):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = BSAM(params, **bsam_kwargs)
    got = bsam_run(optimizer, params, parity.bsam_noise(), DTYPES[dtype], api)
    want = parity.bsam_reference_trajectory(bsam_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


@parity.bsam_case_params
def test_bsam_parity_is_sensitive_to_the_noise(bsam_kwargs):
    """Without the noise the reference ends far outside the float64 tolerance. (In the tuned
    case, N = 1000 and s_init = 2, the noise moves the weights by only ~4e-6: the float32
    comparison alone could not tell whether it was applied.)"""
    with_noise = parity.bsam_reference_trajectory(bsam_kwargs)
    without = bsam_reference_with([[np.zeros_like(w) for w in parity.init_params()]]
                                  * parity.STEPS, bsam_kwargs)
    assert max(np.abs(a - b).max() for a, b in zip(with_noise[-1], without[-1])) > 1e-6


@parity.bsam_case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bsam_seeded_step_closure_matches_the_reference_fed_the_generators_noise(bsam_kwargs,
                                                                                 dtype):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = BSAM(params, **bsam_kwargs, seed=7)
    got = []
    for x, y in torch_batches(DTYPES[dtype]):
        optimizer.step(closure_for(optimizer, params, x, y))
        got.append(numpy(params))
    want = bsam_reference_with(generator_noise(7, DTYPES[dtype]), bsam_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def test_bsam_per_group_settings_match_the_reference_per_tensor():
    """Each group's tensors follow the reference's updates with that group's settings. The
    gradients are given (not computed), since a computed one would couple the groups."""
    tuned = dict(lr=0.2, beta1=0.8, beta2=0.99, weight_decay=0.01, rho=0.01, damping=0.05)
    defaults = dict(lr=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-4, rho=0.05, damping=0.1)
    settings = [defaults, defaults, tuned, tuned]
    w = parity.init_params()
    params = leaves(w)
    optimizer = BSAM([{"params": params[:2]}, {"params": params[2:], **tuned}], num_data=100)
    m, s = ref.bsam_init(w)
    rng = np.random.default_rng(0)
    for noise in parity.bsam_noise():
        g, g_adv = ([rng.normal(size=w_i.shape) for w_i in w] for _ in range(2))
        optimizer.noisy_step(noise)
        for got, want in zip(numpy(params), ref.posterior_sample(w, s, noise, 100)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
        with_gradients(params, g)
        optimizer.first_step()
        for i, got in enumerate(numpy(params)):
            e = ref.bsam_perturbation([g[i]], [s[i]], settings[i]["rho"])[0]
            np.testing.assert_allclose(got, w[i] + e, rtol=0, atol=1e-15)
        with_gradients(params, g_adv)
        optimizer.second_step()
        for i, c in enumerate(settings):
            m[i] = ref.bsam_momentum([m[i]], [g_adv[i]], [w[i]], c["beta1"], c["weight_decay"])[0]
            w[i] = ref.bsam_mean([w[i]], [m[i]], [s[i]], c["lr"])[0]
            s[i] = ref.bsam_precision([s[i]], [g[i]], c["beta2"], c["damping"],
                                      c["weight_decay"])[0]
        parity.assert_trajectories_close([numpy(params)], [w], 1e-13)


def test_bsam_lr_scheduler_sets_the_lr_of_each_step():
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100, seed=0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for x, y in torch_batches():
            optimizer.step(closure_for(optimizer, params, x, y))
            scheduler.step()
            got.append(numpy(params))
    lrs = [0.5 * 0.5 ** t for t in range(parity.STEPS)]
    want = bsam_reference_with(generator_noise(0), dict(num_data=100), lrs)
    parity.assert_trajectories_close(got, want, 1e-12)


# --- noise, seeds and the posterior --------------------------------------------------------------


def seeded_run(seed):
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100, seed=seed)
    for x, y in torch_batches():
        optimizer.step(closure_for(optimizer, params, x, y))
    return snapshot(params)


def test_bsam_seeded_runs_are_reproducible_and_the_seed_matters():
    assert_bit_identical(seeded_run(3), seeded_run(3))
    assert not torch.equal(seeded_run(3)[0], seeded_run(4)[0])


def test_bsam_without_a_seed_draws_from_the_global_rng():
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(seeded_run(None))
    assert_bit_identical(runs[0], runs[1])
    got = [r.numpy() for r in runs[0]]
    want = bsam_reference_with(generator_noise(11), dict(num_data=100))[-1]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def test_bsam_with_lr_zero_never_moves_the_weights():
    """Noise and perturbation are removed exactly; only ``m`` and ``s`` change."""
    params = leaves(parity.init_params())
    before = snapshot(params)
    optimizer = BSAM(params, num_data=100, lr=0.0, seed=0)
    for x, y in torch_batches() * 2:
        optimizer.step(closure_for(optimizer, params, x, y))
        assert_bit_identical(params, before)
    state = optimizer.state[params[0]]
    assert state["momentum"].abs().max() > 0 and not torch.all(state["precision"] == 1.0)


def test_bsam_step_returns_the_loss_at_the_noisy_point_and_evaluates_the_closure_twice():
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = BSAM(params, num_data=100, seed=5)
    noise = generator_noise(5, steps=1)[0]
    with torch.no_grad():
        noisy = [w + torch.tensor(n) / 10.0 for w, n in zip(params, noise)]  # 1/sqrt(N s_init)
        want = mlp_loss(noisy, x, y)
    calls = []
    loss = optimizer.step(closure_for(optimizer, params, x, y, calls))
    assert len(calls) == 2
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-15)


def test_bsam_and_looksam_take_numpy_integers_like_the_reference():
    bsam = BSAM(leaves(parity.init_params()), num_data=np.int64(100), seed=np.int64(3))
    looksam = LookSAM(leaves(parity.init_params()), k=np.int64(3), lr=0.1)
    assert (bsam.num_data, bsam.seed, looksam.k) == (100, 3, 3)
    assert all(type(v) is int for v in (bsam.num_data, bsam.seed, looksam.k))


def test_bsam_step_without_a_closure_names_it():
    optimizer = BSAM(leaves(parity.init_params()), num_data=100)
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()


def trained_bsam(num_data=100):
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=num_data, lr=0.2, seed=0)
    for x, y in torch_batches():
        optimizer.step(closure_for(optimizer, params, x, y))
    return params, optimizer


def test_posterior_sample_draws_from_n_w_one_over_n_s_and_restores_w_exactly():
    params, optimizer = trained_bsam()
    before = snapshot(params)
    s = [optimizer.state[p]["precision"] for p in params]
    assert not torch.allclose(s[0], s[0].flatten()[0])  # the precision varies per weight
    generator = torch.Generator().manual_seed(0)
    standardised = []
    for _ in range(400):
        with optimizer.posterior_sample(generator):
            standardised.append(torch.cat([((p - w) * torch.sqrt(100 * s_p)).flatten()
                                           for p, w, s_p in zip(params, before, s)]))
        assert_bit_identical(params, before)
    z = torch.stack(standardised)  # 400 draws x 43 weights, each ~ N(0, 1) if the spread is right
    assert abs(z.mean().item()) < 0.03
    assert abs(z.std().item() - 1.0) < 0.03


def test_posterior_sample_spread_is_one_over_sqrt_n_s_init_before_training():
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=25, s_init=4.0)  # std 1 / sqrt(25 * 4) = 0.1
    w = snapshot(params)
    torch.manual_seed(0)
    draws = []
    for _ in range(400):
        with optimizer.posterior_sample():
            draws.append(torch.cat([(p - w_p).flatten() for p, w_p in zip(params, w)]))
    assert abs(torch.stack(draws).std().item() - 0.1) < 0.003


def test_posterior_sample_restores_w_after_an_exception_and_keeps_the_training_noise():
    """Evaluating does not draw from the optimizer's generator: the next step is unchanged."""
    params, optimizer = trained_bsam()
    twin_params, twin = trained_bsam()
    before = snapshot(params)
    with pytest.raises(KeyError):
        with optimizer.posterior_sample():
            raise KeyError("inside the block")
    assert_bit_identical(params, before)
    x, y = torch_batches()[0]
    optimizer.step(closure_for(optimizer, params, x, y))
    twin.step(closure_for(twin, twin_params, x, y))
    assert_bit_identical(params, twin_params)


def test_posterior_sample_with_equal_generators_draws_equal_weights():
    params, optimizer = trained_bsam()
    draws = []
    for _ in range(2):
        with optimizer.posterior_sample(torch.Generator().manual_seed(1)):
            draws.append(snapshot(params))
    assert_bit_identical(draws[0], draws[1])


def test_posterior_sample_inside_a_step_raises():
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100)
    optimizer.noisy_step()
    with pytest.raises(RuntimeError, match="second_step"):
        with optimizer.posterior_sample():
            pass


def test_frozen_parameters_get_no_noise_and_no_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).to(torch.float64)
    model[0].requires_grad_(False)
    frozen = snapshot(model[0].parameters())
    optimizer = BSAM(model.parameters(), num_data=10, seed=0)
    x, y = torch_batches()[0]

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert_bit_identical(model[0].parameters(), frozen)
        loss.backward()
        return loss

    optimizer.step(closure)
    with optimizer.posterior_sample():
        assert_bit_identical(model[0].parameters(), frozen)
    assert len(optimizer.state) == 2


def test_bsam_state_holds_momentum_and_precision_of_the_parameters_dtype():
    params = leaves(parity.init_params(), torch.float32)
    optimizer = BSAM(params, num_data=100, seed=0)
    x, y = torch_batches(torch.float32)[0]
    optimizer.step(closure_for(optimizer, params, x, y))
    assert set(optimizer.state[params[0]]) == {"momentum", "precision"}
    assert optimizer.state[params[0]]["precision"].dtype == torch.float32
    assert optimizer.steps_taken == 1


# --- checkpoints ---------------------------------------------------------------------------------


def train(model, optimizer, batches):
    for x, y in batches:
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def checkpoint_round_trip(model, optimizer):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_bsam_resumed_run_equals_an_uninterrupted_one():
    """m, s, the step count and the generator's state come from disk; the resumed optimizer is
    built with another seed and another init, so nothing can come from elsewhere."""
    def make_run(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 3)).to(torch.float64)
        return model, BSAM(model.parameters(), num_data=100, lr=0.2, seed=seed)

    batches = torch_batches() * 2
    uninterrupted, optimizer = make_run(0)
    train(uninterrupted, optimizer, batches)

    model, optimizer = make_run(0)
    train(model, optimizer, batches[:5])
    checkpoint = checkpoint_round_trip(model, optimizer)
    resumed_model, resumed = make_run(1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.steps_taken == 5 and resumed.seed == 0
    train(resumed_model, resumed, batches[5:])

    assert_bit_identical(resumed_model.parameters(), uninterrupted.parameters())


# --- validation and failures ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_data=0), "num_data"),
    (dict(num_data=100.0), "num_data"),
    (dict(num_data=True), "num_data"),
    (dict(lr=-0.1), "lr"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta1=-0.1), "beta1"),
    (dict(beta2=1.0), "beta2"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(rho=-0.05), "rho"),
    (dict(damping=-0.1), "damping"),
    (dict(s_init=0.0), "s_init"),
    (dict(s_init=-1.0), "s_init"),
    (dict(seed=1.5), "seed"),
    (dict(lr=float("nan")), "lr"),
], ids=["num_data-0", "num_data-float", "num_data-bool", "lr", "beta1-1", "beta1-negative",
        "beta2-1", "weight_decay", "rho", "damping", "s_init-0", "s_init-negative", "seed",
        "lr-nan"])
def test_bsam_invalid_arguments_are_named(kwargs, name):
    kwargs = {"num_data": 100, **kwargs}
    with pytest.raises(ValueError, match=name):
        BSAM(leaves(parity.init_params()), **kwargs)


@pytest.mark.parametrize("key,value", [("lr", -1.0), ("beta1", 1.0), ("beta2", -0.5),
                                       ("weight_decay", -1.0), ("rho", -1.0), ("damping", -1.0)])
def test_bsam_invalid_group_settings_are_named(key, value):
    params = leaves(parity.init_params())
    with pytest.raises(ValueError, match=rf"{key}.*group 1"):
        BSAM([{"params": params[:2]}, {"params": params[2:], key: value}], num_data=100)


@pytest.mark.parametrize("noise", [
    lambda w: w[:3],
    lambda w: [np.zeros(3)] + w[1:],
], ids=["too-few", "wrong-shape"])
def test_bsam_noise_of_the_wrong_structure_is_named(noise):
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100)
    with pytest.raises(ValueError, match="noise"):
        optimizer.noisy_step(noise(parity.init_params()))


def test_bsam_steps_must_come_in_order():
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100)
    with pytest.raises(RuntimeError, match="noisy_step"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.second_step()
    optimizer.noisy_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.noisy_step()
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()


def bsam_state(optimizer, params):
    return [t.clone() for p in params for t in optimizer.state[p].values()]


@BAD
def test_bsam_non_finite_gradient_at_the_noisy_point_raises_and_restores_w(bad):
    params, optimizer = trained_bsam()
    before, state = snapshot(params), bsam_state(optimizer, params)
    optimizer.noisy_step()
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at the noisy point"):
        optimizer.first_step()
    assert_bit_identical(params, before)
    assert_bit_identical(bsam_state(optimizer, params), state)
    assert optimizer.steps_taken == parity.STEPS
    optimizer.noisy_step()  # the failed step is over: the next one can start


@BAD
def test_bsam_non_finite_gradient_at_w_plus_e_raises_and_restores_w(bad):
    params, optimizer = trained_bsam()
    before, state = snapshot(params), bsam_state(optimizer, params)
    optimizer.noisy_step()
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at w \\+ e"):
        optimizer.second_step()
    assert_bit_identical(params, before)
    assert_bit_identical(bsam_state(optimizer, params), state)
    assert optimizer.steps_taken == parity.STEPS
    optimizer.noisy_step()


@pytest.mark.parametrize("at", ["noisy-point", "w-plus-e"])
def test_bsam_missing_gradients_restore_w_and_raise(at):
    params = leaves(parity.init_params())
    optimizer = BSAM(params, num_data=100)
    before = snapshot(params)
    optimizer.noisy_step()
    if at == "w-plus-e":
        with_gradients(params, gradients(params))
        optimizer.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="no (parameter has a )?gradient"):
        (optimizer.first_step if at == "noisy-point" else optimizer.second_step)()
    assert_bit_identical(params, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bsam_on_cuda_matches_the_cpu_with_the_same_noise():
    """One generator per device; with explicit noise the GPU follows the reference too."""
    params = [p.detach().cuda().requires_grad_() for p in leaves(parity.init_params())]
    optimizer = BSAM(params, num_data=100)
    got = []
    for (x, y), noise in zip(torch_batches(), parity.bsam_noise()):
        bsam_explicit_step(optimizer, params, x.cuda(), y.cuda(), noise)
        got.append([p.detach().cpu().numpy().copy() for p in params])
    parity.assert_trajectories_close(got, parity.bsam_reference_trajectory(dict(num_data=100)),
                                     1e-10)
    seeded = BSAM(params, num_data=100, seed=0)
    x, y = torch_batches()[0]
    seeded.step(closure_for(seeded, params, x.cuda(), y.cuda()))
    assert list(seeded.generators) == [params[0].device]
    restored = BSAM(params, num_data=100)
    restored.load_state_dict(seeded.state_dict())
    assert torch.equal(restored.generators[params[0].device].get_state(),
                       seeded.generators[params[0].device].get_state())


# =================================================================================================
# LookSAM
# =================================================================================================


def looksam_explicit_step(optimizer, params, x, y):
    mlp_loss(params, x, y).backward()  # (1)
    if optimizer.first_step(zero_grad=True):  # (2), or the cheap step's (5)
        mlp_loss(params, x, y).backward()  # (3)
        optimizer.second_step(zero_grad=True)  # (4), (5)


def looksam_closure_step(optimizer, params, x, y):
    optimizer.step(closure_for(optimizer, params, x, y))


def looksam_explicit_zeroing_in_place_step(optimizer, params, x, y):
    """Zeroing in place keeps the ``p.grad`` tensors for pass (3): ``g`` must have been copied."""
    mlp_loss(params, x, y).backward()  # (1)
    sam_step = optimizer.first_step()  # (2)
    optimizer.zero_grad(set_to_none=False)
    if sam_step:
        mlp_loss(params, x, y).backward()  # (3)
        optimizer.second_step()  # (4), (5)
        optimizer.zero_grad(set_to_none=False)


def looksam_run(optimizer, params, api=looksam_explicit_step, dtype=torch.float64, batches=None):
    out = []
    for x, y in batches or torch_batches(dtype):
        api(optimizer, params, x, y)
        out.append(numpy(params))
    return out


LOOKSAM_APIS = pytest.mark.parametrize(
    "api", [looksam_explicit_step, looksam_closure_step, looksam_explicit_zeroing_in_place_step],
    ids=["explicit", "closure", "explicit-zeroing-in-place"])


# --- parity with the reference -------------------------------------------------------------------


@parity.looksam_case_params
@pytest.mark.parametrize("dtype", list(DTYPES))
@LOOKSAM_APIS
def test_looksam_matches_the_reference_at_every_step(looksam_kwargs, base_kwargs, dtype, api):
    params = leaves(parity.init_params(), DTYPES[dtype])
    optimizer = LookSAM(params, torch.optim.SGD, **looksam_kwargs, **base_kwargs)
    got = looksam_run(optimizer, params, api, DTYPES[dtype])
    want = parity.looksam_reference_trajectory(looksam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def test_looksam_cheap_steps_differ_from_sam_and_from_the_base():
    """The parity problem is sensitive to the cheap steps: SAM every step, or ``alpha = 0`` (the
    base step with ``g``), end far from LookSAM."""
    kwargs, base = parity.LOOKSAM_CASES[0][1:]
    looksam = parity.looksam_reference_trajectory(kwargs, base)[-1]
    every_step = parity.looksam_reference_trajectory({**kwargs, "k": 1}, base)[-1]
    no_g_v = parity.looksam_reference_trajectory({**kwargs, "alpha": 0.0}, base)[-1]
    for other in (every_step, no_g_v):
        assert max(np.abs(a - b).max() for a, b in zip(looksam, other)) > 1e-4


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_looksam_with_k_one_is_sam(adaptive, rho, momentum):
    """Every step a SAM step: the same ``e`` and the base step with ``g_adv``, bit for bit."""
    ours, sam = leaves(parity.init_params()), leaves(parity.init_params())
    kwargs = dict(rho=rho, adaptive=adaptive, lr=0.1, momentum=momentum)
    got = looksam_run(LookSAM(ours, k=1, **kwargs), ours, batches=torch_batches() * 2)
    want = looksam_run(SAM(sam, **kwargs), sam, explicit_step, batches=torch_batches() * 2)
    parity.assert_trajectories_close(got, want, 0.0)


def test_looksam_per_group_rho_acts_on_the_sam_steps():
    """Two groups with different rho: the SAM step's ascent is SAM's with the same groups."""
    ours, sam = leaves(parity.init_params()), leaves(parity.init_params())
    got = looksam_run(LookSAM([{"params": ours[:2], "rho": 0.3}, {"params": ours[2:]}], k=1,
                              rho=0.05, lr=0.1), ours)
    want = looksam_run(SAM([{"params": sam[:2], "rho": 0.3}, {"params": sam[2:]}], rho=0.05,
                           lr=0.1), sam, explicit_step)
    parity.assert_trajectories_close(got, want, 0.0)


@pytest.mark.parametrize("api,attach_to_base", [(looksam_closure_step, False),
                                                  (looksam_explicit_step, True)],
                         ids=["closure-scheduler-on-looksam", "explicit-scheduler-on-base"])
def test_looksam_lr_scheduler_sets_the_lr_of_sam_and_cheap_steps(api, attach_to_base):
    """With rho = 0 and alpha = 0 both kinds of step are the base step with ``g``, so the move
    shows which lr each one used."""
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, rho=0.0, k=2, alpha=0.0, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer.base_optimizer if attach_to_base else optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for t, (x, y) in enumerate(torch_batches()):
            before = snapshot(params)
            g = torch.autograd.grad(mlp_loss(params, x, y), params)
            api(optimizer, params, x, y)
            scheduler.step()
            for p, w, g_p in zip(params, before, g):
                torch.testing.assert_close(p.detach(), w - 0.1 * 0.5 ** t * g_p, rtol=0,
                                           atol=1e-15)


# --- the cost: n + ceil(n / k) gradient evaluations ----------------------------------------------


@pytest.mark.parametrize("n,k", [(5, 1), (10, 3), (7, 7), (9, 10), (20, 10), (11, 2)])
def test_looksam_evaluates_n_plus_ceil_n_over_k_gradients(n, k):
    params = leaves(parity.init_params())
    batches = (torch_batches() * 5)[:n]
    optimizer = LookSAM(params, k=k, lr=0.1)
    calls = []
    for x, y in batches:
        optimizer.step(closure_for(optimizer, params, x, y, calls))
    assert len(calls) == n + math.ceil(n / k)
    assert optimizer.steps_taken == n

    twin = leaves(parity.init_params())
    twin_optimizer = LookSAM(twin, k=k, lr=0.1)
    backward_passes, second_passes = 0, 0
    for x, y in batches:
        mlp_loss(twin, x, y).backward()
        backward_passes += 1
        if twin_optimizer.first_step(zero_grad=True):
            mlp_loss(twin, x, y).backward()
            backward_passes += 1
            second_passes += 1
            twin_optimizer.second_step(zero_grad=True)
    assert backward_passes == n + math.ceil(n / k) and second_passes == math.ceil(n / k)
    assert_bit_identical(twin, params)


def test_looksam_first_step_says_which_step_it_took():
    """k = 3: steps 0 and 3 are SAM steps (weights at w + e, base not stepped), the others cheap
    (the base step is done, nothing left to restore)."""
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=3, rho=0.1, lr=0.1)
    for t, (x, y) in enumerate(torch_batches()):
        before = snapshot(params)
        g = torch.autograd.grad(mlp_loss(params, x, y), params)
        mlp_loss(params, x, y).backward()
        sam_step = optimizer.first_step(zero_grad=True)
        assert sam_step == (t % 3 == 0)
        if sam_step:
            e = [p - w for p, w in zip(snapshot(params), before)]
            norm = torch.sqrt(sum(torch.sum(g_p * g_p) for g_p in g))
            for e_p, g_p in zip(e, g):
                torch.testing.assert_close(e_p, 0.1 * g_p / norm, rtol=0, atol=1e-12)
            mlp_loss(params, x, y).backward()
            optimizer.second_step(zero_grad=True)
        else:
            assert optimizer._saved_w is None
            with pytest.raises(RuntimeError, match=r"first_step\(\) returned True"):
                optimizer.second_step()
        assert not all(torch.equal(p, w) for p, w in zip(params, before))
        assert optimizer.steps_taken == t + 1


def test_looksam_step_returns_the_loss_at_w_and_needs_a_closure():
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=2, lr=0.1)
    for x, y in torch_batches()[:2]:  # a SAM step, then a cheap one
        with torch.no_grad():
            loss_at_w = mlp_loss(params, x, y)
        assert optimizer.step(closure_for(optimizer, params, x, y)).item() == loss_at_w.item()
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()


# --- state and checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("base,kwargs,keys", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), {"momentum_buffer", "g_v"}),
    (torch.optim.Adam, dict(lr=0.01), {"step", "exp_avg", "exp_avg_sq", "g_v"}),
], ids=["sgd-momentum", "adam"])
def test_looksam_g_v_is_stored_after_the_base_step(base, kwargs, keys):
    params = leaves(parity.init_params())
    x, y = torch_batches()[0]
    optimizer = LookSAM(params, base, k=2, **kwargs)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    assert optimizer.state is optimizer.base_optimizer.state
    mlp_loss(params, x, y).backward()
    optimizer.first_step(zero_grad=True)
    assert len(optimizer.state) == 0  # neither w nor g in the state: Adam still initialises
    mlp_loss(params, x, y).backward()
    optimizer.second_step(zero_grad=True)
    assert set(optimizer.state[params[0]]) == keys
    g = [torch.tensor(g_p) for g_p in
         ref.mlp_loss_and_grad(parity.init_params(), *parity.batches()[0])[1]]
    g_v = [optimizer.state[p]["g_v"] for p in params]
    cosine = sum(torch.sum(v * g_p) for v, g_p in zip(g_v, g)) / (
        torch.sqrt(sum(torch.sum(v * v) for v in g_v) * sum(torch.sum(g_p * g_p) for g_p in g)))
    assert abs(cosine.item()) < 1e-10  # orthogonal to g


def test_looksam_g_v_of_a_parameter_without_a_gradient_is_dropped():
    """A tensor that had no gradient on the last SAM step has ``g_v = 0``: no stale ``g_v``."""
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizer = LookSAM(list(first.parameters()) + list(second.parameters()), k=1, lr=0.1)
    x = torch.randn(4, 3)
    for model in (lambda: first(x) + second(x), lambda: first(x)):
        def closure(model=model):
            optimizer.zero_grad(set_to_none=True)
            loss = model().pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
    assert all("g_v" in optimizer.state[p] for p in first.parameters())
    assert all("g_v" not in optimizer.state[p] for p in second.parameters())


@pytest.mark.parametrize("base", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                  (torch.optim.Adam, dict(lr=0.01))], ids=["sgd-momentum", "adam"])
def test_looksam_resumed_run_equals_an_uninterrupted_one(base):
    """k = 3, saved after step 5: the resumed run starts with a cheap step (t = 5) that needs the
    ``g_v`` of step 3 and the step count, both from disk."""
    def make_run(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 3)).to(torch.float64)
        base_optimizer, base_kwargs = base
        return model, LookSAM(model.parameters(), base_optimizer, rho=0.1, k=3, **base_kwargs)

    batches = torch_batches() * 2
    uninterrupted, optimizer = make_run(0)
    train(uninterrupted, optimizer, batches)

    model, optimizer = make_run(0)
    train(model, optimizer, batches[:5])
    checkpoint = checkpoint_round_trip(model, optimizer)
    resumed_model, resumed = make_run(1)  # another init: everything must come from disk
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.state is resumed.base_optimizer.state
    assert resumed.steps_taken == 5
    train(resumed_model, resumed, batches[5:])

    assert_bit_identical(resumed_model.parameters(), uninterrupted.parameters())


# --- BatchNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_looksam_running_statistics_come_from_pass_one_only(momentum):
    """On SAM steps ``disable_running_stats`` keeps pass (3) out of the statistics; cheap steps
    have one pass. Either way the statistics are those of one forward pass at ``w``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4, momentum=momentum),
                                torch.nn.Tanh(), torch.nn.Linear(4, 3))
    optimizer = LookSAM(model.parameters(), rho=0.5, k=2, lr=0.1)
    for t in range(4):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        pass_one_only = copy.deepcopy(model)
        pass_one_only(x)
        F.cross_entropy(model(x), y).backward()
        if optimizer.first_step(zero_grad=True):
            with disable_running_stats(model):
                F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
        bn, want = model[1], pass_one_only[1]
        assert bn.momentum == momentum
        assert torch.equal(bn.running_mean, want.running_mean)
        assert torch.equal(bn.running_var, want.running_var)
        assert torch.equal(bn.num_batches_tracked, want.num_batches_tracked)


# --- validation and failures ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(k=0), "k"),
    (dict(k=2.0), "k"),
    (dict(k=True), "k"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(rho=-0.1), "rho"),
    (dict(perturb_eps=-1e-12), "perturb_eps"),
    (dict(base_optimizer=object), "base_optimizer"),
], ids=["k-0", "k-float", "k-bool", "alpha", "alpha-nan", "rho", "perturb_eps", "base"])
def test_looksam_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LookSAM(leaves(parity.init_params()), lr=0.1, **kwargs)


def after_one_sam_step(k=2):
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=k, lr=0.1, momentum=0.9)
    looksam_explicit_step(optimizer, params, *torch_batches()[0])
    return params, optimizer


def base_state(optimizer, params):
    return [optimizer.state[p]["momentum_buffer"].clone() for p in params]


@BAD
@pytest.mark.parametrize("sam_step", [True, False], ids=["sam-step", "cheap-step"])
def test_looksam_non_finite_gradient_at_w_raises_and_leaves_everything(bad, sam_step):
    params, optimizer = after_one_sam_step(k=2 if sam_step else 3)
    if sam_step:
        looksam_explicit_step(optimizer, params, *torch_batches()[1])  # t = 2 is a SAM step
    before, state, t = snapshot(params), base_state(optimizer, params), optimizer.steps_taken
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at w;"):
        optimizer.first_step()
    assert_bit_identical(params, before)
    assert_bit_identical(base_state(optimizer, params), state)
    assert optimizer.steps_taken == t


@BAD
def test_looksam_non_finite_gradient_at_w_plus_e_raises_and_restores_w(bad):
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=2, rho=0.5, adaptive=True, lr=0.1, momentum=0.9)
    before = snapshot(params)
    with_gradients(params, gradients(params))
    assert optimizer.first_step()
    with_gradients(params, gradients(params, bad))
    with pytest.raises(FloatingPointError, match="non-finite gradient at w \\+ e"):
        optimizer.second_step()
    assert_bit_identical(params, before)
    assert len(optimizer.state) == 0  # the base optimizer did not step, no g_v
    assert optimizer.steps_taken == 0


def test_looksam_zero_gradients_give_no_nan():
    """Zero ``g`` on a SAM step (``e = 0``, ``g_v = 0``) and on a cheap step (``d = 0``)."""
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=2, lr=0.1)
    before = snapshot(params)
    for _ in range(2):
        with_gradients(params, [np.zeros(p.shape) for p in params])
        if optimizer.first_step():
            with_gradients(params, [np.zeros(p.shape) for p in params])
            optimizer.second_step()
        assert_bit_identical(params, before)
    assert optimizer.steps_taken == 2


def test_looksam_steps_must_alternate_on_sam_steps():
    params = leaves(parity.init_params())
    optimizer = LookSAM(params, k=2, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.second_step()
    with pytest.raises(RuntimeError, match="backward"):
        optimizer.first_step()
    with_gradients(params, gradients(params))
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()
