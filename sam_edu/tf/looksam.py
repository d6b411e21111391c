"""LookSAM: most of SAM at a fraction of its cost, for TensorFlow / Keras 3.

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
SAM. All norms and dot products are global, over all tensors as one vector (the paper's
formulation; a per-tensor projection is a variant). ``t`` is the base optimizer's ``iterations``.

The SAM steps follow the generic numbering (1)-(5) of :mod:`sam_edu.tf.sam`; a cheap step is (1)
and (5) only. :meth:`LookSAM.first_step` therefore returns whether the step is a SAM step, and
the training loop runs pass 2 only then::

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:                              # (1)
            loss = loss_fn(y, model(x, training=True))
        if optimizer.first_step(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables):          # (2), or a cheap (5)
            with tf.GradientTape() as tape:                          # (3) every k-th step
                loss_adv = loss_fn(y, model(x, training=True))
            optimizer.second_step(tape.gradient(loss_adv, model.trainable_variables),
                                  model.trainable_variables)         # (4), (5)

Autograph turns the ``if`` on the returned tensor into a ``tf.cond``, so the second pass is not
computed on cheap steps; :func:`~sam_edu.tf.sam_train_step` does the same under ``model.fit``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from sam_edu.reference.looksam import check_looksam_arguments
from sam_edu.tf.sam import (
    SAM,
    Params,
    _check_finite,
    _global_gradients,
    _keras_config,
    _keras_options,
    _refuse_under_distribution,
    global_norm,
)


def is_sam_step(t, k: int) -> tf.Tensor:
    """Step ``t = 0, 1, ...`` is a full SAM step when ``t mod k == 0`` (so the first one is)."""
    return tf.equal(t % k, 0)


def orthogonal_component(g_adv: Params, grads: Params, perturb_eps: float = 1e-12) -> Params:
    """``g_v = g_adv - (g_adv . g_hat) g_hat`` with ``g_hat = g / (||g|| + eps)``."""
    norm = global_norm(grads) + perturb_eps
    unit = [g / norm for g in grads]
    along = tf.add_n([tf.reduce_sum(a * u) for a, u in zip(g_adv, unit)])
    return [a - along * u for a, u in zip(g_adv, unit)]


def looksam_direction(grads: Params, g_v: Params, alpha: float = 0.7,
                      perturb_eps: float = 1e-12) -> Params:
    """The cheap step's ``d = g + alpha * (||g|| / (||g_v|| + eps)) * g_v``."""
    scale = alpha * global_norm(grads) / (global_norm(g_v) + perturb_eps)
    return [g + scale * v for g, v in zip(grads, g_v)]


