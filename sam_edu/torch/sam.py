"""SAM and ASAM as a ``torch.optim.Optimizer`` (PyTorch).

SAM (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021, arXiv:2010.01412) minimises the worst loss in a
ball of radius ``rho`` around the weights::

    min_w  max_{||e|| <= rho}  L_B(w + e)

A first-order Taylor expansion of the inner maximum gives its solution in closed form (the dual
norm of the L2 norm is the L2 norm)::

    e(w) = rho * g / ||g||,        g = grad L_B(w)

and the gradient of the SAM objective, dropping the second-order term, is ``grad L_B(w + e(w))``.

ASAM (Kwon, Kim, Park, Choi, ICML 2021, arXiv:2102.11600) measures the ball in a weight-scaled
metric with the element-wise operator ``T_w = |w| + eta``, which makes sharpness invariant to
rescalings of the weights that leave the network's function unchanged::

    e(w) = rho * T_w^2 g / ||T_w g||

One generic step, numbered as every implementation in ``sam_edu`` numbers it:

1. gradient at the centre: ``g = grad L_B(w)``
2. ascend: ``w <- w + e(w)``
3. gradient at the perturbed point on the same batch: ``g_adv = grad L_B(w + e)``
4. restore ``w`` exactly
5. base step at ``w`` with the direction ``d = g_adv``

This is ``sam_edu.reference.sam`` written in PyTorch's idiom. The weights are changed in place, so
step (4) copies back a saved ``w``. The settings ``rho``, ``adaptive`` and ``eta`` may differ per
parameter group (the official ASAM code scales weight tensors only, not biases), but the norm is
always one **global** L2 norm over the parameters of all groups together.

Two ways to drive it::

    # explicit loop: the caller runs both backward passes
    loss_fn(model(x), y).backward()                   # (1)
    optimizer.first_step(zero_grad=True)              # (2)
    with disable_running_stats(model):                # BatchNorm statistics from pass 1 only
        loss_fn(model(x), y).backward()               # (3)
    optimizer.second_step(zero_grad=True)             # (4), (5)

    # closure: what LR schedulers and trainer libraries call
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)                    # (1)-(5); the loss at w

An LR scheduler may be attached to either optimizer: they share their parameter groups. With the
explicit loop attach it to ``optimizer.base_optimizer``, whose ``step()`` that loop calls; torch
warns when a scheduler steps before its optimizer's ``step()`` ever ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm

Params = list[torch.Tensor]


def global_norm(tree: Params) -> torch.Tensor:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together."""
    return torch.sqrt(sum(torch.sum(v * v) for v in tree))


def scale_operator(params: Params, eta: Sequence[float], adaptive: Sequence[bool]) -> Params:
    """ASAM's element-wise operator ``T_w = |w| + eta`` (``T_w = 1`` for tensors left unscaled).

    ``eta`` and ``adaptive`` hold one value per tensor (the settings of the tensor's group).
    """
    return [w.abs() + e if a else torch.ones_like(w) for w, e, a in zip(params, eta, adaptive)]


def perturbation(grads: Params, params: Params, rho: Sequence[float], adaptive: Sequence[bool],
                 eta: Sequence[float], perturb_eps: float = 1e-12) -> Params:
    """The perturbation ``e(w)`` with settings per tensor.

    ``e_i = rho_i * T_i^2 g_i / (||T g|| + perturb_eps)``, the norm global over all tensors and
    ``T_i = |w_i| + eta_i`` where ``adaptive_i`` (ASAM) else ``1`` (SAM). A zero gradient gives
    ``e = 0``.
    """
    t = scale_operator(params, eta, adaptive)
    norm = global_norm([tw * g for tw, g in zip(t, grads)])
    return [r * tw * tw * g / (norm + perturb_eps) for r, tw, g in zip(rho, t, grads)]


