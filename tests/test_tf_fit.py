"""Keras 3 ``compile``/``fit`` for the SAM family (issue 6): transparent mode, the exact route
(SAMModel, SAMSequential), callbacks, saving, and tf.distribute.MirroredStrategy.

Transparent mode: a bare ``compile(optimizer=X(...))`` on a plain ``keras.Sequential``; Keras
calls ``apply`` once per batch and the calls alternate (first_step, second_step). With the same
batch at every fit step, two fit steps are one exact SAM step of ``sam_edu.reference``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import parity  # noqa: E402
from test_tf_sam import _keras_momentum, floatx  # noqa: E402

from sam_edu import reference as ref  # noqa: E402
from sam_edu.tf import BSAM, GSAM, SAM, WSAM, LookSAM, SAMModel, SAMSequential  # noqa: E402

TOL = parity.tolerance("float64")


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layers():
    return [keras.layers.Dense(parity.SIZES[1], activation="tanh"),
            keras.layers.Dense(parity.SIZES[2])]


def _build(kind):
    """The parity network ``5 -> 4 (tanh) -> 3`` at ``parity.init_params()`` as a plain
    ``keras.Sequential``, a ``SAMSequential`` or a functional ``SAMModel``."""
    if kind == "SAMModel":
        inputs = keras.Input((parity.SIZES[0],))
        hidden = _layers()[0](inputs)
        model = SAMModel(inputs, keras.layers.Dense(parity.SIZES[2])(hidden))
    else:
        cls = SAMSequential if kind == "SAMSequential" else keras.Sequential
        model = cls([keras.Input((parity.SIZES[0],)), *_layers()])
    model.set_weights([p.astype(keras.config.floatx()) for p in parity.init_params()])
    return model


def _sgd(lr=0.1, momentum=0.0):
    return keras.optimizers.SGD(learning_rate=lr, momentum=_keras_momentum(momentum))


class Recorder(keras.callbacks.Callback):
    """The weights after every fit step, and the logs Keras reports for it."""

    def __init__(self):
        super().__init__()
        self.weights, self.logs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(self.model.get_weights())
        self.logs.append(dict(logs or {}))


def _assert_weights(got, want, tol=TOL, msg=""):
    assert len(got) == len(want), msg
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{msg} tensor {i}")


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _reference_points(variant, kwargs, base_kwargs, steps, x, y):
    """Run ``steps`` reference steps on the batch ``(x, y)``; return every point where a
    gradient is evaluated, in order, followed by the final weights. In transparent mode the
    weights after fit step ``k`` are the point of gradient ``k + 1``."""
    params = parity.init_params()
    buffers = ref.sgd_init(params)
    points, g_v = [], None

    def grad(w):
        points.append(w)
        return ref.mlp_loss_and_grad(w, x, y)[1]

    def base_update(w, d):
        nonlocal buffers
        new, buffers = ref.sgd_update(w, d, buffers, **base_kwargs)
        return new

    for t in range(steps):
        if variant == "SAM":
            params = ref.sam_step(params, grad, base_update, **kwargs)
        elif variant == "GSAM":
            params = ref.gsam_step(params, grad, base_update, **kwargs)
        elif variant == "WSAM":
            params = ref.wsam_step(params, grad, base_update, lr=base_kwargs["lr"], **kwargs)
        else:
            params, g_v = ref.looksam_step(t, params, g_v, grad, base_update, **kwargs)
    return points + [params]


def _plain_descent(base_kwargs, steps, x, y):
    """The base optimizer alone (the gradient at ``w``) for ``steps`` steps."""
    params = parity.init_params()
    buffers = ref.sgd_init(params)
    for _ in range(steps):
        params, buffers = ref.sgd_update(params, ref.mlp_loss_and_grad(params, x, y)[1], buffers,
                                         **base_kwargs)
    return params


# --- 1. transparent mode: a bare compile(optimizer=X(...)) on a plain keras.Sequential ----------

def _make_transparent(variant, kwargs, base):
    if variant == "SAM":
        return SAM(base, **kwargs)
    if variant == "GSAM":
        kwargs = dict(kwargs)
        return GSAM(None, base, rho_scheduler=kwargs.pop("rho"), **kwargs)
    if variant == "WSAM":
        return WSAM(None, base, **kwargs)
    return LookSAM(base, **kwargs)


TRANSPARENT_CASES = (
    [pytest.param("SAM", s, b, 2, id=i) for i, s, b in parity.CASES if i != "asam-sgd"]
    + [pytest.param("GSAM", s, b, 2, id=i) for i, s, b in parity.GSAM_CASES
       if i == "gsam-adaptive"]
    + [pytest.param("WSAM", s, b, 2, id=i) for i, s, b in parity.WSAM_CASES
       if i == "wsam-decoupled-momentum"]
    # k = 2: a SAM step (2 calls), a cheap step (1 call), a SAM step (2 calls)
    + [pytest.param("LookSAM", s, b, 3, id=i) for i, s, b in parity.LOOKSAM_CASES
       if i == "looksam-k2-sgd"]
)


@pytest.mark.parametrize("variant,kwargs,base_kwargs,steps", TRANSPARENT_CASES)
def test_transparent_fit_full_batch_equals_reference_steps(variant, kwargs, base_kwargs, steps):
    """Full batch: fit step ``k`` evaluates its gradient where the reference evaluates gradient
    ``k``. A first fit stops one call short of the last step (the next step only ascended): at
    its end ``finalize_variable_values`` puts back ``w`` of the last completed step; a second fit
    of two calls then completes the last step from there."""
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    x, y = parity.batches()[0]
    want = _reference_points(variant, kwargs, base_kwargs, steps, x, y)
    calls = len(want) - 2  # every call but the last one
    with floatx("float64"):
        model = _build("Sequential")
        model.compile(optimizer=_make_transparent(variant, kwargs, _sgd(**base_kwargs)),
                      loss=_loss())
        first = Recorder()
        model.fit(x, y, batch_size=len(x), epochs=calls, shuffle=False, verbose=0,
                  callbacks=[first])
        after_first_fit = model.get_weights()
        iterations_first = int(model.optimizer.iterations)
        second = Recorder()
        model.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0,
                  callbacks=[second])
    for k, got in enumerate(first.weights, start=1):
        _assert_weights(got, want[k], msg=f"after fit step {k}")
    # the last call only ascended: fit's end restored w of the last completed step
    _assert_weights(after_first_fit, want[calls - 1], msg="after the first fit")
    assert _max_diff(first.weights[-1], after_first_fit) > 1e-4  # it really had moved away
    assert iterations_first == steps - 1  # base iterations count SAM steps, not fit steps
    for k, got in enumerate(second.weights):
        _assert_weights(got, want[calls + k], msg=f"second fit, step {k + 1}")
    _assert_weights(model.get_weights(), want[-1], msg="final")
    assert int(model.optimizer.iterations) == steps
    # real sharpness-aware updates: never the base optimizer's own trajectory
    assert _max_diff(model.get_weights(), _plain_descent(base_kwargs, steps, x, y)) > 1e-4


def _explicit_bsam_points(kwargs, x, y, steps):
    """The explicit API (noisy_step, first_step, second_step) on a twin model: the weights after
    each call, and the mean ``w`` after each step."""
    twin = _build("Sequential")
    opt = BSAM(**kwargs)
    variables = twin.trainable_variables
    loss_fn = _loss()

    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, twin(x, training=True))
        return tape.gradient(loss, variables)

    points, means = [], []
    for _ in range(steps):
        opt.noisy_step(variables)
        points.append(twin.get_weights())
        opt.first_step(gradient(), variables)
        points.append(twin.get_weights())
        opt.second_step(gradient(), variables)
        means.append(twin.get_weights())
    return points, means


def test_transparent_bsam_equals_the_explicit_api_with_the_same_seed():
    """Call 1 only draws the noisy point (its gradient, at ``w``, is unused); then each step is
    two calls: first_step at the noisy point, second_step and the next draw. Five calls are two
    steps and a draw; the end of fit puts the mean ``w`` back."""
    kwargs = dict(num_data=10, lr=0.2, beta1=0.8, rho=0.02, seed=7)
    x, y = parity.batches()[0]
    with floatx("float64"):
        model = _build("Sequential")
        model.compile(optimizer=BSAM(**kwargs), loss=_loss())
        record = Recorder()
        model.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0, callbacks=[record])
        points, means = _explicit_bsam_points(kwargs, x, y, steps=3)
    for k, got in enumerate(record.weights):
        _assert_weights(got, points[k], msg=f"after fit step {k + 1}")
    _assert_weights(model.get_weights(), means[1], msg="final (mean w after step 2)")
    assert int(model.optimizer.iterations) == 2
    assert _max_diff(record.weights[-1], means[1]) > 1e-3  # the dropped draw was far from w
    assert _max_diff(means[1], parity.init_params()) > 1e-3


# --- 2. the exact route: SAMModel and SAMSequential ----------------------------------------------

VARIANTS = ["SAM", "GSAM", "WSAM", "LookSAM", "BSAM"]


def _make(variant, model):
    """One optimizer of each class, with a momentum base where there is one. GSAM's radius is a
    schedule (evaluated at the base optimizer's iterations), LookSAM has cheap steps (k=2)."""
    base = _sgd(0.1, momentum=0.9)
    if variant == "SAM":
        return SAM(base, rho=0.3, adaptive=True, eta=0.01)
    if variant == "GSAM":
        rho = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=4,
                                                         end_learning_rate=0.02)
        return GSAM(model, base, rho_scheduler=rho, alpha=0.4)
    if variant == "WSAM":
        return WSAM(model, base, rho=0.1, gamma=0.8, decouple=True)
    if variant == "LookSAM":
        return LookSAM(base, rho=0.1, k=2, alpha=0.7)
    return BSAM(num_data=10, lr=0.2, beta1=0.8, rho=0.02, seed=5)


