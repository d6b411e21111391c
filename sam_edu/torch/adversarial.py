"""SAM as an inner (adversarial) and an outer optimizer: ``optax.contrib.sam`` in PyTorch.

``optax.contrib.sam(optimizer, adv_optimizer, sync_period)`` describes SAM as two optimizers. From
the outer parameters ``w`` the adversarial optimizer takes ``sync_period - 1`` steps *uphill*; the
gradient at the last adversarial point then drives one step of the outer optimizer, taken at
``w``::

    w_0 = w
    w_{i+1} = w_i - adv_update(g(w_i))         i = 0 .. sync_period - 2   (adversarial, uphill)
    w <- w + update(g(w_{sync_period - 1}))                               (outer step, at w)

``adv_update`` is the step the adversarial optimizer would take *down*hill, so subtracting it
climbs: the adversarial optimizer's update is negated, as in optax. With ``normalize=True`` (the
default) the adversarial optimizer sees ``g / max(||g||, eps)``, one global L2 norm over all
parameters (optax's ``normalize()`` wherever ``||g|| >= eps``, and ``0`` for a zero gradient):
``AdversarialSAM(params, partial(SGD, lr=lr), partial(SGD, lr=rho))`` with ``sync_period=2`` is
the drop-in SAM of the paper, ``w + rho g / ||g||`` and then an SGD step at ``w``. Any
``torch.optim`` optimizer fits either role: SGD with momentum outside, Adam in both.

Two ways to drive it, as in optax:

* transparent: ``loss.backward(); optimizer.step()``, one gradient per call. The first
  ``sync_period - 1`` calls of a cycle are adversarial steps and leave the parameters at the
  adversarial point, visible to the loop; the last call puts the outer parameters back and takes
  the outer step. Count one outer step per ``sync_period`` calls.
* opaque: ``optimizer.step(closure)`` runs the whole cycle in one call: the closure at ``w``, then
  after each adversarial step again (``sync_period`` evaluations), and the outer step. Needed when
  anything besides the weights changes on each forward pass (BatchNorm statistics).

Three of optax's sharp edges are fixed: a zero gradient moves nothing instead of giving NaN
(optax's ``normalize()`` has no epsilon); transparent mode with ``sync_period=1`` is the outer
optimizer (optax's steps from the parameters of the call before); and ``max_radius=rho`` projects
every adversarial point onto the ball ``||a - w|| <= rho``. One normalised step of length ``rho``
stays on the ball by construction, but ``sync_period - 1 > 1`` steps (or an Adam adversarial
optimizer, whose steps are not of length ``rho``) leave it: the adversarial point is no longer the
one SAM's ``max_{||e|| <= rho}`` asks for.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def _build(factory, groups: list[dict], name: str) -> torch.optim.Optimizer:
    """``factory(groups)``, checked to be a ``torch.optim.Optimizer``."""
    if isinstance(factory, torch.optim.Optimizer):
        raise ValueError(
            f"{name} must build an optimizer from parameters, e.g. torch.optim.SGD or "
            f"functools.partial(torch.optim.SGD, lr=0.1), not an optimizer instance "
            f"({type(factory).__name__}): the instance would hold its own parameters")
    if not callable(factory):
        raise ValueError(f"{name} must be a torch.optim.Optimizer class or a callable that "
                         f"builds one from parameters, got {factory!r}")
    optimizer = factory(groups)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"{name} built a {type(optimizer).__name__}, not a "
                         "torch.optim.Optimizer")
    return optimizer


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together."""
    return torch.sqrt(sum(torch.sum(v * v) for v in tensors))


def _project_to_ball(points: list[torch.Tensor], centre: list[torch.Tensor],
                     radius: float) -> None:
    """``a <- w + min(1, radius / ||a - w||) (a - w)``, in place: the point of the ball
    ``||a - w|| <= radius`` nearest to ``a``, with one L2 norm over all tensors."""
    offsets = [a - w for a, w in zip(points, centre)]
    norm = global_norm(offsets)
    if norm > radius:  # outside: back along the offset onto the sphere
        for a, w, e in zip(points, centre, offsets):
            a.copy_(w + e * (radius / norm))


