"""The TensorFlow / Keras 3 backend of the training command (sam_edu.train.tf_backend).

Tiny runs on the digits (8x8x1) with small-cnn: every optimizer end to end, learning, the
trainer's steps against a hand-written loop over the sam_edu.tf optimizers, BatchNorm statistics
from pass 1, LookSAM's pass count, the cosine schedule, label smoothing, coupled weight decay,
resuming, the checkpoint's optimizer state, the command line and bf16 on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import sam_edu.tf as sam_tf  # noqa: E402
from sam_edu.models import tf as models  # noqa: E402
from sam_edu.train import Config, common, cosine_lr, resolve, train  # noqa: E402
from sam_edu.train.tf_backend import SGD, TFTrainer  # noqa: E402

TINY = dict(framework="tf", dataset="digits", model="small-cnn", num_train=96, num_test=64,
            batch_size=32, device="cpu", progress=False)  # 3 steps per epoch, fp32 on a GPU host
SAM_VARIANTS = ("sam", "asam", "gsam", "wsam", "looksam", "bsam")
FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds",
          "images_per_second", "device", "precision", "skipped_steps"}


def make_trainer(optimizer, epochs=1, **overrides):
    """A resolved config, its dataset and a fresh trainer for ``epochs`` epochs."""
    config = resolve(Config(**{**TINY, "optimizer": optimizer, "epochs": epochs, **overrides}))
    dataset = common.load_data(config)
    total = common.steps_per_epoch(config, len(dataset.y_train)) * epochs
    return config, dataset, TFTrainer(config, dataset, total)


def first_batch(config, dataset):
    return next(common.epoch_batches(config, dataset, 1))


def check_records(records, epochs):
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert set(r) == FIELDS
        assert all(math.isfinite(r[k]) for k in FIELDS - {"device", "precision"})
        assert (r["device"], r["precision"]) == ("cpu", "fp32")


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_learns_the_digits(optimizer):
    records = train(**{**TINY, "num_train": None, "num_test": None, "batch_size": 64},
                    optimizer=optimizer, epochs=3)
    assert records[-1]["test_accuracy"] > 0.5
    assert records[-1]["train_loss"] < records[0]["train_loss"]


# --- the steps against the sam_edu.tf optimizers driven by hand -------------------------------

def manual_optimizer(config, num_data, total):
    """The optimizer of ``config`` written out by hand from the library (the trainer's twin)."""
    lr = keras.optimizers.schedules.CosineDecay(config.lr, total)
    if config.optimizer == "bsam":
        return sam_tf.BSAM(num_data=num_data, lr=lr, weight_decay=config.weight_decay,
                           rho=config.rho, seed=config.seed)
    base = SGD(learning_rate=lr, momentum=0.9, l2=config.weight_decay)
    return {
        "sgd": lambda: base,
        "sam": lambda: sam_tf.SAM(base, rho=config.rho),
        "asam": lambda: sam_tf.SAM(base, rho=config.rho, adaptive=True, eta=config.eta),
        "gsam": lambda: sam_tf.GSAM(None, base, keras.optimizers.schedules.CosineDecay(
            config.rho, total, alpha=config.rho_min / config.rho), alpha=config.alpha),
        "wsam": lambda: sam_tf.WSAM(None, base, rho=config.rho, gamma=config.gamma),
        "looksam": lambda: sam_tf.LookSAM(base, rho=config.rho, k=config.k, alpha=config.alpha),
    }[config.optimizer]()


def manual_step(model, optimizer, x, y, smoothing):
    """Steps (1)-(5) by hand, eagerly; BatchNorm statistics put back after pass 2."""
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
    onehot = tf.one_hot(y, 10)
    variables = model.trainable_variables
    if isinstance(optimizer, sam_tf.BSAM):
        optimizer.noisy_step(variables)
    with tf.GradientTape() as tape:
        loss = loss_fn(onehot, model(x, training=True))
    gradients = tape.gradient(loss, variables)
    if isinstance(optimizer, SGD):
        optimizer.apply_gradients(zip(gradients, variables))
        return
    perturbed = optimizer.first_step(gradients, variables)  # LookSAM, WSAM: a bool tensor
    if perturbed is not None and not bool(perturbed):
        return  # a cheap LookSAM step: done
    stats = [v.numpy() for v in model.non_trainable_weights]
    with tf.GradientTape() as tape:
        loss_adv = loss_fn(onehot, model(x, training=True))
    for v, value in zip(model.non_trainable_weights, stats):
        v.assign(value)
    optimizer.second_step(tape.gradient(loss_adv, variables), variables)


def count_gradient_passes(monkeypatch):
    """A counter of ``tape.gradient`` calls that runs inside the compiled step (a tf.cond branch
    not taken does not count)."""
    counter = tf.Variable(0)
    gradient = tf.GradientTape.gradient

    def counting(self, *args, **kwargs):
        counter.assign_add(1)
        return gradient(self, *args, **kwargs)

    monkeypatch.setattr(tf.GradientTape, "gradient", counting)
    return counter


@pytest.fixture
def trainers(monkeypatch):
    """The trainers that ``train`` builds, in order."""
    built = []
    init = TFTrainer.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(TFTrainer, "__init__", recording)
    return built


@pytest.mark.parametrize("optimizer,options,passes", [
    ("sgd", {}, 3), ("sam", {}, 6), ("asam", {"eta": 0.01}, 6), ("gsam", {"rho_min": 0.01}, 6),
    ("wsam", {}, 6), ("looksam", {"k": 2}, 5), ("bsam", {}, 6),
])
def test_runs_end_to_end_and_its_steps_equal_the_library_loop(monkeypatch, trainers, optimizer,
                                                               options, passes):
    """Three steps through ``train``: finite records, the gradient passes (LookSAM k=2: SAM,
    cheap, SAM steps, 1 + 1/k per step) and the weights of a loop written by hand."""
    counter = count_gradient_passes(monkeypatch)
    run = dict(**TINY, optimizer=optimizer, epochs=1, label_smoothing=0.1, **options)
    check_records(train(**run), 1)
    assert int(counter.numpy()) == passes
    (trainer,) = trainers
    config = resolve(Config(**run))
    dataset = common.load_data(config)
    keras.utils.set_random_seed(config.seed)  # the trainer's initialisation
    model = models.build(config.model, dataset.input_shape, dataset.num_classes)
    manual = manual_optimizer(config, len(dataset.y_train), total=3)
    for x, y in common.epoch_batches(config, dataset, 1):  # 3 steps; looksam: SAM, cheap, SAM
        manual_step(model, manual, x, y, config.label_smoothing)
    for a, b in zip(model.weights, trainer.model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(trainer.optimizer.iterations.numpy()) == int(manual.iterations.numpy()) == 3


def test_batchnorm_statistics_come_from_pass_1():
    config, dataset, trainer = make_trainer("sam")
    keras.utils.set_random_seed(config.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_classes)
    x, y = first_batch(config, dataset)
    trainer.train_epoch(iter([(x, y)]))
    model(x, training=True)  # pass 1 alone, at the same w
    stats = [(a.numpy(), b.numpy()) for a, b in zip(model.non_trainable_weights,
                                                   trainer.model.non_trainable_weights)]
    assert len(stats) == 6  # three BatchNorms: moving mean and variance
    for pass_1, trained in stats:
        np.testing.assert_allclose(trained, pass_1, rtol=1e-6, atol=1e-7)
    assert not np.allclose(stats[0][0], 0.0)  # they moved


# --- schedule, loss, weight decay ---------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sam", "bsam"])
def test_lr_follows_cosine_lr(optimizer):
    config, _, trainer = make_trainer(optimizer, epochs=2)  # 6 steps
    for step in range(8):  # the schedule reads the step count (resume_test: it advances)
        trainer.optimizer.iterations.assign(step)
        assert trainer.lr() == pytest.approx(cosine_lr(step, 6, config.lr), abs=1e-7)


def test_gsam_rho_follows_the_learning_rate():
    config, _, trainer = make_trainer("gsam", epochs=2, rho=0.1, rho_min=0.02)
    for step in range(8):
        trainer.optimizer.iterations.assign(step)
        lr_t = cosine_lr(step, 6, config.lr)
        assert float(trainer.optimizer.current_rho()) == pytest.approx(
            0.02 + (0.1 - 0.02) * lr_t / config.lr, abs=1e-7)


def log_softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_label_smoothing_in_training_and_plain_cross_entropy_in_evaluate():
    eps = 0.2
    config, dataset, trainer = make_trainer("sgd", lr=0.0, label_smoothing=eps)
    x, y = first_batch(config, dataset)
    stats = trainer.train_epoch(iter([(x, y)]))  # lr = 0: the weights stay where they are
    log_p = log_softmax(trainer.model(x, training=True).numpy().astype(np.float64))
    target = (1 - eps) * np.eye(10)[y] + eps / 10
    assert stats["loss"] == pytest.approx(-(target * log_p).sum(axis=1).mean(), rel=1e-5)
    assert stats["accuracy"] == pytest.approx(np.mean(log_p.argmax(axis=1) == y))
    evaluated = trainer.evaluate(iter([(x[:20], y[:20]), (x[20:], y[20:])]))
    log_p = log_softmax(trainer.model(x, training=False).numpy().astype(np.float64))
    assert evaluated["loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)
    assert evaluated["accuracy"] == pytest.approx(np.mean(log_p.argmax(axis=1) == y))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_weight_decay_is_l2_added_to_the_gradient(nesterov):
    """Three steps with a changing lr, by hand with torch.optim.SGD's formulas."""
    lrs, momentum, l2 = [0.5, 0.3, 0.1], 0.9, 0.01
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], lrs)
    optimizer = SGD(learning_rate=schedule, momentum=momentum, nesterov=nesterov, l2=l2)
    variable = keras.Variable([1.0, -2.0])
    w, buf = np.array([1.0, -2.0]), np.zeros(2)
    for lr, g in zip(lrs, ([0.0, 0.0], [0.5, 0.25], [-1.0, 0.0])):  # first: a zero loss gradient
        optimizer.apply_gradients([(tf.constant(g), variable)])
        d = np.array(g) + l2 * w
        buf = momentum * buf + d
        w = w - lr * (d + momentum * buf if nesterov else buf)
        np.testing.assert_allclose(variable.numpy(), w, rtol=1e-6)
    # the first step with g = 0: w <- w - lr * l2 * w, decay proportional to lr (coupled)
    assert w[0] != 1.0
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is SGD
    assert (restored.l2, restored.momentum, restored.nesterov) == (l2, momentum, nesterov)
    with pytest.raises(ValueError, match="l2"):
        SGD(weight_decay=1e-4)


# --- resume and checkpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,options", [("sgd", {}), ("sam", {}), ("looksam", {"k": 2}),
                                               ("bsam", {})])
