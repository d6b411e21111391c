"""The JAX backend of ``python -m sam_edu.train`` (sam_edu/train/jax_backend.py).

XLA compiles one step per optimizer and configuration, which dominates the time on a CPU. Most
tests share one small run (``RUN``: 192 digits, batches of 64, 3 steps an epoch, 2 epochs) so
that a step compiled once is found again in a persistent compilation cache for this module (a
temporary directory, restored afterwards).
"""

import dataclasses
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
           num_train=192, num_test=200, weight_decay=0.01, label_smoothing=0.1, progress=False)
STEPS, TOTAL = 3, 6  # per epoch, in the run
FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds",
          "images_per_second", "device", "precision"}
CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                 "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """Compiled steps kept on disk, so that equal runs (and the CLI subprocess) reuse them."""
    directory = tmp_path_factory.mktemp("jax_cache")
    before = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    before_dir = jax.config.jax_compilation_cache_dir
    for name, value in CACHE_OPTIONS.items():
        jax.config.update(name, value)
    compilation_cache.set_cache_dir(str(directory))
    compilation_cache.reset_cache()
    yield directory
    for name, value in before.items():
        jax.config.update(name, value)
    jax.config.update("jax_compilation_cache_dir", before_dir)
    compilation_cache.reset_cache()


def _config(**changes) -> Config:
    return resolve(Config(**{**RUN, **changes}))


@pytest.fixture(scope="module")
def digits():
    return common.load_data(_config())


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


@pytest.fixture
def passes(monkeypatch):
    """Count forward/backward passes as they run (a callback in the compiled step)."""
    count = []
    loss = JaxTrainer._loss

    def counting(self, *args):
        jax.debug.callback(lambda: count.append(1))
        return loss(self, *args)

    monkeypatch.setattr(JaxTrainer, "_loss", counting)
    return count


def _without_clock(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in records]


def _tree_equal(a, b) -> bool:
    """Same structure and bit-equal leaves (PRNG keys compared by their data)."""
    a, b = _plain(a), _plain(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                         jax.tree.leaves(b))))


def _plain(tree):
    """NumPy leaves; typed PRNG keys as their data."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x))
                        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x), tree)


def _check_records(records, config):
    assert [r["epoch"] for r in records] == list(range(1, config.epochs + 1))
    for r in records:
        assert set(r) == FIELDS
        assert all(math.isfinite(r[k]) for k in FIELDS - {"device", "precision"})
        assert (r["device"], r["precision"]) == ("cpu", "fp32")
        assert r["lr"] == pytest.approx(cosine_lr(r["epoch"] * STEPS, TOTAL, config.lr),
                                        abs=1e-7)


# --- end to end through common.train, resuming, checkpoints ------------------------------------

class Crash(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "looksam", "bsam"])
def test_resume_equals_an_uninterrupted_run(optimizer, tmp_path, monkeypatch, trainers, passes):
    run = {**RUN, "optimizer": optimizer, **({"k": 2} if optimizer == "looksam" else {})}
    straight = train(out=str(tmp_path / "a"), **run)
    _check_records(straight, resolve(Config(**run)))
    per_pass = {"sgd": 1, "sam": 2, "bsam": 2}
    # LookSAM with k = 2: SAM steps 0, 2, 4 take two passes, steps 1, 3, 5 one
    assert len(passes) == (9 if optimizer == "looksam" else TOTAL * per_pass[optimizer])

    # a crash during epoch 2 (k = 2 and 3 steps an epoch: LookSAM resumes mid-cycle)
    with monkeypatch.context() as patch:
        epoch = JaxTrainer.train_epoch
        calls = []

        def crashing(self, batches):
            calls.append(1)
            if len(calls) == 2:
                raise Crash
            return epoch(self, batches)

        patch.setattr(JaxTrainer, "train_epoch", crashing)
        with pytest.raises(Crash):
            train(out=str(tmp_path / "b"), **run)
    del passes[:]
    resumed = train(out=str(tmp_path / "b"), resume=True, **run)
    # steps 3, 4, 5: cheap, SAM, cheap for LookSAM
    assert len(passes) == (4 if optimizer == "looksam" else STEPS * per_pass[optimizer])
    assert _without_clock(resumed) == _without_clock(straight)
    name = trainers[0].checkpoint_name
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert _tree_equal(trainers[-1]._state, trainers[0]._state)

    # the checkpoint holds everything: a fresh trainer loads the full state back
    fresh = JaxTrainer(resolve(Config(**run)), common.load_data(resolve(Config(**run))), TOTAL)
    assert not _tree_equal(fresh._state.opt_state, trainers[0]._state.opt_state)
    assert fresh.load(tmp_path / "a" / name) == 2
    assert _tree_equal(fresh._state, trainers[0]._state)
    assert int(schedule_position(fresh._state.opt_state)) == TOTAL


