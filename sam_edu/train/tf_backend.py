"""The TensorFlow / Keras 3 backend of the training command: :class:`TFTrainer`.

The model is a Keras functional model from :mod:`sam_edu.models.tf` (NHWC). For a SAM variant
it is rebuilt as a :class:`sam_edu.tf.SAMModel` on the same layers, whose ``train_step`` is
:func:`sam_edu.tf.sam_train_step`: the exact same-batch step (1)-(5) of ``SPEC.md``, numbered in
its source, with BatchNorm's moving statistics from pass 1 only (saved after pass 1, copied back
after pass 2), LookSAM's pass 2 skipped on its cheap steps (a ``tf.cond`` on what its
``first_step`` returns) and bSAM's pass 1 at its posterior draw. For ``sgd`` it is a plain
``keras.Model`` and Keras' own ``train_step``. Each step is that ``train_step`` inside one
``tf.function`` of ours, called once per batch: the loss and accuracy of pass 1 accumulate in
Keras' metric variables on the device and are read once, at the end of the epoch.

Choices, each the same meaning as in the other two backends:

* the base optimizer is :class:`SGD`, PyTorch's SGD written as a Keras optimizer: weight decay
  is L2 *added to the gradient* and the learning rate multiplies the momentum buffer at the step
  (Keras' own SGD decays the weights outside the gradient and folds the learning rate into its
  buffer, which differ under momentum and a changing learning rate);
* the learning rate is ``keras.optimizers.schedules.CosineDecay(lr, total_steps)`` on the base
  optimizer (on bSAM itself), evaluated at its step count; GSAM's ``rho_min`` is the same cosine
  from ``rho`` down to ``rho_min``;
* ``bf16`` gives every layer Keras' ``mixed_bfloat16`` policy (bfloat16 compute, float32
  weights, logits and optimizer state); the global policy is left alone;
* XLA stays off: it would compile away the optimizers' checks for non-finite gradients, which
  raise ``tf.errors.InvalidArgumentError`` with the weights left unchanged;
* the checkpoint is one ``.npz``: every model weight (BatchNorm's moving statistics included),
  every optimizer variable (the base optimizer's momentum and step count, the SAM variants'
  state, LookSAM's ``g_v``, bSAM's ``m``, ``s`` and noise generator state) and the epoch.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import sam_edu.tf as sam_tf  # noqa: E402
from sam_edu.models import tf as models  # noqa: E402
from sam_edu.train import common  # noqa: E402

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@keras.saving.register_keras_serializable(package="sam_edu.train")
class SGD(keras.optimizers.SGD):
    """SGD with momentum as ``torch.optim.SGD`` defines it (dampening 0)::

        d   = g + l2 * w                                (weight decay: L2 added to the gradient)
        buf = momentum * buf + d                        (buf = d at the first step)
        w  <- w - lr * (d + momentum * buf  if nesterov  else  buf)

    ``l2`` is the ``weight_decay`` of ``torch.optim.SGD`` and ``optax.add_decayed_weights``
    before ``optax.sgd``. Keras' ``weight_decay`` (``w <- w - lr * wd * w`` beside the step,
    outside the momentum) is refused: with momentum ``m`` it decays ``1 / (1 - m)`` times less.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, l2=0.0, name="sgd",
                 **kwargs):
        if kwargs.get("weight_decay") is not None:
            raise ValueError("weight_decay is Keras' decoupled decay; give the L2 coefficient "
                             "added to the gradient as l2")
        kwargs.pop("weight_decay", None)
        if not l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        super().__init__(learning_rate=learning_rate, momentum=float(momentum),
                         nesterov=nesterov, name=name, **kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        d = tf.cast(gradient, variable.dtype) + self.l2 * variable
        if self.momentum == 0:
            self.assign_sub(variable, lr * d)
            return
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, self.momentum * buf + d)
        step = d + self.momentum * buf if self.nesterov else buf
        self.assign_sub(variable, lr * step)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


