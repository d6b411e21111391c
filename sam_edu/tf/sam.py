"""SAM and ASAM for TensorFlow / Keras 3.

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

Keras hands an optimizer one gradient per step, so the two passes live in the caller: a custom
``tf.function`` loop calls :meth:`SAM.first_step` after pass 1 and :meth:`SAM.second_step` after
pass 2, and ``model.fit`` runs both through :func:`sam_train_step` in the model's ``train_step``
(:class:`SAMModel`, :class:`SAMSequential`). A bare ``model.compile(optimizer=SAM(...))`` gets
its second gradient from the next batch instead: :meth:`SAM.apply` alternates the two steps (the
transparent mode of ``optax.contrib.sam``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

Params = list[tf.Tensor]


def global_norm(tree: Params) -> tf.Tensor:
    """``||v|| = sqrt(sum_i sum_j v_ij^2)``: one L2 norm over all tensors together.

    Each ``sum_j v_ij^2`` is ``2 * tf.nn.l2_loss(v_i)``, one kernel that reads ``v_i`` once;
    ``reduce_sum(v * v)`` would write ``v * v`` out first (a plain ``tf.function`` fuses nothing).
    """
    return tf.sqrt(2 * tf.add_n([tf.nn.l2_loss(v) for v in tree]))


def _per_tensor(value, n: int) -> list:
    """Broadcast a scalar setting to one value per tensor (or check a per-tensor sequence)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-tensor values, got {len(value)}")
        return list(value)
    return [value] * n


def scale_operator(params: Params, eta: float | Sequence[float] = 0.0,
                   adaptive: bool | Sequence[bool] = True) -> Params:
    """ASAM's element-wise operator ``T_w = |w| + eta`` (``T_w = 1`` for tensors left unscaled).

    ``adaptive`` may be one flag or one flag per tensor: the official ASAM code scales weight
    tensors only and leaves biases and BatchNorm shifts unscaled.
    """
    etas = _per_tensor(eta, len(params))
    flags = _per_tensor(adaptive, len(params))
    return [tf.abs(w) + e if a else tf.ones_like(w) for w, e, a in zip(params, etas, flags)]


def sam_perturbation(grads: Params, rho: float = 0.05, perturb_eps: float = 1e-12) -> Params:
    """SAM's ascent step ``e = rho * g / (||g|| + perturb_eps)``; a zero gradient gives ``e = 0``."""
    scale = rho / (global_norm(grads) + perturb_eps)
    return [scale * g for g in grads]


def asam_perturbation(grads: Params, params: Params, rho: float = 0.05, eta: float = 0.0,
                      adaptive: bool | Sequence[bool] = True,
                      perturb_eps: float = 1e-12) -> Params:
    """ASAM's ascent step ``e = rho * T_w^2 g / (||T_w g|| + perturb_eps)``."""
    t = scale_operator(params, eta, adaptive)
    scale = rho / (global_norm([tw * g for tw, g in zip(t, grads)]) + perturb_eps)
    return [scale * tw * tw * g for tw, g in zip(t, grads)]


def centralize_gradient(grad: tf.Tensor, out_axis: int = -1) -> tf.Tensor:
    """Gradient centralisation: subtract the mean over every axis except the output-channel axis.

    Vectors (biases) are left alone. Keras kernels keep the output axis last (``out_axis=-1``);
    PyTorch weights keep it first (``out_axis=0``).
    """
    if grad.ndim < 2:
        return grad
    axes = [a for a in range(grad.ndim) if a != out_axis % grad.ndim]
    return grad - tf.reduce_mean(grad, axis=axes, keepdims=True)


def perturbation_norm(grads: Params, params: Params, adaptive: bool | Sequence[bool] = False,
                      eta: float | Sequence[float] = 0.0) -> tf.Tensor:
    """``||T g||``, the norm the perturbation divides by (``||g||`` where no tensor is adaptive).

    Unscaled tensors enter as ``g`` itself: no ``1 * g`` is computed.
    """
    etas = _per_tensor(eta, len(params))
    flags = _per_tensor(adaptive, len(params))
    return global_norm([(tf.abs(w) + e) * g if a else g
                        for w, e, a, g in zip(params, etas, flags, grads)])


