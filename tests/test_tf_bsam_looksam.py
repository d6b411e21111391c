"""TensorFlow/Keras 3 bSAM and LookSAM: parity with the reference, the seed README, Keras' API."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import parity  # noqa: E402
from test_tf_gsam_wsam import (  # noqa: E402
    _assert_differ,
    _assert_weights,
    _base_alone,
    _base_alone_loop,
    _counting,
    _readme_data,
    _replay,
)
from test_tf_sam import (  # noqa: E402
    _keras_momentum,
    _mlp_loss,
    _parity_model,
    _seed_data,
    _seed_model,
    _two_pass_step,
    _values,
    floatx,
)

from sam_edu import reference as ref  # noqa: E402
from sam_edu import tf as samtf  # noqa: E402
from sam_edu.tf import BSAM, SAM, LookSAM, SAMModel, sam_train_step  # noqa: E402


def _bsam_step(opt, variables, loss_fn):
    """bSAM's explicit loop: ``noisy_step``, pass 1, ``first_step``, pass 2, ``second_step``."""
    def step(x, y, noise=None):
        opt.noisy_step(variables, noise)
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        opt.first_step(tape.gradient(loss, variables), variables)
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        opt.second_step(tape.gradient(loss, variables), variables)
    return step


def _looksam_step(opt, variables, loss_fn):
    """LookSAM's explicit loop: pass 2 and ``second_step`` only when ``first_step`` says so."""
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        if opt.first_step(tape.gradient(loss, variables), variables):
            with tf.GradientTape() as tape:
                loss = loss_fn(variables, x, y)
            opt.second_step(tape.gradient(loss, variables), variables)
    return step


def _generator_noise(seed, steps=parity.STEPS, dtype="float64"):
    """The draws of ``BSAM(seed=seed)``: ``keras.random.normal`` from a ``SeedGenerator(seed)``,
    one per variable in order, step after step."""
    generator = keras.random.SeedGenerator(seed)
    return [[keras.random.normal(w.shape, dtype=dtype, seed=generator).numpy()
             for w in parity.init_params()] for _ in range(steps)]


def _bsam_reference(bsam_kwargs, noise, lr=None):
    """``parity.bsam_reference_trajectory`` with the given noise (and ``lr(t)`` per step)."""
    kwargs = dict(bsam_kwargs)
    params = parity.init_params()
    m, s = ref.bsam_init(params, kwargs.pop("s_init", 1.0))
    out = []
    for t, ((x, y), n) in enumerate(zip(parity.batches(), noise)):
        if lr is not None:
            kwargs["lr"] = lr(t)
        params, m, s = ref.bsam_step(params, m, s, n,
                                     lambda w: ref.mlp_loss_and_grad(w, x, y)[1], **kwargs)
        out.append(params)
    return out


def _run_bsam(bsam_kwargs, dtype="float64", mode="tf.function", noise=None):
    """The parity problem through noisy/first/second_step; the weights after every step."""
    variables = [tf.Variable(p.astype(dtype)) for p in parity.init_params()]
    got = []
    with floatx(dtype):
        step = _bsam_step(BSAM(**bsam_kwargs), variables, _mlp_loss)
        if mode == "tf.function":
            step = tf.function(step)
        for t, (x, y) in enumerate(parity.batches()):
            step(tf.constant(x, dtype), tf.constant(y),
                 None if noise is None else [tf.constant(n, dtype) for n in noise[t]])
            got.append(_values(variables))
    return got


def _run_looksam(make_optimizer, base_kwargs, dtype="float64", mode="eager", step=_looksam_step):
    """The parity problem through LookSAM's loop (or ``step``); the weights after every step."""
    variables = [tf.Variable(p.astype(dtype)) for p in parity.init_params()]
    got = []
    with floatx(dtype):
        base = keras.optimizers.SGD(learning_rate=base_kwargs["lr"],
                                    momentum=base_kwargs["momentum"])
        train_step = step(make_optimizer(base), variables, _mlp_loss)
        if mode == "tf.function":
            train_step = tf.function(train_step)
        for x, y in parity.batches():
            train_step(tf.constant(x, dtype), tf.constant(y))
            got.append(_values(variables))
    return got


