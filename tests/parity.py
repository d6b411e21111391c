"""The shared parity problem: every framework runs these steps and must match the reference.

A ``5 -> 4 -> 3`` tanh network (four tensors, so the global norm matters), ``STEPS`` mini-batches,
and one configuration per case. ``reference_trajectory`` is the oracle: the weights after every
step, computed by ``sam_edu.reference`` in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from sam_edu import reference as ref

STEPS = 5
SIZES = (5, 4, 3)
BATCH = 8

# (id, SAM settings, base SGD settings). ASAM needs a larger rho (SPEC.md).
CASES = [
    ("sam-sgd", dict(rho=0.05, adaptive=False, eta=0.0), dict(lr=0.1, momentum=0.0)),
    ("sam-momentum", dict(rho=0.05, adaptive=False, eta=0.0), dict(lr=0.1, momentum=0.9)),
    ("asam-sgd", dict(rho=0.5, adaptive=True, eta=0.0), dict(lr=0.1, momentum=0.0)),
    ("asam-eta-momentum", dict(rho=0.5, adaptive=True, eta=0.01), dict(lr=0.1, momentum=0.9)),
]
case_params = pytest.mark.parametrize(
    "sam_kwargs,base_kwargs", [pytest.param(s, b, id=i) for i, s, b in CASES]
)


def init_params() -> list[np.ndarray]:
    return ref.mlp_init(SIZES, seed=0)


def batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        (rng.normal(size=(BATCH, SIZES[0])), rng.integers(0, SIZES[2], BATCH))
        for _ in range(STEPS)
    ]


def reference_trajectory(sam_kwargs: dict, base_kwargs: dict) -> list[list[np.ndarray]]:
    """Weights after each of ``STEPS`` SAM steps with an SGD/momentum base, by the reference."""
    params = init_params()
    buffers = ref.sgd_init(params)
    out = []
    for x, y in batches():
        def base_update(w, d):
            nonlocal buffers
            new, buffers = ref.sgd_update(w, d, buffers, **base_kwargs)
            return new

        params = ref.sam_step(params, lambda w: ref.mlp_loss_and_grad(w, x, y)[1],
                              base_update, **sam_kwargs)
        out.append(params)
    return out


def tolerance(dtype_name: str) -> float:
    return {"float64": 1e-10, "float32": 1e-5}[dtype_name]


def assert_trajectories_close(got: list[list[np.ndarray]], want: list[list[np.ndarray]],
                              tol: float) -> None:
    """Every tensor at every step within ``tol`` (absolute, on values of order one)."""
    assert len(got) == len(want)
    for step, (g_step, w_step) in enumerate(zip(got, want), start=1):
        for i, (g, w) in enumerate(zip(g_step, w_step)):
            np.testing.assert_allclose(g, w, rtol=0, atol=tol,
                                       err_msg=f"step {step}, tensor {i}")
