"""The PyTorch backend of the training command: :class:`TorchTrainer`.

One training step with a SAM variant, numbered as everywhere in ``sam_edu``::

    loss = loss_fn(model(x), y); loss.backward()      # (1) g at w; BatchNorm statistics updated
    optimizer.first_step(zero_grad=True)              # (2) ascend to w + e
    with disable_running_stats(model):                # BatchNorm statistics from pass 1 only
        loss_fn(model(x), y).backward()               # (3) g_adv at w + e, same batch
    optimizer.second_step(zero_grad=True)             # (4) restore w, (5) base step
    scheduler.step()                                  # the cosine learning rate of the next step

LookSAM's ``first_step()`` returns ``False`` on its cheap steps (it has taken the base step with
the reused ``g_v`` already), and the loop then skips (3)-(5): ``1 + 1/k`` passes per step. bSAM
runs pass (1) at a draw from its posterior, ``optimizer.noisy_step()``, and step (5) is its own
update of the mean and the precision.

Conventions (the same numbers mean the same thing in the JAX and Keras backends):

* the base optimizer is ``torch.optim.SGD(lr, momentum, nesterov, weight_decay)``: weight decay
  is L2 added to the direction of the base step, ``d + weight_decay * w``, so it never enters the
  perturbation ``e``; bSAM's ``weight_decay`` is its prior precision ``delta``;
* the learning rate follows ``lr / 2 (1 + cos(pi t / T))`` per step, a ``LambdaLR`` on the
  optimizer whose ``step()`` the loop runs (SGD, the variants' ``base_optimizer``, or bSAM); with
  ``rho_min``, GSAM's radius follows the same factor, ``rho_t = rho_min + (rho - rho_min) lr_t/lr``;
* the training loss is the cross-entropy against ``(1 - eps) onehot + eps / K``
  (``label_smoothing = eps``); :meth:`TorchTrainer.evaluate` reports the plain cross-entropy;
* ``bf16``: ``torch.autocast`` around the forward pass and the loss; weights, gradients and the
  optimizer state stay float32;
* the model takes NCHW: NHWC batches are transposed on the way in (channels-last on a GPU).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sam_edu.models.torch import build
from sam_edu.torch import BSAM, GSAM, SAM, WSAM, LookSAM, disable_running_stats
from sam_edu.torch.sam import global_norm
from sam_edu.train import common


def select_device(device: str) -> torch.device:
    """``"auto"``: the GPU if CUDA sees one, else the CPU; ``"gpu"`` without CUDA: ValueError."""
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device 'gpu' was asked for, but PyTorch sees no CUDA GPU; "
                         "use device 'cpu' or 'auto'")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def select_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 on a GPU that supports it, else fp32; an explicit choice is kept."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def cosine_factor(step: int, total_steps: int) -> float:
    """``lr_t / lr = (1 + cos(pi t / T)) / 2``, held at 0 after ``T`` steps."""
    return common.cosine_lr(step, total_steps, 1.0)


def gsam_rho(config: common.Config, total_steps: int):
    """GSAM's radius: ``rho``, or with ``rho_min`` the schedule ``rho(t)`` that follows the
    learning rate, ``rho_min + (rho - rho_min) lr_t / lr``, from ``rho`` down to ``rho_min``."""
    if config.rho_min is None:
        return config.rho

    def rho(step: int) -> float:
        return config.rho_min + (config.rho - config.rho_min) * cosine_factor(step, total_steps)

    return rho


def make_optimizer(config: common.Config, params, num_data: int,
                   total_steps: int) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, with SGD (and its L2 weight decay) as the base."""
    if config.optimizer == "bsam":
        return BSAM(params, num_data=num_data, lr=config.lr, weight_decay=config.weight_decay,
                    rho=config.rho, seed=config.seed)
    sgd = dict(lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
               weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **sgd)
    if config.optimizer == "sam":
        return SAM(params, torch.optim.SGD, rho=config.rho, **sgd)
    if config.optimizer == "asam":
        return SAM(params, torch.optim.SGD, rho=config.rho, adaptive=True, eta=config.eta, **sgd)
    if config.optimizer == "gsam":
        return GSAM(params, torch.optim.SGD, rho=gsam_rho(config, total_steps),
                    alpha=config.alpha, **sgd)
    if config.optimizer == "wsam":
        return WSAM(params, torch.optim.SGD, rho=config.rho, gamma=config.gamma, **sgd)
    return LookSAM(params, torch.optim.SGD, rho=config.rho, k=config.k, alpha=config.alpha, **sgd)