# --- parity with the NumPy reference -------------------------------------------------------------

@parity.bsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_bsam_matches_the_reference(bsam_kwargs, dtype, mode):
    got = _run_bsam(bsam_kwargs, dtype, mode, noise=parity.bsam_noise())
    want = parity.bsam_reference_trajectory(bsam_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


@parity.looksam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_looksam_matches_the_reference(looksam_kwargs, base_kwargs, dtype, mode):
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    got = _run_looksam(lambda base: LookSAM(base, **looksam_kwargs), base_kwargs, dtype, mode)
    want = parity.looksam_reference_trajectory(looksam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def _positive(tree):
    return [np.abs(t) + 0.5 for t in tree]


PURE_FUNCTIONS = {
    "posterior_sample": lambda m, a, b, c: m.posterior_sample(a, _positive(b), c, 50),
    "bsam_perturbation": lambda m, a, b, c: m.bsam_perturbation(a, _positive(b), 0.3),
    "bsam_momentum": lambda m, a, b, c: m.bsam_momentum(a, b, c, 0.8, 0.01),
    "bsam_mean": lambda m, a, b, c: m.bsam_mean(a, b, _positive(c), 0.2),
    "bsam_precision": lambda m, a, b, c: m.bsam_precision(_positive(a), b, 0.99, 0.05, 0.01),
    "orthogonal_component": lambda m, a, b, c: m.orthogonal_component(a, b),
    "orthogonal_component-zero-gradient": lambda m, a, b, c: m.orthogonal_component(
        a, [0 * t for t in b]),
    "looksam_direction": lambda m, a, b, c: m.looksam_direction(a, b, 0.7),
}


@pytest.mark.parametrize("name", PURE_FUNCTIONS)
def test_pure_functions_match_the_reference(name):
    rng = np.random.default_rng(0)
    a, b, c = ([rng.normal(size=s) for s in ((3, 4), (4,), (2, 3, 4))] for _ in range(3))
    got = PURE_FUNCTIONS[name](samtf, *([tf.constant(t) for t in v] for v in (a, b, c)))
    want = PURE_FUNCTIONS[name](ref, a, b, c)
    assert len(got) == len(want)
    for x, y in zip(got, want):
        np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=1e-12)


def test_bsam_learning_rate_schedule_is_evaluated_at_each_step():
    lr = keras.optimizers.schedules.PolynomialDecay(0.5, parity.STEPS, 0.1, power=1.0)
    kwargs = dict(num_data=100, lr=lr)
    noise = parity.bsam_noise()
    got = _run_bsam(kwargs, noise=noise)
    want = _bsam_reference(dict(num_data=100), noise, lr=lambda t: float(lr(t)))
    assert float(lr(0)) != float(lr(parity.STEPS - 1))
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))


# --- bSAM's noise and posterior ------------------------------------------------------------------

def test_bsam_seeded_noise_is_reproducible_and_is_the_generators_draw():
    kwargs = dict(num_data=100)
    got = _run_bsam({**kwargs, "seed": 3})
    parity.assert_trajectories_close(got, _run_bsam({**kwargs, "seed": 3}, mode="eager"), 0.0)
    assert np.abs(got[-1][0] - _run_bsam({**kwargs, "seed": 4}, mode="eager")[-1][0]).max() > 1e-4
    want = _bsam_reference(kwargs, _generator_noise(3))
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    # seed=None takes its seed from Python's random, which keras.utils.set_random_seed seeds
    states = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        states.append(BSAM(100)._seed_generator.state.numpy())
    np.testing.assert_array_equal(*states)


def test_bsam_with_lr_zero_never_moves_w():
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(size=(6, 3))), tf.Variable(rng.normal(size=(3,)))]
    before = _values(variables)
    opt = BSAM(num_data=10, lr=0.0, rho=0.5, seed=0)
    step = tf.function(_bsam_step(opt, variables, lambda v, x, y: tf.reduce_sum(
        tf.sin(x @ v[0] + v[1]) ** 2)))
    for _ in range(4):
        step(tf.constant(rng.normal(size=(5, 6))), None)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)  # bit for bit
    assert int(opt.iterations) == 4
    assert np.abs(opt.momentums[0].numpy()).max() > 1e-3
    assert np.abs(opt.precisions[0].numpy() - 1.0).max() > 1e-4


