"""WSAM, sharpness as a weighted regulariser, as a ``torch.optim.Optimizer`` (PyTorch).

WSAM (Yue, Jiang, Ye, Gao, Liu, Zhang, KDD 2023, arXiv:2305.15817) weighs the sharpness term of
SAM's objective::

    L(w) + gamma / (1 - gamma) * [ max_{||e|| <= rho} L(w + e) - L(w) ],     0 <= gamma < 1

With ``a = gamma / (1 - gamma)`` and SAM's first-order solution of the inner maximum its gradient is
``g + a (g_adv - g)``, where ``g = grad L_B(w)`` and ``g_adv = grad L_B(w + e)``: ``gamma = 0`` is
the base optimizer, ``gamma = 1/2`` (``a = 1``) is SAM, a larger ``gamma`` weighs sharpness more.

* Coupled form (``decouple=False``): the base optimizer steps with ``d = g + a (g_adv - g)``.
* Decoupled form (``decouple=True``, the default and the paper's): the base optimizer steps with
  ``g`` alone, and the sharpness term is applied afterwards, outside its momentum and
  preconditioning, with each group's learning rate::

      w <- base_step(w, g) - lr * a * (g_adv - g)

``e`` is SAM's, or ASAM's with ``adaptive=True`` (``eta = 0``). ``max_norm`` clips ``g_adv`` by its
global norm before the two gradients are combined, as the official code does with
``torch.nn.utils.clip_grad_norm_`` (the same formula, so the same numbers).

The step is numbered as everywhere in ``sam_edu`` ((1) ``g`` at ``w``, (2) ascend, (3) ``g_adv`` at
``w + e``, (4) restore ``w``, (5) base step); it is ``sam_edu.reference.wsam`` in PyTorch's idiom,
driven exactly as :class:`sam_edu.torch.SAM` is (``first_step``/``second_step`` or
``step(closure)``; ``disable_running_stats`` around pass (3) for BatchNorm).
"""

from __future__ import annotations

import torch

from sam_edu.torch.sam import SAM, global_norm

Params = list[torch.Tensor]


def sharpness_weight(gamma: float) -> float:
    """``a = gamma / (1 - gamma)``; ``gamma`` must lie in ``[0, 1)``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return gamma / (1.0 - gamma)


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all tensors by ``min(1, max_norm / (||g|| + 1e-6))``: the direction is kept.

    The formula (and its ``1e-6``) is that of ``torch.nn.utils.clip_grad_norm_``.
    """
    scale = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
    return [g * scale for g in grads]


def wsam_direction(grads: Params, g_adv: Params, a: float) -> Params:
    """The coupled direction ``d = g + a (g_adv - g)``."""
    return [g + a * (ga - g) for g, ga in zip(grads, g_adv)]