def _check_non_negative(value: float, name: str, where: str = "") -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0{where}, got {value}")


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (and ASAM with ``adaptive=True``) around a base optimizer.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``rho``,
            ``adaptive``, ``eta`` and base-optimizer options such as ``lr``.
        base_optimizer: the class of the optimizer that takes step (5), e.g. ``torch.optim.SGD``.
        rho: radius of the ball the weights are perturbed in; ASAM needs a larger one (0.5-2.0).
        adaptive: ASAM: measure the ball in the metric of ``T_w = |w| + eta``.
        eta: ASAM's offset, so that zero weights are still perturbed.
        perturb_eps: added to the norm so that a zero gradient gives ``e = 0``.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    The base optimizer shares this optimizer's ``param_groups`` and ``state``: LR schedulers see
    one set of groups, and ``state_dict()`` holds the base optimizer's state (momentum, Adam's
    moments), so a resumed run continues exactly.
    """

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        perturb_eps: float = 1e-12,
        **base_kwargs,
    ) -> None:
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass (the class, e.g. "
                f"torch.optim.SGD, not an instance), got {base_optimizer!r}"
            )
        _check_non_negative(rho, "rho")
        _check_non_negative(eta, "eta")
        _check_non_negative(perturb_eps, "perturb_eps")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        self.perturb_eps = perturb_eps
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # w, saved in (2) for (4). Not in self.state: Adam initialises its moments only when
        # state[p] is empty, and a checkpoint has no use for it.
        self._saved_w: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to both optimizers (one shared list): SAM's settings, then the base's.

        Works after construction too, e.g. to unfreeze layers while fine-tuning.
        """
        for name in ("rho", "eta"):
            _check_non_negative(param_group.get(name, self.defaults[name]), name,
                                f" (parameter group {len(self.param_groups)})")
        if "base_optimizer" not in self.__dict__:  # inside __init__: the base does not exist yet
            super().add_param_group(param_group)
            return
        for name in ("rho", "adaptive", "eta"):
            param_group.setdefault(name, self.defaults[name])
        self.base_optimizer.add_param_group(param_group)

    def _with_grad(self) -> list[tuple[torch.Tensor, dict]]:
        """Every parameter that has a gradient, with its group (frozen parameters are skipped)."""
        return [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Steps (1)-(2): move the weights to ``w + e(w)``; ``p.grad`` must hold ``g``."""
        if self._saved_w is not None:
            raise RuntimeError("first_step() called twice: call second_step() to restore w first")
        found = self._with_grad()
        if not found:
            raise RuntimeError("first_step(): no parameter has a gradient; "
                               "call loss.backward() at w first")
        params = [p for p, _ in found]
        # (1) gradient at the centre: the caller's backward pass at w left g in p.grad
        g = [p.grad for p in params]
        if not torch.isfinite(global_norm(g)):
            raise FloatingPointError("non-finite gradient at w; the weights were not changed")
        e = perturbation(g, params,
                         rho=[group["rho"] for _, group in found],
                         adaptive=[group["adaptive"] for _, group in found],
                         eta=[group["eta"] for _, group in found],
                         perturb_eps=self.perturb_eps)
        # (2) ascend to w + e(w)
        self._saved_w = [(p, p.clone()) for p in params]
        for p, e_p in zip(params, e):
            p.add_(e_p)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5): restore ``w`` and take the base step; ``p.grad`` must hold ``g_adv``."""
        if self._saved_w is None:
            raise RuntimeError("second_step() called without first_step(): "
                               "there is no w to restore")
        # (3) gradient at the perturbed point, same batch: the caller's backward pass left g_adv
        g_adv = [p.grad for p, _ in self._with_grad()]
        # (4) restore w exactly: copy the saved tensor back (subtracting e would not be exact)
        for p, w in self._saved_w:
            p.copy_(w)
        self._saved_w = None
        if not g_adv:
            raise RuntimeError("second_step(): no gradient at w + e; "
                               "w was restored and not updated")
        if not torch.isfinite(global_norm(g_adv)):
            raise FloatingPointError("non-finite gradient at w + e; w was restored and not updated")
        # (5) base step at w with d = g_adv
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _restore_w_for_every_perturbed_tensor(self) -> tuple[Params, Params]:
        """Steps (3)-(4) for variants that combine ``g`` and ``g_adv`` tensor by tensor.

        Restores ``w`` exactly and returns ``(params, g_adv)`` for the perturbed tensors. Every one
        of them must have a finite ``g_adv``; otherwise this raises after ``w`` is restored.
        """
        if self._saved_w is None:
            raise RuntimeError("second_step() called without first_step(): "
                               "there is no w to restore")
        params = [p for p, _ in self._saved_w]
        # (3) gradient at the perturbed point, same batch: the caller's backward pass left g_adv
        g_adv = [p.grad for p in params]
        # (4) restore w exactly: copy the saved tensor back
        for p, w in self._saved_w:
            p.copy_(w)
        self._saved_w = None
        if any(g_p is None for g_p in g_adv):
            raise RuntimeError("second_step(): no gradient at w + e for a parameter that had one "
                               "at w; w was restored and not updated")
        if not torch.isfinite(global_norm(g_adv)):
            raise FloatingPointError("non-finite gradient at w + e; w was restored and not updated")
        return params, g_adv

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One SAM step, (1)-(5); returns the loss at ``w``.

        ``closure`` zeroes the gradients, computes the loss on the current batch, calls
        ``backward()`` and returns the loss. It is evaluated twice: at ``w`` and at ``w + e``.
        """
        if closure is None:
            raise ValueError("SAM.step() needs a closure: it evaluates the loss at w and at w + e")
        closure = torch.enable_grad()(closure)
        loss = closure()  # (1) g at w
        self.first_step(zero_grad=True)  # (2) w + e
        closure()  # (3) g_adv at w + e, same batch
        self.second_step()  # (4) restore w, (5) base step
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the base optimizer, then share its (new) ``param_groups`` and ``state``."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


@contextlib.contextmanager
def disable_running_stats(model: torch.nn.Module) -> Iterator[None]:
    """Freeze BatchNorm running statistics inside the block (use it around pass (3)).

    Inside, every BatchNorm's momentum is 0, so ``running = running * 1 + batch * 0`` is left
    exactly as pass (1) set it. On exit the original momentum (``None`` too: the cumulative
    average) and ``num_batches_tracked``, which the forward pass still increments, are restored.
    """
    saved = [(m, m.momentum,
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, num_batches_tracked in saved:
            m.momentum = momentum
            if num_batches_tracked is not None:
                m.num_batches_tracked.copy_(num_batches_tracked)
