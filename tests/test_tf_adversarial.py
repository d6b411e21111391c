"""sam_edu.tf.AdversarialSAM: optax.contrib.sam's inner/outer formulation in TensorFlow/Keras 3.

optax.contrib.sam (the installed one) is the peer: on the two-basin problem of its notebook, in
float64, every call of both modes must match it, where it is right. Where it is not (a zero
gradient, transparent mode with sync_period=1) the tests pin our behaviour and optax's.

Two Keras details the peer comparison must respect: Keras' SGD casts its Python-float momentum
(and Adam its betas) through float32, so both sides use float32-exact values; Keras' Adam adds
``epsilon`` to ``sqrt(v)`` before the bias correction and optax after it, so both use a negligible
``epsilon`` (1e-16).
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import adversarial_peer  # noqa: E402
from sam_edu import reference as ref  # noqa: E402
from sam_edu.tf import AdversarialSAM  # noqa: E402

START = (-0.4, -0.4)  # the notebook's starting point
MOMENTUM = float(np.float32(0.9))
# Keras' Adam casts beta_1 and beta_2 through float32 too in its bias corrections
BETAS = dict(beta_1=float(np.float32(0.9)), beta_2=float(np.float32(0.999)))
K_SGD, K_ADAM = keras.optimizers.SGD, keras.optimizers.Adam

# name: (keras outer, keras adversarial, optax outer, optax adversarial (before normalize), k)
CASES = {
    "drop-in-sam": (lambda: K_SGD(0.01), lambda: K_SGD(0.1),
                    lambda o: o.sgd(0.01), lambda o: o.sgd(0.1), 2),
    "sam-momentum": (lambda: K_SGD(0.01, momentum=MOMENTUM), lambda: K_SGD(0.1),
                     lambda o: o.sgd(0.01, momentum=MOMENTUM), lambda o: o.sgd(0.1), 2),
    "sam-adam": (lambda: K_ADAM(1e-3, epsilon=1e-16, **BETAS),
                 lambda: K_ADAM(0.03, epsilon=1e-16, **BETAS),
                 lambda o: o.adam(1e-3, b1=BETAS["beta_1"], b2=BETAS["beta_2"], eps=1e-16),
                 lambda o: o.adam(0.03, b1=BETAS["beta_1"], b2=BETAS["beta_2"], eps=1e-16), 5),
    "momentum-inside-k3": (lambda: K_SGD(0.05, momentum=0.5), lambda: K_SGD(0.05, momentum=0.5),
                           lambda o: o.sgd(0.05, momentum=0.5), lambda o: o.sgd(0.05, momentum=0.5),
                           3),
}


@contextlib.contextmanager
def floatx(dtype="float64"):
    """Keras' dtype for the variables it creates (the learning rate: 0.1 in float32 is off by
    1.5e-9) and for layers."""
    old = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(old[0])
        keras.config.set_dtype_policy(old[1])


@pytest.fixture(autouse=True)
def _float64():
    with floatx():
        yield


def two_basin(x, y):
    """The notebook's loss, ``-exp(-(x-2)^2 - y^2) - exp(-(x^2 + 100 y^2))``, as TF ops."""
    return -tf.exp(-(x - 2) ** 2 - y ** 2) - tf.exp(-(x ** 2 + 100 * y ** 2))


def leaves(point=START):
    """Two variables, so the normalisation is a global norm over several tensors."""
    return [tf.Variable(np.float64(v)) for v in point]


def numpy(variables):
    return np.array([float(v.numpy()) for v in variables])


def grad_fn_for(variables, loss=two_basin):
    def grad_fn():
        with tf.GradientTape() as tape:
            value = loss(*variables)
        return value, tape.gradient(value, variables)
    return grad_fn


def stepper(optimizer, variables, opaque, compiled, loss=two_basin):
    grad_fn = grad_fn_for(variables, loss)

    def step():
        if opaque:
            return optimizer.step(grad_fn, variables)
        _, grads = grad_fn()
        optimizer.apply_gradients(zip(grads, variables))
    return tf.function(step) if compiled else step


def run_tf(optimizer, variables, calls, opaque, compiled=False):
    step = stepper(optimizer, variables, opaque, compiled)
    trajectory = []
    for _ in range(calls):
        step()
        trajectory.append(numpy(variables))
    return np.array(trajectory)


def run_optax(name, calls, opaque, **kwargs):
    """The JAX trajectory of case ``name`` (:func:`adversarial_peer.run_optax`)."""
    return adversarial_peer.run_optax(CASES[name][2:], START, calls, opaque, **kwargs)


def make(name, reset_state=True, sync_period=None, **kwargs):
    outer, adv, _, _, k = CASES[name]
    return AdversarialSAM(outer(), adv(), sync_period=sync_period or k, reset_state=reset_state,
                          **kwargs), leaves()


