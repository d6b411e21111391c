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

Two implementations of the same equations, as in ``torch.optim``: the readable per-tensor loop
(the functions below, one equation each) and a ``foreach`` path that applies each equation to all
tensors at once with ``torch._foreach_*`` kernels (one call instead of one per tensor, no
temporary copies of the weights, the saved ``w`` kept in buffers reused from step to step). The
constructor's ``foreach`` chooses: ``None`` (default) takes the fast path whenever the tensors
allow it, ``False`` the loop, ``True`` the fast path or an error; ``foreach_used`` says which one
the last step took. The two agree to rounding (tests/test_torch_fast_paths.py).

On the fast path, large tensors keep ``w`` without copying it (``swap``): ``w + e`` is written
into those buffers, the parameters point at them (``p.data``) for pass (3), and step (4) points
them back at ``w``, which was never written. Copying ``w`` out and back costs two reads and two
writes of every weight per step, the largest part of SAM's own cost on a memory-bound model
(benchmarks/step_cost.py: 0.33 of an SGD step above two passes on a 5M-parameter MLP copying,
0.12 swapping). Small tensors are copied: moving a pointer costs more than copying a few numbers.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm

Params = list[torch.Tensor]

SMALL = 4096  # global_norm_foreach() flattens tensors of at most this many elements on average


def global_norm(tree: Params) -> torch.Tensor:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together."""
    return torch.sqrt(sum(torch.sum(v * v) for v in tree))


def global_norm_foreach(tree: Params) -> torch.Tensor:
    """The same ``||v||``, fast path, in whichever of two forms costs less.

    Large tensors: the norm of the per-tensor norms (``torch._foreach_norm``), which reads each
    tensor once. Many small ones (at most ``SMALL`` elements on average): one norm of all of them
    flattened into one vector, since a kernel per tensor costs more than copying a few numbers.
    """
    if sum(map(torch.Tensor.numel, tree)) <= SMALL * len(tree):
        return torch.linalg.vector_norm(torch._utils._flatten_dense_tensors(tree))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tree)))


def all_finite(tree: Params) -> bool:
    """Whether every element of every tensor is finite (no NaN, no Inf)."""
    return all(bool(torch.isfinite(v).all()) for v in tree)


def all_finite_foreach(tree: Params) -> bool:
    """The same check, fast path: one kernel for all the tensors, the one
    ``torch.amp.GradScaler`` runs before a step. Its unscaling multiplies by ``1``, which
    leaves every value as it was; unlike a norm, a finite tensor whose squares overflow passes.
    """
    found_inf = torch.zeros(1, device=tree[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tree, found_inf,
                                                     torch.ones(1, device=tree[0].device))
    return not found_inf.item()


def foreach_possible(params: Params, grads: Params) -> bool:
    """Whether ``torch._foreach_*`` can take these tensors in one call: parameters on one device
    and of one floating-point dtype, dense gradients (autograd gives a gradient its parameter's
    dtype and device)."""
    device, dtype = params[0].get_device(), params[0].dtype  # get_device(): -1 on the CPU
    return (dtype.is_floating_point
            and all(p.dtype is dtype and p.get_device() == device for p in params)
            and not any(g.is_sparse for g in grads))


def check_foreach(foreach: bool | None, swap: bool | None = None) -> None:
    """``foreach`` and ``swap`` are each ``None`` (choose), ``True`` or ``False``, and
    ``swap=True`` (a way of the fast path) does not go with ``foreach=False``."""
    for name, value in (("foreach", foreach), ("swap", swap)):
        if not (value is None or isinstance(value, bool)):
            raise ValueError(f"{name} must be None, True or False, got {value!r}")
    if swap and foreach is False:
        raise ValueError("swap=True needs the fast path; it cannot go with foreach=False")


def choose_foreach(foreach: bool | None, params: Params, grads: Params) -> bool:
    """Resolve the ``foreach`` argument for one step's parameters and their gradients."""
    if foreach is False:
        return False
    possible = foreach_possible(params, grads)
    if foreach and not possible:
        raise ValueError("foreach=True needs all parameters and gradients of a step dense, on "
                         "one device and of one floating-point dtype; use foreach=None or False")
    return possible