def test_posterior_sample_has_the_posterior_spread_and_restores_w():
    num_data, s = 100, np.repeat([1.0, 4.0], 20000)
    w = tf.Variable(np.linspace(-1.0, 1.0, s.size))
    before = w.numpy()
    opt = BSAM(num_data, seed=0)
    opt.build([w])
    opt.precisions[0].assign(s)
    state = opt._seed_generator.state.numpy()
    with opt.posterior_sample([w], seed=1):
        draw = w.numpy() - before
    np.testing.assert_array_equal(w.numpy(), before)  # bit for bit
    std = 1.0 / np.sqrt(num_data * s)  # 0.1 and 0.05
    for half in (slice(0, 20000), slice(20000, None)):
        assert np.std(draw[half]) == pytest.approx(std[half][0], rel=0.03)
        assert abs(np.mean(draw[half])) < 3 * std[half][0] / np.sqrt(20000)
    with opt.posterior_sample([w], seed=1):
        np.testing.assert_array_equal(w.numpy() - before, draw)  # the seed is the draw
    np.testing.assert_array_equal(opt._seed_generator.state.numpy(), state)  # training's noise
    opt.noisy_step([w])
    with pytest.raises(RuntimeError, match="inside a step"), opt.posterior_sample([w]):
        pass


# --- LookSAM's cost and special cases ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_looksam_evaluates_n_plus_ceil_n_over_k_gradients(mode):
    n, k = 7, 3
    calls = tf.Variable(0)
    variables = [tf.Variable(np.ones((4, 2))), tf.Variable(np.zeros(2))]

    def loss_fn(v, x, y):
        calls.assign_add(1)
        return tf.reduce_sum(tf.tanh(x @ v[0] + v[1]) ** 2)

    opt = LookSAM(keras.optimizers.SGD(0.1), k=k)
    step = _looksam_step(opt, variables, loss_fn)
    if mode == "tf.function":
        step = tf.function(step)
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 4)))
    for _ in range(n):
        step(x, None)
    assert int(calls.numpy()) == n + math.ceil(n / k) == 10
    assert int(opt.iterations) == n
    assert [bool(samtf.is_sam_step(t, k)) for t in range(n)] == [ref.is_sam_step(t, k)
                                                                 for t in range(n)]


def test_looksam_with_k_1_is_sam():
    base_kwargs = dict(lr=0.1, momentum=_keras_momentum(0.9))
    got = _run_looksam(lambda base: LookSAM(base, rho=0.1, k=1, alpha=0.7), base_kwargs)
    sam = _run_looksam(lambda base: SAM(base, rho=0.1), base_kwargs, step=_two_pass_step)
    parity.assert_trajectories_close(got, sam, 1e-12)


