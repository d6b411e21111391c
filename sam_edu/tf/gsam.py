"""GSAM (surrogate gap guided SAM) for TensorFlow / Keras 3.

GSAM (Zhuang et al., ICLR 2022, arXiv:2203.08065) observes that SAM minimises the perturbed loss
``L_p(w) = L(w + e(w))`` but not the *surrogate gap* ``h(w) = L_p(w) - L(w)``, which measures
sharpness: a point can have a low perturbed loss while still sitting in a sharp valley. GSAM
keeps SAM's descent on ``L_p`` and adds an ascent on ``L`` along the part of the clean gradient
that does not change ``L_p`` to first order::

    g_par  = (g . g_adv_hat) g_adv_hat,     g_adv_hat = g_adv / (||g_adv|| + eps)
    g_perp = g - g_par
    d      = g_adv - alpha * g_perp

Moving along ``-d`` lowers ``L_p`` as SAM does, while the ``+alpha g_perp`` part raises ``L``
without touching ``L_p`` (to first order), so the gap ``h = L_p - L`` shrinks.

The radius may follow a schedule (the paper ties it to the learning rate): ``rho_scheduler`` is a
float or a ``keras.optimizers.schedules.LearningRateSchedule``, evaluated at the number of steps
already taken and clamped at 0. ``alpha = 0`` with a constant radius is exactly SAM. Adaptive GSAM
follows the official JAX code, ``e = rho |w| g / (||g|| + eps)`` (not ASAM's ``T_w^2`` form).

The steps are SAM's (1)-(5) (:mod:`sam_edu.tf.sam`); GSAM changes the perturbation in step (2)
and the direction in step (5), which needs the clean gradient ``g`` kept from step (1).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from sam_edu.tf.sam import SAM, Params, _keras_config, _keras_options, _model_reference, global_norm


def gsam_perturbation(grads: Params, params: Params, rho, adaptive: bool = False,
                      perturb_eps: float = 1e-12, norm: tf.Tensor | None = None) -> Params:
    """``e = rho g / (||g|| + eps)``, or ``e = rho |w| g / (||g|| + eps)`` when ``adaptive``.

    ``rho`` (a float or a tensor of the gradients' dtype) is clamped at 0; ``norm`` is
    ``||g||`` when the caller has it already.
    """
    if norm is None:
        norm = global_norm(grads)
    scale = tf.maximum(tf.convert_to_tensor(rho, dtype=norm.dtype), 0.0) / (norm + perturb_eps)
    return [scale * (tf.abs(w) if adaptive else 1.0) * g for w, g in zip(params, grads)]


def decompose(grads: Params, g_adv: Params, perturb_eps: float = 1e-12) -> tuple[Params, Params]:
    """Split ``g`` into ``g_par`` along ``g_adv`` and ``g_perp`` orthogonal to it."""
    norm = global_norm(g_adv) + perturb_eps
    unit = [a / norm for a in g_adv]
    along = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(grads, unit)])
    g_par = [along * u for u in unit]
    return g_par, [g - p for g, p in zip(grads, g_par)]


def gsam_direction(grads: Params, g_adv: Params, alpha: float = 0.4,
                   perturb_eps: float = 1e-12) -> Params:
    """``d = g_adv - alpha * g_perp``."""
    _, g_perp = decompose(grads, g_adv, perturb_eps)
    return [a - alpha * p for a, p in zip(g_adv, g_perp)]


@keras.saving.register_keras_serializable(package="sam_edu")
class GSAM(SAM):
    """Surrogate gap guided SAM around any Keras optimizer.

    ``model`` is ``None`` (custom loops) or the ``keras.Model`` this optimizer trains:
    :func:`~sam_edu.tf.sam_train_step` refuses to train another model with it (BatchNorm
    statistics are handled there for any model). ``rho_scheduler`` is a float or a Keras
    ``LearningRateSchedule`` evaluated at :attr:`iterations` (the base optimizer's step count) in
    each :meth:`first_step`. Use it as :class:`~sam_edu.tf.SAM`: :meth:`first_step` with ``g`` at
    ``w``, :meth:`second_step` with ``g_adv`` at ``w + e``, or ``sam_train_step`` under ``fit``.
    """

    _keeps_centre_gradient = True

    def __init__(self, model, base_optimizer, rho_scheduler, alpha=0.4, adaptive=False,
                 perturb_eps=1e-12, name="gsam", **kwargs):
        options = _keras_options(type(self).__name__, kwargs)  # SAM's use_gc and eta refused
        schedule = isinstance(rho_scheduler, keras.optimizers.schedules.LearningRateSchedule)
        if not schedule and not (isinstance(rho_scheduler, (int, float))
                                 and rho_scheduler >= 0):
            raise ValueError("rho_scheduler must be a float >= 0 or a keras.optimizers.schedules."
                             f"LearningRateSchedule, got {rho_scheduler!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(base_optimizer, rho=0.0, adaptive=adaptive, perturb_eps=perturb_eps,
                         name=name, **options)
        self._model_ref = _model_reference(model)
        # `rho` is SAM's name for it: sam_train_step compares its own `rho` argument against it
        self.rho = self.rho_scheduler = rho_scheduler
        self.alpha = alpha

    def current_rho(self, dtype="float32"):
        """``rho_t``: the schedule at the number of steps already taken, clamped at 0."""
        rho = self.rho_scheduler
        if isinstance(rho, keras.optimizers.schedules.LearningRateSchedule):
            rho = tf.cast(rho(self.iterations), dtype)
        return tf.maximum(tf.convert_to_tensor(rho, dtype=dtype), 0.0)

    def _perturbation_norm(self, g, params):
        """``||g||``: GSAM's ``e`` divides by it, ``adaptive`` or not."""
        return global_norm(g)

    def _perturbation(self, g, params, norm):
        """(2) ``e = rho_t g / (||g|| + eps)``, times ``|w|`` when ``adaptive``."""
        return gsam_perturbation(g, params, self.current_rho(g[0].dtype), self.adaptive,
                                 self.perturb_eps, norm)

    def _step_at_w(self, g_adv, variables):
        """(5) the base optimizer steps at ``w`` with ``d = g_adv - alpha g_perp``."""
        g_adv = [tf.zeros_like(v) if t is None else t for t, v in zip(g_adv, variables)]
        d = gsam_direction(self._centre_gradient(variables), g_adv, self.alpha, self.perturb_eps)
        self._base_step(d, variables)

    def get_config(self):
        # Not SAM's: GSAM takes a schedule and alpha, and neither use_gc nor eta. The model is not
        # serialised; a restored GSAM has model=None.
        rho = self.rho_scheduler
        return {
            "name": self.name,
            "base_optimizer": keras.optimizers.serialize(self.base_optimizer),
            "rho_scheduler": (keras.optimizers.schedules.serialize(rho)
                              if isinstance(rho, keras.optimizers.schedules.LearningRateSchedule)
                              else rho),
            "alpha": self.alpha,
            "adaptive": self.adaptive,
            "perturb_eps": self.perturb_eps,
            **_keras_config(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base = keras.optimizers.deserialize(dict(config.pop("base_optimizer")),
                                            custom_objects=custom_objects)
        rho = config.pop("rho_scheduler")
        if isinstance(rho, dict):
            rho = keras.optimizers.schedules.deserialize(dict(rho), custom_objects=custom_objects)
        return cls(None, base, rho, **config)
