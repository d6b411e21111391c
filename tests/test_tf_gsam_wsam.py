"""TensorFlow/Keras 3 GSAM and WSAM: parity with the reference, special cases, the seed README."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import parity  # noqa: E402
from test_tf_sam import (  # noqa: E402
    SAMModel,
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
from sam_edu.tf import GSAM, SAM, WSAM  # noqa: E402


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


def _run(make_optimizer, dtype, mode, base_kwargs):
    """The parity problem through first_step/second_step; the weights after every step."""
    variables = [tf.Variable(p.astype(dtype)) for p in parity.init_params()]
    got = []
    with floatx(dtype):
        base = keras.optimizers.SGD(learning_rate=base_kwargs["lr"],
                                    momentum=base_kwargs["momentum"])
        step = _two_pass_step(make_optimizer(base), variables, _mlp_loss)
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


# --- the TF2 seed README, as written (only the import changed) -----------------------------------

@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_seed_readme_gsam():
    from sam_edu.tf import GSAM  # README: from sam import GSAM

    x_train, y_train = _seed_data()
    train_dataset = tf.data.Dataset.from_tensor_slices((x_train[:48], y_train[:48])).batch(16)
    val_dataset = tf.data.Dataset.from_tensor_slices((x_train[48:], y_train[48:])).batch(16)
    model = _seed_model(SAMModel)  # train_step: sam_train_step

    # --- README ---
    # Instantiate a base optimizer
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)

    # Define a rho scheduler (example: exponential decay)
    rho_scheduler = tf.keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.05, decay_steps=1000, decay_rate=0.95)

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
    model.fit(train_dataset, validation_data=val_dataset, epochs=10, verbose=0)
    # --- end README ---

    assert int(optimizer.iterations) == 30
    assert float(optimizer.current_rho()) == pytest.approx(0.05 * 0.95 ** (30 / 1000), rel=1e-6)
    init = _seed_model().get_weights()
    assert np.abs(model.get_weights()[0] - init[0]).max() > 1e-3


def test_seed_readme_wsam_arguments_are_looksams():
    from sam_edu.tf import WSAM  # README: from sam import WSAM

    model = _seed_model()
    base_opt = tf.keras.optimizers.Adam(learning_rate=1e-3)
    with pytest.raises(ValueError, match="(?s)`k` and `alpha` are LookSAM's.*`gamma`"):
        # --- README ---
        WSAM(
            model=model,
            base_optimizer=base_opt,
            rho=0.1,
            k=10,
            alpha=0.7,
            adaptive=False,
            use_gc=False,
            perturb_eps=1e-12
        )
        # --- end README ---


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
    (GSAM, dict(clipnorm=1.0), "`clipnorm`"),
    (WSAM, dict(rho=-0.1), "rho"),
    (WSAM, dict(gamma=1.0), "gamma"),
    (WSAM, dict(gamma=-0.1), "gamma"),
    (WSAM, dict(gamma=float("nan")), "gamma"),
    (WSAM, dict(max_norm=0.0), "max_norm"),
    (WSAM, dict(max_norm=-1.0), "max_norm"),
    (WSAM, dict(model=keras.layers.Dense(3)), "model"),
    (WSAM, dict(base_optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2)),
     "base_optimizer accumulates"),
    (WSAM, dict(use_gc=True), "`use_gc`"),
    (WSAM, dict(k=10), "LookSAM"),
])
def test_invalid_settings_raise_naming_the_argument(cls, kwargs, name):
    kwargs = {"model": None, "base_optimizer": keras.optimizers.SGD(), **kwargs}
    if cls is GSAM:
        kwargs.setdefault("rho_scheduler", 0.05)
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)