@pytest.mark.parametrize("changes", [dict(optimizer="asam"),
                                     dict(optimizer="gsam", rho_min=0.01),
                                     dict(optimizer="wsam")])
def test_every_other_optimizer_runs_end_to_end(changes, tmp_path):
    records = train(out=str(tmp_path), **{**RUN, **changes})
    _check_records(records, _config(**changes))
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] \
        == records
    assert (tmp_path / JaxTrainer.checkpoint_name).exists()


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path, digits):
    sgd = JaxTrainer(_config(optimizer="sgd"), digits, TOTAL)
    sgd.save(tmp_path / "sgd.msgpack", 1)
    sam = JaxTrainer(_config(optimizer="sam"), digits, TOTAL)
    with pytest.raises(ValueError):
        sam.load(tmp_path / "sgd.msgpack")


def test_cli_writes_the_run(tmp_path, compilation_cache_dir):
    out = tmp_path / "run"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir),
           **{name.upper(): str(value) for name, value in CACHE_OPTIONS.items()}}
    flags = ["--framework", "jax", "--optimizer", "sgd", "--epochs", "2", "--batch-size", "64",
             "--num-train", "192", "--num-test", "200", "--weight-decay", "0.01",
             "--label-smoothing", "0.1", "--no-progress", "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "sam_edu.train", *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["framework"] == "jax"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    saved = serialization.msgpack_restore((out / JaxTrainer.checkpoint_name).read_bytes())
    assert saved["epoch"] == 2


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


def _first_epoch(config, digits):
    return list(common.epoch_batches(config, digits, 1))


def _trainer_epoch(config, digits):
    trainer = JaxTrainer(config, digits, TOTAL)
    stats = trainer.train_epoch(iter(_first_epoch(config, digits)))
    return trainer, stats


def _assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_sgd_and_sam_steps_written_out(optimizer, digits):
    """SAM's step (1)-(5) by hand: momentum, coupled L2 in the base step only, cosine lr."""
    config = _config(optimizer=optimizer)
    model, w, stats = _start(config, digits)
    grad = jax.value_and_grad(_hand_loss, argnums=1, has_aux=True)
    buffer, losses = None, []
    for t, (x, y) in enumerate(_first_epoch(config, digits)):
        (loss, pass_one_stats), g = grad(model, w, stats, x, y, config.label_smoothing)
        if optimizer == "sam":
            norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
            e = jax.tree.map(lambda v: config.rho * v / (norm + 1e-12), g)
            g = grad(model, jax.tree.map(jnp.add, w, e), stats, x, y,
                     config.label_smoothing)[1]
        d = jax.tree.map(lambda gi, wi: gi + config.weight_decay * wi, g, w)  # L2, coupled
        buffer = d if buffer is None else jax.tree.map(lambda b, di: 0.9 * b + di, buffer, d)
        lr = cosine_lr(t, TOTAL, config.lr)
        w = jax.tree.map(lambda wi, b: wi - lr * b, w, buffer)
        stats, losses = pass_one_stats, losses + [loss]
    trainer, record = _trainer_epoch(config, digits)
    _assert_close(trainer._state.params, w)
    _assert_close(trainer._state.batch_stats, stats)  # BatchNorm: pass 1's statistics
    assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # label smoothing
    assert record["skipped_steps"] == 0
    assert trainer.lr() == pytest.approx(cosine_lr(STEPS, TOTAL, config.lr), abs=1e-7)


def _hand_optimizer(config, num_data):
    schedule = optax.cosine_decay_schedule(config.lr, TOTAL)
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


@pytest.mark.parametrize("changes", [dict(optimizer="asam"),
                                     dict(optimizer="gsam", rho_min=0.01),
                                     dict(optimizer="wsam"),
                                     dict(optimizer="looksam", k=2),
                                     dict(optimizer="bsam")])
def test_variant_steps_equal_a_hand_written_loop(changes, digits):
    """Three steps with the sam_edu optimizer, the loop written by hand, pass-1 statistics."""
    config = _config(**changes)
    model, w, stats = _start(config, digits)
    opt = _hand_optimizer(config, len(digits.y_train))
    state = opt.init(w)
    losses = []
    for x, y in _first_epoch(config, digits):
        def grad_fn(p):
            return jax.grad(_hand_loss, argnums=1, has_aux=True)(
                model, p, stats, x, y, config.label_smoothing)[0]

        if config.optimizer == "bsam":  # pass 1 at the noisy point, with the optimizer's noise
            noise = optax.tree_utils.tree_random_like(jax.random.split(state.key)[1], w)
            at = sam_jax.posterior_sample(w, state.precision, noise, len(digits.y_train))
            loss, new_stats = _hand_loss(model, at, stats, x, y, config.label_smoothing)
            updates, state = opt.update(None, state, w, grad_fn=grad_fn, noise=noise)
        else:
            (loss, new_stats), g = jax.value_and_grad(_hand_loss, argnums=1, has_aux=True)(
                model, w, stats, x, y, config.label_smoothing)
            updates, state = opt.update(g, state, w, grad_fn=grad_fn)
        w, stats, losses = optax.apply_updates(w, updates), new_stats, losses + [loss]
    trainer, record = _trainer_epoch(config, digits)
    _assert_close(trainer._state.params, w)
    _assert_close(trainer._state.batch_stats, stats)
    _assert_close(_plain(trainer._state.opt_state), _plain(state))
    assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_looksam_makes_one_pass_plus_one_every_k_steps(digits, passes):
    trainer = JaxTrainer(_config(optimizer="looksam", k=2), digits, TOTAL)
    counts = []
    for x, y in _first_epoch(trainer.config, digits):
        trainer.train_epoch(iter([(x, y)]))
        counts.append(len(passes))
    assert np.diff([0] + counts).tolist() == [2, 1, 2]  # SAM, cheap, SAM


# --- smaller properties ------------------------------------------------------------------------

def test_label_smoothing_targets():
    logits = jnp.array([[2.0, -1.0, 0.5, 0.0]])
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 + 0.1 / 4) * log_p[2] - (0.1 / 4) * (log_p[0] + log_p[1] + log_p[3])
    assert float(cross_entropy(logits, jnp.array([2]), 0.1)) == pytest.approx(float(expected))
    assert float(cross_entropy(logits, jnp.array([2]))) == pytest.approx(float(-log_p[2]))


