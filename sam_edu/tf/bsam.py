"""bSAM: SAM as an optimal relaxation of Bayes, as a Keras 3 optimizer (TensorFlow backend).

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
moves. This is ``sam_edu.reference.bsam`` written in Keras' idiom. bSAM is a full optimizer, not a
wrapper: ``m`` and ``s`` are optimizer variables (:attr:`BSAM.momentums`,
:attr:`BSAM.precisions`), ``lr`` is Keras' ``learning_rate`` (so a ``LearningRateSchedule``
works) and :attr:`~BSAM.iterations` counts the steps.

The noise is drawn with ``keras.random.normal`` from a ``keras.random.SeedGenerator`` seeded with
``seed``; its state is an optimizer variable, so a checkpoint resumes the same draws.
``noisy_step(variables, noise=...)`` takes an explicit draw instead, so the tests can feed the
same noise to every framework.

In ``sam_edu``'s numbering of the generic two-pass step, bSAM's pass 1 runs at ``w_noisy`` instead
of ``w``: (1) ``g`` at the noisy point, (2) ascend to ``w_adv``, (3) ``g_adv`` there, (4) restore
``w`` exactly, (5) bSAM's own update 5-7. Two ways to drive it::

    @tf.function                                      # an explicit loop (eager works too)
    def train_step(x, y):
        optimizer.noisy_step(model.trainable_variables)              # w + n / sqrt(N s)
        with tf.GradientTape() as tape:                              # (1)
            loss = loss_fn(y, model(x, training=True))
        optimizer.first_step(tape.gradient(loss, model.trainable_variables),
                             model.trainable_variables)              # (2)
        with tf.GradientTape() as tape:                              # (3)
            loss_adv = loss_fn(y, model(x, training=True))
        optimizer.second_step(tape.gradient(loss_adv, model.trainable_variables),
                              model.trainable_variables)             # (4), (5)

    # model.fit: `def train_step(self, data): return sam_edu.tf.sam_train_step(self, data)`

    with optimizer.posterior_sample(model.trainable_variables):    # Bayesian model averaging:
        probs += tf.nn.softmax(model(x_test))                      # predict with a few draws
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from sam_edu.tf.sam import (
    Params,
    _assign,
    _check_finite,
    _check_flag,
    _global_gradients,
    _keras_config,
    _keras_options,
    _transparent_arguments,
    _update_ema,
)

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def check_bsam_arguments(num_data: int, lr, beta1: float, beta2: float, weight_decay: float,
                         rho: float, damping: float, s_init: float = 1.0) -> None:
    """``ValueError`` naming the first argument out of its range.

    ``lr`` is a float >= 0 or a Keras ``LearningRateSchedule``.
    """
    if not (isinstance(num_data, (int, np.integer)) and not isinstance(num_data, bool)
            and num_data >= 1):
        raise ValueError(f"num_data must be an integer >= 1 (the training set size), "
                         f"got {num_data!r}")
    if not (isinstance(lr, LearningRateSchedule)
            or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0)):
        raise ValueError(f"lr must be a float >= 0 or a keras.optimizers.schedules."
                         f"LearningRateSchedule, got {lr!r}")
    for name, value in (("weight_decay", weight_decay), ("rho", rho), ("damping", damping)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not s_init > 0:
        raise ValueError(f"s_init must be > 0 (a precision), got {s_init}")


def posterior_sample(params: Params, s: Params, noise: Params, num_data: int) -> Params:
    """Update 1: ``w + n / sqrt(N s)``, a draw from ``N(w, 1/(N s))`` given ``n ~ N(0, I)``."""
    return [w + n / tf.sqrt(num_data * si) for w, si, n in zip(params, s, noise)]


def bsam_perturbation(grads: Params, s: Params, rho: float = 0.05) -> Params:
    """Update 3's ascent ``e = rho * g / s``: preconditioned by the precision, not normalised."""
    return [rho * g / si for g, si in zip(grads, s)]


def bsam_momentum(m: Params, g_adv: Params, params: Params, beta1: float = 0.9,
                  weight_decay: float = 1e-4) -> Params:
    """Update 5: ``m <- beta1 m + (1 - beta1)(g_adv + delta w)``."""
    return [beta1 * mi + (1 - beta1) * (ga + weight_decay * w)
            for mi, ga, w in zip(m, g_adv, params)]


def bsam_mean(params: Params, m: Params, s: Params, lr=0.5) -> Params:
    """Update 6: ``w <- w - lr * m / s``."""
    return [w - lr * mi / si for w, mi, si in zip(params, m, s)]


