"""LookSAM, most of SAM at a fraction of its cost, as an optax ``GradientTransformation`` (JAX).

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
SAM. All norms and dot products are global, over all leaves as one vector (the paper's
formulation; a per-tensor projection is a variant).

The SAM steps follow the generic numbering (1)-(5); a cheap step is (1) and (5) only.

This is ``sam_edu.reference.looksam`` written in JAX's idiom, with the conventions of
:func:`sam_edu.jax.sam`: pytrees, ``update(..., grad_fn=...)``, and a skipped step instead of an
exception when a gradient is not finite. The choice between the two kinds of step depends on the
step count, a traced value under ``jax.jit``, so it is a ``jax.lax.cond``: both branches are
traced once, and only the chosen one runs, so ``grad_fn`` is *evaluated* only on SAM steps.

On a CPU that branch needs care: XLA:CPU puts only the convolutions at the top level of a
program into the layout of its fast kernels, so the backward pass of a CNN inside the branch ran
as plain loops, about 30 times slower than SAM's (0.45 s against 0.03 s per step for a small CNN
on digits). The SAM branch therefore evaluates ``grad_fn`` through
:func:`canonical_convolutions` on CPUs, which writes the canonical layout itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sam_edu.jax.sam import (
    Flags,
    Params,
    _check_non_negative,
    ascend,
    global_norm,
    keep_finite,
    perturbation,
    perturbation_norm,
    skip_unless_finite,
)


def is_sam_step(t: int | jax.Array, k: int) -> bool | jax.Array:
    """Step ``t = 0, 1, ...`` is a full SAM step when ``t mod k == 0`` (so the first one is)."""
    return t % k == 0


def projection_coefficient(g_adv: Params, grads: Params,
                           perturb_eps: float = 1e-12) -> jax.Array:
    """``c = (g_adv . g) / (||g|| + eps)^2``: the component of ``g_adv`` along ``g`` is ``c g``.

    The dot product runs over all leaves together.
    """
    norm = global_norm(grads) + perturb_eps
    along = sum(jnp.sum(a * g) for a, g in zip(jax.tree.leaves(g_adv), jax.tree.leaves(grads)))
    return along / norm / norm


def orthogonal_component(g_adv: Params, grads: Params, perturb_eps: float = 1e-12,
                         c: jax.Array | None = None) -> Params:
    """``g_v = g_adv - (g_adv . g_hat) g_hat`` with ``g_hat = g / (||g|| + eps)``.

    Computed as ``g_v = g_adv - c g`` with the number ``c`` of :func:`projection_coefficient`
    (passed in when the caller has it already), so that no ``g_hat`` is written out to memory.
    Each leaf keeps ``g_adv``'s dtype.
    """
    if c is None:
        c = projection_coefficient(g_adv, grads, perturb_eps)
    return jax.tree.map(lambda a, g: (a - c * g).astype(a.dtype), g_adv, grads)


def looksam_direction(grads: Params, g_v: Params, alpha: float = 0.7,
                      perturb_eps: float = 1e-12) -> Params:
    """The cheap step's ``d = g + alpha * (||g|| / (||g_v|| + eps)) * g_v``."""
    scale = alpha * global_norm(grads) / (global_norm(g_v) + perturb_eps)
    return jax.tree.map(lambda g, v: g + scale * v, grads, g_v)