def test_looksam_use_gc_centralises_the_ascent_gradient_only():
    kwargs = dict(rho=0.5, k=2, alpha=0.7)
    base_kwargs = dict(lr=0.1, momentum=0.0)
    got = _run_looksam(lambda base: LookSAM(base, use_gc=True, **kwargs), base_kwargs)
    g_v = None

    def looksam_gc_step(t, w, grad_fn, base_update):
        nonlocal g_v
        g = grad_fn(w)
        if not ref.is_sam_step(t, kwargs["k"]):
            return base_update(w, ref.looksam_direction(g, g_v, kwargs["alpha"]))
        centred = [ref.centralize_gradient(t, out_axis=-1) for t in g]
        g_adv = grad_fn(ref.ascend(w, ref.perturbation(centred, w, kwargs["rho"])))
        g_v = ref.orthogonal_component(g_adv, g)  # against g as it is
        return base_update(w, g_adv)

    want = parity._trajectory(looksam_gc_step, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    plain = parity.looksam_reference_trajectory({**kwargs, "adaptive": False}, base_kwargs)
    assert np.abs(plain[-1][0] - want[-1][0]).max() > 1e-6


# --- non-finite gradients and the order of the calls ---------------------------------------------

@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_bsam_non_finite_gradients_and_call_order(mode):
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(size=(6, 3)).astype("float32")),
                 tf.Variable(rng.normal(size=(3,)).astype("float32"))]
    before = _values(variables)
    opt = BSAM(num_data=10, seed=0)
    noisy, first, second = opt.noisy_step, opt.first_step, opt.second_step
    if mode == "tf.function":
        noisy, first, second = (tf.function(f) for f in (noisy, first, second))
    good = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables]
    bad = [good[0], tf.constant([1.0, np.nan, 0.0])]

    def untouched():
        for v, b in zip(variables, before):
            np.testing.assert_array_equal(v.numpy(), b)  # restored bit for bit
        for m, s in zip(opt.momentums, opt.precisions):
            np.testing.assert_array_equal(m.numpy(), 0.0)
            np.testing.assert_array_equal(s.numpy(), 1.0)
        assert int(opt.iterations) == 0

    with pytest.raises(RuntimeError, match="before noisy_step"):
        opt.first_step(good, variables)
    noisy(variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="noisy_step\\(\\) called twice"):
        noisy(variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient at the noisy"):
        first(bad, variables)
    untouched()
    with pytest.raises(tf.errors.InvalidArgumentError, match="without noisy_step"):
        first(good, variables)
    noisy(variables)
    first(good, variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient at w \\+ e"):
        second(bad, variables)
    untouched()
    with pytest.raises(tf.errors.InvalidArgumentError, match="without first_step"):
        second(good, variables)
    noisy(variables)
    first(good, variables)
    second(good, variables)
    assert int(opt.iterations) == 1


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_looksam_non_finite_gradients_and_call_order(mode):
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(size=(6, 3)).astype("float32")),
                 tf.Variable(rng.normal(size=(3,)).astype("float32"))]
    opt = LookSAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.5, k=3)
    opt.build(variables)
    first, second = opt.first_step, opt.second_step
    if mode == "tf.function":
        first, second = tf.function(first), tf.function(second)
    good = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables]
    bad = [good[0], tf.constant([1.0, np.nan, 0.0])]
    for t in range(2):  # a SAM step, then a cheap one
        before = _values(variables)
        momentums = [m.numpy() for m in opt.base_optimizer.momentums]

        def untouched():
            for v, b in zip(variables, before):
                np.testing.assert_array_equal(v.numpy(), b)
            for m, b in zip(opt.base_optimizer.momentums, momentums):
                np.testing.assert_array_equal(m.numpy(), b)
            assert int(opt.iterations) == t  # a failed step is not counted

        with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient at w;"):
            first(bad, variables)
        untouched()
        if t == 0:
            assert first(good, variables)
            with pytest.raises(tf.errors.InvalidArgumentError, match="at w \\+ e"):
                second(bad, variables)
            untouched()
        if first(good, variables):
            second(good, variables)
        assert int(opt.iterations) == t + 1
    with pytest.raises(tf.errors.InvalidArgumentError, match="without first_step"):
        second(good, variables)  # after a cheap step there is no pass 2


# --- sam_train_step under model.fit ---------------------------------------------------------------

def _fit_parity_model(optimizer, loss="sparse_categorical_crossentropy", run_eagerly=False):
    """Fit the parity model over ``parity.batches()`` (float64); weights and logged losses."""
    batches, got, logged = parity.batches(), [], []
    model = _parity_model()
    model.compile(optimizer=optimizer, run_eagerly=run_eagerly,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                  if loss == "sparse_categorical_crossentropy" else loss)
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
        got.append(model.get_weights()), logged.append(logs["loss"])))
    model.fit(np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]),
              batch_size=parity.BATCH, shuffle=False, verbose=0, callbacks=[record])
    return got, logged


def _running_mean(values):
    """What Keras logs: the mean over the epoch so far."""
    return np.cumsum(values) / np.arange(1, len(values) + 1)