class TorchTrainer:
    """Trains ``config.model`` on ``dataset`` with ``config.optimizer`` for ``total_steps`` steps.

    Attributes a reader may inspect: ``model``, ``optimizer``, ``scheduler`` (the ``LambdaLR``),
    ``device`` (e.g. ``"cpu"``, ``"cuda:0"``) and ``precision`` (``"fp32"`` or ``"bf16"``).
    """

    checkpoint_name = "checkpoint.pt"

    def __init__(self, config: common.Config, dataset, total_steps: int) -> None:
        self.config = config
        self._device = select_device(config.device)
        self.device = str(self._device)
        self.precision = select_precision(config.precision, self._device)
        # channels-last is the layout of the NHWC batches, and the fast one for cuDNN's convs
        self._memory_format = (torch.channels_last if self._device.type == "cuda"
                               else torch.contiguous_format)
        torch.manual_seed(config.seed)
        self.model = build(config.model, dataset.input_shape, dataset.num_classes).to(
            self._device, memory_format=self._memory_format)
        self.optimizer = make_optimizer(config, self.model.parameters(), len(dataset.y_train),
                                        total_steps)
        # the schedule drives the optimizer whose step() the loop's step ends in
        stepped = getattr(self.optimizer, "base_optimizer", self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            stepped, lambda step: cosine_factor(step, total_steps))

    # --- one step ---------------------------------------------------------------------------

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """An NHWC NumPy batch as an NCHW tensor on the device, and its labels.

        The permuted view is NCHW with channels-last strides: on the CPU it is copied to the
        standard layout, on a GPU it stays channels-last and is copied from pinned memory, so
        that the copy does not wait for the GPU to finish the previous step."""
        x, y = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)
        if self._device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return (x.to(self._device, memory_format=self._memory_format, non_blocking=True),
                y.to(self._device, non_blocking=True))

    def _forward(self, x: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean cross-entropy on the batch and the logits, in bf16 under ``autocast``."""
        with torch.autocast(self._device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, logits

    def _sgd_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain SGD, ``torch.optim.SGD``'s step: ``b <- momentum b + (g + weight_decay w)``,
        ``w <- w - lr b`` (Nesterov: ``w <- w - lr (g + weight_decay w + momentum b)``)."""
        loss, logits = self._forward(x, y, self.config.label_smoothing)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not torch.isfinite(global_norm(grads)):  # as the SAM variants do: no NaN weights
            raise FloatingPointError("non-finite gradient at w; the weights were not changed")
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss, logits

    def _sam_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of a SAM variant, (1)-(5); returns the loss and logits of pass (1)."""
        smoothing = self.config.label_smoothing
        if isinstance(self.optimizer, BSAM):
            self.optimizer.noisy_step()  # bSAM's pass (1) runs at w + n / sqrt(N s)
        # (1) gradient at the centre w: pass 1, the only one that updates BatchNorm's statistics
        loss, logits = self._forward(x, y, smoothing)
        loss.backward()
        # (2) ascend to w + e; LookSAM's cheap step takes its base step (5) here instead and
        #     returns False, the other variants return None
        if self.optimizer.first_step(zero_grad=True) is not False:
            # (3) gradient at w + e on the same batch, BatchNorm's running statistics frozen
            with disable_running_stats(self.model):
                self._forward(x, y, smoothing)[0].backward()
            # (4) restore w exactly, (5) base step with the variant's direction
            self.optimizer.second_step(zero_grad=True)
        return loss, logits

    def _advance_schedule(self) -> None:
        """The learning rate of the next step (after the optimizer's step, as torch wants)."""
        with warnings.catch_warnings():
            # LambdaLR warns when its optimizer's step() has not run before its first step; bSAM's
            # explicit loop steps through second_step(), so for bSAM that warning is a false alarm
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

    # --- the Trainer interface ----------------------------------------------------------------

    def train_epoch(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Every step of one epoch; the mean pass-1 loss and accuracy, synchronised once."""
        self.model.train()
        step = self._sgd_step if self.config.optimizer == "sgd" else self._sam_step
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        count = 0
        for x_np, y_np in batches:
            x, y = self._tensors(x_np, y_np)
            loss, logits = step(x, y)
            self._advance_schedule()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            count += len(y)
        return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count}

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Mean cross-entropy (no label smoothing) and accuracy at ``w`` (bSAM: its mean),
        BatchNorm with its running statistics."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        count = 0
        for x_np, y_np in batches:
            x, y = self._tensors(x_np, y_np)
            loss, logits = self._forward(x, y, label_smoothing=0.0)
            loss_sum += loss * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            count += len(y)
        self.model.train()
        return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count}

    def lr(self) -> float:
        """The base learning rate of the next step."""
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, epoch: int) -> None:
        """Weights and BatchNorm statistics, the optimizer's full state (momentum, step counts,
        LookSAM's ``g_v``, bSAM's ``m``, ``s`` and generators), the schedule's position, torch's
        global RNG and ``epoch``, in one ``torch.save`` file written atomically."""
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self._device.type == "cuda" else None,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        common.atomic_write(path, buffer.getvalue())

    def load(self, path: Path) -> int:
        """Restore what :meth:`save` wrote; returns the number of epochs done."""
        # onto the CPU first: generator states must be CPU tensors; load_state_dict moves the
        # weights and the optimizer state to the device of the parameters
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["epoch"]
