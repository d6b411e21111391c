"""sam_edu.train's PyTorch backend: every optimizer end to end, each step equal to the library's own
loop, BatchNorm, LookSAM's pass count, the schedule, the loss, weight decay, checkpoints, resume."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from sam_edu.models.torch import build  # noqa: E402
from sam_edu.torch import BSAM, GSAM, SAM, WSAM, LookSAM, disable_running_stats  # noqa: E402
from sam_edu.train import common  # noqa: E402
from sam_edu.train.torch_backend import TorchTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 3 steps of 64 images per epoch: a resume after epoch 1 falls mid-cycle for LookSAM with k = 2
TINY = dict(framework="torch", dataset="digits", model="small-cnn", num_train=192, num_test=100,
            batch_size=64, epochs=1, progress=False)
RECORD_FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr",
                 "seconds", "images_per_second", "device", "precision", "skipped_steps"}
VARIANT_OPTIONS = {  # options that make each variant's own code path matter
    "sam": dict(nesterov=True),
    "asam": dict(eta=0.01),
    "gsam": dict(rho_min=0.01),
    "wsam": {},
    "looksam": dict(k=2),
    "bsam": {},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: this shared CPU is much faster so for these tiny convolutions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def configure(**overrides) -> common.Config:
    return common.resolve(common.Config(**{**TINY, **overrides}))


def make_trainer(**overrides):
    """A trainer for ``TINY`` with ``overrides``, its config, dataset and step count."""
    config = configure(**overrides)
    dataset = common.load_data(config)
    total = common.steps_per_epoch(config, len(dataset.y_train)) * config.epochs
    return TorchTrainer(config, dataset, total), config, dataset, total


def initial_model(config, dataset):
    """The trainer's initial weights, built the way it builds them."""
    torch.manual_seed(config.seed)
    return build(config.model, dataset.input_shape, dataset.num_classes)


def nchw(x, y):
    """NCHW with standard strides: with C = 1 a permuted NHWC tensor also counts as contiguous,
    and torch would pick its channels-last convolution (other rounding) for it."""
    return (torch.from_numpy(x).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format),
            torch.from_numpy(y))


def assert_states_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- every optimizer, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", common.OPTIMIZERS)
def test_every_optimizer_trains_through_common_train(optimizer):
    records = common.train(optimizer=optimizer, **{**TINY, "num_train": 128},
                           **VARIANT_OPTIONS.get(optimizer, {}))
    (record,) = records
    assert set(record) == RECORD_FIELDS
    assert (record["device"], record["precision"]) == ("cpu", "fp32")
    for name in RECORD_FIELDS - {"device", "precision", "epoch"}:
        assert math.isfinite(record[name]), name
    assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_learns_the_digits(optimizer):
    (*_, last) = common.train(framework="torch", optimizer=optimizer, epochs=2, batch_size=32,
                              progress=False)
    assert last["test_accuracy"] > 0.8  # chance is 0.1


# --- each step is the library's own step ----------------------------------------------------------


def library_optimizer(name, config, params, total_steps, num_data):
    """The sam_edu optimizer the trainer should build, spelled out from the config by hand."""
    sgd = dict(lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
               weight_decay=config.weight_decay)
    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=config.rho, **sgd)
    if name == "asam":
        return SAM(params, torch.optim.SGD, rho=config.rho, adaptive=True, eta=config.eta, **sgd)
    if name == "gsam":
        def rho(t):
            return config.rho_min + (config.rho - config.rho_min) * common.cosine_lr(
                t, total_steps, 1.0)
        return GSAM(params, torch.optim.SGD, rho=rho, alpha=config.alpha, **sgd)
    if name == "wsam":
        return WSAM(params, torch.optim.SGD, rho=config.rho, gamma=config.gamma, **sgd)
    if name == "looksam":
        return LookSAM(params, torch.optim.SGD, rho=config.rho, k=config.k, alpha=config.alpha,
                       **sgd)
    return BSAM(params, num_data=num_data, lr=config.lr, weight_decay=config.weight_decay,
                rho=config.rho, seed=config.seed)


def library_run(name, config, dataset, batches, total_steps):
    """The optimizer's own ``step(closure)``, BatchNorm frozen on the closure's second call."""
    model = initial_model(config, dataset)
    optimizer = library_optimizer(name, config, model.parameters(), total_steps,
                                  len(dataset.y_train))
    for t, (x, y) in enumerate(batches):
        x, y = nchw(x, y)
        for group in optimizer.param_groups:
            group["lr"] = common.cosine_lr(t, total_steps, config.lr)
        calls = []

        def closure():
            optimizer.zero_grad()
            with disable_running_stats(model) if calls else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            loss.backward()
            calls.append(loss)
            return loss

        optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize("name", list(VARIANT_OPTIONS))
