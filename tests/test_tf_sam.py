"""TensorFlow/Keras 3 SAM: parity with the reference, the TF2 seed README, and Keras' API."""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import parity  # noqa: E402
from sam_edu import reference as ref  # noqa: E402
from sam_edu import tf as samtf  # noqa: E402
from sam_edu.tf import SAM, sam_train_step  # noqa: E402


@contextlib.contextmanager
def floatx(dtype):
    """Keras' default dtype for the variables it creates: layers' weights, the learning rate.

    Both settings are needed: ``floatx`` for an optimizer's learning rate (0.1 held in float32
    is off by 1.5e-9, enough to fail float64 parity), and the global dtype policy for layers,
    which Keras fixes from ``floatx`` the first time it is asked and never rereads.
    """
    old = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(old[0])
        keras.config.set_dtype_policy(old[1])


def _keras_momentum(momentum):
    """Keras' SGD casts its Python-float momentum with ``tf.cast``, which goes through float32
    whatever the variables' dtype: the momentum Keras really uses is this one."""
    return float(np.float32(momentum))


def _mlp_loss(variables, x, y):
    """The parity problem's loss: mean softmax cross-entropy of ``tanh(x W1 + b1) W2 + b2``."""
    w1, b1, w2, b2 = variables
    logits = tf.tanh(x @ w1 + b1) @ w2 + b2
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def _two_pass_step(opt, variables, loss_fn):
    """The explicit loop: pass 1, ``first_step``, pass 2 on the same batch, ``second_step``."""
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        opt.first_step(tape.gradient(loss, variables), variables)
        with tf.GradientTape() as tape:
            loss = loss_fn(variables, x, y)
        opt.second_step(tape.gradient(loss, variables), variables)
    return step


def _values(variables):
    return [v.numpy() for v in variables]


# --- parity with the NumPy reference -------------------------------------------------------------

@parity.case_params
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_first_and_second_step_match_the_reference(sam_kwargs, base_kwargs, dtype, mode):
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    variables = [tf.Variable(p.astype(dtype)) for p in parity.init_params()]
    got = []
    with floatx(dtype):
        base = keras.optimizers.SGD(learning_rate=base_kwargs["lr"],
                                    momentum=base_kwargs["momentum"])
        step = _two_pass_step(SAM(base, **sam_kwargs), variables, _mlp_loss)
        if mode == "tf.function":
            step = tf.function(step)
        for x, y in parity.batches():
            step(tf.constant(x, dtype), tf.constant(y))
            got.append(_values(variables))
    want = parity.reference_trajectory(sam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance(dtype))


def _tree(seed, shapes=((3, 4), (4,), (2, 3, 4))):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


PURE_FUNCTIONS = {
    "global_norm": lambda m, g, w: [m.global_norm(g)],
    "scale_operator": lambda m, g, w: m.scale_operator(w, eta=[0.01, 0.0, 0.1],
                                                       adaptive=[True, False, True]),
    "sam_perturbation": lambda m, g, w: m.sam_perturbation(g, 0.05),
    "asam_perturbation": lambda m, g, w: m.asam_perturbation(g, w, 0.5, eta=0.01),
    "perturbation": lambda m, g, w: m.perturbation(g, w, rho=[0.1, 0.2, 0.3],
                                                   adaptive=[True, False, True], eta=0.01),
    "perturbation-zero-gradient": lambda m, g, w: m.perturbation([0 * t for t in g], w, 0.5,
                                                                 adaptive=True),
    "centralize_gradient-last": lambda m, g, w: [m.centralize_gradient(t, -1) for t in g],
    "centralize_gradient-first": lambda m, g, w: [m.centralize_gradient(t, 0) for t in g],
    "ascend": lambda m, g, w: m.ascend(w, g),
}


