"""Properties of the GSAM and WSAM references."""

import numpy as np
import pytest

from sam_edu import reference as ref

import parity


def _tree(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)), rng.normal(size=(4,))]


def _dot(a, b):
    return sum(float(np.sum(x * y)) for x, y in zip(a, b))


def test_decomposition_is_orthogonal_and_complete():
    g, g_adv = _tree(0), _tree(1)
    g_par, g_perp = ref.decompose(g, g_adv)
    assert abs(_dot(g_perp, g_adv)) < 1e-12
    for a, b, c in zip(g_par, g_perp, g):
        np.testing.assert_allclose(a + b, c, rtol=1e-14)


def test_gsam_direction_keeps_the_component_along_g_adv():
    """d . g_adv_hat = g_adv . g_adv_hat: the ascent on L does not change L_p to first order."""
    g, g_adv = _tree(2), _tree(3)
    d = ref.gsam_direction(g, g_adv, alpha=0.7)
    assert _dot(d, g_adv) == pytest.approx(_dot(g_adv, g_adv), rel=1e-12)


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_gsam_with_alpha_zero_is_sam(rho):
    params = ref.mlp_init((5, 4, 3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    grad = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    sgd = lambda w, d: [a - 0.1 * b for a, b in zip(w, d)]  # noqa: E731
    for a, b in zip(ref.gsam_step(params, grad, sgd, rho=rho, alpha=0.0),
                    ref.sam_step(params, grad, sgd, rho=rho)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_adaptive_gsam_perturbation_follows_the_official_jax_code():
    params, g = _tree(4), _tree(5)
    e = ref.gsam_perturbation(g, params, rho=0.5, adaptive=True)
    norm = np.sqrt(sum(np.sum(t * t) for t in g))
    for ei, w, gi in zip(e, params, g):
        np.testing.assert_allclose(ei, 0.5 * np.abs(w) * gi / norm, rtol=1e-10)


def test_lr_proportional_rho_interpolates_and_clamps_at_zero():
    kw = dict(lr_max=0.1, lr_min=0.0, rho_max=0.05, rho_min=0.01)
    assert ref.lr_proportional_rho(0.1, **kw) == pytest.approx(0.05)
    assert ref.lr_proportional_rho(0.0, **kw) == pytest.approx(0.01)
    assert ref.lr_proportional_rho(0.05, **kw) == pytest.approx(0.03)
    assert ref.lr_proportional_rho(-0.1, **kw) == 0.0  # a warm-up below lr_min
    with pytest.raises(ValueError, match="lr_max"):
        ref.lr_proportional_rho(0.1, 0.1, 0.1, 0.05)


def test_gsam_rejects_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        ref.gsam_step([np.ones(2)], lambda p: [np.ones(2)], lambda p, d: p, alpha=-0.1)


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_gamma_outside_zero_one_is_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ref.sharpness_weight(gamma)


def _mlp_problem():
    params = ref.mlp_init((5, 4, 3))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    return params, (lambda w: ref.mlp_loss_and_grad(w, x, y)[1])


def test_wsam_coupled_with_gamma_half_is_sam():
    params, grad = _mlp_problem()
    buffers = ref.sgd_init(params)
    base = lambda w, d: ref.sgd_update(w, d, buffers, lr=0.1, momentum=0.9)[0]  # noqa: E731
    for a, b in zip(ref.wsam_step(params, grad, base, lr=0.1, gamma=0.5, decouple=False),
                    ref.sam_step(params, grad, base)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_with_gamma_zero_is_the_base_optimizer(decouple):
    params, grad = _mlp_problem()
    base = lambda w, d: [a - 0.1 * b for a, b in zip(w, d)]  # noqa: E731
    for a, b in zip(ref.wsam_step(params, grad, base, lr=0.1, gamma=0.0, decouple=decouple),
                    base(params, grad(params))):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_decoupled_and_coupled_agree_for_plain_sgd():
    """With SGD (no preconditioning, no momentum) decoupling changes nothing."""
    params, grad = _mlp_problem()
    base = lambda w, d: [a - 0.1 * b for a, b in zip(w, d)]  # noqa: E731
    for a, b in zip(ref.wsam_step(params, grad, base, lr=0.1, decouple=True),
                    ref.wsam_step(params, grad, base, lr=0.1, decouple=False)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_clip_by_global_norm_keeps_the_direction():
    g = _tree(6)
    c = ref.clip_by_global_norm(g, 0.5)
    assert np.sqrt(sum(np.sum(t * t) for t in c)) == pytest.approx(0.5, rel=1e-5)
    for a, b in zip(c, g):
        np.testing.assert_allclose(a / b, c[0].flat[0] / g[0].flat[0], rtol=1e-12)
    for a, b in zip(ref.clip_by_global_norm(g, 1e6), g):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", [c[0] for c in parity.GSAM_CASES])
def test_gsam_reference_trajectory_decreases_the_loss(case):
    _, kw, base = next(c for c in parity.GSAM_CASES if c[0] == case)
    traj = parity.gsam_reference_trajectory(kw, base)
    x = np.concatenate([b[0] for b in parity.batches()])
    y = np.concatenate([b[1] for b in parity.batches()])
    assert ref.mlp_loss(traj[-1], x, y) < ref.mlp_loss(parity.init_params(), x, y)


@pytest.mark.parametrize("case", [c[0] for c in parity.WSAM_CASES])
def test_wsam_reference_trajectory_decreases_the_loss(case):
    _, kw, base = next(c for c in parity.WSAM_CASES if c[0] == case)
    traj = parity.wsam_reference_trajectory(kw, base)
    x = np.concatenate([b[0] for b in parity.batches()])
    y = np.concatenate([b[1] for b in parity.batches()])
    assert ref.mlp_loss(traj[-1], x, y) < ref.mlp_loss(parity.init_params(), x, y)
