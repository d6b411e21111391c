"""Properties of the bSAM and LookSAM references."""

import math

import numpy as np
import pytest

from sam_edu import reference as ref


def _tree(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)), rng.normal(size=(4,))]


def _dot(a, b):
    return sum(float(np.sum(x * y)) for x, y in zip(a, b))


def _problem(seed=0):
    params = ref.mlp_init((5, 4, 3), seed=seed)
    rng = np.random.default_rng(seed + 1)
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    return params, (lambda w: ref.mlp_loss_and_grad(w, x, y)[1])


# --- bSAM -------------------------------------------------------------------------------------

def test_bsam_step_by_hand_on_a_quadratic():
    """L(w) = 0.5 * a * w^2, one scalar weight: every update of SPEC.md written out."""
    a, w, n = 3.0, np.array([0.5]), np.array([0.7])
    num_data, lr, b1, b2, wd, rho, damping, s0 = 4, 0.5, 0.9, 0.999, 1e-2, 0.05, 0.1, 2.0
    m, s = ref.bsam_init([w], s0)
    grad = lambda p: [a * p[0]]  # noqa: E731
    got_w, got_m, got_s = ref.bsam_step([w], m, s, [n], grad, num_data, lr=lr, beta1=b1,
                                        beta2=b2, weight_decay=wd, rho=rho, damping=damping)
    noisy = w + n / np.sqrt(num_data * s0)
    g = a * noisy
    g_adv = a * (w + rho * g / s0)
    m1 = (1 - b1) * (g_adv + wd * w)
    np.testing.assert_allclose(got_m[0], m1, rtol=1e-15)
    np.testing.assert_allclose(got_w[0], w - lr * m1 / s0, rtol=1e-15)
    np.testing.assert_allclose(got_s[0], b2 * s0 + (1 - b2) * (np.sqrt(s0) * abs(g) + damping + wd),
                               rtol=1e-15)


def test_bsam_with_lr_zero_never_moves_the_weights():
    params, grad = _problem()
    m, s = ref.bsam_init(params)
    w = params
    rng = np.random.default_rng(3)
    for _ in range(5):
        noise = [rng.normal(size=p.shape) for p in params]
        w, m, s = ref.bsam_step(w, m, s, noise, grad, num_data=10, lr=0.0)
    for a, b in zip(w, params):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(si != 1.0) for si in s)  # the precision still learns


def test_posterior_sample_has_the_posterior_spread():
    w, s = [np.zeros(4)], [np.array([1.0, 4.0, 9.0, 100.0])]
    rng = np.random.default_rng(0)
    draws = np.stack([ref.posterior_sample(w, s, [rng.normal(size=4)], num_data=25)[0]
                      for _ in range(20000)])
    np.testing.assert_allclose(draws.std(axis=0), 1 / np.sqrt(25 * s[0]), rtol=0.03)
    np.testing.assert_allclose(draws.mean(axis=0), 0.0, atol=0.01)


def test_precision_settles_at_damping_plus_weight_decay_without_gradient():
    """With g = 0 the fixed point of s <- beta2 s + (1 - beta2)(damping + delta) is damping + delta."""
    s = [np.full(3, 5.0)]
    for _ in range(3000):
        s = ref.bsam_precision(s, [np.zeros(3)], beta2=0.99, damping=0.1, weight_decay=0.02)
    np.testing.assert_allclose(s[0], 0.12, rtol=1e-9)