class AdversarialSAM(torch.optim.Optimizer):
    """SAM with any outer and any adversarial (inner) ``torch.optim`` optimizer.

    Args:
        params: the parameters, or parameter groups (dicts). Group options (``lr``, ...) are the
            outer optimizer's; the adversarial optimizer gets the same groups with its own
            defaults.
        optimizer: builds the outer optimizer from the parameter groups: an optimizer class, or
            e.g. ``functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)``.
        adv_optimizer: builds the adversarial optimizer the same way, e.g.
            ``functools.partial(torch.optim.SGD, lr=rho)``; its update is negated (uphill).
        sync_period: gradients per outer step: ``sync_period - 1`` adversarial steps, then the
            outer step. ``1`` is the outer optimizer alone.
        reset_state: reset the adversarial optimizer's state (momentum, Adam's moments) after
            every outer step, as optax does by default.
        normalize: feed the adversarial optimizer ``g / max(||g||, eps)`` (optax's
            ``chain(normalize(), adv_optimizer)``); the norm is global over all parameters.
        eps: the smallest norm divided by, so that a zero gradient gives a zero step instead of
            NaN; above it the normalisation is optax's exactly.
        max_radius: ``None`` (optax's behaviour) or the radius ``rho >= 0`` of the ball around
            ``w`` onto which every adversarial point is projected.

    ``param_groups`` and ``state`` are the outer optimizer's (LR schedulers attached here change
    the outer learning rate; in transparent mode step them once per ``sync_period`` calls).
    ``state_dict()`` holds both optimizers, the position in the cycle and the saved outer
    parameters, so a run resumed mid-cycle continues exactly.
    """

    def __init__(self, params, optimizer: OptimizerFactory, adv_optimizer: OptimizerFactory,
                 sync_period: int = 2, reset_state: bool = True, normalize: bool = True,
                 eps: float = 1e-12, max_radius: float | None = None) -> None:
        if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
            raise ValueError(f"sync_period must be an integer >= 1, got {sync_period!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the smallest norm divided by), got {eps}")
        if max_radius is not None and not (isinstance(max_radius, numbers.Real)
                                           and max_radius >= 0):
            raise ValueError(f"max_radius must be None or a number >= 0, got {max_radius!r}")
        super().__init__(params, {})
        self.sync_period = sync_period
        self.reset_state = reset_state
        self.normalize = normalize
        self.eps = eps
        self.max_radius = max_radius
        adv_groups = [{"params": group["params"]} for group in self.param_groups]
        self.optimizer = _build(optimizer, self.param_groups, "optimizer")
        self.adv_optimizer = _build(adv_optimizer, adv_groups, "adv_optimizer")
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._steps_since_sync = 0
        # the outer parameters w, saved at the first call of a cycle (not in self.state: Adam
        # initialises its moments only where state[p] is empty)
        self._cache: list[torch.Tensor] | None = None

    @property
    def steps_since_sync(self) -> int:
        """Calls since the last outer step: ``0`` means the parameters are the outer ones."""
        return self._steps_since_sync

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to both optimizers (between cycles only: the outer ``w`` is saved whole)."""
        if "adv_optimizer" not in self.__dict__:  # inside __init__
            super().add_param_group(param_group)
            return
        if self._steps_since_sync != 0:
            raise RuntimeError("add_param_group() in the middle of a cycle: the parameters are "
                               "at an adversarial point; add it after the outer step")
        self.optimizer.add_param_group(param_group)
        self.adv_optimizer.add_param_group({"params": self.param_groups[-1]["params"]})

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _with_grad(self) -> list[torch.Tensor]:
        return [p for p in self._params() if p.grad is not None]

    def _restore_outer(self) -> None:
        for p, w in zip(self._params(), self._cache):
            p.copy_(w)

    def _end_cycle(self) -> None:
        self._steps_since_sync = 0
        self._cache = None
        if self.reset_state:
            self.adv_optimizer.state.clear()  # torch optimizers initialise empty state lazily

    def _abort(self, where: str) -> None:
        """A non-finite gradient: back to the outer ``w``, a fresh cycle, and raise."""
        if self._cache is not None:
            self._restore_outer()
        self._end_cycle()
        raise FloatingPointError(f"non-finite gradient {where}; the parameters were restored to "
                                 "the outer parameters w and not updated")

    def _grads(self, where: str) -> list[torch.Tensor]:
        params = self._with_grad()
        if not params:
            raise RuntimeError("step(): no parameter has a gradient; call loss.backward() first")
        if not torch.isfinite(global_norm([p.grad for p in params])):
            self._abort(where)
        return params

    def _adversarial_step(self) -> None:
        """``w_{i+1} = w_i - adv_update(g)``: the adversarial optimizer's step, negated (and
        projected onto the ball ``||w_{i+1} - w|| <= max_radius`` unless that is ``None``)."""
        params = self._grads("at an adversarial step")
        grads = [p.grad for p in params]
        if self.normalize:
            scale = 1.0 / torch.clamp(global_norm(grads), min=self.eps)
            for p, g in zip(params, grads):
                p.grad = g * scale
        before = [p.clone() for p in params]
        self.adv_optimizer.step()
        for p, w, g in zip(params, before, grads):
            p.copy_(w - (p - w))  # w - adv_update
            p.grad = g  # the caller's gradient, not the normalised one
        if self.max_radius is not None:
            _project_to_ball(self._params(), self._cache, self.max_radius)

    def _outer_step(self) -> None:
        """Back to the outer ``w``; the outer optimizer steps there with the last gradient."""
        self._restore_outer()
        self._grads("for the outer step")
        self.optimizer.step()
        self._end_cycle()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Transparent without a closure (one gradient per call), opaque with one (a cycle).

        Without ``closure``, ``p.grad`` must hold the gradient at the current parameters. With
        one, ``closure`` zeroes the gradients, computes the loss, calls ``backward()`` and
        returns the loss; it is evaluated ``sync_period`` times and the loss at ``w`` returned.
        A non-finite gradient raises ``FloatingPointError`` after restoring ``w``.
        """
        if closure is not None:
            return self._opaque_step(closure)
        if self._steps_since_sync == 0:
            self._cache = [p.clone() for p in self._params()]
        if self._steps_since_sync == self.sync_period - 1:
            self._outer_step()
        else:
            self._adversarial_step()
            self._steps_since_sync += 1
        return None

    def _opaque_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._steps_since_sync != 0:
            raise RuntimeError(
                f"step(closure) in the middle of a transparent cycle ({self._steps_since_sync} "
                f"of {self.sync_period} calls done): finish it with step() first")
        closure = torch.enable_grad()(closure)
        self._cache = [p.clone() for p in self._params()]
        try:
            loss = closure()  # g at w
            for _ in range(self.sync_period - 1):
                self._adversarial_step()
                closure()  # g at the adversarial point
        except BaseException:
            if self._cache is not None:  # the closure failed: back to w, nothing stepped
                self._restore_outer()
                self._end_cycle()
            raise
        self._outer_step()
        return loss

    def state_dict(self) -> dict:
        """Both optimizers, the position in the cycle and the saved outer parameters."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "adv_optimizer": self.adv_optimizer.state_dict(),
            "steps_since_sync": self._steps_since_sync,
            "cache": None if self._cache is None else [w.clone() for w in self._cache],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"optimizer", "adv_optimizer", "steps_since_sync", "cache"} - set(state_dict)
        if missing:
            raise ValueError(f"not an AdversarialSAM state_dict: missing {sorted(missing)}")
        steps = state_dict["steps_since_sync"]
        if not 0 <= steps < self.sync_period:
            raise ValueError(f"the checkpoint is at call {steps} of its cycle, which does not "
                             f"exist with sync_period={self.sync_period}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.adv_optimizer.load_state_dict(state_dict["adv_optimizer"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._steps_since_sync = steps
        cache = state_dict["cache"]
        params = self._params()
        if cache is not None and len(cache) != len(params):
            raise ValueError(f"the checkpoint saved {len(cache)} outer parameters for "
                             f"{len(params)} parameters")
        self._cache = None if cache is None else [
            p.detach().clone().copy_(w) for p, w in zip(params, cache)]
