"""TensorFlow/Keras 3 GSAM and WSAM: parity with the reference, special cases, the seed README."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import parity  # noqa: E402
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
from sam_edu.tf import GSAM, SAM, WSAM, SAMModel  # noqa: E402


def _linear_rho_schedule():
    """``parity.RHO_SCHEDULE`` as a Keras schedule (what a user would write)."""
    s = parity.RHO_SCHEDULE
    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=s["init_value"], decay_steps=s["transition_steps"],
        end_learning_rate=s["end_value"], power=1.0)


def _keras_rho(schedule, step):
    """Keras schedules compute in float32 whatever ``floatx`` is (``end_learning_rate`` goes
    through a float32 cast): the radius Keras really uses at ``step`` is this one."""
    return float(schedule(step))


def test_linear_rho_schedule_is_parity_linear_rho():
    schedule = _linear_rho_schedule()
    for t in range(parity.STEPS + 3):
        assert _keras_rho(schedule, t) == pytest.approx(parity.linear_rho(t), rel=1e-7, abs=0)


def _gsam_reference(gsam_kwargs, base_kwargs, schedule):
    """``parity.gsam_reference_trajectory``, with a schedule's radius as Keras computes it."""
    if gsam_kwargs["rho"] != "linear":
        return parity.gsam_reference_trajectory(gsam_kwargs, base_kwargs)
    kwargs = {k: v for k, v in gsam_kwargs.items() if k != "rho"}
    return parity._trajectory(lambda t, w, grad, base: ref.gsam_step(
        w, grad, base, rho=_keras_rho(schedule, t), **kwargs), base_kwargs)


def _looksam_step(opt, variables, loss_fn):
    """LookSAM's loop (WSAM with ``k > 1``): pass 2 only when ``first_step`` returns True."""
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        if opt.first_step(tape.gradient(loss, variables), variables):
            with tf.GradientTape() as tape:
                loss = loss_fn(variables, x, y)
            opt.second_step(tape.gradient(loss, variables), variables)
    return step


def _run(make_optimizer, dtype, mode, base_kwargs, loop=_two_pass_step):
    """The parity problem through first_step/second_step; the weights after every step."""
    variables = [tf.Variable(p.astype(dtype)) for p in parity.init_params()]
    got = []
    with floatx(dtype):
        base = keras.optimizers.SGD(learning_rate=base_kwargs["lr"],
                                    momentum=base_kwargs["momentum"])
        step = loop(make_optimizer(base), variables, _mlp_loss)
        if mode == "tf.function":
            step = tf.function(step)
        for x, y in parity.batches():
            step(tf.constant(x, dtype), tf.constant(y))
            got.append(_values(variables))
    return got


def _gsam_kwargs(gsam_kwargs):
    """``rho="linear"`` becomes the Keras schedule, ``rho`` becomes ``rho_scheduler``."""
    kwargs = dict(gsam_kwargs)
    rho = kwargs.pop("rho")
    return dict(rho_scheduler=_linear_rho_schedule() if rho == "linear" else rho, **kwargs)


# --- parity with the NumPy reference -------------------------------------------------------------

@parity.gsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_gsam_matches_the_reference(gsam_kwargs, base_kwargs, dtype, mode):
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    kwargs = _gsam_kwargs(gsam_kwargs)
    got = _run(lambda base: GSAM(None, base, **kwargs), dtype, mode, base_kwargs)
    want = _gsam_reference(gsam_kwargs, base_kwargs, kwargs["rho_scheduler"])
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


@parity.wsam_case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_wsam_matches_the_reference(wsam_kwargs, base_kwargs, dtype, mode):
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    got = _run(lambda base: WSAM(None, base, **wsam_kwargs), dtype, mode, base_kwargs)
    want = parity.wsam_reference_trajectory(wsam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def test_decoupled_wsam_uses_the_base_learning_rate_of_each_step():
    """A learning-rate schedule: ``lr_t`` is the one the base optimizer used for step ``t``."""
    lr = keras.optimizers.schedules.PolynomialDecay(0.2, parity.STEPS, 0.05, power=1.0)
    kwargs = dict(rho=0.05, gamma=0.8, decouple=True)
    got = _run(lambda base: WSAM(None, base, **kwargs), "float64", "tf.function",
               dict(lr=lr, momentum=0.0))
    params, want = parity.init_params(), []
    for t, (x, y) in enumerate(parity.batches()):
        lr_t = float(lr(t))
        params = ref.wsam_step(params, lambda w: ref.mlp_loss_and_grad(w, x, y)[1],
                               lambda w, d: ref.sgd_update(w, d, ref.sgd_init(w), lr=lr_t)[0],
                               lr=lr_t, **kwargs)
        want.append(params)
    assert float(lr(0)) != float(lr(parity.STEPS - 1))
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))


