"""The JAX backend of ``python -m sam_edu.train`` (sam_edu/train/jax_backend.py).

XLA compiles one step per optimizer and configuration, which dominates the time on a CPU. So the
tests share one run per optimizer (``RUN``: the digits, batches of 64, 2 epochs) and keep
compiled steps in a persistent compilation cache (a temporary directory of this session): an
equal step is compiled once, in this process and in the CLI's subprocess. (A step
that counts its passes calls back to Python, which JAX does not cache: only LookSAM's counts.)
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from jax.experimental.compilation_cache import compilation_cache

import sam_edu.jax as sam_jax
from sam_edu.models.jax import build
from sam_edu.train import common
from sam_edu.train.common import Config, cosine_lr, resolve, train
from sam_edu.train.jax_backend import JaxTrainer, cross_entropy, schedule_position

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(framework="jax", dataset="digits", model="small-cnn", epochs=2, batch_size=64,
           weight_decay=0.01, label_smoothing=0.1, progress=False)
# the options of each optimizer's run; LookSAM and bSAM, whose steps cost most on a CPU, train
# on 320 images (5 steps an epoch: LookSAM with k = 2 resumes mid-cycle), the others on all 1257
OPTIONS = {"gsam": dict(rho_min=0.01), "looksam": dict(k=2, num_train=320),
           "bsam": dict(num_train=320)}
FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds",
          "images_per_second", "device", "precision", "skipped_steps"}
CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                 "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """Compiled steps kept on disk for this module; JAX's settings restored afterwards."""
    directory = tmp_path_factory.mktemp("jax_compilation_cache")
    before = {name: getattr(jax.config, name)
              for name in (*CACHE_OPTIONS, "jax_compilation_cache_dir")}
    for name, value in CACHE_OPTIONS.items():
        jax.config.update(name, value)
    compilation_cache.set_cache_dir(str(directory))
    compilation_cache.reset_cache()
    yield directory
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture
def passes(monkeypatch):
    """The forward/backward passes run so far, counted as they run (a callback in the step)."""
    count = []
    loss = JaxTrainer._loss

    def counting(self, *args):
        jax.debug.callback(lambda: count.append(1))
        return loss(self, *args)

    monkeypatch.setattr(JaxTrainer, "_loss", counting)
    return count


def _config(optimizer, **changes) -> Config:
    return resolve(Config(**{**RUN, "optimizer": optimizer, **OPTIONS.get(optimizer, {}),
                             **changes}))


def _steps(config) -> tuple[int, int]:
    """Steps per epoch and in the run."""
    steps = common.steps_per_epoch(config, len(common.load_data(config).y_train))
    return steps, steps * config.epochs


def _trainer(config) -> JaxTrainer:
    return JaxTrainer(config, common.load_data(config), _steps(config)[1])


@pytest.fixture(scope="module")
def digits():
    return common.load_data(_config("sgd"))


