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


# GSAM: rho constant or a linear schedule over the steps (each framework builds its own native
# schedule: a Python function in PyTorch, optax.linear_schedule, keras PolynomialDecay(power=1)).
RHO_SCHEDULE = dict(init_value=0.1, end_value=0.02, transition_steps=STEPS)


def linear_rho(step: int) -> float:
    """``rho_t`` of ``RHO_SCHEDULE`` at step ``t = 0, 1, ...`` (the value used by step t + 1)."""
    s = RHO_SCHEDULE
    frac = min(step, s["transition_steps"]) / s["transition_steps"]
    return s["init_value"] + (s["end_value"] - s["init_value"]) * frac


GSAM_CASES = [
    ("gsam-sgd", dict(rho=0.05, alpha=0.4, adaptive=False), dict(lr=0.1, momentum=0.0)),
    ("gsam-momentum-schedule", dict(rho="linear", alpha=0.4, adaptive=False),
     dict(lr=0.1, momentum=0.9)),
    ("gsam-adaptive", dict(rho=0.5, alpha=0.2, adaptive=True), dict(lr=0.1, momentum=0.9)),
]
gsam_case_params = pytest.mark.parametrize(
    "gsam_kwargs,base_kwargs", [pytest.param(s, b, id=i) for i, s, b in GSAM_CASES]
)

WSAM_CASES = [
    ("wsam-decoupled-sgd", dict(rho=0.05, gamma=0.9, decouple=True, max_norm=None, adaptive=False),
     dict(lr=0.1, momentum=0.0)),
    ("wsam-decoupled-momentum", dict(rho=0.05, gamma=0.8, decouple=True, max_norm=None,
                                     adaptive=False), dict(lr=0.1, momentum=0.9)),
    ("wsam-coupled-momentum", dict(rho=0.05, gamma=0.9, decouple=False, max_norm=None,
                                   adaptive=False), dict(lr=0.1, momentum=0.9)),
    ("wsam-clipped-adaptive", dict(rho=0.5, gamma=0.7, decouple=True, max_norm=0.3,
                                   adaptive=True), dict(lr=0.1, momentum=0.9)),
]
wsam_case_params = pytest.mark.parametrize(
    "wsam_kwargs,base_kwargs", [pytest.param(s, b, id=i) for i, s, b in WSAM_CASES]
)


def _trajectory(variant_step, base_kwargs):
    params = init_params()
    buffers = ref.sgd_init(params)
    out = []
    for t, (x, y) in enumerate(batches()):
        def base_update(w, d):
            nonlocal buffers
            new, buffers = ref.sgd_update(w, d, buffers, **base_kwargs)
            return new

        params = variant_step(t, params, lambda w: ref.mlp_loss_and_grad(w, x, y)[1], base_update)
        out.append(params)
    return out


def gsam_reference_trajectory(gsam_kwargs: dict, base_kwargs: dict) -> list[list[np.ndarray]]:
    """Weights after each GSAM step; ``rho="linear"`` means :func:`linear_rho`."""
    kwargs = dict(gsam_kwargs)
    rho = kwargs.pop("rho")
    return _trajectory(
        lambda t, w, grad, base: ref.gsam_step(
            w, grad, base, rho=linear_rho(t) if rho == "linear" else rho, **kwargs),
        base_kwargs)


def wsam_reference_trajectory(wsam_kwargs: dict, base_kwargs: dict) -> list[list[np.ndarray]]:
    """Weights after each WSAM step."""
    return _trajectory(
        lambda t, w, grad, base: ref.wsam_step(w, grad, base, lr=base_kwargs["lr"], **wsam_kwargs),
        base_kwargs)


# bSAM: a full optimizer, fed the same standard normal noise in every framework (NOISE_SEED).
# num_data is small so that the noise 1/sqrt(N s) is large enough to matter.
BSAM_CASES = [
    ("bsam-defaults", dict(num_data=100)),
    ("bsam-tuned", dict(num_data=10, lr=0.2, beta1=0.8, beta2=0.99, weight_decay=0.01,
                        rho=0.01, damping=0.05, s_init=2.0)),
]
bsam_case_params = pytest.mark.parametrize(
    "bsam_kwargs", [pytest.param(b, id=i) for i, b in BSAM_CASES]
)
NOISE_SEED = 2


def bsam_noise() -> list[list[np.ndarray]]:
    """One standard normal draw per step, shaped like the parameters."""
    rng = np.random.default_rng(NOISE_SEED)
    return [[rng.normal(size=w.shape) for w in init_params()] for _ in range(STEPS)]


def bsam_reference_trajectory(bsam_kwargs: dict) -> list[list[np.ndarray]]:
    """Weights (the mean w) after each bSAM step with the noise of :func:`bsam_noise`."""
    kwargs = dict(bsam_kwargs)
    params = init_params()
    m, s = ref.bsam_init(params, kwargs.pop("s_init", 1.0))
    out = []
    for (x, y), noise in zip(batches(), bsam_noise()):
        params, m, s = ref.bsam_step(params, m, s, noise,
                                     lambda w: ref.mlp_loss_and_grad(w, x, y)[1], **kwargs)
        out.append(params)
    return out


# LookSAM: k = 2 and 3 over STEPS = 5 steps mix full SAM steps (t = 0, 2, 4 or 0, 3) and cheap ones.
LOOKSAM_CASES = [
    ("looksam-k2-sgd", dict(rho=0.1, k=2, alpha=0.7, adaptive=False), dict(lr=0.1, momentum=0.0)),
    ("looksam-k3-momentum", dict(rho=0.05, k=3, alpha=0.5, adaptive=False),
     dict(lr=0.1, momentum=0.9)),
    ("looksam-adaptive-k2", dict(rho=0.5, k=2, alpha=0.7, adaptive=True),
     dict(lr=0.1, momentum=0.9)),
]
looksam_case_params = pytest.mark.parametrize(
    "looksam_kwargs,base_kwargs", [pytest.param(s, b, id=i) for i, s, b in LOOKSAM_CASES]
)


def looksam_reference_trajectory(looksam_kwargs: dict,
                                 base_kwargs: dict) -> list[list[np.ndarray]]:
    """Weights after each LookSAM step, ``g_v`` carried from step to step."""
    g_v = None

    def step(t, w, grad, base):
        nonlocal g_v
        w, g_v = ref.looksam_step(t, w, g_v, grad, base, **looksam_kwargs)
        return w

    return _trajectory(step, base_kwargs)