def _canonical_convolution(lhs, rhs, *, dimension_numbers, **params):
    """One ``conv_general_dilated`` in XLA:CPU's canonical layout, transposed in and out.

    Canonical is ``lhs = (batch, spatial..., feature)``, ``rhs = (spatial..., in, out)``, ``out``
    like ``lhs`` (``b01f_01io->b01f``), the form XLA's ``ConvCanonicalization`` pass produces; the
    spatial order, and with it every window parameter, is kept. Only the layout changes.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n = len(lhs_spec) - 2
    canonical = lax.ConvDimensionNumbers((0, n + 1, *range(1, n + 1)),
                                         (n + 1, n, *range(n)),
                                         (0, n + 1, *range(1, n + 1)))
    if tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, canonical)):
        return lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers,
                                               **params)
    out = lax.conv_general_dilated_p.bind(
        lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
        lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
        dimension_numbers=canonical, **params)
    to_canonical = (out_spec[0], *out_spec[2:], out_spec[1])
    return lax.transpose(out, tuple(int(i) for i in np.argsort(to_canonical)))


def _eval_canonical(jaxpr, consts, *args):
    """``jax.core.eval_jaxpr`` with every convolution made canonical, nested jits inlined."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outvals = [_canonical_convolution(*invals, **eqn.params)]
        elif eqn.primitive.name in ("pjit", "jit"):  # a nested jax.jit: its convolutions too
            inner = eqn.params["jaxpr"]
            outvals = _eval_canonical(inner.jaxpr, inner.consts, *invals)
        else:  # as jax.core.eval_jaxpr binds it
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            if not isinstance(v, jax.extend.core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def canonical_convolutions(fn: Callable[[Params], Params]) -> Callable[[Params], Params]:
    """``fn`` with every convolution it runs written in XLA:CPU's canonical layout.

    Why LookSAM needs it: its pass 2 sits in a ``lax.cond`` branch, and XLA:CPU rewrites only
    the *top-level* convolutions of a program into the layout its fast convolution kernels take
    (the ``ConvCanonicalization`` pass, "all top-level convolutions"). Inside a branch, the
    backward pass's convolutions (input gradient ``b01f_01oi->b01f``, kernel gradient
    ``f01b_i01o->01bf``) stay as they are and are emitted as plain loops: a small CNN's pass 2
    ran about 30 times slower in the branch than at the top level (``jax.jit(f).lower(...)
    .compile().as_text()`` shows the loops). So the branch traces ``fn`` to a jaxpr and
    evaluates it with each convolution transposed into the canonical layout and back (what the
    pass does at the top level); the math is unchanged. Other primitives run as they are.
    Not covered: the kernel gradient of a grouped or depthwise convolution, which XLA rewrites
    (``batch_group_count``) after this and leaves in a loop inside the branch.
    """
    def canonical(params):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params)
        leaves = _eval_canonical(closed.jaxpr, closed.consts, *jax.tree.leaves(params))
        return jax.tree.unflatten(jax.tree.structure(out_shape), leaves)

    return canonical


class LookSAMState(NamedTuple):
    """State of :func:`looksam`.

    Attributes:
      base_state: the base optimizer's state, untouched by the perturbation.
      count: the step ``t`` of the next update; ``t mod k == 0`` is a full SAM step (JAX's
        default integer). A skipped update does not count, so a skipped SAM step is retried.
      g_v: the component of the last SAM step's ``g_adv`` orthogonal to its ``g``, one array per
        leaf of the params (zeros until the first SAM step, which is step 0).
      notfinite_count: how many updates were skipped because ``g`` or ``g_adv`` was not finite
        (a running total, never reset; int32 scalar).
    """

    base_state: optax.OptState
    count: jax.Array
    g_v: Params
    notfinite_count: jax.Array