# --- optax.contrib.sam as the peer ---------------------------------------------------------------


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("reset_state", [True, False], ids=["reset", "keep-state"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_optax_at_every_call(name, reset_state, opaque):
    """Transparent: every call, adversarial points included. Opaque: every cycle."""
    calls = 12 if opaque else 6 * CASES[name][4]
    optimizer, variables = make(name, reset_state)
    got = run_tf(optimizer, variables, calls, opaque)
    want = run_optax(name, calls, opaque, reset_state=reset_state)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["sam-momentum", "sam-adam"])
def test_matches_optax_inside_tf_function(name, opaque):
    calls = 10 if opaque else 10 * CASES[name][4]
    optimizer, variables = make(name)
    got = run_tf(optimizer, variables, calls, opaque, compiled=True)
    np.testing.assert_allclose(got, run_optax(name, calls, opaque), rtol=0, atol=1e-12)


def test_the_first_call_of_drop_in_sam_is_the_sam_ascent():
    optimizer, variables = make("drop-in-sam")
    step = stepper(optimizer, variables, opaque=False, compiled=False)
    step()
    g = ref.two_basin_grad(np.array(START))
    np.testing.assert_allclose(numpy(variables), START + 0.1 * g / np.linalg.norm(g),
                               rtol=0, atol=1e-15)
    assert int(optimizer.steps_since_sync) == 1
    step()
    g_adv = ref.two_basin_grad(START + 0.1 * g / np.linalg.norm(g))
    np.testing.assert_allclose(numpy(variables), START - 0.01 * g_adv, rtol=0, atol=1e-15)
    assert int(optimizer.steps_since_sync) == 0
    assert int(optimizer.iterations) == 2 and int(optimizer.optimizer.iterations) == 1


def test_opaque_step_calls_grad_fn_sync_period_times_and_returns_the_loss_at_w():
    optimizer, variables = make("sam-adam")
    grad_fn, points = grad_fn_for(variables), []

    def counting():
        points.append(numpy(variables))
        return grad_fn()

    loss = optimizer.step(counting, variables)
    assert len(points) == 5
    np.testing.assert_array_equal(points[0], START)
    assert float(loss) == ref.two_basin_loss(np.array(START))
    assert int(optimizer.iterations) == 5 and int(optimizer.optimizer.iterations) == 1



@pytest.mark.parametrize("sync_period", [None, 1], ids=["k", "k=1"])
@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-adam"])
def test_matches_the_jax_version(name, opaque, sync_period):
    """sam_edu.jax.adversarial_sam, sync_period=1 included. Its ``normalize`` divides by
    ``||g|| + eps`` where ours divides by ``max(||g||, eps)``: a relative 1e-11 apart."""
    calls = 30
    optimizer, variables = make(name, sync_period=sync_period)
    got = run_tf(optimizer, variables, calls, opaque)
    want = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)

# --- optax's sharp edges, fixed ------------------------------------------------------------------


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-adam"])
def test_sync_period_one_is_the_outer_optimizer(name, opaque):
    optimizer, variables = make(name, sync_period=1)
    got = run_tf(optimizer, variables, 20, opaque)
    plain_variables = leaves()
    want = run_tf(CASES[name][0](), plain_variables, 20, opaque=False)
    np.testing.assert_array_equal(got, want)
    # optax's opaque mode agrees; its transparent mode steps from the previous call's parameters
    optax_got = run_optax(name, 20, opaque=opaque, sync_period=1)
    if opaque:
        np.testing.assert_allclose(optax_got, want, rtol=0, atol=1e-12)
    else:
        assert np.max(np.abs(optax_got - want)) > 1e-4


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name", ["drop-in-sam", "sam-adam"])
def test_a_zero_gradient_gives_no_nan(name, opaque):
    optimizer, variables = make(name)
    zero = stepper(optimizer, variables, opaque, compiled=False, loss=lambda x, y: 0 * x * y)
    for _ in range(2 * CASES[name][4]):
        zero()
        np.testing.assert_array_equal(numpy(variables), START)
    # optax.contrib.normalize() divides by the norm with no epsilon: 0/0
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax").numpy
    updates, _ = optax.contrib.normalize().update((jnp.zeros(()), jnp.zeros(())), None)
    assert np.all(np.isnan(np.array(updates)))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("at_call", [0, 1, 4], ids=["at-w", "adversarial", "outer"])
