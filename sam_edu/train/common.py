"""What every framework's trainer shares: the configuration, its defaults and checks, the data
stream, the cosine schedule, the epoch loop, the JSON-lines log and resuming.

A backend (``torch_backend``, ``jax_backend``, ``tf_backend``) only says how to take one training
step and how to save its state; everything a reader compares across frameworks -- the order of the
batches, their augmentation, the schedule, what is logged -- is decided here, once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from sam_edu import data as datasets
from sam_edu.models import MODELS

FRAMEWORKS = ("torch", "jax", "tf")
OPTIMIZERS = ("sgd", "sam", "asam", "gsam", "wsam", "bsam", "looksam")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "gpu")

# Defaults that depend on the optimizer. A value of None in Config means "this optimizer's
# default"; an option that does not apply to the chosen optimizer must stay None (it would be
# accepted and ignored otherwise).
#   rho: SAM/WSAM/GSAM 0.05 (Foret et al.), ASAM 0.5 (Kwon et al., CIFAR), LookSAM 0.1 (SPEC.md),
#        bSAM 0.05 (the seed README's default).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "gsam": 0.05, "wsam": 0.05, "bsam": 0.05, "looksam": 0.1}
DEFAULT_LR = {"bsam": 0.5}            # bSAM's step is m / s: its own scale (Moellenhoff & Khan)
DEFAULT_WEIGHT_DECAY = {"bsam": 1e-4}  # bSAM's delta, the prior precision / N
OPTION_OWNERS = {                      # variant options and the optimizers that take them
    "eta": ("asam",),
    "alpha": ("gsam", "looksam"),
    "rho_min": ("gsam",),
    "gamma": ("wsam",),
    "k": ("looksam",),
    "momentum": ("sgd", "sam", "asam", "gsam", "wsam", "looksam"),
    "nesterov": ("sgd", "sam", "asam", "gsam", "wsam", "looksam"),
}
VARIANT_DEFAULTS = {"eta": 0.0, "gamma": 0.9, "k": 10, "momentum": 0.9, "nesterov": False}
ALPHA_DEFAULT = {"gsam": 0.4, "looksam": 0.7}


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. ``None`` means "the default for this optimizer" (see :func:`resolve`).

    The base optimizer of every SAM variant (and of ``sgd``) is SGD with momentum; weight decay
    is L2 added to the gradient of the base step (``torch.optim.SGD``'s ``weight_decay``), so it
    never enters the perturbation ``e``. bSAM is a full optimizer: ``lr`` and ``weight_decay`` are
    its own ``lr`` and ``delta``, and ``num_data`` is the training-set size.
    """

    framework: str = "torch"
    optimizer: str = "sam"
    model: str = "small-cnn"
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    rho: float | None = None
    eta: float | None = None
    alpha: float | None = None
    rho_min: float | None = None
    gamma: float | None = None
    k: int | None = None
    label_smoothing: float = 0.0
    label_noise: float = 0.0
    augment: bool = True
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    num_train: int | None = None
    num_test: int | None = None
    data_dir: str | None = None
    download: bool = True
    out: str | None = None
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name} {message}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve(config: Config) -> Config:
    """Check every field and fill in the optimizer's defaults; ``ValueError`` names the field."""
    c = config
    for name, allowed in (("framework", FRAMEWORKS), ("optimizer", OPTIMIZERS),
                          ("model", MODELS), ("dataset", datasets.DATASETS),
                          ("precision", PRECISIONS), ("device", DEVICES)):
        _check(getattr(c, name) in allowed, name, f"must be one of {allowed}, got "
                                                  f"{getattr(c, name)!r}")
    for name in ("epochs", "batch_size", "seed"):
        _check(_is_int(getattr(c, name)), name, f"must be an integer, got {getattr(c, name)!r}")
    _check(c.epochs >= 1, "epochs", f"must be >= 1, got {c.epochs}")
    _check(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}")
    _check(0.0 <= c.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got "
                                                              f"{c.label_smoothing}")
    _check(0.0 <= c.label_noise <= 1.0, "label_noise", f"must be in [0, 1], got {c.label_noise}")
    if c.optimizer == "sgd":
        _check(c.rho is None, "rho", "applies to the SAM variants, not to sgd")
    for name, owners in OPTION_OWNERS.items():
        _check(getattr(c, name) is None or c.optimizer in owners, name,
               f"applies to {', '.join(owners)}, not to {c.optimizer}")

    fill = {
        "lr": DEFAULT_LR.get(c.optimizer, 0.1) if c.lr is None else c.lr,
        "weight_decay": (DEFAULT_WEIGHT_DECAY.get(c.optimizer, 5e-4)
                         if c.weight_decay is None else c.weight_decay),
        "rho": DEFAULT_RHO.get(c.optimizer) if c.rho is None else c.rho,
        "alpha": ALPHA_DEFAULT.get(c.optimizer) if c.alpha is None else c.alpha,
    }
    for name, default in VARIANT_DEFAULTS.items():
        if c.optimizer in OPTION_OWNERS[name] and getattr(c, name) is None:
            fill[name] = default
    c = dataclasses.replace(c, **fill)

    _check(c.lr >= 0, "lr", f"must be >= 0, got {c.lr}")
    _check(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}")
    _check(c.rho is None or c.rho >= 0, "rho", f"must be >= 0, got {c.rho}")
    _check(c.momentum is None or 0 <= c.momentum < 1, "momentum", f"must be in [0, 1), got "
                                                                   f"{c.momentum}")
    _check(not c.nesterov or c.momentum > 0, "nesterov", "needs momentum > 0")
    _check(c.eta is None or c.eta >= 0, "eta", f"must be >= 0, got {c.eta}")
    _check(c.alpha is None or c.alpha >= 0, "alpha", f"must be >= 0, got {c.alpha}")
    _check(c.rho_min is None or 0 <= c.rho_min <= c.rho, "rho_min",
           f"must be in [0, rho={c.rho}], got {c.rho_min}")
    _check(c.gamma is None or 0 <= c.gamma < 1, "gamma", f"must be in [0, 1), got {c.gamma}")
    _check(c.k is None or (_is_int(c.k) and c.k >= 1), "k", f"must be an integer >= 1, got "
                                                             f"{c.k!r}")
    for name in ("num_train", "num_test", "stop_after"):
        value = getattr(c, name)
        _check(value is None or (_is_int(value) and value >= 1), name,
               f"must be an integer >= 1, got {value!r}")
    return c


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """The learning rate after ``step`` of ``total_steps`` steps: ``lr/2 (1 + cos(pi t/T))``.

    Every backend uses its framework's own cosine schedule (``LambdaLR``,
    ``optax.cosine_decay_schedule``, ``keras.optimizers.schedules.CosineDecay``); the tests hold
    them to this formula.
    """
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def load_data(config: Config) -> datasets.ImageDataset:
    """The dataset of ``config`` with its label noise, cut to ``num_train``/``num_test``."""
    return datasets.load(config.dataset, root=config.data_dir, download=config.download,
                         label_noise=config.label_noise, seed=config.seed,
                         num_train=config.num_train, num_test=config.num_test)


