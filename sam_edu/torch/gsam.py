"""GSAM, surrogate gap guided SAM, as a ``torch.optim.Optimizer`` (PyTorch).

GSAM (Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, ICLR 2022, arXiv:2203.08065)
observes that SAM minimises the perturbed loss ``L_p(w) = L(w + e(w))`` but not the *surrogate gap*
``h(w) = L_p(w) - L(w)``, which measures sharpness: a point can have a low perturbed loss and
still sit in a sharp valley. GSAM keeps SAM's descent on ``L_p`` and adds an ascent on ``L`` along
the part of the clean gradient ``g`` that leaves ``L_p`` unchanged to first order::

    e      = rho_t g / (||g|| + eps)                (adaptive: rho_t |w| g / (||g|| + eps))
    g_adv  = grad L_B(w + e)
    g_par  = (g . g_adv_hat) g_adv_hat,             g_adv_hat = g_adv / (||g_adv|| + eps)
    g_perp = g - g_par
    d      = g_adv - alpha * g_perp

Moving along ``-d`` lowers ``L_p`` as SAM does, while ``+alpha g_perp`` raises ``L`` without
touching ``L_p`` (to first order), so the gap ``h = L_p - L`` shrinks. All norms and the dot product
are **global**, over the parameters of all groups together. ``alpha = 0`` with a constant ``rho`` is
exactly SAM.

``rho`` is a float or a schedule ``rho(step) -> float``, ``step`` being the number of GSAM steps
already taken (0 for the first). The paper lets ``rho_t`` follow the learning rate::

    rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

and clamps it at 0, since a warm-up can push ``lr_t`` below ``lr_min``; so does this optimizer. A
schedule writes ``rho_t`` into every group's ``"rho"``, as an LR scheduler writes ``"lr"``; the step
count is part of ``state_dict()``, so a resumed run continues on the schedule where it left off.

Adaptive GSAM follows the official JAX code, ``e = rho |w| g / ||g||``: the norm is of ``g`` itself.
The common PyTorch port instead uses ASAM's ``e = rho w^2 g / || |w| g ||`` (``sam_edu.torch.SAM``
with ``adaptive=True``); the two differ unless all ``|w|`` are equal.

The step is numbered as everywhere in ``sam_edu`` ((1) ``g`` at ``w``, (2) ascend, (3) ``g_adv`` at
``w + e``, (4) restore ``w``, (5) base step with ``d``); it is ``sam_edu.reference.gsam`` in
PyTorch's idiom, driven exactly as :class:`sam_edu.torch.SAM` is (``first_step``/``second_step`` or
``step(closure)``; ``disable_running_stats`` around pass (3) for BatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sam_edu.torch.sam import SAM, choose_foreach, global_norm

Params = list[torch.Tensor]


def gsam_perturbation(grads: Params, params: Params, rho: Sequence[float],
                      adaptive: Sequence[bool], perturb_eps: float = 1e-12) -> Params:
    """``e_i = rho_i g_i / (||g|| + eps)``, times ``|w_i|`` where ``adaptive_i`` (the JAX form).

    ``rho`` and ``adaptive`` hold one value per tensor (its group's); the norm is global.
    """
    norm = global_norm(grads) + perturb_eps
    return [r * (w.abs() if a else 1.0) * g / norm
            for r, a, w, g in zip(rho, adaptive, params, grads)]


def decompose(grads: Params, g_adv: Params, perturb_eps: float = 1e-12) -> tuple[Params, Params]:
    """Split ``g`` into ``g_par = (g . g_adv_hat) g_adv_hat`` and ``g_perp = g - g_par``.

    ``g_adv_hat = g_adv / (||g_adv|| + eps)``; the dot product runs over all tensors together.
    """
    norm = global_norm(g_adv) + perturb_eps
    unit = [a / norm for a in g_adv]
    along = sum(torch.sum(g * u) for g, u in zip(grads, unit))
    g_par = [along * u for u in unit]
    return g_par, [g - p for g, p in zip(grads, g_par)]


def gsam_direction(grads: Params, g_adv: Params, alpha: float = 0.4,
                   perturb_eps: float = 1e-12) -> Params:
    """``d = g_adv - alpha * g_perp``: SAM's direction plus an ascent on ``L`` along ``g_perp``."""
    _, g_perp = decompose(grads, g_adv, perturb_eps)
    return [a - alpha * p for a, p in zip(g_adv, g_perp)]


class GSAM(SAM):
    """Surrogate gap guided SAM around a base optimizer.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``rho`` (when
            ``rho`` is a float), ``adaptive`` and base-optimizer options such as ``lr``.
        base_optimizer: the class of the optimizer that takes step (5), e.g. ``torch.optim.SGD``.
        rho: radius of the perturbation: a float, or a schedule ``rho(step) -> float`` with
            ``step`` the number of GSAM steps already taken; a scheduled value is clamped at 0.
        alpha: weight of the ascent along ``g_perp``; the paper uses 0.01-1.0.
        adaptive: the JAX code's adaptive form ``e = rho |w| g / (||g|| + eps)``.
        perturb_eps: added to ``||g||`` and ``||g_adv||`` so that zero gradients give no NaN.
        foreach: the ``torch._foreach_*`` fast path (``None``: when the tensors allow it), as in
            :class:`sam_edu.torch.SAM`; ``foreach_used`` tells which path the last step took.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Groups also carry SAM's ``eta``, which GSAM does not use (its adaptive form has no offset).
    """

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float | Callable[[int], float] = 0.05,
        alpha: float = 0.4,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        foreach: bool | None = None,
        **base_kwargs,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.rho_schedule = rho if callable(rho) else None
        super().__init__(params, base_optimizer,
                         rho=self._scheduled_rho(0) if callable(rho) else rho,
                         adaptive=adaptive, perturb_eps=perturb_eps, foreach=foreach,
                         **base_kwargs)
        self.alpha = alpha
        self.steps_taken = 0
        # g, saved in (1) for (5). Not in self.state, for the reason SAM keeps w out of it.
        self._g: Params | None = None

    def _scheduled_rho(self, step: int) -> float:
        """``max(rho(step), 0)``: a warm-up can make the LR-proportional ``rho_t`` negative."""
        return max(float(self.rho_schedule(step)), 0.0)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Steps (1)-(2): move the weights to ``w + e(w)``; ``p.grad`` must hold ``g``."""
        if self._perturbed is not None:
            raise RuntimeError("first_step() called twice: call second_step() to restore w first")
        groups = self._groups_with_grad()
        if not groups:
            raise RuntimeError("first_step(): no parameter has a gradient; "
                               "call loss.backward() at w first")
        params = [p for _, ps, _ in groups for p in ps]
        # (1) gradient at the centre: the caller's backward pass at w left g in p.grad
        g = [g_p for _, _, gs in groups for g_p in gs]
        self.foreach_used = choose_foreach(self.foreach, params, g)
        if not self.foreach_used and not torch.isfinite(global_norm(g)):
            raise FloatingPointError("non-finite gradient at w; the weights were not changed")
        if self.rho_schedule is not None:
            rho_t = self._scheduled_rho(self.steps_taken)
            for group in self.param_groups:
                group["rho"] = rho_t
        if self.foreach_used:
            self._ascend_foreach(groups, params, g, take_g=zero_grad)
        else:
            self.swap_used = False
            group_of = [group for group, ps, _ in groups for _ in ps]  # each tensor's group
            e = gsam_perturbation(g, params,
                                  rho=[group["rho"] for group in group_of],
                                  adaptive=[group["adaptive"] for group in group_of],
                                  perturb_eps=self.perturb_eps)
            # (2) ascend to w + e(w), keeping w for (4) and g for (5)
            self._saved_w = [p.clone() for p in params]
            self._g = [g_p.clone() for g_p in g]
            for p, e_p in zip(params, e):
                p.add_(e_p)
        self._perturbed = params
        if zero_grad:
            self.zero_grad()

    def _ascend_foreach(self, groups: list[tuple[dict, Params, Params]], params: Params,
                        g: Params, take_g: bool = False) -> None:
        """Steps (1)-(2) on the fast path: ``gsam_perturbation()``, one kernel per group.

        ``w += (rho / (||g|| + eps)) g``, or ``w += (rho / (||g|| + eps)) |w| g`` (adaptive).
        ``take_g``: the gradients are zeroed next, so ``g`` is taken rather than copied.
        """
        g_norm = self._g_norm_foreach(g)  # raises if g is not finite
        moves = []
        for group, ps, gs in groups:
            step = group["rho"] / (g_norm + self.perturb_eps)
            moves.append((ps, torch._foreach_mul(torch._foreach_abs(ps), gs)
                          if group["adaptive"] else gs, step))
        self._move_foreach(params, moves)
        self._perturbed = params
        self._g = self._keep_g(take=take_g)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5): restore ``w``, base step with ``d``; ``p.grad`` must hold ``g_adv``."""
        g, self._g = self._g, None
        # (3) gradient at the perturbed point and (4) restore w, as in SAM
        foreach = self.foreach_used
        params, g_adv, g_adv_norm = self._restore_w_for_every_perturbed_tensor(with_norm=True)
        # (5) base step at w with d = g_adv - alpha * g_perp, written where the base reads it
        if foreach:
            # the same d on the fast path: g_perp = g - c g_adv with c = (g . g_adv) / ||g_adv||^2
            # (norms + eps), so d = (1 + alpha c) g_adv - alpha g, in place in p.grad
            dot = torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1))
                               for a, b in zip(g, g_adv)]).sum()
            c = dot / (g_adv_norm + self.perturb_eps) ** 2
            torch._foreach_mul_(g_adv, 1 + self.alpha * c)
            torch._foreach_add_(g_adv, g, alpha=-self.alpha)
        else:
            for p, d_p in zip(params, gsam_direction(g, g_adv, self.alpha, self.perturb_eps)):
                p.grad.copy_(d_p)
        self.base_optimizer.step()
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad()

    def state_dict(self) -> dict:
        """The base optimizer's state and groups, plus the step count the ``rho`` schedule reads."""
        return {**super().state_dict(), "gsam_steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state and groups, and the step count."""
        super().load_state_dict(state_dict)
        self.steps_taken = state_dict["gsam_steps_taken"]
