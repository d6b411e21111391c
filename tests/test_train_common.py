"""The framework-free part of the training command: configuration checks and defaults, the CLI,
the data stream, the cosine schedule, the log and resuming (with a NumPy trainer standing in for
the frameworks, so that the loop itself is tested without any of them)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam_edu import data as datasets
from sam_edu.train import Config, common, cosine_lr, resolve, train
from sam_edu.train.cli import main, parser


# --- configuration ------------------------------------------------------------------------------

def test_defaults_follow_the_optimizer():
    sam = resolve(Config(optimizer="sam"))
    assert (sam.lr, sam.weight_decay, sam.rho, sam.momentum, sam.nesterov) == (
        0.1, 5e-4, 0.05, 0.9, False)
    assert sam.alpha is None and sam.gamma is None and sam.k is None and sam.eta is None
    assert resolve(Config(optimizer="asam")).rho == 0.5
    assert resolve(Config(optimizer="asam")).eta == 0.0
    assert resolve(Config(optimizer="gsam")).alpha == 0.4
    looksam = resolve(Config(optimizer="looksam"))
    assert (looksam.rho, looksam.k, looksam.alpha) == (0.1, 10, 0.7)
    assert resolve(Config(optimizer="wsam")).gamma == 0.9
    bsam = resolve(Config(optimizer="bsam"))
    assert (bsam.lr, bsam.weight_decay, bsam.momentum, bsam.nesterov) == (0.5, 1e-4, None, None)
    sgd = resolve(Config(optimizer="sgd"))
    assert sgd.rho is None and sgd.momentum == 0.9
    # a value given is kept
    assert resolve(Config(optimizer="sam", rho=0.1, lr=0.2)).rho == 0.1


@pytest.mark.parametrize("field, value, optimizer", [
    ("rho", 0.05, "sgd"), ("gamma", 0.5, "sam"), ("k", 2, "gsam"), ("alpha", 0.1, "wsam"),
    ("eta", 0.01, "sam"), ("rho_min", 0.0, "looksam"), ("momentum", 0.9, "bsam"),
    ("nesterov", True, "bsam"),
])
def test_an_option_of_another_optimizer_is_refused(field, value, optimizer):
    with pytest.raises(ValueError, match=rf"^{field} applies to .*not to {optimizer}"):
        resolve(Config(optimizer=optimizer, **{field: value}))


@pytest.mark.parametrize("field, value", [
    ("framework", "mxnet"), ("optimizer", "adam"), ("model", "vgg"), ("dataset", "imagenet"),
    ("precision", "fp16"), ("device", "tpu"), ("epochs", 0), ("epochs", 1.5), ("batch_size", 0),
    ("seed", "1"), ("lr", -0.1), ("weight_decay", -1.0), ("rho", -0.01), ("momentum", 1.0),
    ("label_smoothing", 1.0), ("label_noise", 1.5), ("num_train", 0), ("num_test", -3),
    ("stop_after", 0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        resolve(Config(**{field: value}))


@pytest.mark.parametrize("changes, field", [
    (dict(optimizer="looksam", k=0), "k"), (dict(optimizer="wsam", gamma=1.0), "gamma"),
    (dict(optimizer="gsam", alpha=-1.0), "alpha"), (dict(optimizer="asam", eta=-0.1), "eta"),
    (dict(optimizer="gsam", rho=0.05, rho_min=0.1), "rho_min"),
    (dict(optimizer="sgd", momentum=0.0, nesterov=True), "nesterov"),
])
def test_bad_variant_options_name_the_option(changes, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        resolve(Config(**changes))


def test_cosine_schedule():
    assert cosine_lr(0, 100, 0.1) == 0.1
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == 0.0
    assert cosine_lr(25, 100, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(150, 100, 0.1) == 0.0  # clamped past the end


# --- the command line ---------------------------------------------------------------------------

def test_every_config_field_has_a_flag():
    dests = {a.dest for a in parser()._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(Config)}


def test_seed_readme_command_parses():
    # seed 004 (a PyTorch replication README) launches its run with these flags
    args = parser().parse_args("--epochs 200 --lr 0.1 --batch_size 128 --rho 0.05".split())
    assert (args.epochs, args.lr, args.batch_size, args.rho) == (200, 0.1, 128, 0.05)
    assert parser().parse_args(["--batch-size", "64"]).batch_size == 64


def test_cli_reports_a_bad_option_by_name(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--optimizer", "sgd", "--rho", "0.1", "--out", "unused"])
    assert stop.value.code == 2
    assert "rho applies to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--optimizer", "adamw"])
    assert stop.value.code == 2
    assert "invalid choice: 'adamw'" in capsys.readouterr().err


def test_cli_help_runs_without_a_framework():
    result = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['x', '--help']; "
                             "runpy.run_module('sam_edu.train', run_name='__main__')"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--optimizer {sgd,sam,asam,gsam,wsam,bsam,looksam}" in result.stdout


def test_importing_the_package_imports_no_framework():
    code = ("import sys, sam_edu.train, sam_edu.train.cli; "
            "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the data stream ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits", num_train=200, num_test=100)


def test_batches_are_full_shuffled_and_reproducible(digits):
    config = resolve(Config(batch_size=32, seed=3))
    assert common.steps_per_epoch(config, 200) == 6  # the partial 7th batch is dropped
    first = list(common.epoch_batches(config, digits, epoch=1))
    again = list(common.epoch_batches(config, digits, epoch=1))
    other = list(common.epoch_batches(config, digits, epoch=2))
    assert len(first) == 6 and all(x.shape == (32, 8, 8, 1) and y.shape == (32,) for x, y in first)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not np.array_equal(first[0][1], other[0][1])
    x, _ = first[0]
    assert x.dtype == np.float32
    with pytest.raises(ValueError, match="^batch_size"):
        common.steps_per_epoch(resolve(Config(batch_size=500)), 200)


def test_test_batches_cover_the_test_set_in_order(digits):
    config = resolve(Config())
    labels = np.concatenate([y for _, y in common.test_batches(config, digits, batch_size=30)])
    np.testing.assert_array_equal(labels, digits.y_test)


# --- the loop, the log and resuming, with a NumPy trainer ---------------------------------------

class NumpyTrainer:
    """Softmax regression with SGD + momentum: enough state to make resuming non-trivial."""

    device, precision, checkpoint_name = "cpu", "fp32", "checkpoint.npz"

    def __init__(self, config, dataset, total_steps):
        d = int(np.prod(dataset.input_shape))
        self.config, self.total = config, total_steps
        self.w = np.random.default_rng(config.seed).normal(0, 0.01, (d, dataset.num_classes))
        self.v = np.zeros_like(self.w)
        self.step = 0

    def _loss_grad(self, x, y):
        x = x.reshape(len(x), -1)
        logits = x @ self.w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).mean()
        p[np.arange(len(y)), y] -= 1
        return loss, x.T @ p / len(y), (logits.argmax(1) == y).mean()

    def lr(self):
        return cosine_lr(self.step, self.total, self.config.lr)

    def train_epoch(self, batches):
        losses, accuracies = [], []
        for x, y in batches:
            loss, grad, accuracy = self._loss_grad(x, y)
            self.v = self.config.momentum * self.v + grad
            self.w -= self.lr() * self.v
            self.step += 1
            losses.append(loss)
            accuracies.append(accuracy)
        return {"loss": np.mean(losses), "accuracy": np.mean(accuracies)}

    def evaluate(self, batches):
        stats = [self._loss_grad(x, y) for x, y in batches]
        return {"loss": np.mean([s[0] for s in stats]), "accuracy": np.mean([s[2] for s in stats])}

    def save(self, path, epoch):
        buffer = io.BytesIO()
        np.savez(buffer, w=self.w, v=self.v, step=self.step, epoch=epoch)
        common.atomic_write(path, buffer.getvalue())

    def load(self, path):
        state = np.load(path)
        self.w, self.v, self.step = state["w"], state["v"], int(state["step"])
        return int(state["epoch"])


@pytest.fixture
def numpy_backend(monkeypatch):
    trainers = []

    def make(config, dataset, total_steps):
        trainers.append(NumpyTrainer(config, dataset, total_steps))
        return trainers[-1]

    monkeypatch.setattr(common, "make_trainer", make)
    return trainers


RUN = dict(optimizer="sgd", epochs=3, batch_size=50, num_train=300, num_test=100, progress=False)


def _without_clock(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in records]


def test_records_and_files(numpy_backend, tmp_path):
    records = train(out=str(tmp_path / "run"), **RUN)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"epoch", "train_loss", "train_accuracy", "test_loss",
                               "test_accuracy", "lr", "skipped_steps", "seconds",
                               "images_per_second", "device", "precision"}
    assert records[-1]["lr"] == 0.0  # the cosine reaches 0 after the last step
    assert records[-1]["test_accuracy"] > 0.5  # softmax regression learns digits
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == records
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == dataclasses.asdict(resolve(Config(out=str(tmp_path / "run"), **RUN)))
    assert np.load(tmp_path / "run" / "checkpoint.npz")["epoch"] == 3
    with pytest.raises(ValueError, match="already holds a run; pass resume=True"):
        train(out=str(tmp_path / "run"), **RUN)


def test_resume_equals_an_uninterrupted_run(numpy_backend, tmp_path):
    straight = train(out=str(tmp_path / "a"), **RUN)
    assert len(train(out=str(tmp_path / "b"), stop_after=1, **RUN)) == 1
    resumed = train(out=str(tmp_path / "b"), resume=True, **RUN)
    assert _without_clock(resumed) == _without_clock(straight)
    np.testing.assert_array_equal(numpy_backend[-1].w, numpy_backend[0].w)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 3


def test_resume_after_a_crash_between_log_and_checkpoint(numpy_backend, tmp_path):
    straight = train(out=str(tmp_path / "a"), **RUN)
    run = tmp_path / "b"
    train(out=str(run), stop_after=1, **RUN)
    after_epoch_1 = (run / "checkpoint.npz").read_bytes()
    train(out=str(run), resume=True, stop_after=2, **RUN)
    # the crash: epoch 2's log line was written, its checkpoint was not (epoch 1's is left)
    (run / "checkpoint.npz").write_bytes(after_epoch_1)
    resumed = train(out=str(run), resume=True, **RUN)
    assert _without_clock(resumed) == _without_clock(straight)


def test_resume_refuses_other_settings_and_an_empty_directory(numpy_backend, tmp_path):
    train(out=str(tmp_path / "a"), stop_after=1, **RUN)
    with pytest.raises(ValueError, match=r"resume: .*other settings \(lr=0\.1\)"):
        train(out=str(tmp_path / "a"), resume=True, **{**RUN, "lr": 0.2})
    with pytest.raises(ValueError, match=r"resume: .*other settings \(epochs=3\)"):
        train(out=str(tmp_path / "a"), resume=True, **{**RUN, "epochs": 5})
    with pytest.raises(ValueError, match="holds no run to resume"):
        train(out=str(tmp_path / "empty"), resume=True, **RUN)
    with pytest.raises(ValueError, match="resume needs out"):
        train(resume=True, **RUN)


def test_readme_training_command_parses():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", readme,
                                                                   flags=re.S)
                if "python -m sam_edu.train" in block]
    assert commands, "the README shows the training command"
    for command in commands:
        argv = shlex.split(command.split("python -m sam_edu.train", 1)[1])
        config = resolve(Config(**vars(parser().parse_args(argv))))
        assert (config.model, config.dataset, config.rho) == ("wrn-28-10", "cifar10", 0.05)
