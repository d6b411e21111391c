"""bSAM: SAM as an optimal relaxation of Bayes, as a ``torch.optim.Optimizer`` (PyTorch).

bSAM (Moellenhoff & Khan, ICLR 2023, arXiv:2210.01620) shows that SAM's objective is a relaxation
of the Bayesian learning rule with a Gaussian posterior ``q(w) = N(m_w, 1/(N s))``: replacing the
expected loss under ``q`` by its worst case over a ball gives SAM, and keeping ``q`` gives an
Adam-like optimizer that learns a mean ``w`` *and* a precision ``s`` per weight. The posterior
``N(w, 1/(N s))`` is then used for Bayesian model averaging at test time
(:meth:`BSAM.posterior_sample`).

With ``N = num_data`` and ``delta = weight_decay`` (the prior precision divided by ``N``), one step
from the state ``(w, m, s)`` with standard normal noise ``n`` is::

    1. w_noisy = w + n / sqrt(N s)                    (a draw from the posterior)
    2. g       = grad L_B(w_noisy)                     (pass 1, at the noisy point)
    3. w_adv   = w + rho * g / s                       (from w; scaled by 1/s, not by 1/||g||)
    4. g_adv   = grad L_B(w_adv)                       (pass 2)
    5. m      <- beta1 m + (1 - beta1)(g_adv + delta w)
    6. w      <- w - lr * m / s                        (with the old s)
    7. s      <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)

Neither the noise nor the perturbation stays in the weights: with ``lr = 0`` the mean ``w`` never
moves. This is ``sam_edu.reference.bsam`` written in PyTorch's idiom. bSAM is a full optimizer, not
a wrapper: ``m`` and ``s`` are its per-parameter state (``"momentum"``, ``"precision"``), and every
setting of update 3 and 5-7 (``lr``, ``beta1``, ``beta2``, ``weight_decay``, ``rho``, ``damping``)
may differ per parameter group, as Adam's do, so LR schedulers work. Every update acts element by
element (there is no global norm), so a group's tensors step exactly as they would alone.

The noise is drawn from a ``torch.Generator`` seeded with ``seed`` (one per device), or from the
global torch RNG when ``seed=None``; ``noisy_step(noise=...)`` takes an explicit draw instead, so
the tests can feed the same noise to every framework.

As in :class:`sam_edu.torch.SAM`, every update has a readable per-tensor form (the functions
below) and a ``foreach`` fast path with the same equations written as ``torch._foreach_*`` calls,
chosen by the ``foreach`` argument (``None``: whenever the tensors allow it).

In ``sam_edu``'s numbering of the generic two-pass step, bSAM's pass 1 runs at ``w_noisy`` instead
of ``w``: (1) ``g`` at the noisy point, (2) ascend to ``w_adv``, (3) ``g_adv`` there, (4) restore
``w`` exactly, (5) bSAM's own update 5-7. Two ways to drive it::

    # explicit loop: the caller runs both backward passes
    optimizer.noisy_step()                            # w + n / sqrt(N s)
    loss_fn(model(x), y).backward()                   # (1)
    optimizer.first_step(zero_grad=True)              # (2)
    with disable_running_stats(model):                # BatchNorm statistics from pass 1 only
        loss_fn(model(x), y).backward()               # (3)
    optimizer.second_step(zero_grad=True)             # (4), (5)

    loss = optimizer.step(closure)                    # the same; the loss at the noisy point

    with optimizer.posterior_sample():                # Bayesian model averaging: predict with
        probs += model(x_test).softmax(-1)            # a few draws from N(w, 1/(N s))
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Collection, Iterator, Sequence

import torch

from sam_edu.reference.bsam import check_bsam_arguments
from sam_edu.torch.sam import (Buffers, all_finite, all_finite_foreach, check_foreach,
                               choose_foreach, choose_swap, point_at)

Params = list[torch.Tensor]

HYPERPARAMETERS = ("lr", "beta1", "beta2", "weight_decay", "rho", "damping")


def posterior_sample(params: Params, s: Params, noise: Params, num_data: int) -> Params:
    """Update 1: ``w + n / sqrt(N s)``, a draw from ``N(w, 1/(N s))`` given ``n ~ N(0, I)``."""
    return [w + n / torch.sqrt(num_data * si) for w, si, n in zip(params, s, noise)]


def bsam_perturbation(grads: Params, s: Params, rho: float = 0.05) -> Params:
    """Update 3's ascent ``e = rho * g / s``: preconditioned by the precision, not normalised."""
    return [rho * g / si for g, si in zip(grads, s)]