def perturbation(grads: Params, params: Params, rho: float | Sequence[float] = 0.05,
                 adaptive: bool | Sequence[bool] = False, eta: float | Sequence[float] = 0.0,
                 perturb_eps: float = 1e-12, norm: tf.Tensor | None = None) -> Params:
    """The perturbation ``e(w)`` with settings per tensor, as the framework optimizers allow.

    ``e_i = rho_i * T_i^2 g_i / (||T g|| + perturb_eps)``, the norm global over all tensors and
    ``T_i = |w_i| + eta_i`` where ``adaptive_i`` (ASAM) else ``1`` (SAM). With one ``rho`` and
    ``adaptive=False`` this is :func:`sam_perturbation`; with ``adaptive=True``,
    :func:`asam_perturbation`.

    ``norm`` is ``||T g||`` (:func:`perturbation_norm`) when the caller has it already, as
    :class:`SAM` has for its finiteness check. Unscaled tensors get ``(rho_i / (||T g|| + eps))
    g_i``: one multiplication by a number instead of four element-wise operations.
    """
    rhos = _per_tensor(rho, len(params))
    etas = _per_tensor(eta, len(params))
    flags = _per_tensor(adaptive, len(params))
    if norm is None:
        norm = perturbation_norm(grads, params, flags, etas)
    e = []
    for r, w, eta_i, a, g in zip(rhos, params, etas, flags, grads):
        scale = r / (norm + perturb_eps)
        if a:
            tw = tf.abs(w) + eta_i
            scale = scale * tw * tw
        e.append(scale * g)
    return e


def ascend(params: Params, e: Params) -> Params:
    """Step (2): the perturbed point ``w + e``."""
    return [w + ew for w, ew in zip(params, e)]


def _model_reference(model):
    """GSAM's and WSAM's ``model``: ``None`` or a ``keras.Model``, held weakly.

    The seed passed the model for BatchNorm handling; in ``sam_edu`` that lives in
    :func:`sam_train_step`, which uses it to check that the optimizer trains this model. A weak
    reference keeps the model out of the optimizer's checkpoint and breaks the cycle
    ``model.optimizer.model``.
    """
    if model is None:
        return None
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model or None, got {type(model).__name__}")
    return weakref.ref(model)


def _check_finite(grads: list, message: str) -> list:
    """The gradients as dense tensors, checked for NaN and Inf (``None`` passes through).

    Checked as the reference checks them, through their global norm: a NaN or Inf anywhere, or
    a sum of squares that overflows, fails (summed in float32 for 16-bit gradients). The check
    sits on the data path: every returned tensor waits for it, so inside a ``tf.function`` every
    op that uses a checked gradient runs after it; a failure raises
    ``tf.errors.InvalidArgumentError`` with ``message``. One ``l2_loss`` per tensor reads it once
    (``CheckNumerics`` per tensor was measured 7x slower on a 3M-element gradient on the CPU).
    XLA compiles these checks away, so tracing under ``jit_compile=True`` raises ``ValueError``.
    """
    _refuse_xla()
    dense = [None if g is None else tf.convert_to_tensor(g) for g in grads]
    present = [g for g in dense if g is not None]
    if not present:
        return dense
    # summed in the widest dtype present, at least float32 (16-bit squares overflow early)
    dtype = max((g.dtype for g in present), key=lambda d: d.size)
    dtype = tf.float32 if dtype.size < 4 else dtype
    checked = _check_finite_norm(global_norm([tf.cast(g, dtype) for g in present]), message)
    with tf.control_dependencies([checked]):
        return [None if g is None else tf.identity(g) for g in dense]


def _check_finite_norm(norm: tf.Tensor, message: str) -> tf.Tensor:
    """``norm`` checked for NaN and Inf, as :func:`_check_finite` checks a gradient: a global
    norm is finite exactly when every element is and the sum of squares does not overflow
    (the reference's test), and checking it reads one number instead of every gradient."""
    _refuse_xla()
    return tf.debugging.assert_all_finite(norm, message)


def _refuse_xla() -> None:
    """``ValueError`` when tracing under ``jit_compile=True``: XLA compiles the checks away."""
    # TensorFlow has no public test for "inside an XLA cluster"; this is the one tf.function uses
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        raise ValueError("jit_compile=True: XLA drops the checks that keep a non-finite gradient "
                         "out of the weights. Compile the model (or tf.function) with "
                         "jit_compile=False; SAMModel and SAMSequential do by default.")


def _check_flag(flag, expected: int, message: str):
    """Raise ``tf.errors.InvalidArgumentError`` with ``message`` unless ``flag == expected``."""
    return tf.debugging.assert_equal(tf.convert_to_tensor(flag), expected, message=message)


