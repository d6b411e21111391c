"""Properties of the NumPy reference: the math every framework is tested against."""

import numpy as np
import pytest

from sam_edu import reference as ref

from parity import CASES, reference_trajectory


def _tree(seed, shapes=((3, 4), (4,), (4, 2))):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


@pytest.mark.parametrize("rho", [0.01, 0.05, 1.0])
def test_sam_perturbation_has_norm_rho(rho):
    e = ref.sam_perturbation(_tree(0), rho)
    assert ref.global_norm(e) == pytest.approx(rho, rel=1e-12)


def test_sam_perturbation_points_along_the_gradient():
    g = _tree(1)
    e = ref.sam_perturbation(g, 0.05)
    cos = sum(np.sum(a * b) for a, b in zip(e, g)) / (ref.global_norm(e) * ref.global_norm(g))
    assert cos == pytest.approx(1.0, abs=1e-12)


def test_norm_is_global_not_per_tensor():
    g = _tree(2)
    e = ref.sam_perturbation(g, 1.0)
    per_tensor = [np.linalg.norm(t) for t in e]
    assert not np.allclose(per_tensor, 1.0)
    assert np.sqrt(sum(n * n for n in per_tensor)) == pytest.approx(1.0)


@pytest.mark.parametrize("fn", ["sam", "asam", "general"])
def test_zero_gradient_gives_zero_perturbation(fn):
    params = _tree(3)
    zeros = [np.zeros_like(p) for p in params]
    e = {
        "sam": lambda: ref.sam_perturbation(zeros, 0.05),
        "asam": lambda: ref.asam_perturbation(zeros, params, 0.5, eta=0.01),
        "general": lambda: ref.perturbation(zeros, params, 0.05, adaptive=[True, False, True]),
    }[fn]()
    for t in e:
        assert np.all(np.isfinite(t)) and np.all(t == 0)


def test_asam_has_norm_rho_in_the_scaled_metric():
    params, g = _tree(4), _tree(5)
    e = ref.asam_perturbation(g, params, rho=0.5, eta=0.01)
    t = ref.scale_operator(params, 0.01)
    # ||T^-1 e|| = rho: the ball is measured in the T-scaled metric
    assert ref.global_norm([ei / ti for ei, ti in zip(e, t)]) == pytest.approx(0.5)


def test_asam_is_invariant_to_weight_rescaling():
    """With eta = 0, scaling a tensor by c scales its perturbation by c: T_cw^2 g/c ... = c e."""
    params, g = _tree(6), _tree(7)
    c = 10.0
    scaled = [params[0] * c, params[1], params[2]]
    g_scaled = [g[0] / c, g[1], g[2]]  # chain rule: dL/d(cw) = g / c
    e = ref.asam_perturbation(g, params, 0.5)
    e_scaled = ref.asam_perturbation(g_scaled, scaled, 0.5)
    np.testing.assert_allclose(e_scaled[0], c * e[0], rtol=1e-12)
    np.testing.assert_allclose(e_scaled[1], e[1], rtol=1e-12)


def test_general_perturbation_reduces_to_sam_and_asam():
    params, g = _tree(8), _tree(9)
    for a, b in zip(ref.perturbation(g, params, 0.05), ref.sam_perturbation(g, 0.05)):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    for a, b in zip(ref.perturbation(g, params, 0.5, adaptive=True, eta=0.01),
                    ref.asam_perturbation(g, params, 0.5, eta=0.01)):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_per_tensor_settings_must_match_the_tensors():
    params, g = _tree(8), _tree(9)
    with pytest.raises(ValueError, match="per-tensor"):
        ref.perturbation(g, params, rho=[0.1, 0.2])


def test_centralize_gradient_keeps_the_output_axis():
    g = np.arange(12.0).reshape(3, 4)
    c = ref.centralize_gradient(g, out_axis=-1)
    np.testing.assert_allclose(c.mean(axis=0), 0.0, atol=1e-12)
    c0 = ref.centralize_gradient(g, out_axis=0)
    np.testing.assert_allclose(c0.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_array_equal(ref.centralize_gradient(np.ones(3)), np.ones(3))


def test_sam_step_with_rho_zero_is_the_base_step():
    params = ref.mlp_init((5, 4, 3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    grad = lambda w: ref.mlp_loss_and_grad(w, x, y)[1]  # noqa: E731
    sgd = lambda w, d: ref.sgd_update(w, d, ref.sgd_init(w), lr=0.1)[0]  # noqa: E731
    for a, b in zip(ref.sam_step(params, grad, sgd, rho=0.0), sgd(params, grad(params))):
        np.testing.assert_array_equal(a, b)


def test_sam_step_moves_against_the_perturbed_gradient():
    w = np.array([0.3, 0.05])
    new = ref.sam_step([w], lambda p: [ref.two_basin_grad(p[0])],
                       lambda p, d: [p[0] - 0.01 * d[0]], rho=0.1)[0]
    e = 0.1 * ref.two_basin_grad(w) / np.linalg.norm(ref.two_basin_grad(w))
    np.testing.assert_allclose(new, w - 0.01 * ref.two_basin_grad(w + e), rtol=1e-10)


@pytest.mark.parametrize("where", ["centre", "perturbed"])
def test_non_finite_gradient_raises(where):
    def grad(p):
        bad = where == "centre" or not np.allclose(p[0], 1.0)
        return [np.array([np.nan, 1.0]) if bad else np.array([1.0, 1.0])]

    with pytest.raises(FloatingPointError, match="non-finite"):
        ref.sam_step([np.array([1.0, 1.0])], grad, lambda p, d: p)


def test_sharp_and_flat_minima_have_the_curvatures_of_the_book():
    sharp = np.linalg.eigvalsh(ref.two_basin_hessian(np.array([0.0, 0.0])))
    flat = np.linalg.eigvalsh(ref.two_basin_hessian(np.array([2.0, 0.0])))
    assert sharp.max() > 30 * flat.max()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_reference_trajectory_decreases_the_loss(case):
    _, sam_kwargs, base_kwargs = next(c for c in CASES if c[0] == case)
    from parity import batches, init_params
    x = np.concatenate([b[0] for b in batches()])
    y = np.concatenate([b[1] for b in batches()])
    traj = reference_trajectory(sam_kwargs, base_kwargs)
    assert ref.mlp_loss(traj[-1], x, y) < ref.mlp_loss(init_params(), x, y)