def _explicit_run(opt, model, batches):
    """The explicit first_step/second_step loop (eager): weights after each step, pass-1 losses
    and accuracies."""
    variables = model.trainable_variables
    loss_fn = _loss()
    weights, losses, accuracies = [], [], []
    for x, y in batches:
        if isinstance(opt, BSAM):
            opt.noisy_step(variables)
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred)
        losses.append(float(loss))
        accuracies.append(float(np.mean(np.argmax(pred.numpy(), -1) == y)))
        more = opt.first_step(tape.gradient(loss, variables), variables)
        if more is None or bool(more):
            with tf.GradientTape() as tape:
                loss_adv = loss_fn(y, model(x, training=True))
            opt.second_step(tape.gradient(loss_adv, variables), variables)
        weights.append(model.get_weights())
    return weights, losses, accuracies


def _running_mean(values):
    return np.cumsum(values) / np.arange(1, len(values) + 1)


def _concat(batches):
    return (np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]))


@pytest.mark.parametrize("kind", ["SAMModel", "SAMSequential"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_fit_equals_the_explicit_loop(variant, kind):
    """Every fit step equals the explicit loop's on the same batch; the logged loss and accuracy
    are pass 1's (Keras logs their running mean over the epoch)."""
    batches = parity.batches()
    x, y = _concat(batches)
    with floatx("float64"):
        model = _build(kind)
        model.compile(optimizer=_make(variant, model), loss=_loss(),
                      metrics=["sparse_categorical_accuracy"])
        record = Recorder()
        model.fit(x, y, batch_size=parity.BATCH, shuffle=False, verbose=0, callbacks=[record])
        twin = _build("Sequential")
        want, losses, accuracies = _explicit_run(_make(variant, None), twin, batches)
    for t, (got, w) in enumerate(zip(record.weights, want)):
        _assert_weights(got, w, msg=f"step {t + 1}")
    np.testing.assert_allclose([log["loss"] for log in record.logs], _running_mean(losses),
                               rtol=0, atol=TOL)
    np.testing.assert_allclose([log["sparse_categorical_accuracy"] for log in record.logs],
                               _running_mean(accuracies), rtol=0, atol=1e-7)
    assert int(model.optimizer.iterations) == parity.STEPS
    # a sharpness-aware step is not the base optimizer's (BSAM has none: it moved at all)
    if variant != "BSAM":
        plain = _build("Sequential")
        plain.compile(optimizer=_sgd(0.1, momentum=0.9), loss=_loss())
        plain.fit(x, y, batch_size=parity.BATCH, shuffle=False, verbose=0)
        assert _max_diff(model.get_weights(), plain.get_weights()) > 1e-4
    assert _max_diff(model.get_weights(), parity.init_params()) > 1e-3


@pytest.mark.parametrize("kind", ["SAMModel", "SAMSequential"])
def test_batchnorm_moving_statistics_come_from_pass_one_only(kind):
    """By hand, Keras' convention: ``moving = moving * momentum + batch * (1 - momentum)`` with
    the batch mean and (biased) variance of the BatchNorm input at ``w`` before each step."""
    momentum = 0.8
    batches = parity.batches()[:3]
    x, y = _concat(batches)
    with floatx("float64"):
        dense = keras.layers.Dense(4, name="dense_in")
        bn = keras.layers.BatchNormalization(momentum=momentum)
        if kind == "SAMModel":
            inputs = keras.Input((5,))
            model = SAMModel(inputs, keras.layers.Dense(3)(bn(dense(inputs))))
        else:
            model = SAMSequential([keras.Input((5,)), dense, bn, keras.layers.Dense(3)])
        model.compile(optimizer=SAM(_sgd(0.1), rho=0.5), loss=_loss())
        before = []
        at_step_start = keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs: before.append(
                [dense.kernel.numpy(), dense.bias.numpy()]))
        model.fit(x, y, batch_size=parity.BATCH, shuffle=False, verbose=0,
                  callbacks=[at_step_start])
    mean, var = np.zeros(4), np.ones(4)
    for (xb, _), (kernel, bias) in zip(batches, before):
        h = xb @ kernel + bias
        mean = mean * momentum + h.mean(axis=0) * (1 - momentum)
        var = var * momentum + h.var(axis=0) * (1 - momentum)
    assert len(before) == 3 and _max_diff(before[-1], before[0]) > 1e-3
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=0, atol=1e-10)


