"""Helpers shared by the torch test files: the parity problem's network in torch, conversions,
and the two ways to drive a SAM-family optimizer (explicit loop, closure)."""

import torch
import torch.nn.functional as F

import parity

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def mlp_loss(params, x, y):
    """The reference's tanh network, same ``(inputs, outputs)`` layout: ``x @ W1 + b1``."""
    w1, b1, w2, b2 = params
    return F.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y)


def leaves(arrays, dtype=torch.float64):
    return [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]


def numpy(params):
    return [p.detach().to(torch.float64).numpy().copy() for p in params]


def torch_batches(dtype=torch.float64):
    return [(torch.tensor(x, dtype=dtype), torch.tensor(y)) for x, y in parity.batches()]


def snapshot(params):
    return [p.detach().clone() for p in params]


def assert_bit_identical(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def explicit_step(optimizer, params, x, y):
    mlp_loss(params, x, y).backward()  # (1)
    optimizer.first_step(zero_grad=True)  # (2)
    mlp_loss(params, x, y).backward()  # (3)
    optimizer.second_step(zero_grad=True)  # (4), (5)


def closure_step(optimizer, params, x, y):
    def closure():
        optimizer.zero_grad()
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss

    optimizer.step(closure)