def test_resume_equals_an_uninterrupted_run(tmp_path, optimizer, options):
    """Two epochs straight == one epoch (stop_after=1) + resume. looksam k=2 with 3 steps per
    epoch: the resume point falls inside a k-cycle."""
    run = dict(**TINY, optimizer=optimizer, epochs=2, **options)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    uninterrupted = train(**run, out=str(straight))
    check_records(uninterrupted, 2)
    config = resolve(Config(**run))
    for r in uninterrupted:  # the lr after each epoch's 3 steps
        assert r["lr"] == pytest.approx(cosine_lr(3 * r["epoch"], 6, config.lr), abs=1e-7)

    assert len(train(**run, out=str(resumed), stop_after=1)) == 1
    continued = train(**run, out=str(resumed), resume=True)
    timing = {"seconds", "images_per_second"}
    assert ([{k: v for k, v in r.items() if k not in timing} for r in continued]
            == [{k: v for k, v in r.items() if k not in timing} for r in uninterrupted])
    with np.load(straight / "checkpoint.npz") as a, np.load(resumed / "checkpoint.npz") as b:
        assert a.files == b.files
        for name in a.files:  # weights, BatchNorm statistics, optimizer state, epoch
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("optimizer", ["looksam", "bsam"])
def test_checkpoint_holds_the_optimizer_state(tmp_path, optimizer):
    config, dataset, trainer = make_trainer(optimizer, k=2 if optimizer == "looksam" else None)
    trainer.train_epoch(common.epoch_batches(config, dataset, 1))
    opt = trainer.optimizer
    assert int(opt.iterations.numpy()) == 3
    if optimizer == "looksam":
        held = [opt.base_optimizer.momentums, opt._orthogonal_gradients]
    else:
        held = [opt.momentums, opt.precisions, [opt._seed_generator.state]]
    trainer.save(tmp_path / trainer.checkpoint_name, epoch=1)

    fresh = make_trainer(optimizer, k=2 if optimizer == "looksam" else None)[2]
    fresh_held = ([fresh.optimizer.base_optimizer.momentums,
                   fresh.optimizer._orthogonal_gradients] if optimizer == "looksam" else
                  [fresh.optimizer.momentums, fresh.optimizer.precisions,
                   [fresh.optimizer._seed_generator.state]])
    for trained, new in zip(held, fresh_held):  # the state is not the initial one ...
        assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(trained, new))
    assert fresh.load(tmp_path / trainer.checkpoint_name) == 1
    for trained, new in zip(held, fresh_held):  # ... and comes back
        for a, b in zip(trained, new):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 3
    assert fresh.lr() == trainer.lr()
    for a, b in zip(trainer.model.weights, fresh.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = make_trainer("sam")[2]  # another optimizer: refused, naming the path
    with pytest.raises(ValueError, match="path"):
        other.load(tmp_path / trainer.checkpoint_name)


# --- command line, precision, device, non-finite values --------------------------------------

def test_command_line_writes_the_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "sam_edu.train", "--framework", "tf", "--optimizer", "sam",
         "--epochs", "1", "--num-train", "32", "--num-test", "32", "--batch-size", "32",
         "--device", "cpu", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["framework"] == "tf"
    check_records([json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()], 1)
    assert (out / "checkpoint.npz").exists()


def test_bf16_runs_on_the_cpu():
    policy = keras.config.dtype_policy().name
    config, dataset, trainer = make_trainer("sam", precision="bf16", num_train=64)
    assert keras.config.dtype_policy().name == policy  # the process' policy is untouched
    assert trainer.precision == "bf16"
    stats = trainer.train_epoch(common.epoch_batches(config, dataset, 1))
    assert math.isfinite(stats["loss"])
    conv = trainer.model.get_layer("conv1")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert all(v.dtype == "float32" for v in trainer.optimizer.variables
               if "float" in str(v.dtype))


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is present")
def test_device_and_precision_on_a_cpu():
    _, _, trainer = make_trainer("sgd", device="auto")
    assert (trainer.device, trainer.precision) == ("cpu", "fp32")
    with pytest.raises(ValueError, match="device"):
        make_trainer("sgd", device="gpu")


def test_non_finite_values_are_not_silent():
    config, dataset, trainer = make_trainer("sam")
    x, y = first_batch(config, dataset)
    before = [v.numpy() for v in trainer.model.trainable_variables]
    x = x.copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient"):
        trainer.train_epoch(iter([(x, y)]))
    for a, b in zip(before, trainer.model.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())  # w untouched
    _, _, sgd = make_trainer("sgd")
    with pytest.raises(FloatingPointError, match="loss"):
        sgd.train_epoch(iter([(x, y)]))