def looksam(
    base: optax.GradientTransformation,
    rho: float = 0.1,
    k: int = 10,
    alpha: float = 0.7,
    adaptive: Flags = False,
    perturb_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """LookSAM around the base optimizer ``base``.

    ``update(grads, state, params, *, grad_fn, **extra_args)`` works as in :func:`sam_edu.jax.sam`:
    ``grads = grad L_B(w)``, ``grad_fn(params)`` the gradient on the **same** batch. ``grad_fn``
    is evaluated once, at ``w + e``, on a SAM step (``state.count mod k == 0``) and not at all on
    the other steps, so ``n`` steps cost ``n + ceil(n / k)`` gradient evaluations with the loop's
    own. Other keyword arguments go on to the base optimizer::

        grad_fn = jax.grad(lambda p: loss(p, batch))
        updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)

    If ``g`` or ``g_adv`` is not finite (NaN or Inf, detected through the global norm) the step is
    skipped: the updates are zero, the base state, ``count`` and ``g_v`` are kept and
    ``state.notfinite_count`` is incremented.

    Args:
      base: the base optimizer (SGD, momentum, Adam, ...); it steps at the original ``w``.
      rho: radius of the ball, ``rho >= 0``.
      k: a full SAM step every ``k`` steps, an integer ``>= 1`` (``k = 1`` is SAM).
      alpha: weight of the reused component ``g_v`` on the cheap steps, ``>= 0``.
      adaptive: ASAM's perturbation (``eta = 0``): one flag, a pytree of flags with the structure
        of the params, or a callable ``params -> pytree of flags``.
      perturb_eps: added to the norms so that a zero gradient gives ``e = 0``; ``>= 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LookSAMState`.
    """
    _check_non_negative("rho", rho)
    if isinstance(k, bool) or not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be an integer >= 1 (a full SAM step every k steps), got {k!r}")
    _check_non_negative("alpha", alpha)
    _check_non_negative("perturb_eps", perturb_eps)
    base = optax.with_extra_args_support(base)

    def init_fn(params: Params) -> LookSAMState:
        return LookSAMState(base_state=base.init(params), count=jnp.zeros([], int),
                            g_v=jax.tree.map(jnp.zeros_like, params),
                            notfinite_count=jnp.zeros([], jnp.int32))

    def update_fn(grads, state: LookSAMState, params: Params | None = None, *,
                  grad_fn: Callable[[Params], Params] | None = None, **extra_args):
        if grad_fn is None:
            raise ValueError("looksam: update needs grad_fn=..., a function params -> gradient "
                             "on the current batch")
        if params is None:
            raise ValueError("looksam: update needs params, the weights w the perturbation "
                             "starts from")
        # (1) gradient at the centre: the caller computed it on this batch
        g = grads
        # the norm that scales a SAM step's e also tells whether g is finite
        norm = perturbation_norm(g, params, adaptive)
        finite = jnp.isfinite(norm)
        c_dtype = jnp.result_type(*jax.tree.leaves(g))  # the dtype of the dot product g_adv . g

        def sam_step():
            # (2) ascend to w + e(w) (SAM, or ASAM with eta = 0)
            perturbed = ascend(params,
                               perturbation(g, params, rho, adaptive, 0.0, perturb_eps, norm))
            # (3) gradient at the perturbed point, same batch; on a CPU with its convolutions
            #     in the layout of XLA's fast kernels, which a cond branch does not get by itself
            g_adv = lax.platform_dependent(perturbed, cpu=canonical_convolutions(grad_fn),
                                           default=grad_fn)
            # (4) restore w: JAX is functional, so ``params`` was never changed
            # d = g_adv, and the number c of g_v = g_adv - c g, kept for the next k - 1 steps
            return (g_adv, projection_coefficient(g_adv, g, perturb_eps).astype(c_dtype),
                    jnp.isfinite(global_norm(g_adv)))

        def cheap_step():
            # g plus the stored orthogonal component, rescaled; no second gradient
            return (looksam_direction(g, state.g_v, alpha, perturb_eps),
                    jnp.zeros([], c_dtype), jnp.asarray(True))

        # a SAM step runs (2)-(4), a cheap one skips them: only the chosen branch runs. Only
        # d and two numbers leave the branch: the buffers a branch returns are written anew
        sam_now = is_sam_step(state.count, k)
        d, c, finite_adv = jax.lax.cond(sam_now, sam_step, cheap_step)
        finite = finite & finite_adv
        # (5) base step at w with d; a non-finite g or g_adv skips the step instead
        updates, base_state = base.update(d, state.base_state, params, **extra_args)
        updates, base_state = skip_unless_finite(finite, updates, base_state, state.base_state)
        # a finite SAM step keeps g_v = g_adv - c g, with the branch's c
        g_v = orthogonal_component(d, g, perturb_eps, c)
        return updates, LookSAMState(
            base_state=base_state,
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
            g_v=keep_finite(sam_now & finite, g_v, state.g_v),
            notfinite_count=jnp.where(finite, state.notfinite_count, state.notfinite_count + 1),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