@pytest.mark.parametrize("name", PURE_FUNCTIONS)
def test_pure_functions_match_the_reference(name):
    g, w = _tree(0), _tree(1)
    got = PURE_FUNCTIONS[name](samtf, [tf.constant(t) for t in g], [tf.constant(t) for t in w])
    want = PURE_FUNCTIONS[name](ref, g, w)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_use_gc_centralises_the_ascent_gradient_only(adaptive):
    params = parity.init_params()
    x, y = parity.batches()[0]
    g = ref.mlp_loss_and_grad(params, x, y)[1]
    variables = [tf.Variable(p) for p in params]
    with floatx("float64"):
        opt = SAM(keras.optimizers.SGD(0.1), rho=0.5, adaptive=adaptive, use_gc=True)
    opt.first_step([tf.constant(t) for t in g], variables)
    want = ref.perturbation([ref.centralize_gradient(t, out_axis=-1) for t in g], params,
                            0.5, adaptive)
    assert np.abs(want[0] - ref.perturbation(g, params, 0.5, adaptive)[0]).max() > 1e-3
    for v, p, e in zip(variables, params, want):
        np.testing.assert_allclose(v.numpy() - p, e, rtol=0, atol=1e-12)
    # the base step gets g_adv as it is (here g itself), not centralised
    opt.second_step([tf.constant(t) for t in g], variables)
    for v, p, t in zip(variables, params, g):
        np.testing.assert_allclose(v.numpy(), p - 0.1 * t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_second_step_restores_w_exactly(mode):
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(size=(20, 10)).astype("float32")),
                 tf.Variable(rng.normal(size=(10,)).astype("float32"))]
    before = _values(variables)
    opt = SAM(keras.optimizers.SGD(learning_rate=0.0), rho=0.7)
    first, second = opt.first_step, opt.second_step
    if mode == "tf.function":
        first, second = tf.function(first), tf.function(second)
    grads = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in variables]
    first(grads, variables)
    assert not np.array_equal(variables[0].numpy(), before[0])
    second([2.0 * t for t in grads], variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)  # bit for bit: copied back, not w + e - e


def test_sparse_and_missing_gradients():
    """An embedding's gradient is ``tf.IndexedSlices``; a variable outside the loss, ``None``."""
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(10, 3)), rng.normal(size=(3, 2)), rng.normal(size=(2,))]
    ids = tf.constant([1, 4, 4, 7])

    def loss_fn(variables, x, y):
        table, dense, _unused = variables
        return tf.reduce_sum((tf.gather(table, x) @ dense - y) ** 2)

    def run(densify):
        variables = [tf.Variable(p) for p in init]
        opt = SAM(keras.optimizers.SGD(0.1), rho=0.2)
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = loss_fn(variables, ids, 1.0)
            g = tape.gradient(loss, variables)
            assert isinstance(g[0], tf.IndexedSlices) and g[2] is None
            if densify:
                g = [tf.convert_to_tensor(g[0]), g[1], tf.zeros(2, tf.float64)]
            opt.first_step(g, variables)
            with tf.GradientTape() as tape:
                loss = loss_fn(variables, ids, 1.0)
            g = tape.gradient(loss, variables)
            if densify:
                g = [tf.convert_to_tensor(g[0]), g[1], tf.zeros(2, tf.float64)]
            opt.second_step(g, variables)
        return _values(variables)

    got, want = run(densify=False), run(densify=True)
    assert not np.allclose(got[0], init[0])
    np.testing.assert_array_equal(got[2], init[2])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