def _assign(variable, value):
    """``variable <- value``, returning the assignment itself so later ops can wait for it.

    ``keras.Variable.assign`` returns the assigned *value*, which carries no dependency on the
    write; the TensorFlow variable inside it returns the write.
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.assign(value)


def _assign_add(variable, value):
    """``variable <- variable + value`` in place, returning the write (see :func:`_assign`)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.assign_add(value)


def ema_update(average: Params, params: Params, momentum) -> Params:
    """``a <- momentum * a + (1 - momentum) * w``: one step of an exponential moving average."""
    return [momentum * a + (1.0 - momentum) * w for a, w in zip(average, params)]


def _replicas() -> int:
    """How many replicas compute this step together (1 outside ``tf.distribute``)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _refuse_under_distribution(what: str) -> None:
    """``ValueError`` when called inside a ``tf.distribute`` replica context with several
    replicas: TensorFlow cannot put the optimizer's cross-replica sums inside a ``tf.cond``."""
    if _replicas() > 1:
        raise ValueError(f"{what} under tf.distribute with {_replicas()} replicas: the step "
                         "branches on a tf.cond, and TensorFlow does not allow the cross-replica "
                         "sums of the base step inside one. Use SAM, GSAM, WSAM (k=1) or BSAM "
                         "with SAMModel / sam_train_step, or first_step/second_step.")


def _all_reduce(grads: list) -> list:
    """Inside a replica context of ``tf.distribute``: the gradients summed over the replicas.

    Keras scales each replica's loss by ``1 / replicas``, so the sum is the gradient of the
    global batch; every replica then computes the same perturbation and keeps its copy of the
    weights in step. ``None`` (a variable outside the loss) passes through.
    """
    if _replicas() == 1:
        return list(grads)
    present = [g for g in grads if g is not None]
    summed = iter(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                                  present))
    return [None if g is None else next(summed) for g in grads]


# Keras optimizer arguments the SAM family applies itself (SAM's docstring says how)
_KERAS_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
                  "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")
# Keras optimizer arguments that belong to the base optimizer
_KERAS_ARGUMENTS = ("learning_rate", "weight_decay")


_BASE_OPTIMIZER_HINT = (" Set the learning rate and weight decay on base_optimizer: it applies "
                        "them to the step at w.")


def _refuse_arguments(owner: str, kwargs: dict, hint: str = _BASE_OPTIMIZER_HINT) -> None:
    """Raise ``ValueError`` for any argument ``owner`` was given and does not take, adding
    ``hint`` when one of them is a Keras optimizer argument."""
    if kwargs:
        names = ", ".join(f"`{k}`" for k in kwargs)
        known = [k for k in kwargs if k in _KERAS_ARGUMENTS]
        raise ValueError(f"{owner} does not accept the argument(s) {names}."
                         f"{hint if known else ''}")