def steps_per_epoch(config: Config, num_train: int) -> int:
    """Full batches per epoch; the last partial batch is dropped (a fresh shuffle every epoch).

    Dropping it keeps every step's batch size (BatchNorm and compiled steps want that)."""
    _check(config.batch_size <= num_train, "batch_size",
           f"({config.batch_size}) is larger than the training set ({num_train} images)")
    return num_train // config.batch_size


def epoch_batches(config: Config, dataset: datasets.ImageDataset,
                  epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The training batches of ``epoch`` (1-based): shuffled, augmented, standardized, NHWC.

    The order and the augmentation are drawn from ``default_rng([seed, epoch])``: every framework
    sees the same batches, and a resumed run sees what an uninterrupted run would have seen.
    """
    rng = np.random.default_rng([config.seed, epoch])
    for index in datasets.batches(len(dataset.y_train), config.batch_size, rng, drop_last=True):
        x = dataset.x_train[index]
        if config.augment:
            x = datasets.augment(x, rng, dataset.crop_padding, dataset.flip)
        yield datasets.standardize(x, dataset.mean, dataset.std), dataset.y_train[index]


def test_batches(config: Config, dataset: datasets.ImageDataset,
                 batch_size: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The test set in order, standardized, in batches of ``batch_size`` (the last one shorter)."""
    for start in range(0, len(dataset.y_test), batch_size):
        x = dataset.x_test[start:start + batch_size]
        yield (datasets.standardize(x, dataset.mean, dataset.std),
               dataset.y_test[start:start + batch_size])


class Trainer(Protocol):
    """What a backend provides: built from the resolved config, the dataset and the step count.

    ``device`` and ``precision`` describe where and how it runs (e.g. ``"cpu"``, ``"fp32"``).
    ``train_epoch`` takes every step of one epoch and returns the mean pass-1 loss and accuracy
    over the epoch, after the device has finished (so that the loop's clock is honest), and, for
    a backend whose optimizers skip non-finite steps instead of raising (JAX), ``skipped_steps``:
    how many steps of the run so far were skipped.
    ``evaluate`` returns the mean cross-entropy (no label smoothing) and accuracy on the batches.
    ``lr`` is the base learning rate the next step would use. ``save`` writes everything a
    resumed run needs (weights, BatchNorm statistics, optimizer state, RNG state) and the number
    of epochs done to ``path`` in one atomic write (:func:`atomic_write`); ``load`` restores it
    and returns that number.
    """

    device: str
    precision: str
    checkpoint_name: str

    def train_epoch(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict: ...
    def evaluate(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict: ...
    def lr(self) -> float: ...
    def save(self, path: Path, epoch: int) -> None: ...
    def load(self, path: Path) -> int: ...


def make_trainer(config: Config, dataset: datasets.ImageDataset, total_steps: int) -> Trainer:
    """The backend's trainer; imports only the chosen framework."""
    if config.framework == "torch":
        from sam_edu.train.torch_backend import TorchTrainer as backend
    elif config.framework == "jax":
        from sam_edu.train.jax_backend import JaxTrainer as backend
    else:
        from sam_edu.train.tf_backend import TFTrainer as backend
    return backend(config, dataset, total_steps)


CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
# The schedule spans ``epochs``, so a resumed run keeps it; these may change between sessions.
_RESUMABLE_CHANGES = {"resume", "stop_after", "progress", "out", "data_dir", "download"}


def _prepare_out(config: Config) -> tuple[Path, list[dict]]:
    """Create ``out``, or, with ``resume``, check it matches ``config`` and read its log."""
    out = Path(config.out)
    log_path, config_path = out / LOG_FILE, out / CONFIG_FILE
    if not config.resume:
        if log_path.exists():
            raise ValueError(f"out: {out} already holds a run; pass resume=True (--resume) to "
                             "continue it, or choose another directory")
        out.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        return out, []
    if not config_path.exists():
        raise ValueError(f"resume: {out} holds no run to resume ({config_path} is missing)")
    saved = json.loads(config_path.read_text())
    changed = sorted(k for k, v in dataclasses.asdict(config).items()
                     if k not in _RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise ValueError(f"resume: the run in {out} was started with other settings "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); only "
                         f"{sorted(_RESUMABLE_CHANGES)} may change")
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return out, records


def train(config: Config | None = None, **overrides) -> list[dict]:
    """Train as ``config`` says and return one record per epoch (what ``log.jsonl`` holds).

    ``train(framework="jax", optimizer="gsam", epochs=3)`` is the Python form of
    ``python -m sam_edu.train --framework jax --optimizer gsam --epochs 3``. With ``out`` set, the
    config, the log and a checkpoint after every epoch are written there, and ``resume=True``
    continues from the last checkpoint; a resumed run equals an uninterrupted one.
    ``stop_after=n`` ends the session after epoch ``n`` of ``epochs`` (e.g. before a Colab
    session runs out); resuming goes on with the same schedule.
    """
    from tqdm.auto import tqdm

    config = resolve(dataclasses.replace(config or Config(), **overrides))
    dataset = load_data(config)
    steps = steps_per_epoch(config, len(dataset.y_train))
    trainer = make_trainer(config, dataset, total_steps=steps * config.epochs)
    records: list[dict] = []
    out = None
    if config.out is not None:
        out, records = _prepare_out(config)
        checkpoint = out / trainer.checkpoint_name
        if config.resume:
            # the log is written before the checkpoint: after a crash between the two, the log
            # has one epoch more, which is dropped and trained again
            done = trainer.load(checkpoint) if checkpoint.exists() else 0
            records = records[:done]
            (out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    elif config.resume:
        raise ValueError("resume needs out, the directory of the run to continue")
    last = config.epochs if config.stop_after is None else min(config.stop_after, config.epochs)
    for epoch in range(len(records) + 1, last + 1):
        batches = tqdm(epoch_batches(config, dataset, epoch), total=steps, leave=False,
                       disable=not config.progress,
                       desc=f"{config.framework} {config.optimizer} epoch {epoch}")
        start = time.perf_counter()
        train_stats = trainer.train_epoch(iter(batches))
        seconds = time.perf_counter() - start
        test_stats = trainer.evaluate(test_batches(config, dataset))
        record = {
            "epoch": epoch,
            "train_loss": float(train_stats["loss"]),
            "train_accuracy": float(train_stats["accuracy"]),
            "test_loss": float(test_stats["loss"]),
            "test_accuracy": float(test_stats["accuracy"]),
            "lr": float(trainer.lr()),
            "skipped_steps": int(train_stats.get("skipped_steps", 0)),
            "seconds": seconds,
            "images_per_second": steps * config.batch_size / seconds,
            "device": trainer.device,
            "precision": trainer.precision,
        }
        records.append(record)
        if config.progress:
            tqdm.write(f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f}, test "
                       f"accuracy {record['test_accuracy']:.4f}, "
                       f"{record['images_per_second']:.0f} images/s")
        if out is not None:
            with open(out / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            trainer.save(checkpoint, epoch)
    return records


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
