"""Small problems with gradients written out by hand, so the reference needs no autodiff.

* The two-basin loss of the optax SAM notebook: a sharp minimum near ``(0, 0)`` and a flat one
  near ``(2, 0)``, both with loss close to -1.
* A one-hidden-layer tanh network with a softmax cross-entropy loss: several tensors of different
  shapes, so the *global* norm and per-tensor settings are exercised. Weights use the
  ``(inputs, outputs)`` layout of Keras kernels and JAX; PyTorch tests use the same layout.
"""

from __future__ import annotations

import numpy as np


def two_basin_loss(w: np.ndarray) -> float:
    """``L(x, y) = -exp(-(x - 2)^2 - y^2) - exp(-(x^2 + 100 y^2))``."""
    x, y = w
    return float(-np.exp(-(x - 2) ** 2 - y ** 2) - np.exp(-(x ** 2 + 100 * y ** 2)))


def two_basin_grad(w: np.ndarray) -> np.ndarray:
    """``grad L = (2(x-2)A + 2xB, 2yA + 200yB)`` with ``A = exp(-(x-2)^2-y^2)``, ``B = exp(-x^2-100y^2)``."""
    x, y = w
    a = np.exp(-(x - 2) ** 2 - y ** 2)
    b = np.exp(-(x ** 2 + 100 * y ** 2))
    return np.array([2 * (x - 2) * a + 2 * x * b, 2 * y * a + 200 * y * b])


def two_basin_hessian(w: np.ndarray) -> np.ndarray:
    """The 2x2 Hessian of :func:`two_basin_loss`; its eigenvalues measure sharpness."""
    x, y = w
    a = np.exp(-(x - 2) ** 2 - y ** 2)
    b = np.exp(-(x ** 2 + 100 * y ** 2))
    lxx = a * (2 - 4 * (x - 2) ** 2) + b * (2 - 4 * x ** 2)
    lxy = -4 * (x - 2) * y * a - 400 * x * y * b
    lyy = a * (2 - 4 * y ** 2) + b * (200 - 40000 * y ** 2)
    return np.array([[lxx, lxy], [lxy, lyy]])


def mlp_init(sizes: tuple[int, int, int], seed: int = 0) -> list[np.ndarray]:
    """``[W1, b1, W2, b2]`` for a ``d -> h -> c`` network, Glorot-scaled normal weights, small biases."""
    d, h, c = sizes
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.0, np.sqrt(2.0 / (d + h)), (d, h)),
        rng.normal(0.0, 0.1, (h,)),
        rng.normal(0.0, np.sqrt(2.0 / (h + c)), (h, c)),
        rng.normal(0.0, 0.1, (c,)),
    ]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mlp_loss(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy of ``softmax(tanh(x W1 + b1) W2 + b2)`` against labels ``y``."""
    w1, b1, w2, b2 = params
    p = _softmax(np.tanh(x @ w1 + b1) @ w2 + b2)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def mlp_loss_and_grad(params: list[np.ndarray], x: np.ndarray,
                      y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """The loss of :func:`mlp_loss` and its gradient by backpropagation written out by hand."""
    w1, b1, w2, b2 = params
    a1 = np.tanh(x @ w1 + b1)
    p = _softmax(a1 @ w2 + b2)
    n = len(y)
    loss = float(-np.mean(np.log(p[np.arange(n), y])))
    dz2 = p.copy()
    dz2[np.arange(n), y] -= 1.0
    dz2 /= n
    dz1 = (dz2 @ w2.T) * (1.0 - a1 ** 2)
    return loss, [x.T @ dz1, dz1.sum(axis=0), a1.T @ dz2, dz2.sum(axis=0)]