def _keras_options(owner: str, kwargs: dict, hint: str = _BASE_OPTIMIZER_HINT) -> dict:
    """Split the Keras optimizer options (clipping, EMA, loss scale, accumulation) off
    ``kwargs``, check what Keras would let pass silently, and refuse everything else."""
    options = {k: kwargs.pop(k) for k in _KERAS_OPTIONS if k in kwargs}
    _refuse_arguments(owner, kwargs, hint)
    for arg in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"):
        value = options.get(arg)
        if value is not None and not (isinstance(value, (int, float))
                                      and not isinstance(value, bool) and value > 0):
            # Keras would skip a clip <= 0 without a word (and take True for 1)
            raise ValueError(f"{arg} must be a number > 0 or None, got {value!r}")
    steps = options.get("gradient_accumulation_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 2):
        raise ValueError(f"gradient_accumulation_steps must be an int >= 2 or None, got {steps!r}")
    if not options.get("use_ema", False):
        ema = [k for k in ("ema_momentum", "ema_overwrite_frequency")
               if options.get(k) is not None]
        if ema:  # Keras would keep them and never use them
            raise ValueError(f"{', '.join(ema)} given without use_ema=True: there is no moving "
                             "average to configure")
    frequency = options.get("ema_overwrite_frequency")
    if frequency is not None and (not isinstance(frequency, int) or isinstance(frequency, bool)
                                  or frequency < 1):  # Keras would take 0 for None, True for 1
        raise ValueError(f"ema_overwrite_frequency must be an int >= 1 or None, got {frequency!r}")
    return options


def _keras_config(optimizer) -> dict:
    """The Keras options of ``optimizer`` for ``get_config`` (only those that were set)."""
    config = {k: getattr(optimizer, k) for k in _KERAS_OPTIONS if k not in ("use_ema",
                                                                             "ema_momentum")}
    if optimizer.use_ema:
        config.update(use_ema=True, ema_momentum=optimizer.ema_momentum)
    return {k: v for k, v in config.items() if v is not None}


def _unscale(optimizer, grads: list) -> list:
    """Undo ``optimizer.scale_loss``: divide every gradient by ``loss_scale_factor``."""
    scale = optimizer.loss_scale_factor
    return list(grads) if scale is None else [None if g is None else g / scale for g in grads]


def _global_gradients(optimizer, gradients) -> list:
    """The gradients as dense tensors, summed over ``tf.distribute`` replicas, divided by the
    optimizer's ``loss_scale_factor``."""
    dense = [None if g is None else tf.convert_to_tensor(g) for g in gradients]
    return _unscale(optimizer, _all_reduce(dense))


def _transparent_arguments(optimizer, grads, trainable_variables) -> tuple[list, list]:
    """``apply``'s arguments in transparent mode, as lists, with the optimizer built; refused
    under ``tf.distribute`` (the modes branch on a ``tf.cond``)."""
    if trainable_variables is None:
        if not optimizer.built:
            raise ValueError("apply() without variables needs a built optimizer: call "
                             "optimizer.build(variables) first")
        trainable_variables = optimizer._trainable_variables
    variables = list(trainable_variables)
    _refuse_under_distribution(f"Transparent mode (a bare compile(optimizer="
                               f"{type(optimizer).__name__}(...)))")
    if not optimizer.built:
        optimizer.build(variables)
    return list(grads), variables


def _update_ema(optimizer, variables) -> None:
    """After a step: move the moving average toward ``w``; every ``ema_overwrite_frequency``
    steps write it into the variables. The first step starts the average at ``w``."""
    if not optimizer.use_ema:
        return
    steps = tf.convert_to_tensor(optimizer.iterations)  # counted already, this step included
    momentum = tf.cast(steps > 1, variables[0].dtype) * optimizer.ema_momentum
    averages = [optimizer._model_variables_moving_average[optimizer._get_variable_index(v)]
                for v in variables]
    new = ema_update([tf.convert_to_tensor(a) for a in averages],
                     [tf.convert_to_tensor(v) for v in variables], momentum)
    written = [_assign(a, value) for a, value in zip(averages, new)]
    frequency = optimizer.ema_overwrite_frequency
    if frequency:
        def overwrite():
            for v, a in zip(variables, new):
                _assign(v, a)

        with tf.control_dependencies(written):
            tf.cond(tf.equal(steps % frequency, 0), overwrite, lambda: None)


@keras.saving.register_keras_serializable(package="sam_edu")
class SAM(keras.optimizers.Optimizer):
    """Sharpness-Aware Minimization around any Keras optimizer (ASAM with ``adaptive=True``).

    ``e = rho * T^2 g / (||T g|| + perturb_eps)`` with ``T = |w| + eta`` if ``adaptive`` else
    ``T = 1``; the norm is global over all variables. With ``use_gc`` the ascent gradient is
    centralised first (:func:`centralize_gradient`, Keras' output axis last). The base optimizer
    owns the learning rate, its schedule, weight decay and its state; it steps at ``w`` with
    ``g_adv`` and never sees the perturbation.

    Three ways to drive it:

    * a custom loop: :meth:`first_step` with the gradient at ``w``, :meth:`second_step` with the
      gradient at ``w + e`` (eagerly or inside ``tf.function``, in ``strategy.run`` too);
    * ``model.fit`` on a :class:`~sam_edu.tf.SAMModel` or :class:`~sam_edu.tf.SAMSequential`
      (or any model whose ``train_step`` returns :func:`sam_train_step`): exact SAM, both passes
      on the same batch;
    * a bare ``model.compile(optimizer=SAM(...))``: the *transparent mode* of
      ``optax.contrib.sam``. Keras calls :meth:`apply` once per batch with one gradient, so the
      calls alternate: odd calls ascend (:meth:`first_step`), even calls restore ``w`` and step
      (:meth:`second_step`). One SAM step spans two batches, pass 1 on batch ``t`` and pass 2 on
      batch ``t + 1``; BatchNorm statistics and the logged loss come from both kinds of batch.

    The Keras optimizer options act on the base step (5), so that SAM's radius stays ``rho``:

    * ``clipnorm`` / ``clipvalue`` / ``global_clipnorm`` clip the direction ``d`` the base
      optimizer steps with (``g_adv`` for SAM), never the ascent gradient;
    * ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``: a moving average of ``w`` after
      each SAM step (never of ``w + e``), written into the variables every
      ``ema_overwrite_frequency`` steps and by :meth:`finalize_variable_values` (end of ``fit``);
    * ``loss_scale_factor``: :meth:`scale_loss` multiplies each pass's loss by it, and each
      pass's gradient is divided by it before use;
    * ``gradient_accumulation_steps=n``: every micro-batch gets its own perturbation (the paper's
      m-sharpness with m the micro-batch), the ``n`` directions are averaged and the base
      optimizer steps once;
    * ``name``.
    """

    def __init__(self, base_optimizer, rho=0.05, adaptive=False, use_gc=False,
                 perturb_eps=1e-12, eta=0.0, name="sam", **kwargs):
        cls = type(self).__name__
        options = _keras_options(cls, kwargs)
        if not isinstance(base_optimizer, keras.optimizers.Optimizer):
            raise ValueError("base_optimizer must be a keras.optimizers.Optimizer instance, got "
                             f"{type(base_optimizer).__name__}")
        if isinstance(base_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(f"base_optimizer is a LossScaleOptimizer, which {cls} does not "
                             "support: its dynamic scale would have to cover both passes. Use "
                             "bfloat16 (no loss scaling needed) or a fixed loss_scale_factor "
                             f"on {cls}.")
        if base_optimizer.loss_scale_factor is not None:
            raise ValueError(f"base_optimizer has a loss_scale_factor; set it on {cls} instead, "
                             "which unscales both passes' gradients")
        for arg, value in (("rho", rho), ("eta", eta), ("perturb_eps", perturb_eps)):
            if not value >= 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        super().__init__(learning_rate=0.0, name=name, **options)
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.use_gc = use_gc
        self.perturb_eps = perturb_eps
        self.eta = eta

    # GSAM and WSAM build their direction from g_adv *and* g: they keep g from step (1) to (5)
    _keeps_centre_gradient = False
    # GSAM's and WSAM's `model` (see _model_reference)
    _model_ref = None

    @property
    def model(self):
        """The model this optimizer was built for (GSAM's and WSAM's ``model``), or ``None``."""
        return None if self._model_ref is None else self._model_ref()

    def build(self, var_list):
        """Create a backup of every variable (to restore ``w`` exactly) and build the base."""
        self._backups = self.add_optimizer_variables(var_list, "sam_backup")
        if self._keeps_centre_gradient:
            self._centre_gradients = self.add_optimizer_variables(var_list, "sam_centre_gradient")
        # 1 between first_step and second_step: pairs the two calls, inside tf.function too
        self._perturbed = self.add_variable(shape=(), initializer="zeros", dtype="int32",
                                            name="sam_perturbed")
        self.base_optimizer.build(var_list)
        super().build(var_list)  # Keras' EMA and accumulator variables, where asked for

    @property
    def variables(self):
        return self._variables + self.base_optimizer.variables

    @property
    def learning_rate(self):
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.base_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        """The number of SAM steps taken: the base optimizer's step count."""
        return self.base_optimizer.iterations

    def first_step(self, gradients, variables):
        """Steps (1)-(2): save ``w`` and move to ``w + e(w)``, given ``g`` at ``w``.

        A non-finite ``g`` raises ``tf.errors.InvalidArgumentError`` before any weight moves.
        """
        variables = list(variables)
        if not self.built:
            self.build(variables)
        self._check_variables_are_known(variables)
        # (1) gradient at the centre (computed by the caller); an unconnected variable has g = 0
        paired = _check_flag(self._perturbed, 0, "first_step() called twice: call "
                                                 "second_step() to restore w first")
        with tf.control_dependencies([paired]):  # nothing below runs if the check fails
            g = _global_gradients(self, gradients)
            g = [tf.zeros_like(v) if t is None else t for t, v in zip(g, variables)]
            params = [tf.convert_to_tensor(v) for v in variables]
            # the ascent gradient: centralised with use_gc (the g kept below stays as it is)
            ascent = [centralize_gradient(t, out_axis=-1) for t in g] if self.use_gc else g
            # the norm that scales e also tells whether g is finite (a NaN or Inf in g makes it
            # NaN or Inf, centralised or not): checked before anything is written
            norm = _check_finite_norm(self._perturbation_norm(ascent, params),
                                      "non-finite gradient at w; the weights were not changed")
        with tf.control_dependencies([norm]):
            saved = []
            for v, w, t in zip(variables, params, g):
                saved.append(_assign(self._backups[self._get_variable_index(v)], w))
                if self._keeps_centre_gradient:
                    self._centre_gradients[self._get_variable_index(v)].assign(t)
            e = self._perturbation(ascent, params, norm)
        # (2) ascend to w + e(w) in place, once w is saved and read for the last time (a
        #     variable written while a tensor read from it is alive is copied first)
        with tf.control_dependencies(saved + e):
            moved = [_assign_add(v, e_v) for v, e_v in zip(variables, e)]
            with tf.control_dependencies(moved):  # not set if the check on g fails
                self._perturbed.assign(1)

    def second_step(self, gradients, variables):
        """Steps (3)-(5): restore ``w`` and let the base optimizer step with ``g_adv``.

        A non-finite ``g_adv`` raises ``tf.errors.InvalidArgumentError`` after ``w`` is restored
        and before the base optimizer sees it.
        """
        variables = list(variables)
        if not self.built:
            raise RuntimeError("second_step() called before first_step(): there is no w to restore")
        self._check_variables_are_known(variables)
        # (3) gradient at the perturbed point, same batch (computed by the caller)
        # (4) restore w: copy back the saved tensor (subtracting e would not give w back exactly)
        with tf.control_dependencies([_check_flag(self._perturbed, 1, "second_step() called "
                                                  "without first_step(): no w to restore")]):
            restored = [_assign(v, self._backups[self._get_variable_index(v)])
                        for v in variables]
            # w is back: the next first_step may run, even if the check below fails
            restored.append(_assign(self._perturbed, 0))
        with tf.control_dependencies(restored):
            g_adv = _check_finite(_global_gradients(self, gradients), "non-finite gradient at "
                                  "w + e; the weights were restored to w and not updated")
        # (5) base step at w, after every check: in a tf.function a failed one must stop all of
        #     it, the base optimizer's step count included
        with tf.control_dependencies([t for t in g_adv if t is not None]):
            self._step_at_w(g_adv, variables)

    def _perturbation_norm(self, g, params):
        """The norm that scales step (2)'s ``e(w)``: ``||g||``, or ASAM's ``||T g||``."""
        return perturbation_norm(g, params, self.adaptive, self.eta)

    def _perturbation(self, g, params, norm):
        """Step (2)'s ``e(w)``: SAM's, or ASAM's with ``adaptive``, given its norm."""
        return perturbation(g, params, self.rho, self.adaptive, self.eta, self.perturb_eps, norm)

    def _step_at_w(self, g_adv, variables):
        """Step (5): the base optimizer steps at ``w`` with ``d = g_adv``."""
        self._base_step(g_adv, variables)

    def _base_step(self, d, variables, then=None):
        """Step (5) as Keras applies a gradient: ``d`` averaged over ``gradient_accumulation_steps``
        micro-batches, clipped, handed to the base optimizer; ``then()`` (decoupled WSAM's own
        update of ``w``) and the moving average follow each base step."""
        def step(direction):
            direction = self._clip_gradients(direction)
            # the base optimizer sums what each tf.distribute replica hands it: give it a share
            replicas = _replicas()
            self.base_optimizer.apply_gradients(
                (None if t is None else t / replicas, v) for t, v in zip(direction, variables))
            if then is not None:
                then()
            _update_ema(self, variables)

        steps = self.gradient_accumulation_steps
        if not steps:
            step(d)
            return
        _refuse_under_distribution("gradient_accumulation_steps")
        d = [tf.zeros_like(v) if t is None else t for t, v in zip(d, variables)]
        sums = [self._accumulated_gradients[self._get_variable_index(v)] for v in variables]

        def update():
            step([(s + t) / steps for s, t in zip(sums, d)])
            for s in sums:
                s.assign(tf.zeros_like(s))

        def accumulate():
            for s, t in zip(sums, d):
                s.assign_add(t)

        # SAM's own counter (`iterations` is the base optimizer's) counts the micro-batches
        tf.cond(tf.equal((self._iterations + 1) % steps, 0), update, accumulate)
        self._iterations.assign_add(1)

    def _centre_gradient(self, variables):
        """The gradient ``g`` at ``w`` that :meth:`first_step` kept (GSAM and WSAM)."""
        return [tf.convert_to_tensor(self._centre_gradients[self._get_variable_index(v)])
                for v in variables]

    def apply(self, grads, trainable_variables=None):
        """Transparent mode (a bare ``model.compile(optimizer=SAM(...))``): alternate
        :meth:`first_step` (the gradient is at ``w``) and :meth:`second_step` (the gradient is
        at ``w + e``, computed by the caller on its next batch)."""
        grads, variables = _transparent_arguments(self, grads, trainable_variables)
        tf.cond(tf.equal(self._perturbed, 0),
                lambda: self._transparent_first_step(grads, variables),
                lambda: self.second_step(grads, variables))

    def _transparent_first_step(self, grads, variables):
        """The odd call of transparent mode: steps (1)-(2) (LookSAM: or a whole cheap step)."""
        self.first_step(grads, variables)

    def _restore_unfinished_step(self, var_list):
        """Put ``w`` back if a transparent-mode step was left at ``w + e`` (eager)."""
        if self.built and int(self._perturbed.numpy()) == 1:
            for v in var_list:
                v.assign(self._backups[self._get_variable_index(v)])
            self._perturbed.assign(0)

    def finalize_variable_values(self, var_list):
        """End of ``fit``: drop an unfinished transparent-mode step (back to ``w``), then write
        the moving averages (SAM's, then the base optimizer's) into the variables."""
        self._restore_unfinished_step(var_list)
        super().finalize_variable_values(var_list)
        self.base_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        # Not super().get_config(): SAM's learning rate and weight decay are the base optimizer's
        return {
            "name": self.name,
            "base_optimizer": keras.optimizers.serialize(self.base_optimizer),
            "rho": self.rho,
            "adaptive": self.adaptive,
            "use_gc": self.use_gc,
            "perturb_eps": self.perturb_eps,
            "eta": self.eta,
            **_keras_config(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # a copy: keras.optimizers.deserialize rewrites "class_name" in the dict it is given
        base = keras.optimizers.deserialize(dict(config.pop("base_optimizer")),
                                            custom_objects=custom_objects)
        return cls(base, **config)


# The SAM wrapper around a plain compiled optimizer, one per model, created on first use.
_PLAIN_SAM = weakref.WeakKeyDictionary()


def _sam_for(model, rho):
    """``model.optimizer`` if it is a :class:`SAM` (GSAM, WSAM and LookSAM are: checked to train
    ``model``) or a :class:`~sam_edu.tf.BSAM`, else a SAM (``rho``, default 0.05) around it."""
    from sam_edu.tf.bsam import BSAM  # imported here: bsam.py builds on this module

    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("the compiled optimizer is a LossScaleOptimizer (Keras adds one under "
                         "the mixed_float16 policy), which sam_train_step does not support: its "
                         "dynamic scale would have to cover both passes. Use mixed_bfloat16 "
                         "(no loss scaling needed) or a fixed loss_scale_factor on SAM.")
    if isinstance(optimizer, (SAM, BSAM)):
        if (isinstance(optimizer, SAM) and optimizer.model is not None
                and optimizer.model is not model):
            raise ValueError(f"the compiled {type(optimizer).__name__} was built with "
                             f"model={optimizer.model.name!r} but is training {model.name!r}: "
                             "pass it the model it trains, or model=None")
        if rho is not None and rho != optimizer.rho:
            raise ValueError(f"rho={rho} given, but the compiled {type(optimizer).__name__} "
                             f"optimizer has rho={optimizer.rho}; set rho on the optimizer only")
        return optimizer
    rho = 0.05 if rho is None else rho
    sam = _PLAIN_SAM.get(model)
    if sam is None or sam.base_optimizer is not optimizer or sam.rho != rho:
        sam = _PLAIN_SAM[model] = SAM(optimizer, rho=rho)
    return sam


def sam_train_step(model, data, rho=None):
    """One exact SAM step for ``model.fit``: both passes on the same batch.

    Use it as ``def train_step(self, data): return sam_train_step(self, data)``. With a compiled
    :class:`SAM` (or GSAM, WSAM, LookSAM, BSAM) its settings are used; with any other compiled
    optimizer that optimizer is the base of a plain SAM with radius ``rho`` (default 0.05). The
    loss and metrics logged are those of pass 1: the clean pass at ``w`` (bSAM's runs at the noisy
    point ``w + n / sqrt(N s)`` drawn by its ``noisy_step``), and state that pass 2 changes
    besides the weights (BatchNorm moving statistics, per-output loss trackers) is put back to its
    value after pass 1. Dropout draws new masks in pass 2. LookSAM runs pass 2 on its SAM steps
    only (``tf.cond`` on what its ``first_step`` returns): one forward/backward on the others.
    """
    from sam_edu.tf.bsam import BSAM  # imported here: bsam.py builds on this module

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = _sam_for(model, rho)
    variables = model.trainable_variables
    if isinstance(optimizer, BSAM):
        optimizer.noisy_step(variables)  # bSAM's pass 1 runs at a draw from its posterior

    # (1) gradient at the centre (bSAM: at its noisy point); this pass is the one that is logged
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                  training=True)
        scaled = optimizer.scale_loss(loss)  # times loss_scale_factor; the step divides it out
    gradients = tape.gradient(scaled, variables)
    # (2) ascend to w + e(w); None, or LookSAM's bool: False when its cheap step is already done
    perturbed = optimizer.first_step(gradients, variables)

    def adversarial_pass():
        # Pass 2 would update BatchNorm's moving statistics again (and, for a model with several
        # outputs, its per-output loss trackers). Keras updates moving = moving*momentum +
        # batch*(1-momentum), so momentum=0 would overwrite them; instead we save everything
        # non-trainable after pass 1 and copy it back after pass 2, which covers any stateful
        # layer. `non_trainable_weights` leaves out the random-seed states, so dropout keeps
        # drawing fresh masks rather than replaying pass 2's in the next step.
        state = model.non_trainable_weights + model.metrics_variables
        saved = [tf.identity(v) for v in state]
        # (3) gradient at the perturbed point, same batch
        with tf.GradientTape() as tape:
            loss_adv = optimizer.scale_loss(model.compute_loss(
                x=x, y=y, y_pred=model(x, training=True), sample_weight=sample_weight,
                training=True))
        for v, value in zip(state, saved):
            v.assign(value)
        # (4) restore w and (5) base step at w with d = g_adv
        optimizer.second_step(tape.gradient(loss_adv, variables), variables)

    # SAM, GSAM, bSAM, and LookSAM and WSAM with k=1: every step has a pass 2
    if perturbed is None or tf.get_static_value(perturbed) == True:  # noqa: E712 (np.bool_)
        adversarial_pass()
    else:  # LookSAM: a pass 2 on its SAM steps only
        tf.cond(perturbed, adversarial_pass, lambda: None)

    # Keras divides each replica's loss by the number of replicas (so that summed gradients are
    # the global batch's); the logged loss is the replica's own
    loss_tracker = next(m for m in model.metrics if m.name == "loss")
    loss_tracker.update_state(loss * _replicas(),
                              sample_weight=tf.shape(keras.tree.flatten(x)[0])[0])
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


class SAMTrainStep:
    """Mixin for a Keras model class: ``fit`` takes exact SAM steps through
    :func:`sam_train_step`, and ``compile`` leaves XLA off unless asked (XLA would drop the finite
    checks; Keras' ``"auto"`` turns it on where there is a GPU)."""

    def compile(self, *args, jit_compile=False, **kwargs):
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        """``load_model``'s compile. Keras' own skips compiling (with a warning) when the class
        overrides ``compile``; this is what it does otherwise."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)  # the variables load_model restores

    def train_step(self, data):
        return sam_train_step(self, data)


@keras.saving.register_keras_serializable(package="sam_edu")
class SAMModel(SAMTrainStep, keras.Model):
    """A ``keras.Model`` whose ``fit`` takes exact SAM steps: its ``train_step`` is
    :func:`sam_train_step` (both passes on the same batch, BatchNorm statistics and the logged
    loss and metrics from pass 1). Build it like any model, ``SAMModel(inputs, outputs)``, or
    subclass it; compile it with a :class:`SAM` (any variant) or a plain optimizer (then SAM with
    ``rho=0.05``). ``model.save`` / ``keras.models.load_model`` keep the class."""


@keras.saving.register_keras_serializable(package="sam_edu")
class SAMSequential(SAMTrainStep, keras.Sequential):
    """``keras.Sequential`` with :func:`sam_train_step` as its ``train_step``; see
    :class:`SAMModel`."""
