"""Keras 3 optimizer arguments on the TF SAM family (issue 6, item 3): each one has its effect.

``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
``ema_overwrite_frequency``, ``loss_scale_factor``, ``gradient_accumulation_steps`` and ``name``
on SAM, GSAM, WSAM, LookSAM and BSAM: every effect is checked against a hand computation on a small
float64 quadratic driven through the explicit ``first_step`` / ``second_step`` API (and a few
``model.fit`` runs), and every combination that cannot work raises a ``ValueError`` naming the
argument.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from sam_edu import tf as samtf  # noqa: E402
from sam_edu.tf import BSAM, GSAM, SAM, WSAM, LookSAM, SAMSequential  # noqa: E402

LR, RHO = 0.1, 0.3
WRAPPERS = ["SAM", "GSAM", "WSAM", "LookSAM"]
KINDS = WRAPPERS + ["BSAM"]

# --- a float64 quadratic: L_b(w) = sum_i 0.5 * sum(a_i * (w_i - c_bi)^2), g = a * (w - c_b) -----
_rng = np.random.default_rng(0)
CURVATURE = [np.array([[2.0, 3.0], [1.5, 4.0], [2.5, 1.0]]), np.array([0.3, 0.2])]
CENTRES = [[3.0 * _rng.normal(size=(3, 2)), 3.0 * _rng.normal(size=(2,))] for _ in range(6)]
W0 = [_rng.normal(size=(3, 2)), _rng.normal(size=(2,))]
NOISE = [[_rng.normal(size=(3, 2)), _rng.normal(size=(2,))] for _ in range(6)]


def grad(values, batch=0):
    """``g_b(w) = a * (w - c_b)``, one NumPy array per tensor."""
    return [a * (w - c) for a, w, c in zip(CURVATURE, values, CENTRES[batch])]


def norm(tree):
    return np.sqrt(sum(np.sum(t * t) for t in tree))


def clip(tree, option, value):
    """What Keras' clipping does to a list of tensors, by hand."""
    if option == "clipnorm":  # each tensor on its own
        return [t * value / max(np.sqrt(np.sum(t * t)), value) for t in tree]
    if option == "global_clipnorm":  # all tensors together
        return [t * value / max(norm(tree), value) for t in tree]
    assert option == "clipvalue"
    return [np.clip(t, -value, value) for t in tree]


def hand_sam_direction(values, batch=0):
    """SAM's ``d = g_adv = g(w + rho g / ||g||)``."""
    g = grad(values, batch)
    return grad([w + RHO * t / norm(g) for w, t in zip(values, g)], batch)


@contextlib.contextmanager
def float64():
    old = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(old[0])
        keras.config.set_dtype_policy(old[1])


@pytest.fixture
def f64():
    with float64():
        yield


def make(kind, base=None, k=2, decouple=False, **options):
    """One optimizer of ``kind``; the wrappers around ``base`` (default ``SGD(LR)``)."""
    base = keras.optimizers.SGD(LR) if base is None else base
    if kind == "SAM":
        return SAM(base, rho=RHO, **options)
    if kind == "GSAM":
        return GSAM(None, base, RHO, alpha=0.4, **options)
    if kind in ("WSAM", "WSAM-decoupled"):
        return WSAM(None, base, rho=RHO, gamma=0.8, decouple=decouple or kind != "WSAM",
                    **options)
    if kind == "LookSAM":  # k=2 by default: a SAM step, then a cheap step
        return LookSAM(base, rho=RHO, k=k, alpha=0.7, **options)
    assert kind == "BSAM"
    return BSAM(num_data=50, lr=LR, rho=0.05, weight_decay=1e-3, seed=0, **options)


def variables_at(values):
    return [tf.Variable(np.array(v, dtype="float64")) for v in values]


def values_of(variables):
    return [v.numpy() for v in variables]