def _sam_reference(batches, lrs, rho=0.05, momentum=0.0):
    """Reference SAM steps with the learning rate ``lrs[t]`` at step ``t`` and Keras' SGD:
    ``v <- momentum v - lr d``, ``w <- w + v`` (the learning rate inside the velocity; the same
    as ``sam_edu.reference.sgd_update`` while the learning rate is constant)."""
    params = parity.init_params()
    velocity = [np.zeros_like(w) for w in params]
    out = []
    for (x, y), lr in zip(batches, lrs):
        def base_update(w, d, lr=lr):
            nonlocal velocity
            velocity = [momentum * v - lr * t for v, t in zip(velocity, d)]
            return [wi + v for wi, v in zip(w, velocity)]

        params = ref.sam_step(params, lambda w: ref.mlp_loss_and_grad(w, x, y)[1], base_update,
                              rho=rho)
        out.append(params)
    return out


@pytest.mark.parametrize("kind", ["SAMModel", "SAMSequential"])
def test_validation_runs_at_w(kind):
    """``val_loss`` of each epoch is the loss at that epoch's weights; after fit it equals
    ``model.evaluate`` at the same weights."""
    train = parity.batches()[:2]
    x, y = _concat(train)
    xv, yv = parity.batches()[4]
    seen = []
    with floatx("float64"):
        model = _build(kind)
        model.compile(optimizer=SAM(_sgd(0.1), rho=0.05), loss=_loss())
        at_epoch_end = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: seen.append(model.get_weights()))
        history = model.fit(x, y, batch_size=parity.BATCH, epochs=2, shuffle=False, verbose=0,
                            validation_data=(xv, yv), callbacks=[at_epoch_end])
        evaluated = model.evaluate(xv, yv, verbose=0)
    want = _sam_reference(train * 2, [0.1] * 4)
    _assert_weights(seen[0], want[1], msg="epoch 1")
    _assert_weights(seen[1], want[3], msg="epoch 2")
    val = history.history["val_loss"]
    np.testing.assert_allclose(val, [ref.mlp_loss(want[1], xv, yv), ref.mlp_loss(want[3], xv, yv)],
                               rtol=0, atol=TOL)
    assert val[1] == pytest.approx(evaluated, abs=TOL)
    assert abs(val[1] - val[0]) > 1e-4