PURE_FUNCTIONS = {
    "gsam_perturbation": lambda m, g, h, w: m.gsam_perturbation(g, w, 0.3),
    "gsam_perturbation-adaptive": lambda m, g, h, w: m.gsam_perturbation(g, w, 0.3, adaptive=True),
    "gsam_perturbation-negative-rho": lambda m, g, h, w: m.gsam_perturbation(g, w, -0.3),
    "decompose": lambda m, g, h, w: sum(m.decompose(g, h), []),
    "gsam_direction": lambda m, g, h, w: m.gsam_direction(g, h, 0.3),
    "clip_by_global_norm-clips": lambda m, g, h, w: m.clip_by_global_norm(g, 0.5),
    "clip_by_global_norm-keeps": lambda m, g, h, w: m.clip_by_global_norm(g, 100.0),
    "wsam_direction": lambda m, g, h, w: m.wsam_direction(g, h, 4.0),
}


@pytest.mark.parametrize("name", PURE_FUNCTIONS)
def test_pure_functions_match_the_reference(name):
    rng = np.random.default_rng(0)
    g, h, w = ([rng.normal(size=s) for s in ((3, 4), (4,), (2, 3, 4))] for _ in range(3))
    got = PURE_FUNCTIONS[name](samtf, *([tf.constant(t) for t in v] for v in (g, h, w)))
    want = PURE_FUNCTIONS[name](ref, g, h, w)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-12)


# --- the special cases that are SAM --------------------------------------------------------------

SAM_EQUIVALENTS = {
    "GSAM alpha=0": lambda base: GSAM(None, base, rho_scheduler=0.05, alpha=0.0),
    "WSAM gamma=0.5 coupled": lambda base: WSAM(None, base, rho=0.05, gamma=0.5, decouple=False),
}


@pytest.mark.parametrize("name", SAM_EQUIVALENTS)
def test_special_case_is_sam(name):
    base_kwargs = dict(lr=0.1, momentum=_keras_momentum(0.9))
    got = _run(SAM_EQUIVALENTS[name], "float64", "eager", base_kwargs)
    sam = _run(lambda base: SAM(base, rho=0.05), "float64", "eager", base_kwargs)
    parity.assert_trajectories_close(got, sam, 1e-12)
    decoupled = _run(lambda base: WSAM(None, base, rho=0.05, gamma=0.5), "float64", "eager",
                     base_kwargs)  # with momentum, the decoupled form is not SAM
    assert np.abs(decoupled[-1][0] - sam[-1][0]).max() > 1e-6


# --- the TF2 seed READMEs, as written (only the import changed) ----------------------------------
# Seed 000 (SAM, GSAM, WSAM, ...): a bare compile(optimizer=...) on a plain tf.keras Sequential, so
# transparent mode: one SAM step spans two fit steps. Here every epoch is one batch of 16, the same
# batch, so the 10 fit steps are exact SAM steps on it, which an explicit loop replays.

def _readme_data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 784)).astype("float32"), rng.integers(0, 10, 32)
    return (tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(16),
            tf.data.Dataset.from_tensor_slices((x[16:], y[16:])).batch(16))


def _readme_model(units=64, activation="softmax"):
    """The README's ``tf.keras.models.Sequential`` (784 inputs), seeded as the tests seed it."""
    keras.utils.set_random_seed(0)
    return tf.keras.models.Sequential([
        tf.keras.Input((784,)),
        tf.keras.layers.Dense(units, activation="relu"),
        tf.keras.layers.Dense(10, activation=activation),
    ])


def _sam_loop(optimizer, variables, loss_fn, branch=False):
    """One step of the explicit loop: pass 1, first_step, pass 2 (LookSAM / WSAM k > 1: only when
    first_step returns True), second_step."""
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        perturbed = optimizer.first_step(tape.gradient(loss, variables), variables)
        if branch:
            if perturbed:
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                optimizer.second_step(tape.gradient(loss, variables), variables)
        else:
            with tf.GradientTape() as tape:
                loss = loss_fn()
            optimizer.second_step(tape.gradient(loss, variables), variables)
    return step