def swap_possible(params: Params) -> bool:
    """Whether the fast path may point the parameters at other memory during pass (3).

    Only plain dense tensors that own their memory (each the whole of its storage, so not a
    view into a larger one such as FSDP's flattened parameters; no tensor subclasses; on the
    CPU, none shared between processes), large enough on average (more than ``SMALL``
    elements) that moving a pointer costs less than copying the tensor, and no CUDA graph being
    captured (a captured graph keeps the old pointers).
    """
    def owns_memory(p: torch.Tensor) -> bool:
        w = p.data
        return (type(w) is torch.Tensor and w.layout is torch.strided
                and w.storage_offset() == 0
                and w.untyped_storage().nbytes() == w.numel() * w.element_size()
                and not (w.device.type == "cpu" and w.is_shared()))

    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return (not capturing and sum(map(torch.Tensor.numel, params)) > SMALL * len(params)
            and all(map(owns_memory, params)))


def choose_swap(swap: bool | None, params: Params) -> bool:
    """Resolve the ``swap`` argument for one step's parameters (on the fast path)."""
    if swap is False:
        return False
    possible = swap_possible(params)
    if swap and not possible:
        raise ValueError("swap=True needs parameters that own their memory (no views, no tensor "
                         "subclasses, not shared between processes), of more than "
                         f"{SMALL} elements on average, outside CUDA graph capture; use "
                         "swap=None or False")
    return possible


def point_at(params: Params, tensors: Params) -> None:
    """Swapping's one move: each parameter points at the memory of its tensor (``p.data = t``);
    the parameter objects, their gradients and the optimizer state keyed by them stay as they
    are."""
    for p, t in zip(params, tensors):
        p.data = t


