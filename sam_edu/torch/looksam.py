"""LookSAM: most of SAM at a fraction of its cost, as a ``torch.optim.Optimizer`` (PyTorch).

LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, arXiv:2203.02714) notes that SAM's gradient
``g_adv`` differs from the plain gradient ``g`` mostly by a component ``g_v`` orthogonal to ``g``,
and that this component changes slowly from step to step. So it computes ``g_adv`` only every
``k``-th step and reuses ``g_v`` in between::

    t mod k == 0 (a full SAM step):
        g_hat = g / ||g||
        g_v   = g_adv - (g_adv . g_hat) g_hat          (kept for the next k - 1 steps)
        d     = g_adv
    otherwise (one forward/backward only):
        d     = g + alpha * (||g|| / ||g_v||) * g_v

A step costs ``1 + 1/k`` gradient evaluations on average instead of SAM's 2. ``k = 1`` is exactly
SAM. All norms and dot products are global, over the parameters of all groups as one vector (the
paper's formulation; a per-tensor projection is a variant). ``e`` is SAM's, or ASAM's with
``adaptive=True`` (``eta = 0``), and may be set per group as in :class:`sam_edu.torch.SAM`.

This is ``sam_edu.reference.looksam`` in PyTorch's idiom. The SAM steps follow the generic
numbering (1)-(5); a cheap step is (1) and (5) only. ``first_step()`` tells the loop which one it
took, so that the loop runs the second pass only when it is needed::

    # explicit loop
    loss_fn(model(x), y).backward()                   # (1)
    if optimizer.first_step(zero_grad=True):          # SAM step: (2) w + e; cheap step: (5) done
        with disable_running_stats(model):            # BatchNorm statistics from pass 1 only
            loss_fn(model(x), y).backward()           # (3)
        optimizer.second_step(zero_grad=True)         # (4), (5)

    loss = optimizer.step(closure)                    # the same; the closure runs once or twice

``g_v`` is kept in the optimizer's state (``state[p]["g_v"]``) and the step count ``t`` in
``steps_taken``: both are part of ``state_dict()``, so a resumed run continues the cycle exactly.
An LR scheduler is attached as with SAM: to the optimizer with ``step(closure)``, to
``optimizer.base_optimizer`` with the explicit loop (both steps end in its ``step()``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from sam_edu.torch.sam import SAM, choose_foreach, global_norm, global_norm_foreach

Params = list[torch.Tensor]


def is_sam_step(t: int, k: int) -> bool:
    """Step ``t = 0, 1, ...`` is a full SAM step when ``t mod k == 0`` (so the first one is)."""
    return t % k == 0


def orthogonal_component(g_adv: Params, grads: Params, perturb_eps: float = 1e-12) -> Params:
    """``g_v = g_adv - (g_adv . g_hat) g_hat`` with ``g_hat = g / (||g|| + eps)``."""
    norm = global_norm(grads) + perturb_eps
    unit = [g / norm for g in grads]
    along = sum(torch.sum(a * u) for a, u in zip(g_adv, unit))
    return [a - along * u for a, u in zip(g_adv, unit)]


def looksam_direction(grads: Params, g_v: Params, alpha: float = 0.7,
                      perturb_eps: float = 1e-12) -> Params:
    """The cheap step's ``d = g + alpha * (||g|| / (||g_v|| + eps)) * g_v``."""
    scale = alpha * global_norm(grads) / (global_norm(g_v) + perturb_eps)
    return [g + scale * v for g, v in zip(grads, g_v)]