@keras.saving.register_keras_serializable(package="sam_edu")
class LookSAM(SAM):
    """LookSAM around any Keras optimizer (ASAM's perturbation on its SAM steps with
    ``adaptive=True``).

    Every ``k``-th step (counted by the base optimizer's :attr:`iterations`) is a full SAM step:
    :meth:`first_step` moves to ``w + e`` and returns ``True``, and the loop runs pass 2 and
    :meth:`second_step`, which keeps ``g_v``. On the other steps :meth:`first_step` lets the base
    optimizer step with the LookSAM direction and returns ``False``: the step is done. With
    ``use_gc`` the ascent gradient is centralised, as in :class:`~sam_edu.tf.SAM`; ``g_v`` and the
    cheap steps use ``g`` as it is. ``g_v`` is an optimizer variable, so ``model.save`` keeps it.
    """

    _keeps_centre_gradient = True  # g, to split g_adv into its parts along and across g

    def __init__(self, base_optimizer, rho=0.1, k=10, alpha=0.7, adaptive=False, use_gc=False,
                 perturb_eps=1e-12, name="looksam", **kwargs):
        if "step" in kwargs:
            raise ValueError("LookSAM does not take `step`: it always counts steps with "
                             "base_optimizer.iterations. The seed README's step=False (a SAM "
                             "step at every step) is k=1.")
        options = _keras_options(type(self).__name__, kwargs)  # SAM's eta refused
        check_looksam_arguments(rho, k, alpha)
        if k > 1 and options.get("gradient_accumulation_steps"):
            raise ValueError("gradient_accumulation_steps with k > 1: LookSAM keeps g_v from one "
                             "SAM step's gradients, which would be one micro-batch's; accumulate "
                             "with k=1 (SAM) or use a larger batch")
        super().__init__(base_optimizer, rho=rho, adaptive=adaptive, use_gc=use_gc,
                         perturb_eps=perturb_eps, name=name, **options)
        self.k = int(k)
        self.alpha = alpha

    def build(self, var_list):
        """SAM's variables, and ``g_v = 0`` per variable (replaced at the first SAM step)."""
        self._orthogonal_gradients = self.add_optimizer_variables(var_list,
                                                                  "looksam_orthogonal_gradient")
        super().build(var_list)

    def first_step(self, gradients, variables):
        """Step (1), then (2) on a SAM step or (5) on a cheap one; returns a bool tensor.

        ``True``: ``w`` moved to ``w + e(w)``; run pass 2 and :meth:`second_step`. ``False``: the
        base optimizer has stepped with ``d = g + alpha ||g|| / ||g_v|| g_v``; do not call
        :meth:`second_step`. A non-finite ``g`` raises ``tf.errors.InvalidArgumentError`` before
        any weight moves.
        """
        variables = list(variables)
        if not self.built:
            self.build(variables)
        if self.k == 1:  # every step is a SAM step
            return self._sam_first_step(gradients, variables)
        _refuse_under_distribution(f"{type(self).__name__} with k > 1")
        return tf.cond(is_sam_step(tf.convert_to_tensor(self.iterations), self.k),
                       lambda: self._sam_first_step(gradients, variables),
                       lambda: self._cheap_step(gradients, variables))

    def _sam_first_step(self, gradients, variables):
        """Steps (1)-(2) of a SAM step: SAM's, keeping ``g`` for ``g_v``."""
        super().first_step(gradients, variables)
        return tf.constant(True)

    def _cheap_step(self, gradients, variables):
        """Steps (1) and (5) of a cheap step: ``g_adv`` is not computed but approximated by
        ``g + alpha ||g|| / (||g_v|| + eps) g_v``, ``g_v`` from the last SAM step."""
        self._check_variables_are_known(variables)
        # (1) gradient at the centre (computed by the caller); an unconnected variable has g = 0
        g = _check_finite(_global_gradients(self, gradients),
                          "non-finite gradient at w; the weights were not changed")
        g = [tf.zeros_like(v) if t is None else t for t, v in zip(g, variables)]
        g_v = [tf.convert_to_tensor(self._orthogonal_gradients[self._get_variable_index(v)])
               for v in variables]
        # (5) base step at w with the stored orthogonal component, rescaled; after every check,
        #     so that a failed one stops all of it, the base optimizer's step count included
        g_adv = looksam_direction(g, g_v, self.alpha, self.perturb_eps)
        with tf.control_dependencies(g_adv):
            self._direction_step(g, g_adv, variables)
        return tf.constant(False)

    def _step_at_w(self, g_adv, variables):
        """(5) on a SAM step: keep ``g_v = g_adv - (g_adv . g_hat) g_hat`` for the next ``k - 1``
        steps, then step with ``g_adv``."""
        g_adv = [tf.zeros_like(v) if t is None else t for t, v in zip(g_adv, variables)]
        g = self._centre_gradient(variables)
        g_v = orthogonal_component(g_adv, g, self.perturb_eps)
        for v, t in zip(variables, g_v):
            self._orthogonal_gradients[self._get_variable_index(v)].assign(t)
        self._direction_step(g, g_adv, variables)

    def _direction_step(self, g, g_adv, variables):
        """(5) the base optimizer steps at ``w`` with ``d = g_adv`` (computed or approximated)."""
        self._base_step(g_adv, variables)

    def get_config(self):
        # Not SAM's: LookSAM takes k and alpha, and not eta.
        return {
            "name": self.name,
            "base_optimizer": keras.optimizers.serialize(self.base_optimizer),
            "rho": self.rho,
            "k": self.k,
            "alpha": self.alpha,
            "adaptive": self.adaptive,
            "use_gc": self.use_gc,
            "perturb_eps": self.perturb_eps,
            **_keras_config(self),
        }