def bsam_precision(s: Params, grads: Params, beta2: float = 0.999, damping: float = 0.1,
                   weight_decay: float = 1e-4) -> Params:
    """Update 7: ``s <- beta2 s + (1 - beta2)(sqrt(s) |g| + damping + delta)``, ``g`` from pass 1."""
    return [beta2 * si + (1 - beta2) * (tf.sqrt(si) * tf.abs(g) + damping + weight_decay)
            for si, g in zip(s, grads)]


# Where a step stands: BSAM._phase pairs noisy_step, first_step and second_step, in tf.function too
_IDLE, _NOISY, _PERTURBED = 0, 1, 2


@keras.saving.register_keras_serializable(package="sam_edu")
class BSAM(keras.optimizers.Optimizer):
    """Bayesian SAM: learns the mean ``w`` and the precision ``s`` of a Gaussian posterior.

    Args:
        num_data: ``N``, the number of training examples; the posterior's variance is
            ``1/(N s)``, so a small ``N`` means large noise.
        lr: step size of the mean, update 6: a float or a Keras ``LearningRateSchedule``
            (evaluated at :attr:`iterations`). It is Keras' ``learning_rate``.
        beta1: decay of the momentum ``m``, update 5.
        beta2: decay of the precision ``s``, update 7.
        weight_decay: ``delta``, the prior precision divided by ``N``; enters updates 5 and 7.
        rho: radius of the ascent ``rho * g / s``, update 3.
        adaptive: must be ``False``. The seed README lists the flag, but bSAM's ascent is
            already scaled per weight by ``1/s``; there is no adaptive bSAM.
        damping: added to the precision at every step, update 7.
        s_init: the initial precision of every weight.
        seed: seeds the ``keras.random.SeedGenerator`` of the noise; ``None`` picks a seed from
            Python's ``random`` (which ``keras.utils.set_random_seed`` seeds).
        name: the optimizer's name.

    Call :meth:`noisy_step` before pass 1, :meth:`first_step` with the gradient at the noisy
    point and :meth:`second_step` with the gradient at ``w + rho g / s`` (all three work eagerly
    and inside ``tf.function``), or put :func:`~sam_edu.tf.sam_train_step` in the model's
    ``train_step`` for ``model.fit``. ``m``, ``s``, the step count and the generator's state are
    optimizer variables: ``model.save`` keeps them and a resumed run equals an uninterrupted one.
    """

    def __init__(self, num_data, lr=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-4, rho=0.05,
                 adaptive=False, damping=0.1, s_init=1.0, seed=None, name="bsam", **kwargs):
        options = _keras_options(type(self).__name__, kwargs, hint=(
            " bSAM is a full optimizer: it takes its learning rate as `lr` and its weight decay "
            "(delta, part of updates 5 and 7) as `weight_decay`."))
        if options.get("gradient_accumulation_steps"):
            raise ValueError("gradient_accumulation_steps: bSAM's step uses both passes (s from "
                             "pass 1, m from pass 2) and a fresh posterior draw per batch; "
                             "accumulating them is not defined. Use a larger batch.")
        if adaptive:
            raise ValueError("adaptive=True: bSAM's ascent rho * g / s is already scaled per "
                             "weight by its precision s, and the paper defines no adaptive "
                             "bSAM (the seed README lists the flag). Use adaptive=False.")
        check_bsam_arguments(num_data, lr, beta1, beta2, weight_decay, rho, damping, s_init)
        if not (seed is None or (isinstance(seed, int) and not isinstance(seed, bool))):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        # Keras holds lr in a variable of dtype floatx(), or evaluates the schedule
        super().__init__(learning_rate=lr if isinstance(lr, LearningRateSchedule) else float(lr),
                         name=name, **options)
        self.num_data = int(num_data)
        self.beta1 = beta1
        self.beta2 = beta2
        self.weight_decay = weight_decay
        self.rho = rho
        self.adaptive = adaptive
        self.damping = damping
        self.s_init = s_init
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed, name="bsam_noise")
        self._track_variable(self._seed_generator.state)  # checkpointed with the optimizer

    def build(self, var_list):
        """Create ``m = 0``, ``s = s_init``, a backup of ``w`` and a slot for ``g`` per variable."""
        self.momentums = self.add_optimizer_variables(var_list, "bsam_momentum")
        self.precisions = self.add_optimizer_variables(
            var_list, "bsam_precision", initializer=keras.initializers.Constant(self.s_init))
        self._backups = self.add_optimizer_variables(var_list, "bsam_backup")
        self._noisy_gradients = self.add_optimizer_variables(var_list, "bsam_noisy_gradient")
        self._phase = self.add_variable(shape=(), initializer="zeros", dtype="int32",
                                        name="bsam_phase")
        super().build(var_list)

    def _slots(self, slots, variables) -> Params:
        """The values of ``slots`` (one optimizer variable per model variable) for ``variables``."""
        return [tf.convert_to_tensor(slots[self._get_variable_index(v)]) for v in variables]

    def _standard_normal(self, variables, seed) -> Params:
        """``n ~ N(0, I)``, one tensor per variable in order, drawn with ``seed``."""
        return [keras.random.normal(v.shape, dtype=v.dtype, seed=seed) for v in variables]

    def noisy_step(self, variables, noise=None):
        """Update 1: save ``w`` and move every variable to ``w + n / sqrt(N s)``.

        ``noise`` holds one standard normal tensor per variable, in order; by default it is drawn
        from the optimizer's seeded generator (an explicit ``noise`` leaves the generator as it is).
        """
        variables = list(variables)
        if not self.built:
            self.build(variables)
        self._check_variables_are_known(variables)
        if noise is None:
            noise = self._standard_normal(variables, self._seed_generator)
        noise = [tf.cast(n, v.dtype) for n, v in zip(noise, variables)]
        if len(noise) != len(variables) or any(tuple(n.shape) != tuple(v.shape)
                                               for n, v in zip(noise, variables)):
            raise ValueError(f"noise must hold one tensor per variable ({len(variables)}), in "
                             "order, shaped like it")
        idle = _check_flag(self._phase, _IDLE, "noisy_step() called twice: finish the step with "
                                               "first_step() and second_step() first")
        with tf.control_dependencies([idle]):  # nothing below runs if the check fails
            params = [tf.convert_to_tensor(v) for v in variables]
            for v, w in zip(variables, params):
                self._backups[self._get_variable_index(v)].assign(w)
            s = self._slots(self.precisions, variables)
            moved = [_assign(v, w_noisy) for v, w_noisy in
                     zip(variables, posterior_sample(params, s, noise, self.num_data))]
            with tf.control_dependencies(moved):
                self._phase.assign(_NOISY)

    def _restore_w(self, variables, expected: int, message: str) -> list:
        """Check that the step stands at ``expected``, copy the saved ``w`` back into every
        variable (exactly: nothing is subtracted) and mark the step as over; returns the writes."""
        with tf.control_dependencies([_check_flag(self._phase, expected, message)]):
            restored = [_assign(v, self._backups[self._get_variable_index(v)]) for v in variables]
            # w is back: the next noisy_step may run, even if a check after this one fails
            restored.append(_assign(self._phase, _IDLE))
        return restored

    def first_step(self, gradients, variables):
        """Steps (1)-(2): move to ``w + rho g / s``, given ``g`` at the noisy point.

        A non-finite ``g`` raises ``tf.errors.InvalidArgumentError`` with ``w`` restored.
        """
        variables = list(variables)
        if not self.built:
            raise RuntimeError("first_step() called before noisy_step(): bSAM's pass 1 runs at "
                               "the noisy point w + n / sqrt(N s)")
        self._check_variables_are_known(variables)
        # (1) gradient at the noisy point (computed by the caller); unconnected variables get 0.
        #     Back to w first: the ascent starts from w, and a failed check leaves w in place
        restored = self._restore_w(variables, _NOISY, "first_step() called without "
                                   "noisy_step(): bSAM's pass 1 runs at the noisy point")
        with tf.control_dependencies(restored):
            g = _check_finite(_global_gradients(self, gradients), "non-finite gradient at the "
                              "noisy point; w was restored and not updated")
        with tf.control_dependencies([t for t in g if t is not None]):  # after every check
            g = [tf.zeros_like(v) if t is None else t for t, v in zip(g, variables)]
            for v, t in zip(variables, g):  # kept for update 7
                self._noisy_gradients[self._get_variable_index(v)].assign(t)
            # (2) ascend from w (not from the noisy point) to w + rho g / s
            params = self._slots(self._backups, variables)
            e = bsam_perturbation(g, self._slots(self.precisions, variables), self.rho)
            moved = [_assign(v, w + ev) for v, w, ev in zip(variables, params, e)]
            with tf.control_dependencies(moved):
                self._phase.assign(_PERTURBED)

    def second_step(self, gradients, variables):
        """Steps (3)-(5): restore ``w``, then updates 5-7, given ``g_adv`` at ``w + rho g / s``.

        A non-finite ``g_adv`` raises ``tf.errors.InvalidArgumentError`` with ``w`` restored and
        ``m``, ``s`` untouched.
        """
        variables = list(variables)
        if not self.built:
            raise RuntimeError("second_step() called before noisy_step() and first_step(): "
                               "there is no w to restore")
        self._check_variables_are_known(variables)
        # (3) gradient at the perturbed point, same batch (computed by the caller)
        # (4) restore w: copy back the saved tensor (subtracting e would not give w back exactly)
        restored = self._restore_w(variables, _PERTURBED, "second_step() called without "
                                   "first_step(): no w to restore")
        with tf.control_dependencies(restored):
            g_adv = _check_finite(_global_gradients(self, gradients), "non-finite gradient at "
                                  "w + e; w was restored and not updated")
        with tf.control_dependencies([t for t in g_adv if t is not None]):  # after every check
            g_adv = [tf.zeros_like(v) if t is None else t for t, v in zip(g_adv, variables)]
            g_adv = self._clip_gradients(g_adv)  # clipnorm / clipvalue / global_clipnorm
            # (5) bSAM's own step: momentum, mean (with the old s), then precision
            params = self._slots(self._backups, variables)
            s = self._slots(self.precisions, variables)
            lr = tf.cast(self.learning_rate, params[0].dtype)  # this step's (a schedule's value)
            m = bsam_momentum(self._slots(self.momentums, variables), g_adv, params, self.beta1,
                              self.weight_decay)
            new_params = bsam_mean(params, m, s, lr)
            new_s = bsam_precision(s, self._slots(self._noisy_gradients, variables), self.beta2,
                                   self.damping, self.weight_decay)
            for v, m_v, w_v, s_v in zip(variables, m, new_params, new_s):
                index = self._get_variable_index(v)
                self.momentums[index].assign(m_v)
                v.assign(w_v)
                self.precisions[index].assign(s_v)
            self.iterations.assign_add(1)
            _update_ema(self, variables)

    @contextlib.contextmanager
    def posterior_sample(self, variables, seed=None) -> Iterator[None]:
        """Inside the block the variables hold one draw from the posterior ``N(w, 1/(N s))``.

        For Bayesian model averaging: average the predictions of a few draws. On exit ``w`` is
        restored exactly. The noise comes from ``seed`` (an int, a ``keras.random.SeedGenerator``,
        or ``None`` for Keras' global generator), never from the optimizer's own generator:
        evaluating does not change the noise of the training steps that follow. Eager only.
        """
        variables = list(variables)
        if not self.built:
            self.build(variables)  # s = s_init
        self._check_variables_are_known(variables)
        if int(self._phase.numpy()) != _IDLE:
            raise RuntimeError("posterior_sample() inside a step: call second_step() first")
        saved = [tf.identity(v) for v in variables]
        draw = posterior_sample(saved, self._slots(self.precisions, variables),
                                self._standard_normal(variables, seed), self.num_data)
        for v, w_noisy in zip(variables, draw):
            v.assign(w_noisy)
        try:
            yield
        finally:
            for v, w in zip(variables, saved):
                v.assign(w)

    def apply(self, grads, trainable_variables=None):
        """Transparent mode (a bare ``model.compile(optimizer=BSAM(...))``): each call takes the
        next phase of a step. At ``w`` (the first call of a run): draw the noisy point, the
        gradient is not used. At the noisy point: :meth:`first_step`. At ``w + rho g / s``:
        :meth:`second_step`, then the next step's draw, so the caller's next gradient is at it."""
        grads, variables = _transparent_arguments(self, grads, trainable_variables)

        def step_and_draw():
            self.second_step(grads, variables)
            self.noisy_step(variables)

        tf.switch_case(tf.convert_to_tensor(self._phase), [lambda: self.noisy_step(variables),        # _IDLE
                                     lambda: self.first_step(grads, variables),  # _NOISY
                                     step_and_draw])                             # _PERTURBED

    def finalize_variable_values(self, var_list):
        """End of ``fit``: put the mean ``w`` back where a transparent-mode step left a draw or a
        perturbed point (the unfinished step is dropped), then write the moving average."""
        if self.built and int(self._phase.numpy()) != _IDLE:
            for v in var_list:
                v.assign(self._backups[self._get_variable_index(v)])
            self._phase.assign(_IDLE)
        super().finalize_variable_values(var_list)

    def get_config(self):
        # Not super().get_config(): bSAM's learning rate is `lr`, its weight decay its own
        lr = self._learning_rate
        return {
            "name": self.name,
            "num_data": self.num_data,
            "lr": (keras.optimizers.schedules.serialize(lr)
                   if isinstance(lr, LearningRateSchedule) else float(lr.numpy())),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "weight_decay": self.weight_decay,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "damping": self.damping,
            "s_init": self.s_init,
            "seed": self.seed,
            **_keras_config(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config["lr"], dict):
            config["lr"] = keras.optimizers.schedules.deserialize(dict(config["lr"]),
                                                                  custom_objects=custom_objects)
        return cls(**config)