def _replay(make_model, make_optimizer, loss, train_dataset, steps, branch=False):
    """``steps`` exact steps of ``make_optimizer()`` on the one batch of ``train_dataset``, on the
    same initial model: what transparent mode on a repeated batch must equal."""
    (x, y), = list(train_dataset)
    model = make_model()
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=loss)
    variables = model.trainable_variables
    step = _sam_loop(optimizer, variables,
                     lambda: model.compute_loss(x=x, y=y, y_pred=model(x, training=True)), branch)
    for _ in range(steps):
        step()
    return model.get_weights()


def _base_alone(make_model, base_optimizer, loss, train_dataset, epochs=10):
    """The same fit with the base optimizer alone."""
    model = make_model()
    model.compile(optimizer=base_optimizer, loss=loss)
    model.fit(train_dataset, epochs=epochs, verbose=0)
    return model.get_weights()


def _assert_weights(got, want, atol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def _assert_differ(got, want, by=1e-4):
    assert max(np.abs(a - b).max() for a, b in zip(got, want)) > by


@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`")
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_sam_on_a_plain_sequential():
    from sam_edu.tf import SAM  # README: from sam import SAM

    train_dataset, val_dataset = _readme_data()
    keras.utils.set_random_seed(0)

    # --- README (seed 000) ---
    # Define a base optimizer (e.g., Adam)
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)

    # Wrap the base optimizer with SAM
    optimizer = SAM(
        base_optimizer=base_opt,
        rho=0.05,
        adaptive=False,
        use_gc=False,
        perturb_eps=1e-12
    )

    # Build and compile a model
    model = tf.keras.models.Sequential([
        tf.keras.layers.Dense(64, activation='relu', input_shape=(784,)),
        tf.keras.layers.Dense(10, activation='softmax')
    ])
    model.compile(
        optimizer=optimizer,
        loss='sparse_categorical_crossentropy',
        # the seed README is cut off after `loss=...`; completed minimally, as its other
        # examples end: metrics, then fit
        metrics=['accuracy'])
    model.fit(train_dataset, validation_data=val_dataset, epochs=10)
    # --- end README ---

    assert type(model) is tf.keras.models.Sequential
    # 10 epochs of one batch = 10 fit steps = 5 SAM steps, the last one complete (back at w)
    assert int(optimizer.iterations) == int(base_opt.iterations) == 5
    assert int(optimizer._perturbed.numpy()) == 0
    loss = "sparse_categorical_crossentropy"
    want = _replay(_readme_model, lambda: SAM(tf.keras.optimizers.Adam(1e-3), rho=0.05), loss,
                   train_dataset, steps=5)
    _assert_weights(model.get_weights(), want)
    _assert_differ(model.get_weights(), _base_alone(_readme_model, tf.keras.optimizers.Adam(1e-3),
                                                    loss, train_dataset))


@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_gsam_on_a_plain_sequential():
    from sam_edu.tf import GSAM  # README: from sam import GSAM

    train_dataset, val_dataset = _readme_data()
    model = _readme_model()  # the README uses `model` without defining it: SAM's example's

    # --- README (seed 000) ---
    # Instantiate a base optimizer
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)

    # Define a rho scheduler (example: exponential decay)
    rho_scheduler = tf.keras.optimizers.schedules.ExponentialDecay(initial_learning_rate=0.05, decay_steps=1000, decay_rate=0.95)  # noqa: E501

    # Instantiate GSAM optimizer
    optimizer = GSAM(
        model=model,
        base_optimizer=base_opt,
        rho_scheduler=rho_scheduler,
        alpha=0.4,
        adaptive=False,
        perturb_eps=1e-12
    )

    # Compile and train the model
    model.compile(optimizer=optimizer, loss='sparse_categorical_crossentropy', metrics=['accuracy'])
    model.fit(train_dataset, validation_data=val_dataset, epochs=10)
    # --- end README ---

    assert type(model) is tf.keras.models.Sequential
    assert int(optimizer.iterations) == 5  # 10 fit steps
    assert int(optimizer._perturbed.numpy()) == 0
    assert float(optimizer.current_rho()) == pytest.approx(0.05 * 0.95 ** (5 / 1000), rel=1e-6)
    loss = "sparse_categorical_crossentropy"
    want = _replay(_readme_model, lambda: GSAM(None, tf.keras.optimizers.Adam(1e-3), rho_scheduler,
                                               alpha=0.4), loss, train_dataset, steps=5)
    _assert_weights(model.get_weights(), want)
    _assert_differ(model.get_weights(), _base_alone(_readme_model, tf.keras.optimizers.Adam(1e-3),
                                                    loss, train_dataset))


@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_wsam_on_a_plain_sequential():
    from sam_edu.tf import WSAM  # README: from sam import WSAM

    train_dataset, val_dataset = _readme_data()
    model = _readme_model()  # the README uses `model` without defining it: SAM's example's

    # --- README (seed 000) ---
    # Instantiate a base optimizer
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)

    # Instantiate WSAM optimizer
    optimizer = WSAM(
        model=model,
        base_optimizer=base_opt,
        rho=0.1,
        k=10,
        alpha=0.7,
        adaptive=False,
        use_gc=False,
        perturb_eps=1e-12
    )

    # Compile the model using WSAM
    model.compile(optimizer=optimizer, loss='sparse_categorical_crossentropy', metrics=['accuracy'])
    model.fit(train_dataset, validation_data=val_dataset, epochs=10)
    # --- end README ---

    # k=10: step 0 is a SAM step (fit steps 1 and 2), steps 1-8 are cheap (one fit step each)
    assert int(optimizer.iterations) == 9
    assert int(optimizer._perturbed.numpy()) == 0
    assert np.abs(optimizer._orthogonal_gradients[0].numpy()).max() > 0  # g_v from step 0
    loss = "sparse_categorical_crossentropy"
    want = _replay(_readme_model, lambda: WSAM(None, tf.keras.optimizers.Adam(1e-3), rho=0.1, k=10,
                                               alpha=0.7), loss, train_dataset, steps=9,
                   branch=True)
    _assert_weights(model.get_weights(), want)
    _assert_differ(model.get_weights(), _base_alone(_readme_model, tf.keras.optimizers.Adam(1e-3),
                                                    loss, train_dataset))


# Seed 002 (TF2 SAM README): its custom loop train_step_SAM, with GSAM and WSAM in SAM's place.

def _counting(loss_object):
    """``loss_object``, counting its calls (gradient evaluations) in a variable."""
    calls = tf.Variable(0)

    def loss(y_true, y_pred):
        calls.assign_add(1)
        return loss_object(y_true, y_pred)

    return loss, calls


def _base_alone_loop(dataset, base_optimizer):
    model = _seed_model()
    loss_object = tf.keras.losses.SparseCategoricalCrossentropy()
    for x, y in dataset:
        with tf.GradientTape() as tape:
            loss = loss_object(y, model(x, training=True))
        base_optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                           model.trainable_variables))
    return model.get_weights()


@pytest.mark.parametrize("variant", ["GSAM", "WSAM-k1"])
def test_seed_readme_custom_loop_gsam_wsam(variant):
    x_train, y_train = _seed_data()
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(16)  # 4 batches
    loss_object, calls = _counting(tf.keras.losses.SparseCategoricalCrossentropy())
    YourModel = _seed_model  # noqa: N806
    if variant == "GSAM":
        from sam_edu.tf import GSAM as Variant  # README: from sam import SAM
        kwargs = dict(rho_scheduler=0.05)
    else:
        from sam_edu.tf import WSAM as Variant  # README: from sam import SAM
        kwargs = dict(gamma=0.9, decouple=False)

    # --- README (seed 002; SAM(base_optimizer) -> Variant(model, base_optimizer, ...)) ---
    model = YourModel()
    base_optimizer = tf.keras.optimizers.SGD()  # define an optimizer for the "sharpness-aware" update
    optimizer = Variant(model, base_optimizer, **kwargs)

    @tf.function
    def train_step_SAM(images, labels):  # noqa: N802
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = loss_object(labels, predictions)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.first_step(gradients, model.trainable_variables)

        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = loss_object(labels, predictions)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.second_step(gradients, model.trainable_variables)

    for x, y in dataset:
        train_step_SAM(x, y)
    # --- end README ---

    assert int(optimizer.iterations) == 4
    assert int(calls.numpy()) == 8  # two passes per step
    _assert_differ(model.get_weights(), _base_alone_loop(dataset, tf.keras.optimizers.SGD()))


def test_seed_readme_custom_loop_wsam_with_looksams_k():
    """WSAM with the seed 000 README's k=10: first_step says when pass 2 is needed."""
    from sam_edu.tf import WSAM  # README: from sam import SAM

    x_train, y_train = _seed_data()
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(8).repeat(2)  # 16
    loss_object, calls = _counting(tf.keras.losses.SparseCategoricalCrossentropy())
    YourModel = _seed_model  # noqa: N806

    # --- README (seed 002; SAM(base_optimizer) -> WSAM(...), pass 2 when first_step says so) ---
    model = YourModel()
    base_optimizer = tf.keras.optimizers.SGD()  # define an optimizer for the "sharpness-aware" update
    optimizer = WSAM(model, base_optimizer, rho=0.1, k=10, alpha=0.7)

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
    assert int(calls.numpy()) == 16 + math.ceil(16 / 10) == 18
    _assert_differ(model.get_weights(), _base_alone_loop(dataset, tf.keras.optimizers.SGD()))


# --- sam_train_step under model.fit ---------------------------------------------------------------

FIT_CASES = [
    pytest.param("GSAM", *parity.GSAM_CASES[1][1:], id=parity.GSAM_CASES[1][0]),
    pytest.param("WSAM", *parity.WSAM_CASES[1][1:], id=parity.WSAM_CASES[1][0]),
    pytest.param("WSAM", *parity.WSAM_CASES[3][1:], id=parity.WSAM_CASES[3][0]),
]


@pytest.mark.parametrize("cls,kwargs,base_kwargs", FIT_CASES)
def test_fit_with_sam_train_step_matches_the_reference(cls, kwargs, base_kwargs):
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    batches, got = parity.batches(), []
    with floatx("float64"):
        model = _parity_model()
        base = keras.optimizers.SGD(base_kwargs["lr"], momentum=base_kwargs["momentum"])
        if cls == "GSAM":
            optimizer = GSAM(model, base, **_gsam_kwargs(kwargs))
            want = _gsam_reference(kwargs, base_kwargs, optimizer.rho_scheduler)
        else:
            optimizer = WSAM(model, base, **kwargs)
            want = parity.wsam_reference_trajectory(kwargs, base_kwargs)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: got.append(model.get_weights()))
        model.fit(np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]),
                  batch_size=parity.BATCH, shuffle=False, verbose=0, callbacks=[record])
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))


@pytest.mark.parametrize("cls", ["GSAM", "WSAM"])
def test_sam_train_step_refuses_an_optimizer_built_for_another_model(cls):
    inputs = keras.Input((5,))
    model = SAMModel(inputs, keras.layers.Dense(3)(inputs), name="trained")
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs), name="other")
    base = keras.optimizers.SGD(0.1)
    optimizer = GSAM(other, base, 0.05) if cls == "GSAM" else WSAM(other, base)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = parity.batches()[0]
    with pytest.raises(ValueError, match="model='other' but is training 'trained'"):
        model.fit(x.astype("float32"), y, verbose=0)


# --- the SAM machinery: exact restore, non-finite gradients, alternation --------------------------

OPTIMIZERS = {
    "GSAM": lambda base: GSAM(None, base, 0.7, alpha=0.5),
    "WSAM-decoupled": lambda base: WSAM(None, base, rho=0.7),
    "WSAM-coupled-clipped": lambda base: WSAM(None, base, rho=0.7, decouple=False, max_norm=0.1),
}


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_restore_non_finite_and_alternation(name, mode):
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(size=(6, 3)).astype("float32")),
                 tf.Variable(rng.normal(size=(3,)).astype("float32"))]
    before = _values(variables)
    opt = OPTIMIZERS[name](keras.optimizers.SGD(learning_rate=0.0, momentum=0.9))
    first, second = opt.first_step, opt.second_step
    if mode == "tf.function":
        first, second = tf.function(first), tf.function(second)
    grads = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables]
    bad = [grads[0], tf.constant([1.0, np.nan, 0.0])]
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient at w;"):
        first(bad, variables)
    first(grads, variables)
    assert not np.array_equal(variables[0].numpy(), before[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="first_step\\(\\) called twice"):
        first(grads, variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient at w \\+ e"):
        second(bad, variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)  # restored bit for bit, not stepped
    for m in opt.base_optimizer.momentums:
        np.testing.assert_array_equal(m.numpy(), 0.0)
    first(grads, variables)
    second([2.0 * t for t in grads], variables)  # lr = 0: the step leaves w where it was
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    with pytest.raises(tf.errors.InvalidArgumentError, match="without first_step"):
        second(grads, variables)


# --- configuration and validation -----------------------------------------------------------------

CONFIGS = {
    "GSAM-float": lambda: GSAM(None, keras.optimizers.Adam(1e-3), 0.1, alpha=0.2, adaptive=True,
                               perturb_eps=1e-10, name="my_gsam"),
    "GSAM-schedule": lambda: GSAM(None, keras.optimizers.SGD(0.1), _linear_rho_schedule()),
    "WSAM": lambda: WSAM(None, keras.optimizers.Adam(1e-3), rho=0.1, gamma=0.7, decouple=False,
                         max_norm=2.0, adaptive=True, perturb_eps=1e-10, name="my_wsam"),
    "WSAM-k-alpha-use_gc": lambda: WSAM(None, keras.optimizers.SGD(0.1), rho=0.2, k=3, alpha=0.4,
                                        use_gc=True, clipnorm=1.0, use_ema=True,
                                        ema_momentum=0.9),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_get_config_round_trip(name):
    opt = CONFIGS[name]()
    config = opt.get_config()
    again = type(opt).from_config(config)
    assert again.get_config() == config
    assert type(again.base_optimizer) is type(opt.base_optimizer)
    assert again.base_optimizer is not opt.base_optimizer
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is type(opt) and restored.get_config() == config
    if name == "WSAM-k-alpha-use_gc":
        assert (again.k, again.alpha, again.use_gc, again.clipnorm, again.use_ema,
                again.ema_momentum) == (3, 0.4, True, 1.0, True, 0.9)
        assert (config["k"], config["alpha"], config["use_gc"]) == (3, 0.4, True)
    if name == "GSAM-schedule":
        assert isinstance(again.rho_scheduler, keras.optimizers.schedules.PolynomialDecay)
        assert float(again.current_rho()) == pytest.approx(0.1)


@pytest.mark.parametrize("cls,kwargs,name", [
    (GSAM, dict(rho_scheduler=-0.1), "rho_scheduler"),
    (GSAM, dict(rho_scheduler=float("nan")), "rho_scheduler"),
    (GSAM, dict(rho_scheduler="linear"), "rho_scheduler"),
    (GSAM, dict(alpha=-0.1), "alpha"),
    (GSAM, dict(model="my_model"), "model"),
    (GSAM, dict(perturb_eps=-1.0), "perturb_eps"),
    (GSAM, dict(base_optimizer="sgd"), "base_optimizer"),
    (GSAM, dict(clipnorm=0.0), "clipnorm must be a number > 0"),
    (GSAM, dict(ema_momentum=0.9), "ema_momentum given without use_ema=True"),
    (GSAM, dict(gradient_accumulation_steps=1), "gradient_accumulation_steps must be an int"),
    (GSAM, dict(learning_rate=0.1), "`learning_rate`.*base_optimizer"),
    (WSAM, dict(rho=-0.1), "rho"),
    (WSAM, dict(gamma=1.0), "gamma"),
    (WSAM, dict(gamma=-0.1), "gamma"),
    (WSAM, dict(gamma=float("nan")), "gamma"),
    (WSAM, dict(max_norm=0.0), "max_norm"),
    (WSAM, dict(max_norm=-1.0), "max_norm"),
    (WSAM, dict(model=keras.layers.Dense(3)), "model"),
    (WSAM, dict(base_optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2)),
     "gradient_accumulation_steps.*decouple=True"),
    (WSAM, dict(gradient_accumulation_steps=2), "gradient_accumulation_steps.*decouple=True"),
    (WSAM, dict(decouple=False, k=2, gradient_accumulation_steps=2),
     "gradient_accumulation_steps with k > 1"),
    (WSAM, dict(k=0), "k must be"),
    (WSAM, dict(k=2.0), "k must be"),
    (WSAM, dict(alpha=-0.1), "alpha"),
    (WSAM, dict(weight_decay=0.01), "`weight_decay`.*base_optimizer"),
    (WSAM, dict(eta=0.01), "`eta`"),
])
def test_invalid_settings_raise_naming_the_argument(cls, kwargs, name):
    kwargs = {"model": None, "base_optimizer": keras.optimizers.SGD(), **kwargs}
    if cls is GSAM:
        kwargs.setdefault("rho_scheduler", 0.05)
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (GSAM, dict(clipvalue=0.5, use_ema=True, ema_momentum=0.9,
                ema_overwrite_frequency=3, loss_scale_factor=2.0, gradient_accumulation_steps=2)),
    (WSAM, dict(use_gc=True, k=10, alpha=0.5, global_clipnorm=1.0, use_ema=True)),
    (WSAM, dict(decouple=False, gradient_accumulation_steps=2)),  # k=1, coupled: allowed
])
def test_keras_options_are_accepted_and_kept(cls, kwargs):
    base = {"model": None, "base_optimizer": keras.optimizers.SGD()}
    if cls is GSAM:
        base["rho_scheduler"] = 0.05
    opt = cls(**base, **kwargs)
    for name, value in kwargs.items():
        assert getattr(opt, name) == value
    config = opt.get_config()
    assert {k: config[k] for k in kwargs} == kwargs


@pytest.mark.parametrize("name,make", [
    ("GSAM", lambda base, **kw: GSAM(None, base, 0.3, alpha=0.5, **kw)),
    ("WSAM-coupled", lambda base, **kw: WSAM(None, base, rho=0.3, decouple=False, **kw)),
])
def test_clipnorm_clips_the_direction_not_the_ascent(name, make):
    """clipnorm=c: each tensor of the base step's direction d has norm <= c (lr = 1, SGD: the
    step is -d); the ascent to w + e is the same as without clipping."""
    x, y = parity.batches()[0]
    params = parity.init_params()
    results = {}
    for clip in (None, 0.05):
        variables = [tf.Variable(p) for p in params]
        with floatx("float64"):
            opt = make(keras.optimizers.SGD(1.0), **({} if clip is None else {"clipnorm": clip}))
        with tf.GradientTape() as tape:
            loss = _mlp_loss(variables, tf.constant(x), tf.constant(y))
        opt.first_step(tape.gradient(loss, variables), variables)
        ascended = _values(variables)
        with tf.GradientTape() as tape:
            loss = _mlp_loss(variables, tf.constant(x), tf.constant(y))
        opt.second_step(tape.gradient(loss, variables), variables)
        results[clip] = ascended, [p - v for p, v in zip(params, _values(variables))]
    (up_free, d_free), (up_clip, d_clip) = results[None], results[0.05]
    _assert_weights(up_clip, up_free, atol=1e-12)  # the ascent is not clipped
    assert max(np.linalg.norm(d) for d in d_free) > 0.1  # so that clipping bites
    for free, clipped in zip(d_free, d_clip):
        want = free * min(1.0, 0.05 / np.linalg.norm(free))
        np.testing.assert_allclose(clipped, want, rtol=1e-6, atol=1e-12)


# --- WSAM's k and alpha: LookSAM's meaning ---------------------------------------------------------

def _wsam_k_reference(kwargs, base_kwargs):
    """WSAM with LookSAM's k/alpha from the reference's parts: on a SAM step (t mod k == 0) the
    true g_adv (ascent with the centralised g under use_gc) and g_v = its part orthogonal to g; on
    the others g_adv ~ looksam_direction(g, g_v, alpha); then WSAM's step (5) with g_adv."""
    k, alpha, rho = kwargs["k"], kwargs["alpha"], kwargs["rho"]
    a = ref.sharpness_weight(kwargs["gamma"])
    g_v = None

    def step(t, w, grad_fn, base_update):
        nonlocal g_v
        g = grad_fn(w)
        if ref.is_sam_step(t, k):
            ascent = ([ref.centralize_gradient(t, out_axis=-1) for t in g]
                      if kwargs.get("use_gc") else g)
            g_adv = grad_fn(ref.ascend(w, ref.perturbation(ascent, w, rho)))
            g_v = ref.orthogonal_component(g_adv, g)
        else:
            g_adv = ref.looksam_direction(g, g_v, alpha)
        if not kwargs["decouple"]:
            return base_update(w, ref.wsam_direction(g, g_adv, a))
        stepped = base_update(w, g)
        return [s - base_kwargs["lr"] * a * (ga - gi) for s, ga, gi in zip(stepped, g_adv, g)]

    return parity._trajectory(step, base_kwargs)


WSAM_K_CASES = {
    f"k{k}-{'coupled' if not d else 'decoupled'}": dict(rho=0.3, gamma=0.8, decouple=d, k=k,
                                                        alpha=0.6)
    for k in (2, 3) for d in (False, True)
}
WSAM_K_CASES["k2-coupled-use_gc"] = dict(rho=0.5, gamma=0.8, decouple=False, k=2, alpha=0.6,
                                         use_gc=True)


@pytest.mark.parametrize("case,mode", [(c, "tf.function") for c in WSAM_K_CASES]
                         + [("k3-decoupled", "eager")])
def test_wsam_with_k_matches_the_reference_composition(case, mode):
    kwargs = WSAM_K_CASES[case]
    base_kwargs = dict(lr=0.1, momentum=_keras_momentum(0.9))
    got = _run(lambda base: WSAM(None, base, **kwargs), "float64", mode, base_kwargs,
               loop=_looksam_step)
    want = _wsam_k_reference(kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    # the cheap steps are not k=1's steps: k matters
    k1 = parity.wsam_reference_trajectory(
        {key: v for key, v in kwargs.items() if key in ("rho", "gamma", "decouple")}, base_kwargs)
    if not kwargs.get("use_gc"):
        parity.assert_trajectories_close(got[:1], k1[:1], parity.tolerance("float64"))
    assert np.abs(got[-1][0] - k1[-1][0]).max() > 1e-6


@pytest.mark.parametrize("wsam_kwargs,base_kwargs",
                         [pytest.param(*c[1:], id=c[0]) for c in parity.WSAM_CASES[2:]])
def test_wsam_with_k_1_is_the_papers_wsam(wsam_kwargs, base_kwargs):
    """k=1 (alpha has no part): every step a SAM step, first_step returns True; the reference."""
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    got = _run(lambda base: WSAM(None, base, k=1, alpha=0.3, **wsam_kwargs), "float64",
               "tf.function", base_kwargs, loop=_looksam_step)
    parity.assert_trajectories_close(got, parity.wsam_reference_trajectory(wsam_kwargs, base_kwargs),
                                     parity.tolerance("float64"))
    variables = [tf.Variable(p) for p in parity.init_params()]
    opt = WSAM(None, keras.optimizers.SGD(0.1))
    assert bool(opt.first_step([tf.ones_like(v) for v in variables], variables)) is True


@pytest.mark.parametrize("k,decouple,mode", [(3, True, "tf.function"), (2, False, "eager"),
                                             (1, True, "tf.function")])
def test_wsam_evaluates_n_plus_ceil_n_over_k_gradients(k, decouple, mode):
    n = 7
    calls = tf.Variable(0)
    variables = [tf.Variable(np.ones((4, 2))), tf.Variable(np.zeros(2))]

    def loss_fn(v, x, y):
        calls.assign_add(1)
        return tf.reduce_sum(tf.tanh(x @ v[0] + v[1]) ** 2)

    opt = WSAM(None, keras.optimizers.SGD(0.1), k=k, decouple=decouple)
    step = _looksam_step(opt, variables, loss_fn)
    if mode == "tf.function":
        step = tf.function(step)
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 4)))
    for _ in range(n):
        step(x, None)
    assert int(calls.numpy()) == n + math.ceil(n / k)
    assert int(opt.iterations) == n


@pytest.mark.parametrize("k", [1, 2])
def test_wsam_use_gc_centralises_the_ascent_gradient_only(k):
    """As SAM's use_gc: e from the centralised g; the base step's g (and g_v's) as it is."""
    params = parity.init_params()
    x, y = parity.batches()[0]
    g = ref.mlp_loss_and_grad(params, x, y)[1]
    variables = [tf.Variable(p) for p in params]
    a = ref.sharpness_weight(0.8)
    with floatx("float64"):
        opt = WSAM(None, keras.optimizers.SGD(0.1), rho=0.5, gamma=0.8, decouple=False, k=k,
                   use_gc=True)
    assert bool(opt.first_step([tf.constant(t) for t in g], variables))
    want = ref.perturbation([ref.centralize_gradient(t, out_axis=-1) for t in g], params, 0.5)
    assert np.abs(want[0] - ref.perturbation(g, params, 0.5)[0]).max() > 1e-3
    for v, p, e in zip(variables, params, want):
        np.testing.assert_allclose(v.numpy() - p, e, rtol=0, atol=1e-12)
    # pass 2's gradient given as 2 g: d = g + a (2 g - g) with the g kept as it is
    opt.second_step([tf.constant(2 * t) for t in g], variables)
    for v, p, t in zip(variables, params, g):
        np.testing.assert_allclose(v.numpy(), p - 0.1 * (1 + a) * t, rtol=0, atol=1e-12)
    if k == 2:  # g_v of g_adv = 2 g against g itself: 0 (not against the centralised g)
        for gv in opt._orthogonal_gradients:
            np.testing.assert_allclose(gv.numpy(), 0.0, atol=1e-10)