def _resolve_device(requested: str) -> str:
    """``"auto"``: the first GPU if TensorFlow sees one, else the CPU; ``"gpu"`` needs one."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if requested == "gpu" and not has_gpu:
        raise ValueError("device='gpu', but TensorFlow sees no GPU (tf.config."
                         "list_physical_devices('GPU') is empty); use device='cpu' or 'auto'")
    return "gpu:0" if requested != "cpu" and has_gpu else "cpu"


def _build_model(config: common.Config, dataset, precision: str) -> keras.Model:
    """The functional model of ``config.model``, seeded by ``config.seed``; a
    :class:`sam_edu.tf.SAMModel` on the same layers for a SAM variant. ``bf16``: every layer
    under Keras' ``mixed_bfloat16`` policy (bfloat16 compute, float32 weights and logits)."""
    keras.utils.set_random_seed(config.seed)
    model = models.build(config.model, dataset.input_shape, dataset.num_classes,
                         dtype="mixed_bfloat16" if precision == "bf16" else "float32")
    if config.optimizer == "sgd":
        return model
    return sam_tf.SAMModel(model.inputs, model.outputs, name=model.name)


def _cosine(peak: float, total_steps: int, floor: float = 0.0):
    """``floor + (peak - floor) (1 + cos(pi t / T)) / 2``, Keras' ``CosineDecay`` (whose
    ``alpha`` is the floor as a fraction of the peak)."""
    return keras.optimizers.schedules.CosineDecay(
        peak, total_steps, alpha=floor / peak if peak > 0 else 0.0)


def _build_optimizer(config: common.Config, model: keras.Model, num_data: int,
                     total_steps: int) -> keras.optimizers.Optimizer:
    """``config.optimizer`` around the base :class:`SGD` (bSAM: on its own), cosine lr."""
    lr = _cosine(config.lr, total_steps)
    if config.optimizer == "bsam":
        return sam_tf.BSAM(num_data=num_data, lr=lr, weight_decay=config.weight_decay,
                           rho=config.rho, seed=config.seed)
    base = SGD(learning_rate=lr, momentum=config.momentum, nesterov=config.nesterov,
               l2=config.weight_decay)
    name = config.optimizer
    if name == "sgd":
        return base
    if name == "sam":
        return sam_tf.SAM(base, rho=config.rho)
    if name == "asam":
        return sam_tf.SAM(base, rho=config.rho, adaptive=True, eta=config.eta)
    if name == "gsam":  # rho_t = rho_min + (rho - rho_min) lr_t / lr, or rho constant
        rho = config.rho if config.rho_min is None else _cosine(config.rho, total_steps,
                                                                config.rho_min)
        return sam_tf.GSAM(model, base, rho, alpha=config.alpha)
    if name == "wsam":  # the paper's decoupled form
        return sam_tf.WSAM(model, base, rho=config.rho, gamma=config.gamma)
    # looksam, the last name resolve() lets through
    return sam_tf.LookSAM(base, rho=config.rho, k=config.k, alpha=config.alpha)