def test_bsam_fit_matches_the_reference_and_logs_the_noisy_pass():
    kwargs = dict(num_data=100, rho=0.1)
    with floatx("float64"):
        got, logged = _fit_parity_model(BSAM(**kwargs, seed=5))
    noise = _generator_noise(5)
    want = _bsam_reference(kwargs, noise)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    # pass 1's loss, at the noisy point w + n / sqrt(N s); s as the reference updates it
    params, m, s = parity.init_params(), *ref.bsam_init(parity.init_params())
    noisy = []
    for (x, y), n in zip(parity.batches(), noise):
        noisy.append(ref.mlp_loss(ref.posterior_sample(params, s, n, 100), x, y))
        params, m, s = ref.bsam_step(params, m, s, n,
                                     lambda w: ref.mlp_loss_and_grad(w, x, y)[1], **kwargs)
    np.testing.assert_allclose(logged, _running_mean(noisy), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case,run_eagerly", [(1, False), (2, True)],
                         ids=[parity.LOOKSAM_CASES[1][0], parity.LOOKSAM_CASES[2][0] + "-eager"])
def test_looksam_fit_matches_the_reference_with_one_pass_on_cheap_steps(case, run_eagerly):
    _, kwargs, base_kwargs = parity.LOOKSAM_CASES[case]
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    calls = tf.Variable(0)

    def counting_loss(y_true, y_pred):
        calls.assign_add(1)
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    with floatx("float64"):
        base = keras.optimizers.SGD(base_kwargs["lr"], momentum=base_kwargs["momentum"])
        got, logged = _fit_parity_model(LookSAM(base, **kwargs), counting_loss, run_eagerly)
    want = parity.looksam_reference_trajectory(kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    assert int(calls.numpy()) == parity.STEPS + math.ceil(parity.STEPS / kwargs["k"])
    clean = [ref.mlp_loss(w, x, y)
             for w, (x, y) in zip([parity.init_params()] + want, parity.batches())]
    np.testing.assert_allclose(logged, _running_mean(clean), rtol=0, atol=1e-10)


OPTIMIZERS = {
    "BSAM": lambda: BSAM(num_data=100, seed=0),
    "LookSAM": lambda: LookSAM(keras.optimizers.SGD(0.1), rho=0.5, k=2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fit_batchnorm_statistics_come_from_pass_one_only(name):
    """BatchNorm on the inputs: its statistics do not depend on the weights (nor on bSAM's
    noise), so ``n`` steps on one batch must move them as ``n`` forward passes do."""
    steps = 3
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    bn = keras.layers.BatchNormalization(momentum=0.5)
    model = SAMModel(inputs, keras.layers.Dense(3)(bn(inputs)))
    x, y = parity.batches()[0]
    x = x.astype("float32")
    twin = keras.layers.BatchNormalization(momentum=0.5)
    for _ in range(steps):
        twin(x, training=True)
    model.compile(optimizer=OPTIMIZERS[name](),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=steps, verbose=0)
    assert int(model.optimizer.iterations) == steps
    np.testing.assert_allclose(bn.moving_mean.numpy(), twin.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), twin.moving_variance.numpy(),
                               atol=1e-6)


def test_bsam_plain_fit_trains_in_transparent_mode():
    """A bare compile(optimizer=BSAM(...)) on a plain keras.Model: call 1 draws the noisy point
    (its gradient unused), then first_step / second_step + next draw alternate; on one repeated
    batch that is the explicit loop's steps. The end of fit puts the mean w back."""
    x, y = parity.batches()[0]
    x = x.astype("float32")

    def run(transparent, steps):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        optimizer = BSAM(100, rho=0.1, seed=4)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if transparent:
            model.fit(x, y, batch_size=8, epochs=steps, verbose=0)
        else:
            step = tf.function(_bsam_step(optimizer, model.trainable_variables,
                                          lambda v, x, y: model.compute_loss(y=y, y_pred=model(x))))
            for _ in range(steps):
                step(x, y)
        return model, optimizer

    model, optimizer = run(True, 8)  # draw, 3 x (first, second + draw), first: 3 steps
    assert int(optimizer.iterations) == 3
    loop_model, loop_optimizer = run(False, 3)
    _assert_weights(model.get_weights(), loop_model.get_weights(), atol=1e-6)
    for a, b in zip(optimizer.precisions, loop_optimizer.precisions):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    assert np.abs(optimizer.precisions[0].numpy() - 1.0).max() > 1e-4
    # one step more is not what fit did
    _assert_differ(model.get_weights(), run(False, 4)[0].get_weights(), by=1e-6)


def test_sam_train_step_rejects_a_second_rho_for_bsam():
    class Model(keras.Model):
        def train_step(self, data):
            return sam_train_step(self, data, rho=0.1)

    inputs = keras.Input((5,))
    model = Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer=BSAM(100), loss="sparse_categorical_crossentropy")
    x, y = parity.batches()[0]
    with pytest.raises(ValueError, match="rho=0.1 given.*BSAM"):
        model.fit(x.astype("float32"), y, verbose=0)


# --- the TF2 seed README, as written (only the import changed) -----------------------------------

def _readme_model(units, activation=None):
    """The README's ``tf.keras.Sequential`` (784 inputs), seeded as the tests seed it."""
    keras.utils.set_random_seed(0)
    return tf.keras.Sequential([
        tf.keras.Input((784,)),
        tf.keras.layers.Dense(units, activation="relu"),
        tf.keras.layers.Dense(10, activation=activation),
    ])


@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`")
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_bsam_on_a_plain_sequential():
    from sam_edu.tf import BSAM  # README: from sam import BSAM

    train_dataset, val_dataset = _readme_data()  # one batch of 16 per epoch
    keras.utils.set_random_seed(0)

    # --- README (seed 000) ---
    # Instantiate the BSAM optimizer
    optimizer = BSAM(
        num_data=50000,
        lr=0.5,
        beta1=0.9,
        beta2=0.999,
        weight_decay=1e-4,
        rho=0.05,
        adaptive=False,
        damping=0.1
    )

    # Build a model
    model = tf.keras.models.Sequential([
        tf.keras.layers.Dense(256, activation='relu', input_shape=(784,)),
        tf.keras.layers.Dense(10, activation='softmax')
    ])

    # Compile the model using BSAM
    model.compile(optimizer=optimizer, loss='sparse_categorical_crossentropy', metrics=['accuracy'])
    model.fit(train_dataset, validation_data=val_dataset, epochs=10)
    # --- end README ---

    assert type(model) is tf.keras.models.Sequential
    # 10 fit steps: a draw, 4 x (first_step, second_step + draw), a first_step dropped at the end
    assert int(optimizer.iterations) == 4
    assert np.abs(optimizer.precisions[0].numpy() - 1.0).max() > 1e-3
    # the explicit loop (noisy_step, pass 1, first_step, pass 2, second_step), 4 steps on the batch
    (x, y), = list(train_dataset)
    keras.utils.set_random_seed(0)  # the same seed for BSAM, then the same initial weights
    loop_optimizer = BSAM(num_data=50000, lr=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-4,
                          rho=0.05, damping=0.1)
    twin = tf.keras.Sequential([tf.keras.Input((784,)),
                                tf.keras.layers.Dense(256, activation="relu"),
                                tf.keras.layers.Dense(10, activation="softmax")])
    twin.compile(optimizer=loop_optimizer, loss="sparse_categorical_crossentropy")
    step = tf.function(_bsam_step(loop_optimizer, twin.trainable_variables,
                                  lambda v, x, y: twin.compute_loss(y=y, y_pred=twin(x))))
    for _ in range(4):
        step(x, y)
    _assert_weights(model.get_weights(), twin.get_weights())
    # and plain Adam (the closest base optimizer; bSAM has none) trains somewhere else
    _assert_differ(model.get_weights(), _base_alone(
        lambda: _readme_model(256, "softmax"), keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy", train_dataset))


@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`")
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_looksam_on_a_plain_sequential():
    from sam_edu.tf import LookSAM  # README: from optimizers.looksam import LookSAM

    train_dataset, val_dataset = _readme_data()  # one batch of 16 per epoch
    keras.utils.set_random_seed(0)

    # --- README (seed 000) ---
    # 1. Define your base optimizer
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)

    # 2. Wrap it with LookSAM
    opt = LookSAM(
        base_optimizer=base_opt,
        rho=0.1,
        k=10,
        alpha=0.7,
        adaptive=False,
        use_gc=False
    )

    # 3. Compile and train your model as usual
    model = tf.keras.Sequential([
        tf.keras.layers.Dense(128, activation='relu', input_shape=(784,)),
        tf.keras.layers.Dense(10),
    ])
    model.compile(
        optimizer=opt,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy']
    )
    model.fit(train_dataset, validation_data=val_dataset, epochs=10)
    # --- end README ---

    assert type(model) is tf.keras.Sequential
    # step 0 is a SAM step (fit steps 1 and 2), steps 1-8 are cheap (one fit step each)
    assert int(opt.iterations) == int(base_opt.iterations) == 9
    assert int(opt._perturbed.numpy()) == 0
    assert np.abs(opt._orthogonal_gradients[0].numpy()).max() > 0  # from step 0
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    want = _replay(lambda: _readme_model(128), lambda: LookSAM(
        tf.keras.optimizers.Adam(1e-3), rho=0.1, k=10, alpha=0.7), loss, train_dataset, steps=9,
        branch=True)
    _assert_weights(model.get_weights(), want)
    _assert_differ(model.get_weights(), _base_alone(
        lambda: _readme_model(128), tf.keras.optimizers.Adam(1e-3), loss, train_dataset))