def bsam_momentum(m: Params, g_adv: Params, params: Params, beta1: float = 0.9,
                  weight_decay: float = 1e-4) -> Params:
    """Update 5: ``m <- beta1 m + (1 - beta1)(g_adv + delta w)``."""
    return [beta1 * mi + (1 - beta1) * (ga + weight_decay * w)
            for mi, ga, w in zip(m, g_adv, params)]


def bsam_mean(params: Params, m: Params, s: Params, lr: float = 0.5) -> Params:
    """Update 6: ``w <- w - lr * m / s``."""
    return [w - lr * mi / si for w, mi, si in zip(params, m, s)]


def bsam_precision(s: Params, grads: Params, beta2: float = 0.999, damping: float = 0.1,
                   weight_decay: float = 1e-4) -> Params:
    """Update 7: ``s <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)``, ``g`` from pass 1."""
    return [beta2 * si + (1 - beta2) * (torch.sqrt(si) * torch.abs(g) + damping + weight_decay)
            for si, g in zip(s, grads)]


class BSAM(torch.optim.Optimizer):
    """Bayesian SAM: learns the mean ``w`` and the precision ``s`` of a Gaussian posterior.

    Args:
        params: the parameters, or parameter groups (dicts) that may set their own ``lr``,
            ``beta1``, ``beta2``, ``weight_decay``, ``rho`` and ``damping``.
        num_data: ``N``, the number of training examples; the posterior's variance is
            ``1/(N s)``, so a small ``N`` means large noise.
        lr: step size of the mean, update 6.
        beta1: decay of the momentum ``m``, update 5.
        beta2: decay of the precision ``s``, update 7.
        weight_decay: ``delta``, the prior precision divided by ``N``; enters updates 5 and 7.
        rho: radius of the ascent ``rho * g / s``, update 3.
        damping: added to the precision at every step, update 7.
        s_init: the initial precision of every weight.
        seed: an int seeds one ``torch.Generator`` per device for the noise; ``None`` draws it
            from the global torch RNG (``torch.manual_seed``).
        foreach: ``None`` (default): the ``torch._foreach_*`` fast path when the parameters are
            dense, on one device and of one floating-point dtype, else the per-tensor loop;
            ``False``: always the loop; ``True``: always the fast path (``ValueError`` when the
            tensors do not allow it). ``foreach_used`` tells which path the last step took.
        swap: on the fast path, how ``w`` is kept while the parameters hold the noisy point and
            then ``w + e``, as in :class:`sam_edu.torch.SAM`: ``None`` (default) points them at
            buffers holding those points whenever ``swap_possible`` allows it, and back at
            ``w`` (never written) at the end of the step; else ``w`` is copied out and back.
            ``False``: always copy; ``True``: always swap, or a ``ValueError``. ``swap_used``
            tells which way the last step took.

    Only parameters with ``requires_grad`` are perturbed and updated. ``state_dict()`` holds
    ``m``, ``s``, the step count and the generators' states, so a resumed run draws the noise an
    uninterrupted one would have drawn.
    """

    def __init__(
        self,
        params,
        num_data: int,
        lr: float = 0.5,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int | None = None,
        foreach: bool | None = None,
        swap: bool | None = None,
    ) -> None:
        check_foreach(foreach, swap)
        check_bsam_arguments(num_data, lr, beta1, beta2, weight_decay, rho, damping, s_init)
        if not (seed is None or (isinstance(seed, numbers.Integral)
                                 and not isinstance(seed, bool))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.num_data = int(num_data)
        self.s_init = s_init
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                                      rho=rho, damping=damping))
        self.seed = None if seed is None else int(seed)
        self.generators: dict[torch.device, torch.Generator] = {}
        self.steps_taken = 0
        self.foreach = foreach
        self.foreach_used: bool | None = None  # the path of the last noisy_step()
        self.swap = swap
        self.swap_used: bool | None = None  # how the last noisy_step() kept w
        self._w_buffers, self._g_buffers = Buffers(), Buffers()  # the fast path's copies
        # w, saved by noisy_step() for (2) and (4), and g from (1), kept for update 7. Not in
        # self.state: a checkpoint has no use for them (it is taken between steps).
        self._saved_w: dict[torch.Tensor, torch.Tensor] | None = None
        self._g: dict[torch.Tensor, torch.Tensor] | None = None
        self._root_s: dict[torch.Tensor, torch.Tensor] | None = None  # fast path: sqrt(s)

    def add_param_group(self, param_group: dict) -> None:
        """Check the group's settings, then add it (works after construction too)."""
        settings = {name: param_group.get(name, self.defaults[name]) for name in HYPERPARAMETERS}
        check_bsam_arguments(self.num_data, **settings, s_init=self.s_init,
                             where=f" (parameter group {len(self.param_groups)})")
        super().add_param_group(param_group)

    def _trainable(self) -> Params:
        """Every parameter with ``requires_grad``, in ``param_groups`` order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _by_group(self, selected: Collection[torch.Tensor]) -> Iterator[tuple[dict, Params]]:
        """Each group with its parameters that are in ``selected``; empty groups are skipped."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p in selected]
            if params:
                yield group, params

    def _precision(self, p: torch.Tensor) -> torch.Tensor:
        """``s`` of ``p``; the state ``m = 0``, ``s = s_init`` is created on first use."""
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
            state["precision"] = torch.full_like(p, self.s_init)
        return state["precision"]

    def _standard_normal(self, p: torch.Tensor,
                         generator: torch.Generator | None) -> torch.Tensor:
        """``n ~ N(0, I)`` shaped like ``p``, from ``generator`` (``None``: the global RNG)."""
        return torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator of ``device`` (created on first use), or ``None`` without a seed."""
        if self.seed is None:
            return None
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]

    @torch.no_grad()
    def noisy_step(self, noise: Sequence[torch.Tensor] | None = None) -> None:
        """Update 1: move every parameter to ``w + n / sqrt(N s)``, keeping ``w``.

        ``noise`` holds one standard normal tensor per parameter with ``requires_grad``, in
        ``param_groups`` order (NumPy arrays are converted); by default it is drawn from the
        seeded generator, or from the global torch RNG without a seed.
        """
        if self._saved_w is not None:
            raise RuntimeError("noisy_step() called twice: finish the step with first_step() "
                               "and second_step() first")
        params = self._trainable()
        if noise is None:
            noise = [self._standard_normal(p, self._generator(p.device)) for p in params]
        elif len(noise) != len(params) or any(tuple(n.shape) != tuple(p.shape)
                                              for n, p in zip(noise, params)):
            raise ValueError("noise must hold one tensor per parameter with requires_grad, in "
                             "param_groups order, shaped like it")
        else:
            noise = [torch.as_tensor(n, dtype=p.dtype, device=p.device)
                     for n, p in zip(noise, params)]
        s = [self._precision(p) for p in params]
        self.foreach_used = choose_foreach(self.foreach, params, [])
        self.swap_used = self.foreach_used and choose_swap(self.swap, params)
        if self.foreach_used:
            # the same update 1 on the fast path: w + (n / sqrt(s)) / sqrt(N), keeping w and
            # sqrt(s) for update 7 (s does not change before it)
            root_s = torch._foreach_sqrt(s)
            self._root_s = dict(zip(params, root_s))
            buffers = self._w_buffers.like(params)
            if self.swap_used:  # written into the buffers, which the parameters point at
                self._saved_w = {p: p.data for p in params}
                for p, b, n, r in zip(params, buffers, noise, root_s):
                    torch.addcdiv(p, n, r, value=self.num_data ** -0.5, out=b)
                point_at(params, buffers)
                return
            torch._foreach_copy_(buffers, params)  # copied out, then moved in place
            self._saved_w = dict(zip(params, buffers))
            torch._foreach_addcdiv_(params, list(noise), root_s, value=self.num_data ** -0.5)
            return
        self._saved_w = {p: p.clone() for p in params}
        for p, w_noisy in zip(params, posterior_sample(params, s, noise, self.num_data)):
            p.copy_(w_noisy)

    def _end_step(self) -> None:
        """Give every parameter its saved ``w`` back (exactly: nothing is subtracted), pointing
        it back (swapped) or copying, and forget the step, so that the next ``noisy_step()``
        starts afresh."""
        if self.swap_used:
            point_at(list(self._saved_w), list(self._saved_w.values()))
        elif self.foreach_used:
            torch._foreach_copy_(list(self._saved_w), list(self._saved_w.values()))
        else:
            for p, w in self._saved_w.items():
                p.copy_(w)
        self._saved_w, self._g, self._root_s = None, None, None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Steps (1)-(2): move to ``w + rho g / s``; ``p.grad`` must hold ``g`` (noisy point)."""
        if self._saved_w is None:
            raise RuntimeError("first_step() needs noisy_step() first: bSAM's pass 1 runs at "
                               "the noisy point w + n / sqrt(N s)")
        if self._g is not None:
            raise RuntimeError("first_step() called twice: call second_step() to restore w first")
        # (1) gradient at the noisy point: the caller's backward pass left g in p.grad. It is
        #     copied, since update 7 needs it after pass (3) has overwritten p.grad
        with_grad = [p for p in self._saved_w if p.grad is not None]
        if not with_grad:
            self._end_step()
            raise RuntimeError("first_step(): no parameter has a gradient; call loss.backward() "
                               "at the noisy point first (w was restored)")
        grads = [p.grad for p in with_grad]
        if not (all_finite_foreach if self.foreach_used else all_finite)(grads):
            self._end_step()
            raise FloatingPointError("non-finite gradient at the noisy point; "
                                     "w was restored and not updated")
        if self.foreach_used and zero_grad:  # the gradients are dropped next: take them
            g = dict(zip(with_grad, grads))
            for p in with_grad:
                p.grad = None
        elif self.foreach_used:
            copies = self._g_buffers.like(with_grad)
            torch._foreach_copy_(copies, grads)
            g = dict(zip(with_grad, copies))
        else:
            g = {p: g_p.clone() for p, g_p in zip(with_grad, grads)}
        # (2) ascend from w (not from the noisy point) to w + rho g / s
        if self.swap_used:
            self._ascend_swapped(g)
        else:
            self._ascend_copied(g)
        self._g = g
        if zero_grad:
            self.zero_grad()

    def _ascend_copied(self, g: dict[torch.Tensor, torch.Tensor]) -> None:
        """Step (2) in place: copy ``w`` back over the noisy point, then add ``e = rho g / s``."""
        if self.foreach_used:
            torch._foreach_copy_(list(self._saved_w), list(self._saved_w.values()))
        else:
            for p, w in self._saved_w.items():
                p.copy_(w)
        for group, params in self._by_group(g):
            s = [self.state[p]["precision"] for p in params]
            g_group = [g[p] for p in params]
            if self.foreach_used:  # the same e = rho g / s
                torch._foreach_addcdiv_(params, g_group, s, value=group["rho"])
                continue
            for p, e_p in zip(params, bsam_perturbation(g_group, s, group["rho"])):
                p.add_(e_p)

    def _ascend_swapped(self, g: dict[torch.Tensor, torch.Tensor]) -> None:
        """Step (2) when swapped: ``w + rho g / s`` is written over the noisy point, in the
        buffers the parameters point at; a parameter without ``g`` points back at ``w``."""
        for group, params in self._by_group(g):
            for p in params:
                torch.addcdiv(self._saved_w[p], g[p], self.state[p]["precision"],
                              value=group["rho"], out=p.data)
        without_g = [p for p in self._saved_w if p not in g]
        point_at(without_g, [self._saved_w[p] for p in without_g])

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Steps (3)-(5): restore ``w``, then updates 5-7; ``p.grad`` must hold ``g_adv``."""
        if self._g is None:
            raise RuntimeError("second_step() called without first_step(): there is no "
                               "gradient from the noisy point")
        g, root_s = self._g, self._root_s
        # (3) gradient at the perturbed point, same batch: the caller's backward pass left g_adv
        g_adv = {p: p.grad for p in g}
        # (4) restore w exactly: copy the saved tensor back (subtracting e would not be exact)
        self._end_step()
        if any(g_p is None for g_p in g_adv.values()):
            raise RuntimeError("second_step(): no gradient at w + e for a parameter that had one "
                               "at the noisy point; w was restored and not updated")
        if not (all_finite_foreach if self.foreach_used else all_finite)(list(g_adv.values())):
            raise FloatingPointError("non-finite gradient at w + e; w was restored and not updated")
        # (5) bSAM's own step: momentum, mean (with the old s), then precision
        for group, params in self._by_group(g):
            if self.foreach_used:
                self._update_foreach(group, params, [g_adv[p] for p in params],
                                     [g[p] for p in params], [root_s[p] for p in params])
                continue
            states = [self.state[p] for p in params]
            s = [state["precision"] for state in states]
            m = bsam_momentum([state["momentum"] for state in states], [g_adv[p] for p in params],
                              params, group["beta1"], group["weight_decay"])
            w = bsam_mean(params, m, s, group["lr"])
            new_s = bsam_precision(s, [g[p] for p in params], group["beta2"], group["damping"],
                                   group["weight_decay"])
            for p, state, m_p, w_p, s_p in zip(params, states, m, w, new_s):
                state["momentum"].copy_(m_p)
                p.copy_(w_p)
                state["precision"].copy_(s_p)
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad()

    def _update_foreach(self, group: dict, params: Params, g_adv: Params, g: Params,
                        root_s: Params) -> None:
        """Updates 5-7 on the fast path, in place, for one group (``g`` and ``root_s = sqrt(s)``
        from ``noisy_step()``: our tensors, consumed).

        ``beta x + (1 - beta) y`` is ``lerp(x, y, 1 - beta)``: one kernel per moving average.
        """
        m = [self.state[p]["momentum"] for p in params]
        s = [self.state[p]["precision"] for p in params]
        delta = group["weight_decay"]
        # 5. m <- beta1 m + (1 - beta1)(g_adv + delta w)
        torch._foreach_lerp_(m, torch._foreach_add(g_adv, params, alpha=delta) if delta else g_adv,
                             1 - group["beta1"])
        # 6. w <- w - lr m / s
        torch._foreach_addcdiv_(params, m, s, value=-group["lr"])
        # 7. s <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)
        torch._foreach_abs_(g)
        torch._foreach_mul_(root_s, g)  # sqrt(s) |g|
        torch._foreach_add_(root_s, group["damping"] + delta)
        torch._foreach_lerp_(s, root_s, 1 - group["beta2"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One bSAM step, updates 1-7; returns the loss at the noisy point.

        ``closure`` zeroes the gradients, computes the loss on the current batch, calls
        ``backward()`` and returns the loss. It is evaluated twice: at the noisy point and at
        ``w + rho g / s``.
        """
        if closure is None:
            raise ValueError("BSAM.step() needs a closure: it evaluates the loss at the noisy "
                             "point and at w + rho g / s")
        closure = torch.enable_grad()(closure)
        self.noisy_step()  # update 1
        loss = closure()  # (1) g at the noisy point
        self.first_step(zero_grad=True)  # (2) w + rho g / s
        closure()  # (3) g_adv there, same batch
        self.second_step()  # (4) restore w, (5) updates 5-7
        return loss

    @contextlib.contextmanager
    def posterior_sample(self, generator: torch.Generator | None = None) -> Iterator[None]:
        """Inside the block the parameters hold one draw from the posterior ``N(w, 1/(N s))``.

        For Bayesian model averaging: average the predictions of a few draws. On exit ``w`` is
        restored exactly. The noise comes from ``generator`` or, by default, from the global
        torch RNG, never from the optimizer's own generators: evaluating does not change the
        noise of the training steps that follow.
        """
        if self._saved_w is not None:
            raise RuntimeError("posterior_sample() inside a step: call second_step() first")
        params = self._trainable()
        with torch.no_grad():
            noise = [self._standard_normal(p, generator) for p in params]
            s = [self._precision(p) for p in params]
            saved_w = [p.clone() for p in params]
            for p, w_noisy in zip(params, posterior_sample(params, s, noise, self.num_data)):
                p.copy_(w_noisy)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved_w):
                    p.copy_(w)

    def state_dict(self) -> dict:
        """``m`` and ``s`` per parameter, the groups, the step count and the generators' states."""
        return {**super().state_dict(), "bsam_steps_taken": self.steps_taken,
                "bsam_seed": self.seed,
                "bsam_generator_states": {str(device): generator.get_state()
                                          for device, generator in self.generators.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load ``m``, ``s``, the groups, the step count, the seed and the generators' states."""
        state_dict = dict(state_dict)
        steps_taken = state_dict.pop("bsam_steps_taken")
        seed = state_dict.pop("bsam_seed")
        generator_states = state_dict.pop("bsam_generator_states")
        super().load_state_dict(state_dict)
        self.steps_taken, self.seed = steps_taken, seed
        self.generators = {}
        for device, generator_state in generator_states.items():
            generator = torch.Generator(device)
            generator.set_state(generator_state)
            self.generators[torch.device(device)] = generator