# --- non-finite gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eager", "tf.function"])
@pytest.mark.parametrize("where", ["centre", "perturbed"])
def test_non_finite_gradient_raises_and_leaves_w_unchanged(where, mode):
    variables = [tf.Variable(np.ones((3, 2), "float32")), tf.Variable(np.zeros(2, "float32"))]
    before = _values(variables)
    opt = SAM(keras.optimizers.SGD(0.1, momentum=0.9))
    opt.build(variables)
    first, second = opt.first_step, opt.second_step
    if mode == "tf.function":
        first, second = tf.function(first), tf.function(second)
    good = [tf.ones((3, 2)), tf.ones(2)]
    bad = [tf.ones((3, 2)), tf.constant([1.0, np.nan])]
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient"):
        if where == "centre":
            first(bad, variables)
        else:
            first(good, variables)
            second(bad, variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    for m in opt.base_optimizer.momentums:
        np.testing.assert_array_equal(m.numpy(), 0.0)


@pytest.mark.parametrize("where", ["centre", "perturbed"])
def test_a_norm_that_overflows_counts_as_non_finite(where):
    """The check goes through the global norm, as the reference's does: every element finite
    but the sum of squares beyond float32 still raises, and w is left as it was."""
    variables = [tf.Variable(np.ones((3, 2), "float32")), tf.Variable(np.zeros(2, "float32"))]
    before = _values(variables)
    opt = SAM(keras.optimizers.SGD(0.1))
    opt.build(variables)
    good = [tf.ones((3, 2)), tf.ones(2)]
    huge = [tf.ones((3, 2)), tf.constant([1e20, 1.0])]  # finite; its square is not
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient"):
        if where == "centre":
            opt.first_step(huge, variables)
        else:
            opt.first_step(good, variables)
            opt.second_step(huge, variables)
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.parametrize("make", [
    lambda base: SAM(base),
    lambda base: samtf.GSAM(None, base, 0.05),
    lambda base: samtf.WSAM(None, base),
], ids=["sam", "gsam", "wsam"])
def test_a_step_checks_two_norms_not_every_tensor(make):
    """One ``CheckNumerics`` on the norm of ``g`` (the one that scales ``e``) and one on the
    norm of ``g_adv``, whatever the number of tensors; w + e is added in place."""
    variables = [tf.Variable(np.ones((3, 2), "float32")), tf.Variable(np.zeros(2, "float32")),
                 tf.Variable(np.ones((2, 2), "float32"))]
    opt = make(keras.optimizers.SGD(0.1))
    opt.build(variables)
    step = tf.function(_two_pass_step(opt, variables, lambda v, x, y: tf.reduce_sum(
        tf.tanh(x @ v[0] + v[1]) @ v[2]) * y))
    graph = step.get_concrete_function(tf.ones((4, 3)), tf.constant(1.0)).graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("CheckNumerics") == 2
    assert ops.count("AssignAddVariableOp") >= len(variables)  # (2): w += e, in place


def test_perturbation_with_a_precomputed_norm_is_the_same():
    g = [tf.constant(a) for a in _tree(0)]
    w = [tf.constant(a) for a in _tree(1)]
    flags, etas = [True, False, True], [0.01, 0.0, 0.1]
    norm = samtf.perturbation_norm(g, w, flags, etas)
    t_g = [np.asarray(a) * ((np.abs(np.asarray(b)) + e) if f else 1.0)
           for a, b, f, e in zip(g, w, flags, etas)]
    np.testing.assert_allclose(norm.numpy(), np.sqrt(sum(np.sum(v * v) for v in t_g)), rtol=1e-12)
    for a, b in zip(samtf.perturbation(g, w, 0.5, flags, etas, norm=norm),
                    samtf.perturbation(g, w, 0.5, flags, etas)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- the TF2 seed README, as written (only the import changed) -----------------------------------

def _seed_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 20)).astype("float32"), rng.integers(0, 10, 64)


def _seed_model(cls=None):
    """The README's ``YourModel``: a small functional model built with ``Input``."""
    keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((20,))
    hidden = tf.keras.layers.Dense(32, activation="relu")(inputs)
    outputs = tf.keras.layers.Dense(10, activation="softmax")(hidden)
    return (cls or tf.keras.Model)(inputs, outputs)


def test_seed_readme_custom_loop():
    from sam_edu.tf import SAM  # README: from sam import SAM

    x_train, y_train = _seed_data()
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(16)
    loss_object = tf.keras.losses.SparseCategoricalCrossentropy()
    YourModel = _seed_model  # noqa: N806

    # --- README ---
    model = YourModel()
    base_optimizer = tf.keras.optimizers.SGD()  # define an optimizer for the "sharpness-aware" update
    optimizer = SAM(base_optimizer)

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

    plain = YourModel()
    plain_optimizer = tf.keras.optimizers.SGD()

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_object(labels, plain(images, training=True))
        plain_optimizer.apply_gradients(
            zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))

    for x, y in dataset:
        train_step(x, y)
    init = YourModel().get_weights()
    assert optimizer.iterations.numpy() == 4
    assert np.abs(model.get_weights()[0] - init[0]).max() > 1e-3
    assert np.abs(model.get_weights()[0] - plain.get_weights()[0]).max() > 1e-5


