"""SAM as an inner (adversarial) and an outer optimizer: ``optax.contrib.sam`` in TF/Keras 3.

``optax.contrib.sam(optimizer, adv_optimizer, sync_period)`` describes SAM as two optimizers. From
the outer parameters ``w`` the adversarial optimizer takes ``sync_period - 1`` steps *uphill*; the
gradient at the last adversarial point then drives one step of the outer optimizer, taken at
``w``::

    w_0 = w
    w_{i+1} = w_i - adv_update(g(w_i))         i = 0 .. sync_period - 2   (adversarial, uphill)
    w <- w + update(g(w_{sync_period - 1}))                               (outer step, at w)

``adv_update`` is the step the adversarial Keras optimizer would take *down*hill; subtracting it
climbs (optax negates the adversarial update the same way). With ``normalize=True`` (the default)
the adversarial optimizer sees ``g / max(||g||, eps)``, one global L2 norm over all variables:
``AdversarialSAM(keras.optimizers.SGD(lr), keras.optimizers.SGD(rho))`` with ``sync_period=2`` is
the drop-in SAM of the paper. Any Keras optimizer fits either role.

Two ways to drive it, as in optax:

* transparent: ``optimizer.apply_gradients(zip(grads, variables))`` (or ``model.fit`` with the
  optimizer compiled in), one gradient per call. The first ``sync_period - 1`` calls of a cycle
  are adversarial steps and leave the variables at the adversarial point, visible to the loop;
  the last call puts the outer variables back and takes the outer step.
* opaque: ``optimizer.step(grad_fn, variables)`` runs a whole cycle: ``grad_fn()`` returns
  ``(loss, gradients)`` at the variables' current values and is called ``sync_period`` times, at
  ``w`` and after each adversarial step. Needed when anything besides the weights changes on each
  forward pass (BatchNorm statistics).

Both work eagerly and inside ``tf.function``. Three of optax's sharp edges are fixed: a zero
gradient moves nothing instead of giving NaN; transparent mode with ``sync_period=1`` is the outer
optimizer; and ``max_radius=rho`` projects every adversarial point onto the ball
``||a - w|| <= rho``. One normalised step of length ``rho`` stays on the ball by construction, but
``sync_period - 1 > 1`` steps (or an Adam adversarial optimizer, whose steps are not of length
``rho``) leave it: the adversarial point is no longer the one SAM's ``max_{||e|| <= rho}`` asks
for.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import keras
import tensorflow as tf

from sam_edu.tf.sam import _assign, _refuse_arguments

_HINT = (" Set the learning rate, weight decay, clipping and EMA on `optimizer` (the outer "
         "optimizer) or on `adv_optimizer`.")


def _dense(grads) -> list:
    """The gradients as dense tensors (an embedding's ``IndexedSlices`` too); ``None`` stays."""
    return [None if g is None else tf.convert_to_tensor(g) for g in grads]


def _all_finite(grads: list) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])


def _global_norm(tensors: list) -> tf.Tensor:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(v * v) for v in tensors]))


def normalize(grads: list, eps: float = 1e-12) -> list:
    """``g / max(||g||, eps)`` with one L2 norm over all tensors (``None`` passes through).

    optax's ``normalize()`` wherever ``||g|| >= eps``; a zero gradient gives zero, not NaN.
    """
    norm = _global_norm([g for g in grads if g is not None])
    scale = 1.0 / tf.maximum(norm, tf.cast(eps, norm.dtype))
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]


def _check_optimizer(optimizer, name: str) -> None:
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"{name} must be a keras.optimizers.Optimizer instance, got "
                         f"{type(optimizer).__name__}")
    if (isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            or optimizer.loss_scale_factor is not None):
        raise ValueError(f"{name} uses loss scaling (mixed precision), which AdversarialSAM does "
                         "not support")
    if optimizer.built:
        raise ValueError(f"{name} is already built: give AdversarialSAM fresh optimizers, it "
                         "builds them on its own variables")