class TFTrainer:
    """One run's model, optimizer and compiled steps in TensorFlow / Keras 3.

    Built from the resolved config, the dataset (its shape, classes and size) and the total
    number of steps (the length of the cosine schedule).
    """

    checkpoint_name = "checkpoint.npz"

    def __init__(self, config: common.Config, dataset, total_steps: int):
        self.device = _resolve_device(config.device)
        self.precision = (("bf16" if self.device != "cpu" else "fp32")
                          if config.precision == "auto" else config.precision)
        self.num_classes = dataset.num_classes
        self._device_scope = "/GPU:0" if self.device != "cpu" else "/CPU:0"
        with tf.device(self._device_scope):
            self.model = _build_model(config, dataset, self.precision)
            self.optimizer = _build_optimizer(config, self.model, len(dataset.y_train),
                                              total_steps)
            # training: cross-entropy against (1 - eps) onehot + eps / K, as logits come out
            self.model.compile(
                optimizer=self.optimizer,
                loss=keras.losses.CategoricalCrossentropy(
                    from_logits=True, label_smoothing=config.label_smoothing),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
            self.optimizer.build(self.model.trainable_variables)
        # no XLA: it would compile away the optimizers' checks for non-finite gradients
        self._train_step = tf.function(self._step, jit_compile=False)
        shape = (None, *dataset.input_shape)
        self._eval_step = tf.function(self._sums, jit_compile=False, input_signature=[
            tf.TensorSpec(shape, tf.float32), tf.TensorSpec((None,), tf.int64)])

    def _step(self, x, labels):
        """One training step on one batch: the model's ``train_step``, compiled without XLA.

        For a SAM variant that is :func:`sam_edu.tf.sam_train_step` (SAMModel)::

            [bSAM: w <- w + n / sqrt(N s), a draw from its posterior; w is kept]
            (1) g = grad L_B(w), pass 1: its loss, accuracy and BatchNorm statistics are kept
            (2) optimizer.first_step: save w, move to w + e(w)
                [LookSAM's cheap steps: the base step with d = g + alpha ||g||/||g_v|| g_v,
                 and the step ends here]
            (3) g_adv = grad L_B(w + e) on the same batch, pass 2; BatchNorm's statistics are
                put back to their values after pass 1
            (4) optimizer.second_step: restore w exactly, then
            (5) the base step (:class:`SGD`) at w with the variant's direction d

        For sgd it is Keras' own: one pass and the base step with ``g``. Either way the pass-1
        loss and accuracy are added to the model's metrics, on the device.
        """
        self.model.train_step((x, tf.one_hot(labels, self.num_classes)))

    def _sums(self, x, labels):
        """Summed plain cross-entropy and number of correct predictions on one test batch."""
        logits = tf.cast(self.model(x, training=False), tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        correct = tf.equal(tf.argmax(logits, axis=-1), labels)
        return tf.reduce_sum(loss), tf.reduce_sum(tf.cast(correct, tf.float32))

    def train_epoch(self, batches: Batches) -> dict:
        """Every step of one epoch; the mean pass-1 loss and accuracy, read once at the end.

        A non-finite gradient stops the SAM variants in the step (``InvalidArgumentError``, the
        weights unchanged); a non-finite mean loss raises ``FloatingPointError`` here (sgd).
        """
        self.model.reset_metrics()
        with tf.device(self._device_scope):
            for x, y in batches:
                self._train_step(x, y)
            stats = {k: float(v) for k, v in self.model.get_metrics_result().items()}
        if not np.isfinite(stats["loss"]):
            raise FloatingPointError(f"the training loss is {stats['loss']} (lr={self.lr()}): "
                                     "the weights are not finite")
        return {"loss": stats["loss"], "accuracy": stats["accuracy"]}

    def evaluate(self, batches: Batches) -> dict:
        """Mean cross-entropy (no label smoothing) and accuracy, summed on the device."""
        loss = correct = 0.0
        count = 0
        with tf.device(self._device_scope):
            for x, y in batches:
                batch_loss, batch_correct = self._eval_step(x, y)
                loss, correct, count = loss + batch_loss, correct + batch_correct, count + len(y)
        return {"loss": float(loss) / count, "accuracy": float(correct) / count}

    def lr(self) -> float:
        """The base learning rate the next step uses (the schedule at the step count)."""
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def _state(self) -> list:
        """Everything a resumed run needs, in a fixed order: the model's weights (trainable
        and BatchNorm's moving statistics), then every optimizer variable."""
        return list(self.model.weights) + list(self.optimizer.variables)

    def save(self, path: Path, epoch: int) -> None:
        """Write the state and ``epoch`` to ``path`` (one ``.npz``, atomically)."""
        buffer = io.BytesIO()
        arrays = {str(i): keras.ops.convert_to_numpy(v) for i, v in enumerate(self._state())}
        np.savez(buffer, epoch=np.int64(epoch), **arrays)
        common.atomic_write(path, buffer.getvalue())

    def load(self, path: Path) -> int:
        """Restore what :meth:`save` wrote into this trainer's model and optimizer; the epoch."""
        state = self._state()
        with np.load(path) as saved:
            names = sorted((k for k in saved.files if k != "epoch"), key=int)
            if len(names) != len(state):
                raise ValueError(f"path: {path} holds {len(names)} arrays, this run's model and "
                                 f"optimizer have {len(state)}: another model or optimizer?")
            for name, variable in zip(names, state):
                value = saved[name]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"path: {path}: array {name} has shape {value.shape}, "
                                     f"{variable.path} has {tuple(variable.shape)}")
                variable.assign(value)
            return int(saved["epoch"])
