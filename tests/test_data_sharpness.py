"""sam_edu.data.digits and sam_edu.sharpness against known answers."""

import numpy as np
import pytest

from sam_edu import data, sharpness
from sam_edu import reference as ref


def test_digits_split_and_label_noise():
    x_tr, y_tr, x_te, y_te = data.digits()
    assert x_tr.shape[1] == 64 and len(x_tr) + len(x_te) == 1797
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    _, noisy, _, noisy_te = data.digits(label_noise=0.3, seed=1)
    changed = np.mean(noisy != y_tr)
    assert 0.2 < changed < 0.32  # 30% redrawn, a tenth of them to the same class
    np.testing.assert_array_equal(noisy_te, y_te)
    with pytest.raises(ValueError, match="label_noise"):
        data.digits(label_noise=1.5)


def test_hessian_top_eigenvalue_of_a_quadratic():
    a = np.diag([3.0, 1.0, 0.5])
    grad = lambda w: [a @ w[0]]  # noqa: E731  L = w^T A w / 2
    assert sharpness.hessian_top_eigenvalue(grad, [np.ones(3)]) == pytest.approx(3.0, rel=1e-6)


def test_hessian_top_eigenvalue_at_the_two_basin_minima():
    grad = lambda w: [ref.two_basin_grad(w[0])]  # noqa: E731
    for point in ([0.0, 0.0], [2.0, 0.0]):
        want = np.linalg.eigvalsh(ref.two_basin_hessian(np.array(point))).max()
        got = sharpness.hessian_top_eigenvalue(grad, [np.array(point)], iters=100)
        assert got == pytest.approx(want, rel=1e-4)


def test_surrogate_gap_of_a_quadratic_is_first_and_second_order():
    a = np.diag([2.0, 1.0])
    f = lambda w: (0.5 * float(w[0] @ a @ w[0]), [a @ w[0]])  # noqa: E731
    w = [np.array([1.0, -1.0])]
    g = a @ w[0]
    rho = 0.1
    e = rho * g / np.linalg.norm(g)
    assert sharpness.surrogate_gap(f, w, rho) == pytest.approx(g @ e + 0.5 * e @ a @ e)