def test_bsam_perturbation_is_preconditioned_not_normalised():
    g, s = _tree(0), [np.full((3, 4), 2.0), np.full(4, 4.0)]
    e = ref.bsam_perturbation(g, s, rho=0.1)
    np.testing.assert_allclose(e[0], 0.05 * g[0])
    np.testing.assert_allclose(e[1], 0.025 * g[1])


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_data=0), "num_data"), (dict(num_data=2.5), "num_data"),
    (dict(num_data=True), "num_data"),
    (dict(lr=-0.1), "lr"), (dict(rho=-1.0), "rho"), (dict(damping=-0.1), "damping"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"), (dict(s_init=0.0), "s_init"),
])
def test_bsam_arguments_are_validated(kwargs, name):
    args = dict(num_data=10, lr=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-4, rho=0.05,
                damping=0.1, s_init=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ref.check_bsam_arguments(**args)


def test_bsam_init_refuses_a_non_positive_precision():
    with pytest.raises(ValueError, match="s_init"):
        ref.bsam_init([np.zeros(3)], s_init=-1.0)


def test_bsam_step_refuses_a_non_finite_gradient():
    params, _ = _problem()
    m, s = ref.bsam_init(params)
    noise = [np.zeros_like(p) for p in params]
    with pytest.raises(FloatingPointError, match="noisy point"):
        ref.bsam_step(params, m, s, noise, lambda w: [np.full_like(p, np.nan) for p in w], 10)


# --- LookSAM ----------------------------------------------------------------------------------

def test_orthogonal_component_is_orthogonal_to_g_and_completes_g_adv():
    g, g_adv = _tree(1), _tree(2)
    g_v = ref.orthogonal_component(g_adv, g, perturb_eps=0.0)
    assert abs(_dot(g_v, g)) < 1e-12
    norm = np.sqrt(_dot(g, g))
    along = _dot(g_adv, g) / norm ** 2
    for v, a, gi in zip(g_v, g_adv, g):
        np.testing.assert_allclose(v + along * gi, a, rtol=0, atol=1e-12)


def test_looksam_direction_adds_g_v_rescaled_to_alpha_times_the_norm_of_g():
    g, g_v = _tree(3), _tree(4)
    d = ref.looksam_direction(g, g_v, alpha=0.7)
    added = [a - b for a, b in zip(d, g)]
    assert np.sqrt(_dot(added, added)) == pytest.approx(0.7 * np.sqrt(_dot(g, g)), rel=1e-12)
    assert _dot(added, g_v) == pytest.approx(np.sqrt(_dot(added, added) * _dot(g_v, g_v)))


def _run_looksam(n, k, params, grad, **kwargs):
    calls = 0

    def counting_grad(w):
        nonlocal calls
        calls += 1
        return grad(w)

    sgd = lambda w, d: [a - 0.1 * b for a, b in zip(w, d)]  # noqa: E731
    g_v = None
    for t in range(n):
        params, g_v = ref.looksam_step(t, params, g_v, counting_grad, sgd, k=k, **kwargs)
    return params, calls


@pytest.mark.parametrize("rho,adaptive", [(0.1, False), (0.5, True)])
def test_looksam_with_k_one_is_sam(rho, adaptive):
    params, grad = _problem()
    got, _ = _run_looksam(6, 1, params, grad, rho=rho, adaptive=adaptive)
    want = params
    for _ in range(6):
        want = ref.sam_step(want, grad, lambda w, d: [a - 0.1 * b for a, b in zip(w, d)],
                            rho=rho, adaptive=adaptive)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n,k", [(10, 1), (10, 3), (10, 10), (7, 5), (25, 10)])
def test_looksam_evaluates_n_plus_ceil_n_over_k_gradients(n, k):
    params, grad = _problem()
    _, calls = _run_looksam(n, k, params, grad)
    assert calls == n + math.ceil(n / k)


def test_looksam_cheap_step_uses_the_stored_g_v():
    params, grad = _problem()
    sgd = lambda w, d: [a - 0.1 * b for a, b in zip(w, d)]  # noqa: E731
    g_v = [np.ones_like(p) for p in params]
    got, kept = ref.looksam_step(1, params, g_v, grad, sgd, k=2, alpha=0.5)
    assert kept is g_v
    for a, b in zip(got, sgd(params, ref.looksam_direction(grad(params), g_v, 0.5))):
        np.testing.assert_allclose(a, b, rtol=1e-15)


@pytest.mark.parametrize("kwargs,name", [
    (dict(k=0), "k"), (dict(k=2.0), "k"), (dict(k=True), "k"),
    (dict(rho=-0.1), "rho"), (dict(alpha=-1.0), "alpha"),
])
def test_looksam_arguments_are_validated(kwargs, name):
    args = dict(rho=0.1, k=10, alpha=0.7)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ref.check_looksam_arguments(**args)