def test_seed_readme_custom_loop_looksam():
    """The seed 002 README's train_step_SAM with LookSAM: pass 2 only when first_step says so."""
    from sam_edu.tf import LookSAM  # README: from sam import SAM

    x_train, y_train = _seed_data()
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(8).repeat(2)  # 16
    loss_object, calls = _counting(tf.keras.losses.SparseCategoricalCrossentropy())
    YourModel = _seed_model  # noqa: N806

    # --- README (seed 002; SAM(base_optimizer) -> LookSAM, pass 2 when first_step says so) ---
    model = YourModel()
    base_optimizer = tf.keras.optimizers.SGD()  # define an optimizer for the "sharpness-aware" update
    optimizer = LookSAM(base_optimizer, k=5)

    @tf.function
    def train_step_SAM(images, labels):  # noqa: N802
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = loss_object(labels, predictions)
        gradients = tape.gradient(loss, model.trainable_variables)
        if optimizer.first_step(gradients, model.trainable_variables):

            with tf.GradientTape() as tape:
                predictions = model(images, training=True)
                loss = loss_object(labels, predictions)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.second_step(gradients, model.trainable_variables)

    for x, y in dataset:
        train_step_SAM(x, y)
    # --- end README ---

    assert int(optimizer.iterations) == 16
    assert int(calls.numpy()) == 16 + math.ceil(16 / 5) == 20
    _assert_differ(model.get_weights(), _base_alone_loop(dataset, tf.keras.optimizers.SGD()))


