"""WSAM (sharpness as a weighted regulariser) for TensorFlow / Keras 3.

WSAM (Yue et al., KDD 2023, arXiv:2305.15817) weighs the sharpness term of SAM's objective::

    L(w) + gamma / (1 - gamma) * [ max_{||e|| <= rho} L(w + e) - L(w) ],     0 <= gamma < 1

With ``a = gamma / (1 - gamma)`` its gradient is ``g + a (g_adv - g)``: ``gamma = 0`` is the base
optimizer, ``gamma = 1/2`` (``a = 1``) is SAM, larger ``gamma`` weighs sharpness more.

* Coupled form (``decouple=False``): the base optimizer steps with ``d = g + a (g_adv - g)``.
* Decoupled form (``decouple=True``, the paper's): the base optimizer steps with ``g`` alone, and
  the sharpness term is applied afterwards outside its preconditioning and momentum::

      w <- base_update(w, g) - lr_t * a * (g_adv - g)

  with ``lr_t`` the learning rate the base optimizer used for this step (its schedule included).

``max_norm`` clips the gradient at the perturbed point by its global norm before the two are
combined, as the official code does. ``adaptive`` uses ASAM's perturbation (with ``eta = 0``).

The steps are SAM's (1)-(5) (:mod:`sam_edu.tf.sam`), with SAM's perturbation; WSAM changes step
(5), which needs the clean gradient ``g`` kept from step (1).

The seed README gives WSAM LookSAM's ``k`` and ``alpha``. Here they mean what they mean in
LookSAM (:mod:`sam_edu.tf.looksam`): with ``k > 1`` only every ``k``-th step computes ``g_adv``;
the others approximate it by ``g + alpha ||g|| / ||g_v|| g_v`` and combine it with ``g`` as
above. The default ``k=1`` is the paper's WSAM (``alpha`` then plays no part).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from sam_edu.tf.looksam import LookSAM
from sam_edu.tf.sam import Params, _keras_config, _keras_options, _model_reference, global_norm


def sharpness_weight(gamma: float) -> float:
    """``a = gamma / (1 - gamma)``; ``gamma`` must lie in ``[0, 1)``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return gamma / (1.0 - gamma)


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all tensors by ``min(1, max_norm / (||g|| + 1e-6))``: the direction is kept.

    The ``1e-6`` is that of ``torch.nn.utils.clip_grad_norm_``, which the official WSAM code uses
    (``tf.clip_by_global_norm`` has none).
    """
    factor = max_norm / (global_norm(grads) + 1e-6)
    factor = tf.minimum(factor, tf.ones_like(factor))
    return [g * factor for g in grads]


def wsam_direction(grads: Params, g_adv: Params, a: float) -> Params:
    """The coupled direction ``d = g + a (g_adv - g)``."""
    return [g + a * (ga - g) for g, ga in zip(grads, g_adv)]


@keras.saving.register_keras_serializable(package="sam_edu")
class WSAM(LookSAM):
    """Weighted SAM around any Keras optimizer (ASAM's perturbation with ``adaptive=True``).

    ``model`` is ``None`` (custom loops) or the ``keras.Model`` this optimizer trains:
    :func:`~sam_edu.tf.sam_train_step` refuses to train another model with it (BatchNorm
    statistics are handled there for any model). Use it as :class:`~sam_edu.tf.SAM`:
    :meth:`first_step` with ``g`` at ``w``, :meth:`second_step` with ``g_adv`` at ``w + e``, or
    ``sam_train_step`` under ``fit``. With ``k > 1`` it is driven as :class:`~sam_edu.tf.LookSAM`:
    :meth:`first_step` returns whether pass 2 is needed. ``use_gc`` centralises the ascent
    gradient, as in SAM.
    """

    def __init__(self, model, base_optimizer, rho=0.05, gamma=0.9, decouple=True, max_norm=None,
                 k=1, alpha=0.7, adaptive=False, use_gc=False, perturb_eps=1e-12, name="wsam",
                 **kwargs):
        options = _keras_options(type(self).__name__, kwargs)  # SAM's eta refused
        a = sharpness_weight(gamma)
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")
        if decouple and (getattr(base_optimizer, "gradient_accumulation_steps", None)
                         or options.get("gradient_accumulation_steps")):
            raise ValueError("gradient_accumulation_steps (on WSAM or its base_optimizer) with "
                             "decouple=True: the sharpness term would be applied at every "
                             "micro-step; use decouple=False")
        super().__init__(base_optimizer, rho=rho, k=k, alpha=alpha, adaptive=adaptive,
                         use_gc=use_gc, perturb_eps=perturb_eps, name=name, **options)
        self._model_ref = _model_reference(model)
        self.gamma = gamma
        self.sharpness_weight = a
        self.decouple = decouple
        self.max_norm = max_norm

    def _direction_step(self, g, g_adv, variables):
        """(5) coupled: the base steps at ``w`` with ``d = g + a (g_adv - g)``; decoupled: with
        ``g``, then ``w <- w - lr_t a (g_adv - g)`` outside the base optimizer."""
        if self.max_norm is not None:
            g_adv = clip_by_global_norm(g_adv, self.max_norm)
        a = self.sharpness_weight
        if not self.decouple:
            self._base_step(wsam_direction(g, g_adv, a), variables)
            return
        # the learning rate of this step, read before the base step counts it
        lr = tf.cast(self.base_optimizer.learning_rate, g[0].dtype)

        def sharpness_term():
            for v, gi, ga in zip(variables, g, g_adv):
                v.assign_sub(lr * a * (ga - gi))

        self._base_step(g, variables, then=sharpness_term)

    def get_config(self):
        # Not LookSAM's: WSAM takes gamma, decouple and max_norm. The model is not serialised; a
        # restored WSAM has model=None.
        return {
            "name": self.name,
            "base_optimizer": keras.optimizers.serialize(self.base_optimizer),
            "rho": self.rho,
            "gamma": self.gamma,
            "decouple": self.decouple,
            "max_norm": self.max_norm,
            "k": self.k,
            "alpha": self.alpha,
            "adaptive": self.adaptive,
            "use_gc": self.use_gc,
            "perturb_eps": self.perturb_eps,
            **_keras_config(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base = keras.optimizers.deserialize(dict(config.pop("base_optimizer")),
                                            custom_objects=custom_objects)
        return cls(None, base, **config)