def test_a_non_finite_gradient_raises_and_restores_w(at_call, compiled):
    optimizer, variables = make("sam-adam")
    grad_fn = grad_fn_for(variables)

    def step(bad):
        _, grads = grad_fn()
        optimizer.apply_gradients(zip([grads[0], grads[1] * bad], variables))

    step = tf.function(step) if compiled else step
    for _ in range(at_call):
        step(tf.constant(1.0, tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        step(tf.constant(np.nan, tf.float64))
    np.testing.assert_array_equal(numpy(variables), START)
    assert int(optimizer.steps_since_sync) == 0


def test_a_non_finite_gradient_in_opaque_mode_restores_w():
    optimizer, variables = make("sam-adam")
    grad_fn, calls = grad_fn_for(variables), []

    def failing():
        calls.append(1)
        loss, grads = grad_fn()
        return loss, [grads[0], grads[1] * (np.inf if len(calls) == 3 else 1.0)]

    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        optimizer.step(failing, variables)
    np.testing.assert_array_equal(numpy(variables), START)


def adversarial_distances(max_radius, opaque, cycles=20):
    """``||a - w||`` for every adversarial point of drop-in SAM's optimizers with
    ``sync_period=5`` (four normalised steps of length 0.1), seen by the loop or by grad_fn."""
    optimizer, variables = make("drop-in-sam", sync_period=5, max_radius=max_radius)
    grad_fn, seen = grad_fn_for(variables), []  # w, then the four adversarial points

    def seeing():
        seen.append(numpy(variables))
        return grad_fn()

    for _ in range(cycles):
        if opaque:
            optimizer.step(seeing, variables)
            continue
        for _ in range(5):
            _, grads = seeing()
            optimizer.apply_gradients(zip(grads, variables))
    seen = np.array(seen).reshape(cycles, 5, 2)
    return np.linalg.norm(seen[:, 1:] - seen[:, :1], axis=-1)


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_max_radius_keeps_the_adversarial_points_in_the_ball(opaque):
    assert adversarial_distances(None, opaque).max() > 2 * 0.1  # optax's: four steps leave it
    assert adversarial_distances(0.1, opaque).max() <= 0.1 * (1 + 1e-12)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
@pytest.mark.parametrize("name,sync_period,max_radius", [
    ("drop-in-sam", 5, 0.1), ("sam-adam", 5, 0.03), ("momentum-inside-k3", 3, 0.05)])
def test_max_radius_matches_the_jax_version(name, sync_period, max_radius, opaque, compiled):
    calls = 40
    optimizer, variables = make(name, sync_period=sync_period, max_radius=max_radius)
    got = run_tf(optimizer, variables, calls, opaque, compiled)
    want = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax",
                     max_radius=max_radius)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    unprojected = run_optax(name, calls, opaque, sync_period=sync_period, peer="sam_edu.jax")
    assert np.max(np.abs(unprojected - want)) > 1e-6  # the projection did act


@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_max_radius_rho_leaves_drop_in_sam_unchanged(opaque):
    """One normalised step has length rho: the projection changes nothing (up to rounding)."""
    optimizer, variables = make("drop-in-sam", max_radius=0.1)
    got = run_tf(optimizer, variables, 40, opaque)
    plain, plain_variables = make("drop-in-sam")
    np.testing.assert_allclose(got, run_tf(plain, plain_variables, 40, opaque), rtol=0,
                               atol=1e-15)


def test_normalize_false_feeds_the_raw_gradient():
    optimizer, variables = make("drop-in-sam", normalize=False)
    got = run_tf(optimizer, variables, 12, opaque=False)
    want = run_optax("drop-in-sam", 12, opaque=False, normalize=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# --- the optimizer API ---------------------------------------------------------------------------


def test_reset_state_resets_the_adversarial_optimizer_but_not_its_learning_rate():
    for reset_state in (True, False):
        optimizer, variables = make("sam-adam", reset_state)
        step = stepper(optimizer, variables, opaque=False, compiled=False)
        for _ in range(5):
            step()
        adv = optimizer.adv_optimizer
        assert (int(adv.iterations) == 0) is reset_state
        assert bool((adv._momentums[0].numpy() == 0).all()) is reset_state
        assert float(adv.learning_rate) == 0.03


def test_learning_rate_is_the_outer_optimizers():
    optimizer, _ = make("drop-in-sam")
    assert float(optimizer.learning_rate) == 0.01
    optimizer.learning_rate = 0.02
    assert float(optimizer.optimizer.learning_rate) == 0.02
    assert float(optimizer.adv_optimizer.learning_rate) == 0.1


def test_opaque_step_in_the_middle_of_a_transparent_cycle_raises():
    optimizer, variables = make("drop-in-sam")
    stepper(optimizer, variables, opaque=False, compiled=False)()
    with pytest.raises(tf.errors.InvalidArgumentError, match="middle of a transparent cycle"):
        optimizer.step(grad_fn_for(variables), variables)


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, "tanh")(inputs)))


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)), rng.integers(0, 3, 32)