def step(opt, variables, batch=0, step_index=0, scale=1.0, first=None, second=None):
    """One step through the explicit API, the gradients (times ``scale``) computed by hand.

    Returns ``w + e`` after ``first_step`` (``None`` on a LookSAM cheap step)."""
    first = opt.first_step if first is None else first
    second = opt.second_step if second is None else second

    def gradients():
        return [tf.constant(scale * t) for t in grad(values_of(variables), batch)]

    if isinstance(opt, BSAM):
        opt.noisy_step(variables, noise=[tf.constant(n) for n in NOISE[step_index]])
    perturbed = first(gradients(), variables)
    if perturbed is not None and not bool(perturbed):
        return None  # LookSAM's cheap step: the base optimizer has stepped already
    at_w_plus_e = values_of(variables)
    second(gradients(), variables)
    return at_w_plus_e


class Twin:
    """An unclipped, unaveraged copy of an optimizer with base ``SGD(1.0)``: ``direction(w)`` is
    the ``d`` its base step takes at ``w`` (state such as LookSAM's ``g_v`` follows along, since
    it never depends on clipping or on the base's learning rate)."""

    def __init__(self, kind, **kwargs):
        self.opt = make(kind, base=keras.optimizers.SGD(1.0), **kwargs)
        self.variables = variables_at(W0)

    def direction(self, values, batch=0):
        for v, w in zip(self.variables, values):
            v.assign(w)
        step(self.opt, self.variables, batch)
        return [w - v.numpy() for w, v in zip(values, self.variables)]


# --- clipping: the direction d of the base step, never the ascent --------------------------------

CLIPS = [("clipnorm", 5.0), ("clipvalue", 4.0), ("global_clipnorm", 5.0)]