class WSAM(SAM):
    """Weighted sharpness-aware minimization around a base optimizer.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``rho``,
            ``adaptive`` and base-optimizer options such as ``lr`` (the decoupled term uses it).
        base_optimizer: the class of the optimizer that takes step (5), e.g. ``torch.optim.SGD``.
        rho: radius of the perturbation; ASAM (``adaptive=True``) needs a larger one.
        gamma: weight of sharpness in ``[0, 1)``; the regulariser's factor is ``gamma/(1-gamma)``.
        decouple: apply the sharpness term outside the base optimizer (the paper's form).
        max_norm: if set, clip ``g_adv`` to this global norm before combining.
        adaptive: ASAM's perturbation ``e = rho w^2 g / (|| |w| g || + eps)``.
        perturb_eps: added to the norm so that a zero gradient gives ``e = 0``.
        foreach: the ``torch._foreach_*`` fast path (``None``: when the tensors allow it), as in
            :class:`sam_edu.torch.SAM`; ``foreach_used`` tells which path the last step took.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Groups also carry SAM's ``eta`` (0 here); a group that sets it gets ASAM's ``|w| + eta``.
    """

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        max_norm: float | None = None,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        foreach: bool | None = None,
        **base_kwargs,
    ) -> None:
        self.a = sharpness_weight(gamma)
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0 (or None), got {max_norm}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive,
                         perturb_eps=perturb_eps, foreach=foreach, **base_kwargs)
        self.gamma = gamma
        self.decouple = decouple
        self.max_norm = max_norm
        # g, saved in (1) for (5). Not in self.state, for the reason SAM keeps w out of it.
        self._g: Params | None = None
        # whether the fast path took the tensors of g from p.grad (so no one else holds them)
        self._g_taken = False

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Steps (1)-(2), exactly SAM's: move the weights to ``w + e(w)``, keeping ``g``."""
        super().first_step()
        self._g = self._keep_g(take=zero_grad)
        self._g_taken = zero_grad and self.foreach_used
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5): restore ``w`` and take the base step; ``p.grad`` must hold ``g_adv``."""
        g, self._g = self._g, None
        # (3) gradient at the perturbed point and (4) restore w, as in SAM
        params, g_adv, g_adv_norm = self._restore_w_for_every_perturbed_tensor(
            with_norm=self.max_norm is not None)
        if self.foreach_used:
            self._base_step_foreach(params, g, g_adv, g_adv_norm)
            if zero_grad:
                self.zero_grad()
            return
        if self.max_norm is not None:
            g_adv = clip_by_global_norm(g_adv, self.max_norm)
        # (5) base step at w: coupled, with d = g + a (g_adv - g); decoupled, with g and then the
        #     sharpness term a (g_adv - g) outside the base optimizer, at each group's lr
        if not self.decouple:
            for p, d_p in zip(params, wsam_direction(g, g_adv, self.a)):
                p.grad.copy_(d_p)
            self.base_optimizer.step()
        else:
            sharpness = [ga - g_p for ga, g_p in zip(g_adv, g)]
            for p, g_p in zip(params, g):
                p.grad.copy_(g_p)
            self.base_optimizer.step()
            lr = {p: group["lr"] for group in self.param_groups for p in group["params"]}
            for p, s in zip(params, sharpness):
                p.sub_(lr[p] * self.a * s)
        if zero_grad:
            self.zero_grad()

    def _base_step_foreach(self, params: Params, g: Params, g_adv: Params,
                           g_adv_norm: torch.Tensor | None) -> None:
        """Step (5) on the fast path: the same equations, in place in ``p.grad`` (``g_adv``).

        Clipping scales ``g_adv`` by ``min(1, max_norm / (||g_adv|| + 1e-6))``, the norm already
        computed for the finiteness check (``None`` without clipping). Coupled:
        ``d = g_adv + (1 - a)(g - g_adv)``, one ``_foreach_lerp_``. Decoupled: ``s = g_adv - g``,
        base step with ``g``, ``w -= lr a s``; where ``first_step(zero_grad=True)`` took ``g``
        (as ``step(closure)`` does), ``s`` is written over ``g_adv`` and ``p.grad`` is pointed
        at ``g``: no new tensor for ``s`` and no copy of ``g`` (two passes over the weights).
        """
        if self.max_norm is not None:
            torch._foreach_mul_(g_adv, torch.clamp(self.max_norm / (g_adv_norm + 1e-6), max=1.0))
        if not self.decouple:
            torch._foreach_lerp_(g_adv, g, 1.0 - self.a)
            self.base_optimizer.step()
            return
        if self._g_taken:  # s in place of g_adv, and p.grad points at g: no copy, no new tensor
            torch._foreach_sub_(g_adv, g)
            sharpness = dict(zip(params, g_adv))
            for p, g_p in zip(params, g):
                p.grad = g_p
        else:  # g is in buffers kept for the next step: copied into p.grad
            sharpness = dict(zip(params, torch._foreach_sub(g_adv, g)))
            torch._foreach_copy_(g_adv, g)
        self.base_optimizer.step()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in sharpness]
            if ps:
                torch._foreach_add_(ps, [sharpness[p] for p in ps], alpha=-group["lr"] * self.a)