def test_model_fit_is_transparent_mode():
    """``model.fit`` hands the optimizer one gradient per batch: transparent mode as it is."""
    x, y = _data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fitted = _model()
    fitted.compile(optimizer=make("sam-adam")[0], loss=loss_fn)
    fitted.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    manual = _model()
    optimizer = make("sam-adam")[0]
    variables = manual.trainable_variables
    for _ in range(3):
        for i in range(0, 32, 8):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i:i + 8], manual(x[i:i + 8]))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    assert int(fitted.optimizer.iterations) == 12 and int(fitted.optimizer.steps_since_sync) == 2
    for a, b in zip(fitted.trainable_variables, variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", [5, 7], ids=["at-a-sync", "mid-cycle"])
def test_saved_model_resumes_exactly(tmp_path, split):
    x, y = _data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train(model, calls, start=0):
        variables = model.trainable_variables
        for i in range(start, start + calls):
            batch = slice(8 * (i % 4), 8 * (i % 4) + 8)
            with tf.GradientTape() as tape:
                loss = loss_fn(y[batch], model(x[batch]))
            model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    def fresh():
        model = _model()
        model.compile(optimizer=make("sam-adam", reset_state=False)[0], loss=loss_fn)
        return model

    uninterrupted = fresh()
    train(uninterrupted, 12)
    model = fresh()
    train(model, split)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, AdversarialSAM)
    assert int(loaded.optimizer.steps_since_sync) == split % 5
    train(loaded, 12 - split, start=split)
    for a, b in zip(loaded.trainable_variables, uninterrupted.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_get_config_round_trip():
    optimizer, _ = make("sam-adam", reset_state=False, normalize=False, eps=1e-9,
                        max_radius=0.05)
    config = optimizer.get_config()
    assert config["max_radius"] == 0.05
    again = AdversarialSAM.from_config(config)
    assert again.get_config() == config
    assert isinstance(again.adv_optimizer, keras.optimizers.Adam)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, AdversarialSAM) and restored.get_config() == config


@pytest.mark.parametrize("kwargs,name", [
    (dict(sync_period=0), "sync_period"),
    (dict(sync_period=2.0), "sync_period"),
    (dict(sync_period=True), "sync_period"),
    (dict(eps=0.0), "eps"),
    (dict(max_radius=-0.1), "max_radius"),
    (dict(max_radius=float("nan")), "max_radius"),
    (dict(max_radius="0.1"), "max_radius"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(optimizer=keras.optimizers.SGD), "optimizer"),
    (dict(optimizer=keras.optimizers.SGD(loss_scale_factor=128.0)), "optimizer"),
    (dict(adv_optimizer=None), "adv_optimizer"),
    (dict(learning_rate=0.1), "learning_rate"),
], ids=["sync_period-0", "sync_period-float", "sync_period-bool", "eps", "max_radius-negative",
         "max_radius-nan", "max_radius-string", "optimizer-string",
        "optimizer-class", "optimizer-loss-scaling", "adv-none", "keras-argument"])
def test_invalid_arguments_are_named(kwargs, name):
    arguments = dict(optimizer=K_SGD(0.01), adv_optimizer=K_SGD(0.1)) | kwargs
    with pytest.raises(ValueError, match=name):
        AdversarialSAM(**arguments)


def test_one_optimizer_in_both_roles_or_a_built_one_is_refused():
    sgd = K_SGD(0.1)
    with pytest.raises(ValueError, match="another optimizer instance"):
        AdversarialSAM(sgd, sgd)
    sgd.build(leaves())
    with pytest.raises(ValueError, match="already built"):
        AdversarialSAM(sgd, K_SGD(0.1))


def test_sparse_and_missing_gradients():
    """An embedding's IndexedSlices gradient is made dense; a variable without one stays put."""
    table, unused = tf.Variable(np.arange(6.0).reshape(3, 2)), tf.Variable(np.float64(7.0))
    optimizer = AdversarialSAM(K_SGD(0.1), K_SGD(0.5))
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, [0, 2]) ** 2)
        grads = tape.gradient(loss, [table, unused])
        assert isinstance(grads[0], tf.IndexedSlices) and grads[1] is None
        with pytest.warns(UserWarning, match="Gradients do not exist"):
            optimizer.apply_gradients(zip(grads, [table, unused]))
    g = 2 * np.array([[0.0, 1.0], [0.0, 0.0], [4.0, 5.0]])
    w_adv = np.arange(6.0).reshape(3, 2) + 0.5 * g / np.linalg.norm(g)
    np.testing.assert_allclose(table.numpy(), np.arange(6.0).reshape(3, 2) - 0.1 * 2 * w_adv
                               * np.array([[1], [0], [1]]), rtol=0, atol=1e-12)
    assert float(unused.numpy()) == 7.0