@pytest.mark.parametrize("option,value", CLIPS, ids=[c[0] for c in CLIPS])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_clipping_clips_the_base_direction_not_the_ascent(f64, kind, option, value):
    opt = make(kind, **{option: value})
    twin = Twin(kind)
    variables = variables_at(W0)
    clipped_something = False
    for t in range(2):  # LookSAM: a SAM step, then a cheap step
        w = values_of(variables)
        d = twin.direction(w)
        if kind == "SAM":
            for a, b in zip(d, hand_sam_direction(w)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        at_w_plus_e = step(opt, variables, step_index=t)
        if at_w_plus_e is not None:  # the ascent uses g unclipped: e = rho g / ||g||
            g = grad(w)
            for a, b, gi in zip(at_w_plus_e, w, g):
                np.testing.assert_allclose(a - b, RHO * gi / norm(g), rtol=0, atol=1e-12)
        want = [wi - LR * di for wi, di in zip(w, clip(d, option, value))]
        for a, b in zip(values_of(variables), want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        clipped_something |= max(np.abs(a - b).max()
                                 for a, b in zip(clip(d, option, value), d)) > 1e-3
    assert clipped_something  # the problem is one where clipping matters
    if option == "clipnorm":  # per tensor: the small bias gradient passes unchanged
        assert norm([d[1]]) < value < norm([d[0]])


@pytest.mark.parametrize("option,value", CLIPS, ids=[c[0] for c in CLIPS])
def test_bsam_clips_g_adv(f64, option, value):
    """bSAM(clip) fed (g, g_adv) == bSAM() fed (g, clip(g_adv)): clipping acts on g_adv only."""
    clipped, plain = make("BSAM", **{option: value}), make("BSAM")
    a, b = variables_at(W0), variables_at(W0)
    for t in range(2):
        step(clipped, a, step_index=t)
        # the same step by hand: clip g_adv before bSAM sees it
        plain.noisy_step(b, noise=[tf.constant(n) for n in NOISE[t]])
        plain.first_step([tf.constant(x) for x in grad(values_of(b))], b)
        g_adv = grad(values_of(b))
        assert max(np.abs(x - y).max() for x, y in zip(clip(g_adv, option, value), g_adv)) > 1e-3
        plain.second_step([tf.constant(x) for x in clip(g_adv, option, value)], b)
        for x, y in zip(values_of(a), values_of(b)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    unclipped = make("BSAM")
    c = variables_at(W0)
    for t in range(2):
        step(unclipped, c, step_index=t)
    assert np.abs(values_of(c)[0] - values_of(a)[0]).max() > 1e-6


# --- EMA ------------------------------------------------------------------------------------------

def ema(trajectory, momentum):
    """The moving average of the post-step weights; the first step starts it at w_1."""
    average = [np.array(w) for w in trajectory[0]]
    for w in trajectory[1:]:
        average = [momentum * a + (1 - momentum) * x for a, x in zip(average, w)]
    return average


@pytest.mark.parametrize("kind", KINDS + ["WSAM-decoupled"])
def test_ema_is_the_average_of_w_after_each_step_and_finalize_writes_it(f64, kind):
    momentum = 0.7
    opt = make(kind, use_ema=True, ema_momentum=momentum)
    variables = variables_at(W0)
    trajectory = []
    for t in range(4):
        w = values_of(variables)
        step(opt, variables, batch=t, step_index=t)
        if kind == "SAM":  # the weights follow plain SAM: the EMA never writes into them here
            want = [wi - LR * di for wi, di in zip(w, hand_sam_direction(w, batch=t))]
            for a, b in zip(values_of(variables), want):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        trajectory.append(values_of(variables))
    want = ema(trajectory, momentum)
    averages = [opt._model_variables_moving_average[opt._get_variable_index(v)].numpy()
                for v in variables]
    for a, b in zip(averages, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert np.abs(want[0] - trajectory[-1][0]).max() > 1e-3  # the average is not just w
    opt.finalize_variable_values(variables)
    for a, b in zip(values_of(variables), want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["SAM", "LookSAM"])
def test_ema_overwrite_frequency_writes_the_average_every_f_sam_steps(f64, kind):
    momentum, frequency = 0.6, 2
    opt = make(kind, k=1, use_ema=True, ema_momentum=momentum, ema_overwrite_frequency=frequency)
    variables = variables_at(W0)
    w, average = [np.array(x) for x in W0], None
    for t in range(5):
        w = [wi - LR * di for wi, di in zip(w, hand_sam_direction(w, batch=t))]
        average = w if average is None else [momentum * a + (1 - momentum) * x
                                             for a, x in zip(average, w)]
        if (t + 1) % frequency == 0:
            w = average
        step(opt, variables, batch=t, step_index=t)
        for a, b in zip(values_of(variables), w):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert int(opt.iterations) == 5


# --- loss scale -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS + ["WSAM-decoupled"])
def test_loss_scale_factor_divides_each_pass_gradient(f64, kind):
    """Scaled gradients into an optimizer with ``loss_scale_factor`` == unscaled ones into one
    without; unscaled ones into it take a 256 times smaller step: the factor is not ignored."""
    factor = 256.0
    scaled, plain, misfed = make(kind, loss_scale_factor=factor), make(kind), \
        make(kind, loss_scale_factor=factor)
    assert float(scaled.scale_loss(tf.constant(2.0, "float64"))) == 2.0 * factor
    assert float(plain.scale_loss(tf.constant(2.0, "float64"))) == 2.0
    a, b, c = variables_at(W0), variables_at(W0), variables_at(W0)
    for t in range(2):  # LookSAM: a SAM step and a cheap step
        step(scaled, a, batch=t, step_index=t, scale=factor)
        step(plain, b, batch=t, step_index=t)
        step(misfed, c, batch=t, step_index=t)
        for x, y in zip(values_of(a), values_of(b)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    assert np.abs(values_of(c)[0] - values_of(a)[0]).max() > 1e-3


def _data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(24, 5)).astype("float32"), rng.integers(0, 3, size=24)


def _compiled(mode, optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)]
    model = SAMSequential(layers) if mode == "sam_train_step" else keras.Sequential(layers)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("mode", ["sam_train_step", "transparent"])
def test_loss_scale_factor_under_fit_is_applied_and_removed(mode):
    """Under ``fit`` each pass's loss is scaled (``first_step`` sees gradients 128 times larger)
    and the step divides it out: the weights equal the unscaled run's."""
    x, y = _data()
    runs = {}
    for factor in (None, 128.0):
        opt = SAM(keras.optimizers.SGD(0.1), rho=0.1, loss_scale_factor=factor)
        model = _compiled(mode, opt)
        seen = tf.Variable(tf.zeros((4, 3)), trainable=False)  # the last kernel's g at first_step
        original = opt.first_step

        def spy(gradients, variables, original=original, seen=seen):
            seen.assign(tf.convert_to_tensor(gradients[2]))
            return original(gradients, variables)

        opt.first_step = spy
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 6 fit steps
        runs[factor] = model.get_weights(), seen.numpy(), int(opt.iterations)
    (w_plain, g_plain, n_plain), (w_scaled, g_scaled, n_scaled) = runs[None], runs[128.0]
    assert n_plain == n_scaled == (6 if mode == "sam_train_step" else 3)
    assert np.abs(g_plain).max() > 1e-3
    np.testing.assert_allclose(g_scaled, 128.0 * g_plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(w_scaled, w_plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --- gradient accumulation ------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_gradient_accumulation_perturbs_each_micro_batch_and_steps_once(f64, kind, compiled):
    n = 3
    opt = make(kind, k=1, gradient_accumulation_steps=n)
    twin = Twin(kind, k=1)
    first = tf.function(opt.first_step) if compiled else None
    second = tf.function(opt.second_step) if compiled else None
    variables = variables_at(W0)
    w = [np.array(x) for x in W0]
    directions = []
    for t in range(2 * n):  # two windows of n micro-batches, each its own quadratic
        d = twin.direction(w, batch=t)  # the micro-batch's own perturbation, at the base's w
        if kind == "SAM":
            for a, b in zip(d, hand_sam_direction(w, batch=t)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        directions.append(d)
        at_w_plus_e = step(opt, variables, batch=t, first=first, second=second)
        g = grad(w, batch=t)
        for a, b, gi in zip(at_w_plus_e, w, g):  # perturbed by this micro-batch's g, from w
            np.testing.assert_allclose(a - b, RHO * gi / norm(g), rtol=0, atol=1e-12)
        if (t + 1) % n == 0:  # the base steps once, with the mean direction
            mean = [sum(parts) / n for parts in zip(*directions)]
            w = [wi - LR * di for wi, di in zip(w, mean)]
            directions = []
        for a, b in zip(values_of(variables), w):  # in between, w stays where it was
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        assert int(opt.iterations) == (t + 1) // n  # base steps, not micro-batches


def test_gradient_accumulation_with_ema_and_clipping_act_per_base_step(f64):
    n, momentum, clipnorm = 2, 0.5, 5.0
    opt = make("SAM", gradient_accumulation_steps=n, use_ema=True, ema_momentum=momentum,
               clipnorm=clipnorm)
    variables = variables_at(W0)
    w, trajectory = [np.array(x) for x in W0], []
    for t in range(2 * n):
        step(opt, variables, batch=t)
        if (t + 1) % n == 0:
            mean = [sum(parts) / n for parts in zip(*[hand_sam_direction(w, batch=b)
                                                      for b in range(t + 1 - n, t + 1)])]
            w = [wi - LR * di for wi, di in zip(w, clip(mean, "clipnorm", clipnorm))]
            trajectory.append(w)
        for a, b in zip(values_of(variables), w):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    opt.finalize_variable_values(variables)
    for a, b in zip(values_of(variables), ema(trajectory, momentum)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["sam_train_step", "transparent"])
def test_gradient_accumulation_under_fit_counts_base_steps(mode):
    x, y = _data()
    model = _compiled(mode, SAM(keras.optimizers.SGD(0.1), rho=0.1,
                                gradient_accumulation_steps=3))
    before = model.get_weights()
    seen = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(model.get_weights()))
    epochs = 1 if mode == "sam_train_step" else 2  # transparent: 2 fit steps per SAM step
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations) == 2
    assert int(model.optimizer._iterations) == 6  # SAM's own counter: the micro-batches
    if mode == "transparent":  # the weights move at every call (to w + e and back)
        return
    for i, weights in enumerate(seen):  # the weights move after micro-batches 3 and 6 only
        moved = max(np.abs(a - b).max() for a, b in zip(weights, before)) > 0
        assert moved == (i % 3 == 2), i
        before = weights


# --- EMA under fit --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sam_train_step", "transparent"])
def test_fit_ends_with_the_moving_average_in_the_weights(mode):
    momentum = 0.5
    x, y = _data()
    model = _compiled(mode, SAM(keras.optimizers.SGD(0.1), rho=0.1, use_ema=True,
                                ema_momentum=momentum))
    seen = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(model.get_weights()))
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[callback])  # 6 batches
    # transparent mode: a SAM step ends at every second batch; in between the model is at w + e
    trajectory = seen if mode == "sam_train_step" else seen[1::2]
    assert int(model.optimizer.iterations) == len(trajectory)
    want = ema(trajectory, momentum)
    assert max(np.abs(a - b).max() for a, b in zip(want, trajectory[-1])) > 1e-4
    for a, b in zip(model.get_weights(), want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --- name, get_config / from_config ---------------------------------------------------------------

def _options(kind, clip_option):
    options = dict({clip_option: 1.5}, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3,
                   loss_scale_factor=64.0, name=f"my_{kind.lower()}")
    if kind in ("SAM", "GSAM", "WSAM"):  # WSAM coupled here; LookSAM (k=2) and bSAM refuse it
        options["gradient_accumulation_steps"] = 2
    return options


@pytest.mark.parametrize("clip_option", [c[0] for c in CLIPS])
@pytest.mark.parametrize("kind", KINDS)
def test_get_config_round_trips_every_option(kind, clip_option):
    options = _options(kind, clip_option)
    opt = make(kind, **options)
    assert opt.name == options["name"]
    config = opt.get_config()
    for arg, value in options.items():
        assert config[arg] == value, arg
        assert getattr(opt, arg) == value, arg
    cls = type(opt)
    again = cls.from_config(config)
    assert again.get_config() == config
    for arg, value in options.items():
        assert getattr(again, arg) == value, arg
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is cls and restored.get_config() == config


def test_default_config_leaves_the_options_out():
    config = make("SAM").get_config()
    assert config["name"] == "sam"
    for arg in ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum",
                "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps"):
        assert arg not in config


# --- what cannot work raises, naming the argument -------------------------------------------------

INVALID = [
    (dict(clipnorm=0), "clipnorm"),
    (dict(clipnorm=-1.0), "clipnorm"),
    (dict(clipvalue=0.0), "clipvalue"),
    (dict(global_clipnorm=-2.0), "global_clipnorm"),
    (dict(clipnorm=1.0, clipvalue=1.0), "clipnorm.*clipvalue"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), "clipnorm.*global_clipnorm"),
    (dict(loss_scale_factor=0.0), "loss_scale_factor"),
    (dict(loss_scale_factor=-128.0), "loss_scale_factor"),
    (dict(ema_momentum=0.9), "ema_momentum"),
    (dict(ema_overwrite_frequency=5), "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_momentum=1.5), "ema_momentum"),
    (dict(use_ema=True, ema_overwrite_frequency=2.5), "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_overwrite_frequency=0), "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_overwrite_frequency=True), "ema_overwrite_frequency"),
    (dict(clipnorm=True), "clipnorm"),
    (dict(loss_scale_factor=True), "loss_scale_factor"),
    (dict(momentum=0.9), "momentum"),
]
ACCUMULATION = [(dict(gradient_accumulation_steps=s), "gradient_accumulation_steps")
                for s in (1, 0, 2.5, True, "2")]


@pytest.mark.parametrize("kwargs,match", INVALID + ACCUMULATION)
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_option_raises_naming_it(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(kind, k=1, **kwargs)


@pytest.mark.parametrize("arg", ["learning_rate", "weight_decay"])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_learning_rate_and_weight_decay_point_at_the_base_optimizer(kind, arg):
    with pytest.raises(ValueError, match=f"`{arg}`.*base_optimizer"):
        make(kind, **{arg: 0.1})


def test_bsam_learning_rate_points_at_lr():
    with pytest.raises(ValueError, match="`learning_rate`.*`lr`"):
        make("BSAM", learning_rate=0.1)


@pytest.mark.parametrize("kind,kwargs", [
    ("LookSAM", dict(k=2)),
    ("WSAM", dict(k=1, decouple=True)),
    ("BSAM", dict()),
], ids=["LookSAM-k2", "WSAM-decoupled", "BSAM"])
def test_gradient_accumulation_refused_where_undefined(kind, kwargs):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make(kind, gradient_accumulation_steps=2, **kwargs)
    make(kind, **kwargs)  # the same settings without accumulation are fine


def test_wsam_decoupled_refuses_a_base_optimizer_that_accumulates():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make("WSAM", decouple=True,
             base=keras.optimizers.SGD(LR, gradient_accumulation_steps=2))


@pytest.mark.parametrize("base", [
    lambda: keras.optimizers.SGD(LR, loss_scale_factor=128.0),
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR)),
], ids=["loss_scale_factor", "LossScaleOptimizer"])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_base_optimizer_with_a_loss_scale_is_refused(kind, base):
    with pytest.raises(ValueError, match="base_optimizer.*(loss_scale_factor|LossScaleOptimizer)"):
        make(kind, base=base())