@keras.saving.register_keras_serializable(package="sam_edu")
class AdversarialSAM(keras.optimizers.Optimizer):
    """SAM with any outer and any adversarial (inner) Keras optimizer.

    Args:
        optimizer: the outer optimizer (a fresh Keras optimizer instance): it owns the learning
            rate that ``learning_rate`` and LR callbacks see.
        adv_optimizer: the adversarial optimizer, e.g. ``keras.optimizers.SGD(rho)``; its update
            is negated (uphill).
        sync_period: gradients per outer step: ``sync_period - 1`` adversarial steps, then the
            outer step. ``1`` is the outer optimizer alone.
        reset_state: reset the adversarial optimizer's variables (its step count, momentum,
            Adam's moments) to their initial values after every outer step, as optax does.
        normalize: feed the adversarial optimizer ``g / max(||g||, eps)`` (optax's
            ``chain(normalize(), adv_optimizer)``); the norm is global over all variables.
        eps: the smallest norm divided by, so that a zero gradient gives a zero step.
        max_radius: ``None`` (optax's behaviour) or the radius ``rho >= 0`` of the ball around
            ``w`` onto which every adversarial point is projected.

    ``iterations`` counts calls (gradients); ``optimizer.iterations`` counts outer steps. A
    non-finite gradient raises ``tf.errors.InvalidArgumentError`` after putting the outer
    variables back and starting a fresh cycle.
    """

    def __init__(self, optimizer, adv_optimizer, sync_period=2, reset_state=True, normalize=True,
                 eps=1e-12, max_radius=None, name="adversarial_sam", **kwargs):
        _refuse_arguments(type(self).__name__, kwargs, _HINT)
        _check_optimizer(optimizer, "optimizer")
        _check_optimizer(adv_optimizer, "adv_optimizer")
        if adv_optimizer is optimizer:
            raise ValueError("adv_optimizer must be another optimizer instance than optimizer: "
                             "they keep separate state")
        if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
            raise ValueError(f"sync_period must be an integer >= 1, got {sync_period!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the smallest norm divided by), got {eps}")
        if max_radius is not None and not (isinstance(max_radius, numbers.Real)
                                           and max_radius >= 0):
            raise ValueError(f"max_radius must be None or a number >= 0, got {max_radius!r}")
        super().__init__(learning_rate=0.0, name=name)
        self.optimizer = optimizer
        self.adv_optimizer = adv_optimizer
        self.sync_period = sync_period
        self.reset_state = reset_state
        self.normalize = normalize
        self.eps = eps
        self.max_radius = max_radius

    def build(self, var_list):
        """The outer variables' copy, the position in the cycle, and both optimizers."""
        # eagerly, even when first called inside a tf.function: the adversarial optimizer's
        # initial values (kept for reset_state) must be readable now
        with tf.init_scope():
            self._cache = self.add_optimizer_variables(var_list, "adversarial_sam_cache")
            self._steps_since_sync = self.add_variable(
                shape=(), initializer="zeros", dtype="int32", name="steps_since_sync")
            self.optimizer.build(var_list)
            self.adv_optimizer.build(var_list)
            lr = self.adv_optimizer._learning_rate  # reset_state keeps the learning rate
            self._adv_initial = [(i, tf.constant(v.numpy()))
                                 for i, v in enumerate(self.adv_optimizer.variables)
                                 if v is not lr]
            super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.optimizer.variables + self.adv_optimizer.variables

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.optimizer.learning_rate = learning_rate

    @property
    def steps_since_sync(self):
        """Calls since the last outer step: ``0`` means the variables are the outer ones."""
        return self._steps_since_sync

    # --- the pieces ------------------------------------------------------------------------------

    def _prepare(self, variables):
        variables = list(variables)
        if not self.built:
            self.build(variables)
        self._check_variables_are_known(variables)
        return variables

    def _cached(self, variables):
        return [self._cache[self._get_variable_index(v)] for v in variables]

    def _save_outer(self, variables):
        for v, c in zip(variables, self._cached(variables)):
            c.assign(v)

    def _restore_outer(self, variables):
        for v, c in zip(variables, self._cached(variables)):
            _assign(v, c)

    def _reset_adversarial(self):
        if self.reset_state:
            adv_variables = self.adv_optimizer.variables
            for i, value in self._adv_initial:
                adv_variables[i].assign(value)

    def _guard(self, grads, variables, where, saved):
        """A check that passes if ``grads`` are all finite; otherwise back to ``w`` (from the copy,
        where ``saved``), a fresh cycle, and raise. Run everything after it under its control."""
        ok = _all_finite(grads)

        def abort():
            tf.cond(tf.convert_to_tensor(saved), lambda: self._restore_outer(variables),
                    lambda: None)
            self._steps_since_sync.assign(0)
            self._reset_adversarial()
            return tf.constant(False)

        passed = tf.cond(ok, lambda: tf.constant(True), abort)
        check = tf.debugging.assert_equal(
            passed, True, message=f"non-finite gradient {where}; the variables were restored to "
                                  "the outer variables w and not updated")
        return check

    def _project_to_ball(self, variables):
        """``a <- w + min(1, max_radius / ||a - w||) (a - w)``: the point of the ball
        ``||a - w|| <= max_radius`` nearest to ``a``, with one L2 norm over all variables."""
        centre = self._cached(variables)
        offsets = [tf.convert_to_tensor(a) - w for a, w in zip(variables, centre)]
        norm = _global_norm(offsets)
        radius = tf.constant(self.max_radius, norm.dtype)  # tf.cast(0.1, ...) rounds via float32
        scale = tf.where(norm > radius, radius / norm, tf.ones_like(norm))  # selected: no 0 / 0
        for a, w, e in zip(variables, centre, offsets):
            _assign(a, w + e * tf.cast(scale, e.dtype))

    def _adversarial_step(self, grads, variables):
        """``w_{i+1} = w_i - adv_update(g)``: the adversarial optimizer's step, negated (and
        projected onto the ball ``||w_{i+1} - w|| <= max_radius`` unless that is ``None``)."""
        fed = normalize(grads, self.eps) if self.normalize else grads
        moved = [v for v, g in zip(variables, grads) if g is not None]
        before = [tf.identity(tf.convert_to_tensor(v)) for v in moved]
        with tf.control_dependencies(before):
            self.adv_optimizer.apply(fed, variables)
        for v, w in zip(moved, before):
            _assign(v, w - (tf.convert_to_tensor(v) - w))
        if self.max_radius is not None:
            self._project_to_ball(variables)

    def _outer_step(self, grads, variables):
        """Back to the outer ``w``; the outer optimizer steps there with the last gradient."""
        self._restore_outer(variables)
        self.optimizer.apply(grads, variables)
        self._reset_adversarial()

    # --- the two modes ---------------------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        """Transparent mode: one gradient, at the variables' current values, per call."""
        if trainable_variables is None:
            if not self.built:
                raise ValueError("AdversarialSAM.apply() needs the variables on its first call")
            trainable_variables = self._trainable_variables
        variables = self._prepare(trainable_variables)
        grads = _dense(grads)
        check = self._guard(grads, variables, "at the current variables",
                            saved=self._steps_since_sync > 0)
        last = self.sync_period - 1
        with tf.control_dependencies([check]):  # in a tf.function, nothing moves if it fails
            steps = tf.identity(self._steps_since_sync)

            def adversarial():
                tf.cond(tf.equal(steps, 0), lambda: self._save_outer(variables), lambda: None)
                self._adversarial_step(grads, variables)
                self._steps_since_sync.assign(steps + 1)

            def outer():
                if last == 0:
                    self._save_outer(variables)
                self._outer_step(grads, variables)
                self._steps_since_sync.assign(0)

            if last == 0:
                outer()
            else:
                tf.cond(tf.equal(steps, last), outer, adversarial)
            self._iterations.assign_add(1)

    def step(self, grad_fn: Callable[[], tuple], variables):
        """Opaque mode: a whole cycle in one call; returns the loss at ``w``.

        ``grad_fn()`` returns ``(loss, gradients)`` at the variables' current values; it is
        called ``sync_period`` times. Must not be called in the middle of a transparent cycle.
        """
        variables = self._prepare(variables)
        idle = tf.debugging.assert_equal(
            self._steps_since_sync, 0,
            message="step(grad_fn) in the middle of a transparent cycle: finish it with apply()")
        with tf.control_dependencies([idle]):
            self._save_outer(variables)
            loss, grads = grad_fn()
        for _ in range(self.sync_period - 1):
            grads = _dense(grads)
            with tf.control_dependencies(
                    [self._guard(grads, variables, "at an adversarial step", saved=True)]):
                self._adversarial_step(grads, variables)
                _, grads = grad_fn()
        grads = _dense(grads)
        with tf.control_dependencies(
                [self._guard(grads, variables, "for the outer step", saved=True)]):
            self._outer_step(grads, variables)
            self._iterations.assign_add(self.sync_period)
        return loss

    def finalize_variable_values(self, var_list):
        self.optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.optimizer),
            "adv_optimizer": keras.optimizers.serialize(self.adv_optimizer),
            "sync_period": self.sync_period,
            "reset_state": self.reset_state,
            "normalize": self.normalize,
            "eps": self.eps,
            "max_radius": self.max_radius,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("optimizer", "adv_optimizer"):
            config[key] = keras.optimizers.deserialize(dict(config[key]),
                                                       custom_objects=custom_objects)
        return cls(**config)


__all__ = ["AdversarialSAM", "normalize"]