class Buffers:
    """One tensor like each of a list of parameters, kept from step to step: the fast path copies
    ``w`` (and ``g``) into these instead of allocating new tensors at every step."""

    def __init__(self) -> None:
        self.params: Params = []
        self.tensors: Params = []

    def like(self, params: Params) -> Params:
        """The buffers for ``params`` (of one dtype and device), new ones if the list changed."""
        same = (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and self.tensors[0].dtype is params[0].dtype
                and self.tensors[0].device == params[0].device)
        if not same:
            self.params, self.tensors = params, [torch.empty_like(p) for p in params]
        return self.tensors


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
        foreach: ``None`` (default): the ``torch._foreach_*`` fast path whenever a step's
            parameters and gradients are dense, on one device and of one floating-point dtype,
            else the per-tensor loop; ``False``: always the loop; ``True``: always the fast path
            (``ValueError`` at a step whose tensors do not allow it). ``foreach_used`` tells which
            path the last ``first_step()`` took. The base optimizer chooses its own.
        swap: on the fast path, how ``w`` is kept during pass (3). ``None`` (default): by moving
            pointers whenever :func:`swap_possible` allows it: ``w + e`` is written into buffers
            kept from step to step, the parameters point at them (``p.data``) for pass (3), and
            step (4) points them back at ``w``, which was never touched (exact, and no copy of
            ``w`` either way); else ``w`` is copied out and back. ``False``: always copy;
            ``True``: always swap, or a ``ValueError``. ``swap_used`` tells which way the last
            ``first_step()`` took. Outside ``first_step()``/``second_step()`` the parameters
            always hold their own memory, so references to ``p.data`` stay valid.
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
        foreach: bool | None = None,
        swap: bool | None = None,
        **base_kwargs,
    ) -> None:
        check_foreach(foreach, swap)
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
        self.foreach = foreach
        self.foreach_used: bool | None = None  # the path of the last first_step()
        self.swap = swap
        self.swap_used: bool | None = None  # how the last first_step() kept w
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # The perturbed parameters and their w, saved in (2) for (4). Not in self.state: Adam
        # initialises its moments only when state[p] is empty, and a checkpoint has no use for w.
        self._perturbed: Params | None = None
        self._saved_w: Params | None = None
        self._w_buffers = Buffers()  # the fast path's saved w, reused from step to step
        self._g_buffers = Buffers()  # the fast path's copy of g, for the variants that keep it

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
        if self.foreach_used:
            self._ascend_foreach(groups, params, g)
        else:
            self.swap_used = False
            if not torch.isfinite(global_norm(g)):
                raise FloatingPointError("non-finite gradient at w; the weights were not changed")
            group_of = [group for group, ps, _ in groups for _ in ps]  # each tensor's group
            e = perturbation(g, params,
                             rho=[group["rho"] for group in group_of],
                             adaptive=[group["adaptive"] for group in group_of],
                             eta=[group["eta"] for group in group_of],
                             perturb_eps=self.perturb_eps)
            # (2) ascend to w + e(w)
            self._saved_w = [p.clone() for p in params]
            for p, e_p in zip(params, e):
                p.add_(e_p)
        self._perturbed = params
        if zero_grad:
            self.zero_grad()

    def _keep_g(self, take: bool = False) -> Params:
        """``g`` of the perturbed tensors, kept after (2) by the variants whose (5) needs it
        (GSAM, WSAM, LookSAM). ``take``: the gradients are about to be zeroed, so the fast path
        takes the tensors themselves and leaves ``p.grad`` empty (``None``, as ``zero_grad()``
        would) instead of copying them; otherwise it copies into buffers reused from step to
        step, and the loop clones."""
        g = [p.grad for p in self._perturbed]
        if not self.foreach_used:
            return [g_p.clone() for g_p in g]
        if take:
            for p in self._perturbed:
                p.grad = None
            return g
        kept = self._g_buffers.like(self._perturbed)
        torch._foreach_copy_(kept, g)
        return kept

    def _groups_with_grad(self) -> list[tuple[dict, Params, Params]]:
        """``(group, params, grads)`` for each group: its parameters that have a gradient (frozen
        ones are skipped); groups without any are left out."""
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                groups.append((group, params, [p.grad for p in params]))
        return groups

    def _g_norm_foreach(self, g: Params) -> float:
        """``||g||`` as a float (the host needs it anyway: for the check and the scale of ``e``);
        raises ``FloatingPointError`` if it is not finite."""
        norm = global_norm_foreach(g).item()
        if not math.isfinite(norm):
            raise FloatingPointError("non-finite gradient at w; the weights were not changed")
        return norm

    def _move_foreach(self, params: Params, moves: list[tuple[Params, Params, float]]) -> None:
        """Step (2) on the fast path, keeping ``w``: ``w + step * v`` for each ``(ps, vs, step)``
        (one per group; together the ``ps`` are ``params``, in order).

        Swapping (``swap_used``): ``w + step v`` is written into buffers kept from step to step
        and the parameters point at them; ``w`` stays where it was. Copying: ``w`` is copied into
        those buffers and the parameters move in place.
        """
        self.swap_used = choose_swap(self.swap, params)
        buffers = self._w_buffers.like(params)
        if not self.swap_used:
            self._saved_w = buffers
            torch._foreach_copy_(self._saved_w, params)
            for ps, vs, step in moves:
                torch._foreach_add_(ps, vs, alpha=step)
            return
        self._saved_w = [p.data for p in params]
        moved = iter(buffers)
        for ps, vs, step in moves:
            for p, v in zip(ps, vs):
                torch.add(p, v, alpha=step, out=next(moved))
        point_at(params, buffers)

    def _ascend_foreach(self, groups: list[tuple[dict, Params, Params]], params: Params,
                        g: Params) -> None:
        """Steps (1)-(2) on the fast path: ``perturbation()``'s equations, one kernel per term.

        ``e_i = rho_i T_i^2 g_i / (||T g|| + eps)``; with ``T = 1`` (SAM) the norm is ``||g||``,
        already computed for the finiteness check, and ``w += (rho / (||g|| + eps)) g`` is one
        ``_foreach_add_`` per group.
        """
        g_norm = self._g_norm_foreach(g)
        # per group: (T, T g) where adaptive (ASAM), None where T = 1 (SAM); then ||T g||
        scaled = []
        for group, ps, gs in groups:
            if group["adaptive"]:
                t = torch._foreach_abs(ps)
                torch._foreach_add_(t, group["eta"])
                scaled.append((t, torch._foreach_mul(t, gs)))
            else:
                scaled.append(None)
        if any(scaled):
            norm = global_norm_foreach([v for (_, _, gs), t_tg in zip(groups, scaled)
                                        for v in (t_tg[1] if t_tg else gs)]).item()
        else:
            norm = g_norm
        # (2) ascend to w + e(w), keeping w
        moves = []
        for (group, ps, gs), t_tg in zip(groups, scaled):
            step = group["rho"] / (norm + self.perturb_eps)
            if t_tg:
                t, tg = t_tg
                torch._foreach_mul_(tg, t)  # T^2 g
                moves.append((ps, tg, step))
            else:
                moves.append((ps, gs, step))
        self._move_foreach(params, moves)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5): restore ``w`` and take the base step; ``p.grad`` must hold ``g_adv``."""
        if self._perturbed is None:
            raise RuntimeError("second_step() called without first_step(): "
                               "there is no w to restore")
        # (3) gradient at the perturbed point, same batch: the caller's backward pass left g_adv
        g_adv = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        self._restore_w()
        if not g_adv:
            raise RuntimeError("second_step(): no gradient at w + e; "
                               "w was restored and not updated")
        self._check_g_adv(g_adv)
        # (5) base step at w with d = g_adv
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _restore_w_for_every_perturbed_tensor(self, with_norm: bool = False
                                              ) -> tuple[Params, Params, torch.Tensor | None]:
        """Steps (3)-(4) for variants that combine ``g`` and ``g_adv`` tensor by tensor.

        Restores ``w`` exactly and returns ``(params, g_adv, ||g_adv||)`` for the perturbed
        tensors (the norm only ``with_norm``, else ``None``). Every one of them must have a finite
        ``g_adv``; otherwise this raises after ``w`` is restored.
        """
        if self._perturbed is None:
            raise RuntimeError("second_step() called without first_step(): "
                               "there is no w to restore")
        params = self._perturbed
        # (3) gradient at the perturbed point, same batch: the caller's backward pass left g_adv
        g_adv = [p.grad for p in params]
        self._restore_w()
        if any(g_p is None for g_p in g_adv):
            raise RuntimeError("second_step(): no gradient at w + e for a parameter that had one "
                               "at w; w was restored and not updated")
        if not with_norm:
            self._check_g_adv(g_adv)
            return params, g_adv, None
        return params, g_adv, self._g_adv_norm(g_adv)

    def _restore_w(self) -> None:
        """Step (4): restore ``w`` exactly, pointing the parameters back at it (swapped) or
        copying the saved tensors back (subtracting ``e`` would not be exact)."""
        if self.swap_used:
            point_at(self._perturbed, self._saved_w)
        elif self.foreach_used:
            torch._foreach_copy_(self._perturbed, self._saved_w)  # the buffers are kept
        else:
            for p, w in zip(self._perturbed, self._saved_w):
                p.copy_(w)
        self._perturbed, self._saved_w = None, None

    def _check_g_adv(self, g_adv: Params) -> None:
        """Raises ``FloatingPointError`` unless every element of ``g_adv`` is finite."""
        if not (all_finite_foreach if self.foreach_used else all_finite)(g_adv):
            raise FloatingPointError("non-finite gradient at w + e; w was restored and not updated")

    def _g_adv_norm(self, g_adv: Params) -> torch.Tensor:
        """``||g_adv||``, global, for the variants that need it; raises ``FloatingPointError`` if
        it is not finite (a non-finite ``g_adv`` makes it so)."""
        norm = global_norm_foreach(g_adv) if self.foreach_used else global_norm(g_adv)
        if not torch.isfinite(norm):
            raise FloatingPointError("non-finite gradient at w + e; w was restored and not updated")
        return norm

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