@pytest.mark.parametrize("mode", ["sam_train_step"])
def test_mixed_float16_loss_scale_optimizer_is_refused_under_fit(mode):
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _compiled(mode, SAM(keras.optimizers.SGD(0.1)))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        with pytest.raises(ValueError, match="LossScaleOptimizer.*mixed_float16"):
            model.fit(x, y, batch_size=8, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- use_gc: Keras kernels keep the output axis last ----------------------------------------------

def test_centralize_gradient_over_keras_kernel_layouts():
    rng = np.random.default_rng(2)
    for shape in [(4, 3), (3, 3, 2, 5)]:  # Dense (in, out), Conv2D (h, w, in, out)
        g = rng.normal(size=shape) + 1.0
        got = samtf.centralize_gradient(tf.constant(g)).numpy()
        axes = tuple(range(len(shape) - 1))
        np.testing.assert_allclose(got, g - g.mean(axis=axes, keepdims=True), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.mean(axis=axes), 0.0, atol=1e-12)  # per output channel
        assert np.abs(got.mean(axis=tuple(range(1, len(shape))))).max() > 1e-3  # not over axis 0
    bias = rng.normal(size=(5,))
    np.testing.assert_array_equal(samtf.centralize_gradient(tf.constant(bias)).numpy(), bias)


@pytest.mark.parametrize("kind", ["SAM", "WSAM", "LookSAM"])
def test_use_gc_centralises_a_conv_kernel_ascent_per_output_channel(f64, kind):
    rng = np.random.default_rng(3)
    params = [rng.normal(size=(3, 3, 2, 4)), rng.normal(size=(4,))]
    g = [rng.normal(size=(3, 3, 2, 4)) + 0.5, rng.normal(size=(4,))]
    variables = variables_at(params)
    opt = make(kind, k=1, use_gc=True)
    opt.first_step([tf.constant(t) for t in g], variables)
    centred = [g[0] - g[0].mean(axis=(0, 1, 2), keepdims=True), g[1]]
    for v, p, c in zip(variables, params, centred):
        np.testing.assert_allclose(v.numpy() - p, RHO * c / norm(centred), rtol=0, atol=1e-12)