class LookSAM(SAM):
    """SAM's ascent every ``k``-th step, its orthogonal component reused in between.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``rho``,
            ``adaptive`` and base-optimizer options such as ``lr``.
        base_optimizer: the class of the optimizer that takes step (5), e.g. ``torch.optim.SGD``.
        rho: radius of the perturbation on the SAM steps; ASAM (``adaptive=True``) needs a larger
            one.
        k: a full SAM step every ``k`` steps (``t mod k == 0``); ``k = 1`` is SAM.
        alpha: weight of the reused ``g_v`` on the cheap steps, relative to ``||g||``.
        adaptive: ASAM's perturbation ``e = rho w^2 g / (|| |w| g || + eps)``.
        perturb_eps: added to every norm so that zero gradients give no NaN.
        foreach: the ``torch._foreach_*`` fast path (``None``: when the tensors allow it), as in
            :class:`sam_edu.torch.SAM`; ``foreach_used`` tells which path the last step took.
        **base_kwargs: options of the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Groups also carry SAM's ``eta`` (0 here); a group that sets it gets ASAM's ``|w| + eta``.
    A parameter that had no gradient on the last SAM step has ``g_v = 0``.
    """

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.1,
        k: int = 10,
        alpha: float = 0.7,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        foreach: bool | None = None,
        **base_kwargs,
    ) -> None:
        if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"k must be an integer >= 1 (a full SAM step every k steps), "
                             f"got {k!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive,
                         perturb_eps=perturb_eps, foreach=foreach, **base_kwargs)
        self.k = int(k)
        self.alpha = alpha
        self.steps_taken = 0
        # g, saved in (1) of a SAM step for g_v. Not in self.state, for the reason SAM keeps w out.
        self._g: Params | None = None
        # ||g_v|| and how many tensors it covers, computed once on the fast path's SAM step for the
        # k - 1 cheap steps that reuse g_v (None: not known, computed when needed)
        self._g_v_norm: tuple[torch.Tensor, int] | None = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Step (1) and then, by ``t mod k``, either (2) or the whole cheap step (5).

        ``p.grad`` must hold ``g``. Returns ``True`` on a SAM step: the weights are at ``w + e``;
        run pass (3) and call :meth:`second_step`. Returns ``False`` on a cheap step: the base
        step with ``d = g + alpha (||g|| / ||g_v||) g_v`` has been taken; do not call
        ``second_step()``. ``zero_grad`` zeroes the gradients when this call is done.
        """
        if is_sam_step(self.steps_taken, self.k):
            # (1)-(2) exactly SAM's, keeping g for g_v
            super().first_step()
            self._g = self._keep_g(take=zero_grad)
            if zero_grad:
                self.zero_grad()
            return True
        groups = self._groups_with_grad()
        if not groups:
            raise RuntimeError("first_step(): no parameter has a gradient; "
                               "call loss.backward() at w first")
        params = [p for _, ps, _ in groups for p in ps]
        # (1) gradient at the centre: the caller's backward pass at w left g in p.grad
        g = [p.grad for p in params]
        self.foreach_used = choose_foreach(self.foreach, params, g)
        self.swap_used = False  # a cheap step does not move the weights
        if self.foreach_used:
            self._cheap_direction_foreach(params, g)
        else:
            if not torch.isfinite(global_norm(g)):
                raise FloatingPointError("non-finite gradient at w; the weights were not changed")
            # (5) only: base step at w with g plus the stored orthogonal component, rescaled
            g_v = [self.state[p]["g_v"] if "g_v" in self.state[p] else torch.zeros_like(p)
                   for p in params]
            for p, d_p in zip(params, looksam_direction(g, g_v, self.alpha, self.perturb_eps)):
                p.grad.copy_(d_p)
        self.base_optimizer.step()
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad()
        return False

    def _cheap_direction_foreach(self, params: Params, g: Params) -> None:
        """``looksam_direction()`` on the fast path, in place in ``p.grad``:
        ``g += alpha (||g|| / (||g_v|| + eps)) g_v``; a parameter without ``g_v`` adds nothing."""
        with_g_v = [(p.grad, self.state[p]["g_v"]) for p in params if "g_v" in self.state[p]]
        norms = [global_norm_foreach(g)]
        if self._g_v_norm is not None and self._g_v_norm[1] == len(with_g_v):
            norms.append(self._g_v_norm[0])  # every stored g_v is used: the SAM step's norm
        elif with_g_v:
            norms.append(global_norm_foreach([v for _, v in with_g_v]))
        g_norm, *g_v_norm = torch.stack(norms).tolist()  # the step's one synchronisation
        if not math.isfinite(g_norm):
            raise FloatingPointError("non-finite gradient at w; the weights were not changed")
        if with_g_v:
            torch._foreach_add_([g_p for g_p, _ in with_g_v], [v for _, v in with_g_v],
                                alpha=self.alpha * g_norm / (g_v_norm[0] + self.perturb_eps))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5) of a SAM step: restore ``w``, base step with ``d = g_adv``, keep ``g_v``.

        ``p.grad`` must hold ``g_adv``. Call it only when :meth:`first_step` returned ``True``.
        """
        if self._perturbed is None:
            raise RuntimeError("second_step() without a SAM step's first_step(): call it only "
                               "when first_step() returned True")
        g, self._g = self._g, None
        # (3) gradient at the perturbed point and (4) restore w, as in SAM
        params, g_adv, _ = self._restore_w_for_every_perturbed_tensor()
        if self.foreach_used:
            # the same g_v on the fast path: g_v = g_adv - c g, c = (g_adv . g) / (||g|| + eps)^2
            dot = torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1))
                               for a, b in zip(g_adv, g)]).sum()
            torch._foreach_mul_(g, dot / (global_norm_foreach(g) + self.perturb_eps) ** 2)
            g_v = torch._foreach_sub(g_adv, g)  # g (the buffer) now holds c g
            # ||g_v|| once here instead of on each of the k - 1 cheap steps (one read of g_v each)
            self._g_v_norm = (global_norm_foreach(g_v), len(g_v)) if self.k > 1 else None
        else:
            g_v = orthogonal_component(g_adv, g, self.perturb_eps)
            self._g_v_norm = None
        # (5) base step at w with d = g_adv, which p.grad holds
        self.base_optimizer.step()
        # g_v for the next k - 1 steps, stored after the base step: Adam initialises its moments
        # only while state[p] is empty. A parameter without a gradient now drops its old g_v.
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.state[p].pop("g_v", None)
        for p, g_v_p in zip(params, g_v):
            self.state[p]["g_v"] = g_v_p
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One LookSAM step; returns the loss at ``w``.

        ``closure`` zeroes the gradients, computes the loss on the current batch, calls
        ``backward()`` and returns the loss. It is evaluated twice on a SAM step (at ``w`` and at
        ``w + e``) and once on a cheap step.
        """
        if closure is None:
            raise ValueError("LookSAM.step() needs a closure: it evaluates the loss at w "
                             "(and at w + e on every k-th step)")
        closure = torch.enable_grad()(closure)
        loss = closure()  # (1) g at w
        if self.first_step(zero_grad=True):  # (2) w + e, or the cheap step (5) is done
            closure()  # (3) g_adv at w + e, same batch
            self.second_step()  # (4) restore w, (5) base step
        return loss

    def state_dict(self) -> dict:
        """The base optimizer's state (with ``g_v``) and groups, plus the step count ``t``."""
        return {**super().state_dict(), "looksam_steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state (with ``g_v``) and groups, and the step count."""
        super().load_state_dict(state_dict)
        self.steps_taken = state_dict["looksam_steps_taken"]
        self._g_v_norm = None  # the loaded g_v's norm is computed on the next cheap step