@pytest.mark.parametrize("compiled", ["sgd", "SAM(SGD())"])
def test_seed_readme_keras_api(compiled):
    from sam_edu.tf import sam_train_step  # README: from sam import sam_train_step

    x_train, y_train = _seed_data()
    optimizer = "sgd" if compiled == "sgd" else SAM(tf.keras.optimizers.SGD())

    # --- README ---
    # override the train_step function of the keras model
    class YourModel(tf.keras.Model):
        def train_step(self, data):
            return sam_train_step(self, data)

    model = _seed_model(YourModel)  # inputs = Input(...); outputs = ...; YourModel(inputs, outputs)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=3)
    # --- end README ---

    plain = _seed_model()
    plain.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    plain.fit(x_train, y_train, epochs=3, verbose=0)
    init = _seed_model().get_weights()
    assert np.abs(model.get_weights()[0] - init[0]).max() > 1e-3
    assert np.abs(model.get_weights()[0] - plain.get_weights()[0]).max() > 1e-5


# --- sam_train_step under model.fit ---------------------------------------------------------------

class SAMModel(keras.Model):
    def train_step(self, data):
        return sam_train_step(self, data)


def _parity_model():
    inputs = keras.Input((parity.SIZES[0],))
    hidden = keras.layers.Dense(parity.SIZES[1], activation="tanh")(inputs)
    model = SAMModel(inputs, keras.layers.Dense(parity.SIZES[2])(hidden))
    model.set_weights(parity.init_params())
    return model


FIT_CASES = [pytest.param(s, b, "SAM", id=f"{i}-SAM(SGD)") for i, s, b in parity.CASES] + [
    pytest.param(s, b, "SGD", id=f"{i}-SGD") for i, s, b in parity.CASES
    if s == dict(rho=0.05, adaptive=False, eta=0.0)  # sam_train_step's default: plain SAM
]


@pytest.mark.parametrize("sam_kwargs,base_kwargs,compiled", FIT_CASES)
def test_fit_with_sam_train_step_matches_the_reference(sam_kwargs, base_kwargs, compiled):
    """Exact same-batch SAM under ``fit``, and the logged loss is the clean pass at ``w``."""
    base_kwargs = {**base_kwargs, "momentum": _keras_momentum(base_kwargs["momentum"])}
    batches = parity.batches()
    got, logged = [], []
    with floatx("float64"):
        model = _parity_model()
        base = keras.optimizers.SGD(base_kwargs["lr"], momentum=base_kwargs["momentum"])
        model.compile(optimizer=SAM(base, **sam_kwargs) if compiled == "SAM" else base,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            got.append(model.get_weights()), logged.append(logs["loss"])))
        model.fit(np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]),
                  batch_size=parity.BATCH, shuffle=False, verbose=0, callbacks=[record])
    want = parity.reference_trajectory(sam_kwargs, base_kwargs)
    parity.assert_trajectories_close(got, want, parity.tolerance("float64"))
    # Keras logs the running mean over the epoch of the loss at w (before each step)
    clean = [ref.mlp_loss(w, x, y) for w, (x, y) in zip([parity.init_params()] + want, batches)]
    np.testing.assert_allclose(logged, np.cumsum(clean) / np.arange(1, len(clean) + 1),
                               rtol=0, atol=1e-10)
    x, y = batches[0]
    g = ref.mlp_loss_and_grad(parity.init_params(), x, y)[1]
    perturbed = ref.ascend(parity.init_params(), ref.perturbation(g, parity.init_params(),
                                                                  **sam_kwargs))
    assert abs(ref.mlp_loss(perturbed, x, y) - logged[0]) > 1e-4  # what the seed logged instead