@pytest.fixture
def trainers(monkeypatch):
    """Every trainer ``common.train`` builds, in order."""
    built = []
    make = common.make_trainer

    def recording(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(common, "make_trainer", recording)
    return built


def _plain(tree):
    """NumPy leaves; typed PRNG keys as their data."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x))
                        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x), tree)


def _tree_equal(a, b) -> bool:
    """Same structure and bit-equal leaves (PRNG keys compared by their data)."""
    a, b = _plain(a), _plain(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                         jax.tree.leaves(b))))


def _without_clock(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in records]


def _check_records(records, config):
    assert [r["epoch"] for r in records] == list(range(1, config.epochs + 1))
    for r in records:
        assert set(r) == FIELDS
        assert all(math.isfinite(r[k]) for k in FIELDS - {"device", "precision"})
        assert (r["device"], r["precision"]) == ("cpu", "fp32")
        steps, total = _steps(config)
        assert r["lr"] == pytest.approx(cosine_lr(r["epoch"] * steps, total, config.lr),
                                        abs=1e-7)


# --- end to end through common.train, resuming, checkpoints ------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "sam", "looksam", "bsam"])
def test_resume_equals_an_uninterrupted_run(optimizer, tmp_path, trainers):
    """2 epochs straight == 1 epoch (``stop_after=1``), then ``resume``; LookSAM (k = 2, 5 steps
    an epoch) resumes mid-cycle, after a cheap step. Also: the records, learning, the checkpoint."""
    run = {**RUN, "optimizer": optimizer, **OPTIONS.get(optimizer, {})}
    config = resolve(Config(**run))
    steps, total = _steps(config)
    assert optimizer != "looksam" or steps % config.k != 0  # the resumed run starts mid-cycle
    straight = train(out=str(tmp_path / "a"), **run)
    _check_records(straight, config)
    if optimizer in ("sgd", "sam"):
        assert straight[-1]["test_accuracy"] > 0.5, straight  # it learns (10 classes)

    train(out=str(tmp_path / "b"), stop_after=1, **run)
    resumed = train(out=str(tmp_path / "b"), resume=True, **run)
    assert _without_clock(resumed) == _without_clock(straight)
    name = JaxTrainer.checkpoint_name
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert _tree_equal(trainers[-1]._state, trainers[0]._state)

    # the checkpoint holds everything: a fresh trainer loads the full state back
    fresh = _trainer(config)
    assert not _tree_equal(fresh._state.opt_state, trainers[0]._state.opt_state)
    assert fresh.load(tmp_path / "a" / name) == 2
    assert _tree_equal(fresh._state, trainers[0]._state)
    assert int(schedule_position(fresh._state.opt_state)) == total


@pytest.mark.parametrize("optimizer", ["asam", "gsam", "wsam"])
def test_every_other_optimizer_runs_end_to_end(optimizer, tmp_path):
    records = train(out=str(tmp_path), **{**RUN, "optimizer": optimizer,
                                          **OPTIONS.get(optimizer, {})})
    _check_records(records, _config(optimizer))
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] \
        == records
    assert (tmp_path / JaxTrainer.checkpoint_name).exists()


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path):
    sgd = _trainer(_config("sgd"))
    sgd.save(tmp_path / "sgd.msgpack", 1)
    sam = _trainer(_config("sam"))
    with pytest.raises(ValueError, match="path: .* is not a checkpoint of this model and "
                                         "optimizer"):
        sam.load(tmp_path / "sgd.msgpack")


def test_cli_writes_the_run(tmp_path, compilation_cache_dir):
    out = tmp_path / "run"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir),
           **{name.upper(): str(value) for name, value in CACHE_OPTIONS.items()}}
    flags = ["--framework", "jax", "--optimizer", "sgd", "--epochs", "1", "--batch-size", "128",
             "--num-train", "256", "--num-test", "100", "--no-progress", "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "sam_edu.train", *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["framework"] == "jax"
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    saved = serialization.msgpack_restore((out / JaxTrainer.checkpoint_name).read_bytes())
    assert saved["epoch"] == 1


# --- one step through the trainer == the same step written by hand -----------------------------

def _hand_loss(model, params, stats, x, y, eps):
    """Smoothed cross-entropy written out: targets (1 - eps) onehot + eps / K."""
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
    targets = (1 - eps) * jax.nn.one_hot(y, logits.shape[-1]) + eps / logits.shape[-1]
    loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
    return loss, updates["batch_stats"]


def _start(config, digits):
    model = build(config.model, digits.input_shape, digits.num_classes)
    variables = model.init(jax.random.key(config.seed),
                           jnp.zeros((1, *digits.input_shape)), train=False)
    return model, variables["params"], variables["batch_stats"]


def _first_steps(config, digits, n=3):
    """The first ``n`` batches of the run."""
    return list(common.epoch_batches(config, digits, 1))[:n]


def _trainer_steps(config, digits):
    trainer = _trainer(config)
    return trainer, trainer.train_epoch(iter(_first_steps(config, digits)))


def _assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_sam_steps_written_out(digits):
    """SAM's steps (1)-(5) by hand: momentum, L2 added in the base step only (never in e), the
    cosine lr, BatchNorm statistics of pass 1, label smoothing in the loss."""
    config = _config("sam")
    total = _steps(config)[1]
    model, w, stats = _start(config, digits)
    grad = jax.value_and_grad(_hand_loss, argnums=1, has_aux=True)
    buffer, losses = None, []
    for t, (x, y) in enumerate(_first_steps(config, digits)):
        (loss, pass_one_stats), g = grad(model, w, stats, x, y, config.label_smoothing)
        norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
        e = jax.tree.map(lambda v: config.rho * v / (norm + 1e-12), g)
        (_, pass_two_stats), g_adv = grad(model, jax.tree.map(jnp.add, w, e), stats, x, y,
                                          config.label_smoothing)
        d = jax.tree.map(lambda ga, wi: ga + config.weight_decay * wi, g_adv, w)  # coupled L2
        buffer = d if buffer is None else jax.tree.map(lambda b, di: 0.9 * b + di, buffer, d)
        w = jax.tree.map(lambda wi, b: wi - cosine_lr(t, total, config.lr) * b, w, buffer)
        stats, losses = pass_one_stats, losses + [float(loss)]
    trainer, record = _trainer_steps(config, digits)
    _assert_close(trainer._state.params, w)
    _assert_close(trainer._state.batch_stats, stats)  # BatchNorm: pass 1's statistics ...
    with pytest.raises(AssertionError):  # ... which differ from pass 2's beyond the tolerance
        _assert_close(trainer._state.batch_stats, pass_two_stats)
    assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # label smoothing
    assert record["skipped_steps"] == 0
    assert trainer.lr() == pytest.approx(cosine_lr(3, total, config.lr), abs=1e-7)


def _hand_optimizer(config, num_data):
    schedule = optax.cosine_decay_schedule(config.lr, _steps(config)[1])
    if config.optimizer == "bsam":
        return sam_jax.bsam(num_data, learning_rate=schedule, weight_decay=config.weight_decay,
                            rho=config.rho, seed=config.seed)
    base = optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=0.9))
    if config.optimizer == "asam":
        return sam_jax.sam(base, config.rho, adaptive=True)
    if config.optimizer == "gsam":  # rho_t = rho_min + (rho - rho_min) lr_t / lr
        return sam_jax.gsam(base, lambda t: 0.01 + (config.rho - 0.01) * schedule(t) / config.lr,
                            alpha=config.alpha)
    if config.optimizer == "wsam":
        return sam_jax.wsam(base, learning_rate=schedule, rho=config.rho, gamma=config.gamma)
    return sam_jax.looksam(base, rho=config.rho, k=config.k, alpha=config.alpha)


@pytest.mark.parametrize("optimizer", ["asam", "gsam", "wsam", "looksam", "bsam"])
def test_variant_steps_equal_a_hand_written_loop(optimizer, request):
    """Each of three steps through the trainer == the same step written by hand with the sam_edu
    optimizer, from the trainer's state before it: weights, optimizer state (bSAM: the same
    noise), pass-1 BatchNorm statistics, loss; LookSAM's passes. (From the trainer's state, so
    that rounding cannot flip a ReLU or a max-pool tie between the two over several steps.)"""
    config = _config(optimizer)
    digits = common.load_data(config)
    model, _, _ = _start(config, digits)
    opt = _hand_optimizer(config, len(digits.y_train))
    passes = request.getfixturevalue("passes") if optimizer == "looksam" else []
    trainer = _trainer(config)
    passes_per_step = []
    for x, y in _first_steps(config, digits):
        w, stats, state = jax.tree.map(jnp.copy, trainer._state)

        def grad_fn(p):
            return jax.grad(_hand_loss, argnums=1, has_aux=True)(
                model, p, stats, x, y, config.label_smoothing)[0]

        if config.optimizer == "bsam":  # pass 1 at the noisy point, with the optimizer's noise
            noise = optax.tree_utils.tree_random_like(jax.random.split(state.key)[1], w)
            at = sam_jax.posterior_sample(w, state.precision, noise, len(digits.y_train))
            loss, stats_1 = _hand_loss(model, at, stats, x, y, config.label_smoothing)
            updates, state = opt.update(None, state, w, grad_fn=grad_fn, noise=noise)
        else:
            (loss, stats_1), g = jax.value_and_grad(_hand_loss, argnums=1, has_aux=True)(
                model, w, stats, x, y, config.label_smoothing)
            updates, state = opt.update(g, state, w, grad_fn=grad_fn)
        before = len(passes)
        record = trainer.train_epoch(iter([(x, y)]))
        passes_per_step.append(len(passes) - before)
        _assert_close(trainer._state.params, optax.apply_updates(w, updates))
        _assert_close(trainer._state.batch_stats, stats_1)
        _assert_close(_plain(trainer._state.opt_state), _plain(state))
        assert record["loss"] == pytest.approx(float(loss), rel=1e-5)
    if optimizer == "looksam":  # k = 2: steps 0 and 2 are SAM steps, step 1 a cheap one
        assert passes_per_step == [2, 1, 2]


# --- smaller properties ------------------------------------------------------------------------

def test_label_smoothing_targets():
    logits = jnp.array([[2.0, -1.0, 0.5, 0.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 + 0.1 / 4) * log_p[2] - (0.1 / 4) * (log_p[0] + log_p[1] + log_p[3])
    assert float(cross_entropy(logits, jnp.array([2]), 0.1)) == pytest.approx(float(expected))
    assert float(cross_entropy(logits, jnp.array([2]))) == pytest.approx(float(-log_p[2]))


def test_a_non_finite_step_is_skipped_and_counted(digits):
    trainer = _trainer(_config("sam"))
    x, y = _first_steps(trainer.config, digits)[0]
    before = _plain(trainer._state)
    assert trainer.train_epoch(iter([(np.full_like(x, np.nan), y)]))["skipped_steps"] == 1
    after = _plain(trainer._state)
    assert _tree_equal(after.params, before.params)
    assert _tree_equal(after.batch_stats, before.batch_stats)  # no NaN in the statistics
    assert trainer.lr() == pytest.approx(trainer.config.lr)  # the schedule did not move
    assert trainer.train_epoch(iter([(x, y)]))["skipped_steps"] == 1  # a running total


def test_bf16_runs_a_step_on_the_cpu(digits):
    trainer = _trainer(_config("sgd", precision="bf16"))
    assert trainer.precision == "bf16"
    record = trainer.train_epoch(iter(_first_steps(trainer.config, digits, 1)))
    assert math.isfinite(record["loss"])
    dtypes = {x.dtype for x in jax.tree.leaves(trainer._state)}  # weights, state: float32
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32), jnp.dtype(bool)}


def test_device_and_precision():
    trainer = _trainer(_config("sgd"))
    on_gpu = jax.default_backend() == "gpu"
    assert (trainer.device, trainer.precision) == (("gpu:0", "bf16") if on_gpu else
                                                   ("cpu", "fp32"))
    if not on_gpu:
        with pytest.raises(ValueError, match="device"):
            _trainer(_config("sgd", device="gpu"))