def test_steps_equal_the_library_step_with_a_closure(name):
    """Three steps of the trainer's explicit loop equal, bit for bit, three ``step(closure)``
    calls of the optimizer built by hand from the config: weights, BatchNorm statistics and
    optimizer state (LookSAM k = 2: a SAM step, a cheap one, a SAM step)."""
    trainer, config, dataset, total = make_trainer(optimizer=name, label_smoothing=0.1,
                                                   **VARIANT_OPTIONS[name])
    batches = list(common.epoch_batches(config, dataset, 1))
    trainer.train_epoch(iter(batches))
    model, optimizer = library_run(name, config, dataset, batches, total)
    assert_states_equal(trainer.model.state_dict(), model.state_dict())
    got, want = trainer.optimizer.state_dict(), optimizer.state_dict()
    for key in ("gsam_steps_taken", "looksam_steps_taken", "bsam_steps_taken"):
        assert got.get(key) == want.get(key)
    for index, state in want["state"].items():
        assert_states_equal(got["state"][index], state)


def test_batchnorm_statistics_after_a_sam_step_are_those_of_pass_1():
    trainer, config, dataset, _ = make_trainer(optimizer="sam", num_train=64)
    batches = list(common.epoch_batches(config, dataset, 1))
    trainer.train_epoch(iter(batches))
    model = initial_model(config, dataset)
    model(nchw(*batches[0])[0])  # pass 1 alone, in training mode
    buffers = dict(trainer.model.named_buffers())
    for name, want in model.named_buffers():
        assert torch.equal(buffers[name], want), name
    assert buffers["bn1.num_batches_tracked"].item() == 1


def test_looksam_takes_one_plus_one_over_k_passes_per_step():
    trainer, config, dataset, _ = make_trainer(optimizer="looksam", k=3, batch_size=32)
    passes = []
    trainer.model.register_forward_hook(lambda *_: passes.append(1))
    trainer.train_epoch(common.epoch_batches(config, dataset, 1))  # 6 steps: 2 SAM, 4 cheap
    assert len(passes) == 6 + 6 // 3


# --- schedule, loss, weight decay, precision, device ----------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "gsam", "bsam"])
def test_lr_follows_the_cosine(optimizer):
    rho_min = dict(rho_min=0.01) if optimizer == "gsam" else {}
    trainer, config, dataset, total = make_trainer(optimizer=optimizer, epochs=2, **rho_min)
    assert trainer.lr() == config.lr
    for epoch in (1, 2):
        trainer.train_epoch(common.epoch_batches(config, dataset, epoch))
        want = common.cosine_lr(3 * epoch, total, config.lr)
        assert trainer.lr() == pytest.approx(want, abs=1e-12)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want, abs=1e-12)
        if rho_min:  # rho of the last step taken, 3 epoch - 1
            factor = common.cosine_lr(3 * epoch - 1, total, 1.0)
            assert trainer.optimizer.param_groups[0]["rho"] == pytest.approx(
                config.rho_min + (config.rho - config.rho_min) * factor, abs=1e-12)
    assert trainer.lr() == 0.0


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_training_loss_is_smoothed_and_the_test_loss_is_not():
    eps = 0.2
    trainer, config, dataset, _ = make_trainer(optimizer="sgd", num_train=64,
                                               label_smoothing=eps)
    batch = next(common.epoch_batches(config, dataset, 1))
    model = initial_model(config, dataset)
    with torch.no_grad():
        logp = log_softmax(model(nchw(*batch)[0]).double().numpy())  # training mode, as pass 1
    y = batch[1]
    smoothed = -((1 - eps) * logp[np.arange(len(y)), y] + eps * logp.mean(axis=1)).mean()
    stats = trainer.train_epoch(iter([batch]))
    assert stats["loss"] == pytest.approx(smoothed, rel=1e-5)

    x_test, y_test = next(common.test_batches(config, dataset))
    model = trainer.model.eval()
    with torch.no_grad():
        logp = log_softmax(model(nchw(x_test, y_test)[0]).double().numpy())
    stats = trainer.evaluate(common.test_batches(config, dataset))
    assert stats["loss"] == pytest.approx(-logp[np.arange(len(y_test)), y_test].mean(), rel=1e-5)
    assert stats["accuracy"] == np.mean(logp.argmax(axis=1) == y_test)


def gradient(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_weight_decay_is_l2_in_the_base_step_only(optimizer):
    """One step by hand: ``w - lr (g_adv + wd w)``, the perturbation ``e`` from ``g`` alone."""
    trainer, config, dataset, _ = make_trainer(optimizer=optimizer, num_train=64,
                                               weight_decay=0.05)
    batch = next(common.epoch_batches(config, dataset, 1))
    trainer.train_epoch(iter([batch]))
    model = initial_model(config, dataset)
    x, y = nchw(*batch)
    w = [p.detach().clone() for p in model.parameters()]
    d = gradient(model, x, y)
    if optimizer == "sam":
        norm = torch.sqrt(sum((g * g).sum() for g in d))
        with torch.no_grad():
            for p, g in zip(model.parameters(), d):
                p.add_(config.rho * g / norm)
        d = gradient(model, x, y)
    for (name, p), w_p, d_p in zip(trainer.model.named_parameters(), w, d):
        # the first step of momentum SGD: buffer = d + wd w, w <- w - lr * buffer
        want = w_p - config.lr * (d_p + config.weight_decay * w_p)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6, msg=name)