def test_fit_passes_sample_weights():
    """Weights ``[1, 1, 1, 1, 0, 0, 0, 0]`` with Keras' mean over the batch: half the loss of the
    first four samples. ``e`` is scale-free, so the step is the reference's on them at lr / 2."""
    x, y = parity.batches()[0]
    with floatx("float64"):
        model = _parity_model()
        model.compile(optimizer=SAM(keras.optimizers.SGD(0.1)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, sample_weight=np.repeat([1.0, 0.0], 4), batch_size=8,
                            verbose=0)
    params = parity.init_params()
    want = ref.sam_step(params, lambda w: ref.mlp_loss_and_grad(w, x[:4], y[:4])[1],
                        lambda w, d: ref.sgd_update(w, d, ref.sgd_init(w), lr=0.05)[0])
    for a, b in zip(model.get_weights(), want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert history.history["loss"][0] == pytest.approx(ref.mlp_loss(params, x[:4], y[:4]) / 2,
                                                       abs=1e-10)


def test_batchnorm_statistics_come_from_pass_one_only_and_dropout_redraws():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Dense(4)(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.Dropout(0.3)(hidden))
    model = SAMModel(inputs, outputs)
    twin = keras.Model(inputs, outputs)  # the same layers, so the same weights
    x, y = (t.astype("float32") if t.dtype.kind == "f" else t for t in parity.batches()[0])
    bn, dropout = model.layers[2], model.layers[3]
    seed = dropout.seed_generator.state.numpy()
    w0 = model.get_weights()

    twin(x, training=True)  # pass 1 alone
    stats = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    twin(x, training=True)  # a second pass would move them again
    assert np.abs(bn.moving_mean.numpy() - stats[0]).max() > 1e-3
    model.set_weights(w0)

    model.compile(optimizer=SAM(keras.optimizers.SGD(0.1), rho=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), stats[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), stats[1], rtol=0, atol=1e-6)
    # the twin's two calls and SAM's two passes drew four masks: the random state is not rewound
    np.testing.assert_array_equal(dropout.seed_generator.state.numpy(), seed + [0, 4])


def test_per_output_losses_are_logged_from_the_clean_pass():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    model = SAMModel(inputs, [keras.layers.Dense(3, name="a")(hidden),
                              keras.layers.Dense(2, name="b")(hidden)])
    x, y = parity.batches()[0]
    x = x.astype("float32")
    ya, yb = y, y % 2
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True) for _ in range(2)]
    clean = [float(f(t, p)) for f, t, p in zip(losses, (ya, yb), model(x, training=True))]
    model.compile(optimizer=SAM(keras.optimizers.SGD(0.1), rho=0.5), loss=losses)
    logs = model.fit(x, (ya, yb), batch_size=8, verbose=0).history
    assert logs["a_loss"][0] == pytest.approx(clean[0], abs=1e-6)
    assert logs["b_loss"][0] == pytest.approx(clean[1], abs=1e-6)
    assert logs["loss"][0] == pytest.approx(sum(clean), abs=1e-6)


def test_sam_train_step_rejects_a_second_rho():
    class Model(keras.Model):
        def train_step(self, data):
            return sam_train_step(self, data, rho=0.1)

    inputs = keras.Input((5,))
    model = Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer=SAM(keras.optimizers.SGD(0.1), rho=0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = parity.batches()[0]
    with pytest.raises(ValueError, match="rho"):
        model.fit(x.astype("float32"), y, verbose=0)


def test_plain_fit_trains_with_sam_in_transparent_mode():
    """A bare ``compile(optimizer=SAM(...))`` + ``fit`` takes SAM steps (transparent mode): with
    the one batch repeated, two fit steps are one exact SAM step, unlike the base optimizer's."""
    x, y = parity.batches()[0]
    x = x.astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def model_with(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        model.compile(optimizer=optimizer, loss=loss)
        return model

    sam = model_with(SAM(keras.optimizers.SGD(0.1), rho=0.5))
    sam.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)  # pass 1, then pass 2
    assert int(sam.optimizer.iterations) == 1
    explicit = model_with(SAM(keras.optimizers.SGD(0.1), rho=0.5))
    loss_fn = lambda v, x, y: loss(y, explicit(x))  # noqa: E731
    _two_pass_step(explicit.optimizer, explicit.trainable_variables, loss_fn)(x, y)
    plain = model_with(keras.optimizers.SGD(0.1))
    plain.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for a, b, c in zip(sam.get_weights(), explicit.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert max(np.abs(a - c).max() for a, c in zip(sam.get_weights(), plain.get_weights())) > 1e-4


# --- configuration, validation, checkpoints ------------------------------------------------------

def test_get_config_round_trip():
    opt = SAM(keras.optimizers.Adam(1e-3), rho=0.1, adaptive=True, use_gc=True,
              perturb_eps=1e-10, eta=0.01, name="my_sam")
    config = opt.get_config()
    again = SAM.from_config(config)
    assert again.get_config() == config
    assert isinstance(again.base_optimizer, keras.optimizers.Adam)
    assert again.base_optimizer is not opt.base_optimizer
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, SAM) and restored.get_config() == config


def test_saved_model_keeps_the_base_optimizers_state(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer=SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = parity.batches()[0]
    loss_fn = lambda v, x, y: model.compute_loss(y=y, y_pred=model(x))  # noqa: E731
    for _ in range(2):
        _two_pass_step(model.optimizer, model.trainable_variables, loss_fn)(x.astype("float32"), y)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, SAM) and loaded.optimizer.rho == 0.1
    assert int(loaded.optimizer.iterations) == 2
    momentums = [m.numpy() for m in model.optimizer.base_optimizer.momentums]
    assert np.abs(momentums[0]).max() > 0
    for a, b in zip(loaded.optimizer.base_optimizer.momentums, momentums):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("kwargs,name", [
    (dict(rho=-0.1), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(eta=-0.01), "eta"),
    (dict(perturb_eps=-1e-12), "perturb_eps"),
    (dict(base_optimizer="sgd"), "base_optimizer"),
    (dict(base_optimizer=keras.optimizers.SGD), "base_optimizer"),
    (dict(base_optimizer=keras.optimizers.SGD(loss_scale_factor=128.0)), "base_optimizer"),
    (dict(base_optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())),
     "base_optimizer"),
])
def test_invalid_settings_raise_naming_the_argument(kwargs, name):
    kwargs = {"base_optimizer": keras.optimizers.SGD(), **kwargs}
    with pytest.raises(ValueError, match=name):
        SAM(**kwargs)