def test_callbacks_run_and_learning_rate_scheduler_drives_the_base_optimizer():
    """A callback sees the weights of every batch; LearningRateScheduler sets the base
    optimizer's learning rate, and the steps of epoch 2 use the new one."""
    train = parity.batches()[:2]
    x, y = _concat(train)
    with floatx("float64"):
        model = _build("SAMSequential")
        base = _sgd(0.1, momentum=0.9)
        model.compile(optimizer=SAM(base, rho=0.05), loss=_loss())
        record = Recorder()
        scheduler = keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: 0.1 if epoch == 0 else 0.03)
        history = model.fit(x, y, batch_size=parity.BATCH, epochs=2, shuffle=False, verbose=0,
                            callbacks=[scheduler, record])
    assert float(base.learning_rate) == pytest.approx(0.03)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.03])
    want = _sam_reference(train * 2, [0.1, 0.1, 0.03, 0.03], momentum=_keras_momentum(0.9))
    assert len(record.weights) == 4
    for t, got in enumerate(record.weights):
        _assert_weights(got, want[t], msg=f"step {t + 1}")
    unchanged = _sam_reference(train * 2, [0.1] * 4, momentum=_keras_momentum(0.9))
    assert _max_diff(record.weights[-1], unchanged[-1]) > 1e-4