def test_bf16_runs_on_the_cpu_with_float32_weights():
    trainer, config, dataset, _ = make_trainer(optimizer="sam", num_train=64, precision="bf16")
    assert trainer.precision == "bf16"
    dtypes = []
    trainer.model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    stats = trainer.train_epoch(common.epoch_batches(config, dataset, 1))
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert math.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in state.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_and_precision_on_a_cpu():
    trainer, *_ = make_trainer(optimizer="sgd", num_train=64)
    assert (trainer.device, trainer.precision) == ("cpu", "fp32")
    with pytest.raises(ValueError, match="device"):
        make_trainer(optimizer="sgd", num_train=64, device="gpu")


def test_a_non_finite_gradient_stops_sgd_before_the_weights_change():
    trainer, config, dataset, _ = make_trainer(optimizer="sgd", num_train=64)
    x, y = next(common.epoch_batches(config, dataset, 1))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train_epoch(iter([(np.full_like(x, np.inf), y)]))
    for p, w in zip(trainer.model.parameters(), before):
        assert torch.equal(p.detach(), w)


# --- checkpoints and resume -----------------------------------------------------------------------


RESUMED = {"sgd": {}, "sam": {}, "gsam": dict(rho_min=0.01), "looksam": dict(k=2), "bsam": {}}


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in records]


@pytest.mark.parametrize("optimizer", list(RESUMED))
def test_a_resumed_run_equals_an_uninterrupted_one(optimizer, tmp_path):
    run = dict(TINY, optimizer=optimizer, epochs=2, **RESUMED[optimizer])
    straight = common.train(**run, out=str(tmp_path / "straight"))
    common.train(**run, out=str(tmp_path / "resumed"), stop_after=1)  # a session of one epoch
    resumed = common.train(**run, out=str(tmp_path / "resumed"), resume=True)
    assert without_timing(resumed) == without_timing(straight)
    logged = [json.loads(line)
              for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert without_timing(logged) == without_timing(straight)
    got, want = (torch.load(tmp_path / name / TorchTrainer.checkpoint_name, weights_only=True)
                 for name in ("resumed", "straight"))
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in want["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][index][name], tensor), name
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == 6
    for key, value in want["optimizer"].items():
        if key.endswith("_steps_taken"):
            assert got["optimizer"][key] == value == 6
    for device, state in want["optimizer"].get("bsam_generator_states", {}).items():
        assert torch.equal(got["optimizer"]["bsam_generator_states"][device], state)


@pytest.mark.parametrize("optimizer, keys, counter", [
    ("sgd", {"momentum_buffer"}, None),
    ("sam", {"momentum_buffer"}, None),
    ("gsam", {"momentum_buffer"}, "gsam_steps_taken"),
    ("looksam", {"momentum_buffer", "g_v"}, "looksam_steps_taken"),
    ("bsam", {"momentum", "precision"}, "bsam_steps_taken"),
])
def test_the_checkpoint_holds_the_optimizer_state(optimizer, keys, counter, tmp_path):
    trainer, config, dataset, _ = make_trainer(optimizer=optimizer, epochs=2,
                                               **RESUMED[optimizer])
    trainer.train_epoch(common.epoch_batches(config, dataset, 1))
    trainer.save(tmp_path / "checkpoint.pt", epoch=1)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert saved["scheduler"]["last_epoch"] == 3
    state = saved["optimizer"]["state"]
    assert len(state) == len(list(trainer.model.parameters()))
    assert all(set(s) >= keys for s in state.values())
    if counter:
        assert saved["optimizer"][counter] == 3
    if optimizer == "bsam":
        assert saved["optimizer"]["bsam_generator_states"]

    fresh, *_ = make_trainer(optimizer=optimizer, epochs=2, **RESUMED[optimizer])
    assert fresh.load(tmp_path / "checkpoint.pt") == 1
    assert fresh.lr() == trainer.lr()
    assert_states_equal(fresh.model.state_dict(), trainer.model.state_dict())


def test_the_command_line_writes_a_run(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sam_edu.train", "--framework", "torch", "--optimizer",
               "looksam", "--k", "2", "--epochs", "1", "--num-train", "128", "--num-test", "100",
               "--batch-size", "64", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["optimizer"] == "looksam"
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert set(record) == RECORD_FIELDS
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