@pytest.mark.parametrize("kwarg,value,hint", [
    ("weight_decay", 1e-4, True), ("learning_rate", 0.1, True), ("momentum", 0.9, False),
    ("nesterov", True, False),
])
def test_base_optimizer_arguments_are_refused_not_ignored(kwarg, value, hint):
    """The base optimizer's own arguments raise (weight decay and the learning rate pointing at
    it); the Keras options SAM applies itself are tested in test_tf_keras_options.py."""
    with pytest.raises(ValueError, match=f"`{kwarg}`") as raised:
        SAM(keras.optimizers.SGD(), **{kwarg: value})
    assert ("base_optimizer" in str(raised.value)) == hint


@pytest.mark.parametrize("kwarg,value", [
    ("clipnorm", 1.0), ("clipvalue", 1.0), ("global_clipnorm", 1.0), ("use_ema", True),
    ("loss_scale_factor", 128.0), ("gradient_accumulation_steps", 2), ("clipnorm", None),
])
def test_keras_optimizer_options_are_accepted_and_kept(kwarg, value):
    opt = SAM(keras.optimizers.SGD(), **{kwarg: value})
    assert getattr(opt, kwarg) == value
    assert opt.get_config().get(kwarg) == value


def test_learning_rate_and_iterations_belong_to_the_base_optimizer():
    base = keras.optimizers.SGD(0.1)
    opt = SAM(base)
    opt.learning_rate = 0.03
    assert float(base.learning_rate) == pytest.approx(0.03)
    variables = [tf.Variable([1.0, 2.0])]
    _two_pass_step(opt, variables, lambda v, x, y: tf.reduce_sum(v[0] ** 2))(None, None)
    assert int(opt.iterations) == int(base.iterations) == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_first_and_second_step_must_alternate(compiled):
    w = tf.Variable([1.0, -2.0])
    opt = SAM(keras.optimizers.SGD(learning_rate=0.1), rho=0.1)
    first = tf.function(opt.first_step) if compiled else opt.first_step
    second = tf.function(opt.second_step) if compiled else opt.second_step
    grads = [tf.constant([0.5, 0.25])]
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step(grads, [w])
    first(grads, [w])
    perturbed = w.numpy().copy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="first_step\\(\\) called twice"):
        first(grads, [w])
    np.testing.assert_array_equal(w.numpy(), perturbed)  # the saved w was not overwritten
    second(grads, [w])
    stepped = w.numpy().copy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="without first_step"):
        second(grads, [w])
    np.testing.assert_array_equal(w.numpy(), stepped)  # no stale w restored