def test_seed_readme_looksam_step_argument():
    with pytest.raises(ValueError, match="`step`.*k=1"):
        LookSAM(tf.keras.optimizers.Adam(), step=False)


# --- checkpoints, configuration, validation -------------------------------------------------------

CHECKPOINTED = {
    "BSAM": (lambda: BSAM(num_data=100, seed=3), _bsam_step),
    # k=3: the run stops after t = 1, so t = 2 needs the saved g_v, and t = 3 the step count
    "LookSAM": (lambda: LookSAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.5, k=3),
                _looksam_step),
}


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_resumed_run_equals_an_uninterrupted_one(name, tmp_path):
    make_optimizer, make_step = CHECKPOINTED[name]
    batches = [(x.astype("float32"), y) for x, y in parity.batches()]

    def compiled_model():
        inputs = keras.Input((parity.SIZES[0],))
        hidden = keras.layers.Dense(parity.SIZES[1], activation="tanh")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(parity.SIZES[2])(hidden))
        model.set_weights([p.astype("float32") for p in parity.init_params()])
        model.compile(optimizer=make_optimizer(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def train(model, batches):
        step = make_step(model.optimizer, model.trainable_variables,
                         lambda v, x, y: model.compute_loss(y=y, y_pred=model(x)))
        for x, y in batches:
            step(x, y)

    uninterrupted = compiled_model()
    train(uninterrupted, batches)
    model = compiled_model()
    train(model, batches[:2])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    assert int(loaded.optimizer.iterations) == 2
    train(loaded, batches[2:])
    for a, b in zip(loaded.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


CONFIGS = {
    "BSAM": lambda: BSAM(1000, lr=0.2, beta1=0.8, beta2=0.99, weight_decay=0.01, rho=0.01,
                         damping=0.05, s_init=2.0, seed=3, name="my_bsam"),
    "BSAM-schedule": lambda: BSAM(1000, lr=keras.optimizers.schedules.PolynomialDecay(
        0.5, 100, 0.1)),
    "LookSAM": lambda: LookSAM(keras.optimizers.Adam(1e-3), rho=0.2, k=5, alpha=0.5,
                               adaptive=True, use_gc=True, perturb_eps=1e-10, name="my_looksam"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_get_config_round_trip(name):
    opt = CONFIGS[name]()
    config = opt.get_config()
    again = type(opt).from_config(config)
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is type(opt) and restored.get_config() == config
    if name == "BSAM-schedule":
        assert float(again.learning_rate) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_data=0), "num_data"),
    (dict(num_data=2.5), "num_data"),
    (dict(num_data=True), "num_data"),
    (dict(lr=-0.1), "lr"),
    (dict(lr="0.1"), "lr"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(rho=-0.05), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(damping=-0.1), "damping"),
    (dict(s_init=0.0), "s_init"),
    (dict(seed=1.5), "seed"),
    (dict(adaptive=True), "adaptive=True: bSAM's ascent .* already scaled"),
    (dict(clipnorm=0.0), "clipnorm must be a number > 0"),
    (dict(learning_rate=0.1), "`learning_rate`"),
    (dict(ema_momentum=0.9), "ema_momentum given without use_ema=True"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
])
def test_bsam_invalid_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSAM(**{"num_data": 100, **kwargs})


@pytest.mark.parametrize("noise", [[np.zeros(1)], [np.zeros(1), np.zeros(3)]],
                         ids=["one-tensor-short", "wrong-shape"])
def test_bsam_noise_must_match_the_variables(noise):
    variables = [tf.Variable([1.0]), tf.Variable([2.0, 3.0])]
    opt = BSAM(100)
    with pytest.raises(ValueError, match="noise must hold one tensor per variable"):
        opt.noisy_step(variables, noise=noise)
    opt.noisy_step(variables, noise=[np.ones(1), np.zeros(2)])  # NumPy float64 is cast
    np.testing.assert_allclose(variables[0].numpy(), 1.1, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho"),
    (dict(k=0), "k must be"),
    (dict(k=2.0), "k must be"),
    (dict(k=True), "k must be"),
    (dict(alpha=-0.1), "alpha"),
    (dict(base_optimizer="sgd"), "base_optimizer"),
    (dict(eta=0.01), "`eta`"),
    (dict(clipnorm=-1.0), "clipnorm must be a number > 0"),
    (dict(k=2, gradient_accumulation_steps=2), "gradient_accumulation_steps with k > 1"),
    (dict(learning_rate=0.1), "`learning_rate`.*base_optimizer"),
])
def test_looksam_invalid_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LookSAM(**{"base_optimizer": keras.optimizers.SGD(), **kwargs})


@pytest.mark.parametrize("cls,kwargs", [
    (BSAM, dict(num_data=100, clipnorm=1.0, use_ema=True, ema_momentum=0.9,
                ema_overwrite_frequency=2, loss_scale_factor=4.0)),
    (LookSAM, dict(base_optimizer=keras.optimizers.SGD(), clipnorm=1.0, use_ema=True,
                   loss_scale_factor=4.0)),
    (LookSAM, dict(base_optimizer=keras.optimizers.SGD(), k=1, gradient_accumulation_steps=2)),
])
def test_keras_options_are_accepted_and_kept(cls, kwargs):
    opt = cls(**kwargs)
    config = opt.get_config()
    for name, value in kwargs.items():
        if name not in ("num_data", "base_optimizer"):
            assert getattr(opt, name) == value and config[name] == value
    assert type(opt).from_config(config).get_config() == config