def test_a_non_finite_step_is_skipped_and_counted(digits):
    trainer = JaxTrainer(_config(optimizer="sam"), digits, TOTAL)
    x, y = _first_epoch(trainer.config, digits)[0]
    before = _plain(trainer._state)
    record = trainer.train_epoch(iter([(np.full_like(x, np.nan), y)]))
    assert record["skipped_steps"] == 1
    after = _plain(trainer._state)
    assert _tree_equal(after.params, before.params)
    assert _tree_equal(after.batch_stats, before.batch_stats)  # no NaN in the statistics
    assert trainer.lr() == trainer.config.lr  # the schedule did not move
    assert trainer.train_epoch(iter([(x, y)]))["skipped_steps"] == 1  # a running total


def test_learning_sgd_and_sam_beat_chance_clearly():
    for optimizer in ("sgd", "sam"):
        records = train(**{**RUN, "optimizer": optimizer, "num_train": None, "epochs": 3})
        assert records[-1]["test_accuracy"] > 0.5, (optimizer, records)


def test_bf16_runs_a_step_on_the_cpu(digits):
    trainer = JaxTrainer(_config(optimizer="sgd", precision="bf16"), digits, TOTAL)
    assert trainer.precision == "bf16"
    record = trainer.train_epoch(iter(_first_epoch(trainer.config, digits)[:1]))
    assert math.isfinite(record["loss"])
    dtypes = {x.dtype for x in jax.tree.leaves(trainer._state)}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32), jnp.dtype(bool)}


def test_device_and_precision():
    trainer = JaxTrainer(_config(optimizer="sgd"), common.load_data(_config()), TOTAL)
    expected = "cpu" if jax.default_backend() == "cpu" else "gpu:0"
    assert trainer.device == expected
    assert trainer.precision == ("fp32" if expected == "cpu" else "bf16")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="device"):
            JaxTrainer(_config(optimizer="sgd", device="gpu"), common.load_data(_config()),
                       TOTAL)