@pytest.mark.parametrize("mode", ["exact", "transparent"])
def test_learning_rate_schedule_is_evaluated_at_base_iterations(mode):
    """``PiecewiseConstantDecay([1], [0.1, 0.02])``: SAM steps 0 and 1 use 0.1, step 2 uses 0.02.
    In transparent mode a SAM step is two fit steps, so the schedule moves at fit step 5."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.02])
    lrs = [0.1, 0.1, 0.02]
    with floatx("float64"):
        if mode == "exact":
            batches = parity.batches()[:3]
            x, y = _concat(batches)
            model = _build("SAMSequential")
            epochs = 1
        else:
            batches = [parity.batches()[0]] * 3
            x, y = batches[0]
            model = _build("Sequential")
            epochs = 6
        model.compile(optimizer=SAM(keras.optimizers.SGD(schedule), rho=0.05), loss=_loss())
        model.fit(x, y, batch_size=parity.BATCH, epochs=epochs, shuffle=False, verbose=0)
    want = _sam_reference(batches, lrs)
    # Keras evaluates schedules in float32: 0.1 is off by 1.5e-9
    _assert_weights(model.get_weights(), want[-1], tol=1e-7)
    assert int(model.optimizer.iterations) == 3
    constant = _sam_reference(batches, [0.1] * 3)
    assert _max_diff(model.get_weights(), constant[-1]) > 1e-4


def _optimizer_state(optimizer):
    return [(v.path, v.numpy()) for v in optimizer.variables]


def _assert_same_state(a, b):
    """Same optimizer variables in the same order (the layers' names in their paths may differ:
    the loaded model names its layers afresh)."""
    assert len(a) == len(b)
    for (path, u), (other, v) in zip(a, b):
        assert path.rsplit("_", 1)[-1] == other.rsplit("_", 1)[-1], (path, other)
        assert u.dtype == v.dtype, path
        np.testing.assert_array_equal(u, v, err_msg=path)


@pytest.mark.parametrize("kind", ["SAMModel", "SAMSequential"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_and_save_load_round_trip(variant, kind, tmp_path):
    """get_config/from_config of the optimizer and the model keep the class and settings;
    ``model.save`` / ``load_model`` keep the class, the optimizer's config, the weights and
    every optimizer variable, and training on from the loaded model equals training on."""
    batches = parity.batches()
    x, y = _concat(batches[:2])
    x2, y2 = _concat(batches[2:4])
    x, x2 = x.astype("float32"), x2.astype("float32")
    model = _build(kind)
    optimizer = _make(variant, model)
    config = optimizer.get_config()
    again = type(optimizer).from_config(config)
    assert type(again) is type(optimizer) and again.get_config() == config
    clone = type(model).from_config(model.get_config())
    assert type(clone) is type(model)
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]

    model.compile(optimizer=optimizer, loss=_loss())
    model.fit(x, y, batch_size=parity.BATCH, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    _assert_weights(loaded.get_weights(), model.get_weights(), tol=0)
    state = _optimizer_state(optimizer)
    assert int(optimizer.iterations) == 2
    assert any(np.abs(v).max() > 0 for p, v in state if "momentum" in p)
    _assert_same_state(_optimizer_state(loaded.optimizer), state)

    model.fit(x2, y2, batch_size=parity.BATCH, shuffle=False, verbose=0)
    loaded.fit(x2, y2, batch_size=parity.BATCH, shuffle=False, verbose=0)
    assert _max_diff(model.get_weights(), parity.init_params()) > 1e-3  # it trained
    _assert_weights(loaded.get_weights(), model.get_weights(), tol=1e-6)
    assert int(loaded.optimizer.iterations) == 4


# --- 3. tf.distribute.MirroredStrategy over two logical CPU devices (in a subprocess) -----------

_DISTRIBUTED_CHILD = textwrap.dedent('''
    import contextlib, json, sys
    import tensorflow as tf
    # before any op runs: split the CPU into two logical devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    import numpy as np
    from sam_edu.tf import BSAM, GSAM, SAM, WSAM, LookSAM, SAMSequential

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 3, 64)
    init = [rng.normal(0, 0.5, (5, 4)), rng.normal(0, 0.1, 4), rng.normal(0, 0.5, (4, 3)),
            rng.normal(0, 0.1, 3)]
    init = [w.astype("float32") for w in init]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def make(name, model):
        base = keras.optimizers.SGD(0.1, momentum=0.9)
        return {
            "SAM": lambda: SAM(base, rho=0.1),
            "GSAM": lambda: GSAM(model, base, rho_scheduler=0.1, alpha=0.4),
            "WSAM": lambda: WSAM(model, base, rho=0.1, gamma=0.8, k=1),
            "BSAM": lambda: BSAM(num_data=20, lr=0.1, rho=0.02, seed=3),
            "LookSAM-k2": lambda: LookSAM(base, rho=0.1, k=2),
            "SAM-accumulation": lambda: SAM(base, rho=0.1, gradient_accumulation_steps=2),
        }[name]()

    def run(name, distributed, cls=SAMSequential):
        with strategy.scope() if distributed else contextlib.nullcontext():
            model = cls([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                         keras.layers.Dense(3)])
            model.set_weights(init)
            model.compile(optimizer=make(name, model),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        iterations = int(model.optimizer.iterations.numpy())  # a MirroredVariable: no int()
        return model.get_weights(), history.history["loss"], iterations

    out = {"replicas": strategy.num_replicas_in_sync, "runs": {}, "errors": {}}
    for name in ["SAM", "GSAM", "WSAM", "BSAM"]:
        one, loss_one, it_one = run(name, False)
        two, loss_two, it_two = run(name, True)
        out["runs"][name] = dict(
            diff=max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
            moved=max(float(np.abs(a - b).max()) for a, b in zip(one, init)),
            loss_one=loss_one, loss_two=loss_two, iterations=[it_one, it_two])
    for name, cls in [("SAM", keras.Sequential), ("LookSAM-k2", SAMSequential),
                      ("SAM-accumulation", SAMSequential)]:
        key = name if cls is SAMSequential else "transparent-" + name
        try:
            run(name, True, cls)
            out["errors"][key] = None
        except Exception as e:  # reported to the parent, which checks type and message
            out["errors"][key] = [type(e).__name__, str(e)]
    print(json.dumps(out))
''')


def test_mirrored_strategy_over_two_cpus_matches_one_device():
    """SAM, GSAM, WSAM (k=1), BSAM with SAMSequential under ``strategy.scope()`` (batch 32 split
    over two replicas) equal one device; the logged loss too. Transparent mode, LookSAM with
    k > 1 and gradient accumulation refuse with a clear ValueError."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _DISTRIBUTED_CHILD], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert set(out["runs"]) == {"SAM", "GSAM", "WSAM", "BSAM"}
    for name, run in out["runs"].items():
        assert run["moved"] > 1e-3, name
        assert run["diff"] < 1e-6, (name, run)
        np.testing.assert_allclose(run["loss_two"], run["loss_one"], rtol=0, atol=1e-6,
                                   err_msg=name)
        assert run["iterations"] == [4, 4], name
    assert set(out["errors"]) == {"transparent-SAM", "LookSAM-k2", "SAM-accumulation"}
    for key, error in out["errors"].items():
        assert error is not None, f"{key} ran under 2 replicas"
        kind, message = error
        assert kind == "ValueError", (key, error)
        assert "tf.distribute" in message and "2 replicas" in message, (key, message)
    assert "Transparent mode" in out["errors"]["transparent-SAM"][1]
    assert "k > 1" in out["errors"]["LookSAM-k2"][1]
    assert "gradient_accumulation_steps" in out["errors"]["SAM-accumulation"][1]
