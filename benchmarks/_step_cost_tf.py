"""TensorFlow rows of ``benchmarks/step_cost.py``: keras SGD, the floors and sam_edu.tf, each
whole training step one ``tf.function``, with XLA where it traces (see step_cost.py).

The floors get the batch twice, as two separate inputs holding the same values, so that neither
grappler nor XLA can merge their two passes. Every gradient a floor computes is read: the floor
steps with ``g1 + g2``, ``floor bSAM`` sums both gradients and its noise into one number.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _step_cost_common import Runner, log, tensor_arrays  # noqa: E402

from sam_edu.tf import BSAM, GSAM, SAM, WSAM, LookSAM  # noqa: E402


def set_threads(threads: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def versions() -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


def make_model(case: str, sizes: dict) -> keras.Model:
    if case == "cnn":
        c = sizes["channels"]
        s = sizes["image_size"]
        return keras.Sequential([
            keras.Input((s, s, 3)),
            keras.layers.Conv2D(c, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(2 * c, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(2 * c, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(4 * c, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ])
    widths = sizes["widths"]
    layers = [keras.Input((widths[0],))]
    for i, b in enumerate(widths[1:]):
        layers.append(keras.layers.Dense(b, activation="relu" if i < len(widths) - 2 else None))
    return keras.Sequential(layers)


def build(case: str, sizes: dict, hp: dict, peer_foreach: bool, seed: int) -> tuple[list, dict]:
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    lr, momentum, rho, k = hp["lr"], hp["momentum"], hp["rho"], hp["looksam_k"]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if case == "tensors":
        init, g_np, t_np = tensor_arrays(sizes, rng)
        data = ([tf.constant(g) for g in g_np], [tf.constant(t) for t in t_np],
                [tf.constant(t.copy()) for t in t_np])

        def new_variables():
            return [tf.Variable(w) for w in init]

        def first_grad(variables, data):
            return list(data[0])

        def grad_a(variables, data):  # gradient of 0.5 ||w - t||^2
            return [v - t for v, t in zip(variables, data[1])]

        def grad_b(variables, data, after=None):
            return [v - t for v, t in zip(variables, data[2])]
        info = dict(parameters=sum(w.size for w in init), tensors=len(init),
                    tensor_shapes=sorted({str(list(a.shape)) for a in init}), input_shape=None)
    else:
        template = make_model(case, sizes)
        init = [w.copy() for w in template.get_weights()]
        batch = sizes["batch"]
        if case == "cnn":
            x = rng.random((batch, sizes["image_size"], sizes["image_size"], 3), np.float32)
        else:
            x = rng.random((batch, sizes["widths"][0]), np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        data = (tf.constant(x), tf.constant(y), tf.constant(x.copy()), tf.constant(y.copy()))
        models = {}

        def new_variables():
            model = make_model(case, sizes)
            model.set_weights(init)
            variables = model.trainable_variables
            models[id(variables[0])] = model
            return variables

        def _grad(variables, x, y):
            model = models[id(variables[0])]
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, variables)

        def first_grad(variables, data):
            return _grad(variables, data[0], data[1])

        grad_a = first_grad

        def grad_b(variables, data, after=None):
            """Pass 2 of a floor, on the second copy of the batch, after pass 1 (``0 *`` the
            sum of the first layer's bias gradient is added to it), as in the JAX worker."""
            x2 = data[2]
            if after is not None:
                x2 = x2 + 0.0 * tf.reduce_sum(after[1])
            return _grad(variables, x2, data[3])
        info = dict(parameters=int(sum(w.size for w in init)), tensors=len(init),
                    input_shape=list(x.shape))

    passes_model = case != "tensors"
    two = 2 if passes_model else None
    runners = []

    def sgd():
        return keras.optimizers.SGD(lr, momentum=momentum)

    def add(name, role, implementation, make_opt, body, floor=None, xla=True, passes=None,
            note=""):
        """``body(opt, variables, data)``: one step, traced into a tf.function; with ``xla``
        first as ``jit_compile=True``, and without XLA if that raises while tracing."""
        variables = new_variables()
        opt = make_opt()
        if opt is not None:
            opt.build(variables)
        out = {}

        def fn(data):
            result = body(opt, variables, data)
            return tf.constant(0) if result is None else result

        mode = "tf.function"
        compiled = tf.function(fn)
        if xla:
            try:
                candidate = tf.function(fn, jit_compile=True)
                candidate.get_concrete_function(data)
                compiled, mode = candidate, "tf.function+xla"
            except Exception as error:  # noqa: BLE001  (whatever refuses XLA, record it)
                log(f"tf {case} {name}: XLA refused ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:100]}); plain tf.function")
                note = (note + " " if note else "") + "XLA refused while tracing"

        def step():
            out["last"] = compiled(data)

        runners.append(Runner(
            name=name, role=role, implementation=implementation, step=step,
            weights=lambda: [v.numpy().copy() for v in variables],
            sync=lambda: [v.numpy() for v in variables[:1]],
            floor=floor, mode=mode, passes_per_step=passes, note=note))

    def base(opt, variables, data):
        opt.apply_gradients(zip(first_grad(variables, data), variables))

    def floor(opt, variables, data):
        g1 = first_grad(variables, data)
        g2 = grad_b(variables, data, after=g1)
        opt.apply_gradients(zip([a + b for a, b in zip(g1, g2)], variables))

    n_total = info["parameters"]
    seeds = keras.random.SeedGenerator(seed)

    def floor_bsam(opt, variables, data):
        g1 = first_grad(variables, data)
        used = [tf.reduce_sum(g) for g in g1 + grad_b(variables, data, after=g1)]
        return tf.add_n(used) + tf.reduce_sum(keras.random.normal((n_total,), seed=seeds))

    def sam_body(opt, variables, data):
        opt.first_step(first_grad(variables, data), variables)
        opt.second_step(grad_a(variables, data), variables)

    def bsam_body(opt, variables, data):
        opt.noisy_step(variables)
        opt.first_step(grad_a(variables, data), variables)
        opt.second_step(grad_a(variables, data), variables)

    def looksam_body(opt, variables, data):
        if opt.first_step(first_grad(variables, data), variables):
            opt.second_step(grad_a(variables, data), variables)

    add("SGD", "base", "keras.optimizers.SGD(momentum)", sgd, base,
        passes=1 if passes_model else None)
    add("SGD (graph)", "base", "keras.optimizers.SGD(momentum), no XLA", sgd, base, xla=False,
        passes=1 if passes_model else None)
    add("floor", "floor", "2 passes + SGD step with g1 + g2", sgd, floor, passes=two)
    add("floor (graph)", "floor", "2 passes + SGD step with g1 + g2, no XLA", sgd, floor, xla=False,
        passes=two)
    add("floor bSAM", "floor",
        "2 passes + its noise (keras.random.normal), all summed; no XLA (as bSAM)",
        lambda: None, floor_bsam, xla=False, passes=two)
    ours = [
        ("SAM", "sam_edu.tf.SAM", lambda: SAM(sgd(), rho=rho), sam_body, two),
        ("ASAM", "sam_edu.tf.SAM(adaptive=True)",
         lambda: SAM(sgd(), rho=hp["asam_rho"], adaptive=True, eta=hp["asam_eta"]), sam_body,
         two),
        ("GSAM", "sam_edu.tf.GSAM",
         lambda: GSAM(None, sgd(), rho, alpha=hp["gsam_alpha"]), sam_body, two),
        ("WSAM", "sam_edu.tf.WSAM",
         lambda: WSAM(None, sgd(), rho=rho, gamma=hp["wsam_gamma"]), sam_body, two),
        ("bSAM", "sam_edu.tf.BSAM",
         lambda: BSAM(hp["bsam_num_data"], lr=hp["bsam_lr"], rho=hp["bsam_rho"], seed=seed),
         bsam_body,
         two),
        (f"LookSAM k={k}", "sam_edu.tf.LookSAM",
         lambda: LookSAM(sgd(), rho=rho, k=k, alpha=hp["looksam_alpha"]), looksam_body,
         (1 + 1 / k) if passes_model else None),
    ]
    for name, impl, make, body, passes in ours:
        add(name, "ours", impl, make, body, passes=passes,
            floor="floor bSAM" if name == "bSAM" else (None if name.startswith("LookSAM")
                                                       else "floor"))
        row = runners[-1]
        if row.floor == "floor" and row.mode == "tf.function":
            row.floor = "floor (graph)"  # the floor in the same mode: both without XLA
    return runners, info
