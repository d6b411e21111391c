"""The JAX backend of the training command: a flax.linen model and an optax optimizer from
:mod:`sam_edu.jax`, trained with one jitted step.

The step is a pure function ``(state, totals, x, y) -> (state, totals)``: ``state`` holds the
weights, the BatchNorm statistics and the optimizer state, ``totals`` the running sums of the
epoch's loss and correct predictions, so an epoch never waits for the device until its end.

How the two passes of a SAM step divide the work (``sam_edu.jax`` runs in *opaque* mode)::

    g, (loss, stats) = grad L_B(w)                  (1) pass 1, here: its loss, accuracy and
                                                        BatchNorm statistics are the step's
    updates = opt.update(g, ..., grad_fn=grad_fn)   (2)-(5) in the optimizer: it ascends to
                                                        w + e, calls grad_fn(w + e) on the same
                                                        batch (pass 2) and steps at w
    w <- w + updates

``grad_fn`` runs the model in train mode, as pass 1 did, so BatchNorm normalises pass 2 with its
own batch statistics; the running statistics it produces are dropped: they come from pass 1 only
(SPEC.md, "Practical conventions"). bSAM computes both of its gradients itself (pass 1 at a noisy
point only it knows), so there the first ``grad_fn`` call is pass 1. LookSAM evaluates ``grad_fn``
only on its SAM steps (a ``lax.cond`` inside the optimizer), so a step costs ``1 + 1/k`` passes.

Weight decay is coupled L2 in the base step: ``optax.add_decayed_weights`` adds ``wd * w`` to the
direction the SAM variant hands to SGD, as ``torch.optim.SGD(weight_decay=wd)`` does; it never
enters the perturbation ``e``. A step whose gradient is not finite is skipped by the optimizer
(SGD's by ``optax.apply_if_finite``) and counted: :meth:`JaxTrainer.train_epoch` reports the
count as ``skipped_steps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import sam_edu.jax as sam_jax
from sam_edu.models.jax import build
from sam_edu.train import common


class TrainState(NamedTuple):
    """Everything a step changes: weights, BatchNorm running statistics, optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Mean cross-entropy against the smoothed targets ``(1 - eps) onehot(y) + eps / K``.

    ``eps = 0`` is the plain cross-entropy. The logits are cast to float32 first (bf16 runs).
    """
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_optimizer(config: common.Config, num_data: int, total_steps: int):
    """The optimizer of ``config`` and its learning-rate schedule (cosine from ``lr`` to 0).

    The base of every SAM variant, and ``sgd`` itself, is SGD with momentum whose direction gets
    ``weight_decay * w`` added first (coupled L2). bSAM is a full optimizer with its own ``lr``
    (following the same cosine) and ``delta = weight_decay``.
    """
    c = config
    schedule = optax.cosine_decay_schedule(c.lr, total_steps)
    if c.optimizer == "bsam":
        return sam_jax.bsam(num_data, learning_rate=schedule, weight_decay=c.weight_decay,
                            rho=c.rho, seed=c.seed), schedule
    base = optax.chain(optax.add_decayed_weights(c.weight_decay),
                       optax.sgd(schedule, momentum=c.momentum, nesterov=c.nesterov))
    if c.optimizer == "sgd":
        # skip a non-finite step, as the SAM variants do (the saturating count never reaches
        # the limit, so a NaN is never applied)
        return optax.apply_if_finite(base, np.iinfo(np.int32).max), schedule
    if c.optimizer == "sam":
        return sam_jax.sam(base, c.rho), schedule
    if c.optimizer == "asam":
        return sam_jax.sam(base, c.rho, adaptive=True, eta=c.eta), schedule
    if c.optimizer == "gsam":
        rho = c.rho
        if c.rho_min is not None:  # rho_t = rho_min + (rho - rho_min) lr_t / lr
            if c.lr == 0:
                raise ValueError("rho_min: a rho proportional to the learning rate needs lr > 0")
            rho = sam_jax.lr_proportional_rho(schedule, lr_max=c.lr, lr_min=0.0, rho_max=c.rho,
                                              rho_min=c.rho_min)
        return sam_jax.gsam(base, rho, alpha=c.alpha), schedule
    if c.optimizer == "wsam":  # the paper's decoupled form: its sharpness term needs lr_t
        return sam_jax.wsam(base, learning_rate=schedule, rho=c.rho, gamma=c.gamma), schedule
    return sam_jax.looksam(base, rho=c.rho, k=c.k, alpha=c.alpha), schedule


def skipped_steps(opt_state) -> jax.Array:
    """How many steps the optimizer skipped for a non-finite gradient since the run began."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return opt_state.notfinite_count


def schedule_position(opt_state) -> jax.Array:
    """The step at which the learning-rate schedule is evaluated next: the count of optax's
    ``scale_by_schedule`` inside the base SGD, or bSAM's own. Skipped steps do not count."""
    def is_schedule_count(path, _):
        return path[-1].tuple_name in ("ScaleByScheduleState", "BSAMState")

    return optax.tree_utils.tree_get(opt_state, "count", filtering=is_schedule_count)


def select_device(requested: str) -> jax.Device:
    """``"auto"``: the first GPU if JAX has one, else the CPU; ``"gpu"`` without one: error."""
    if requested == "cpu" or (requested == "auto" and jax.default_backend() != "gpu"):
        return jax.devices("cpu")[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError as error:
        raise ValueError(f"device: 'gpu' was requested but JAX sees no GPU (default backend "
                         f"{jax.default_backend()!r}); install jax[cuda12] or pass device "
                         f"'cpu' or 'auto'") from error


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(tree):
    """Typed PRNG keys (bSAM's ``state.key``) as their raw ``uint32`` data, for saving."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _check_leaf(where, want, got) -> None:
    """``ValueError`` when a restored leaf's shape or dtype is not the template's."""
    if np.shape(want) != np.shape(got) or np.result_type(want) != np.result_type(got):
        raise ValueError(f"{jax.tree_util.keystr(where)} holds {np.result_type(got)}"
                         f"{list(np.shape(got))}, this run has {np.result_type(want)}"
                         f"{list(np.shape(want))}")


class JaxTrainer:
    """Trains ``config.model`` with ``config.optimizer`` in JAX (see the module docstring)."""

    checkpoint_name = "checkpoint.msgpack"

    def __init__(self, config: common.Config, dataset, total_steps: int):
        self.config = config
        self._device = select_device(config.device)
        self.device = "cpu" if self._device.platform == "cpu" else f"gpu:{self._device.id}"
        if config.precision == "auto":
            self.precision = "fp32" if self.device == "cpu" else "bf16"
        else:
            self.precision = config.precision
        # bf16: compute in bfloat16, weights and optimizer state in float32
        dtype = jnp.bfloat16 if self.precision == "bf16" else jnp.float32
        self.model = build(config.model, dataset.input_shape, dataset.num_classes, dtype=dtype)
        self.optimizer, self.schedule = make_optimizer(config, len(dataset.y_train), total_steps)
        self._state = jax.device_put(self._init_state(dataset.input_shape), self._device)
        self._train_step = jax.jit(self._step, donate_argnums=(0, 1))
        self._eval_step = jax.jit(self._evaluate_batch, donate_argnums=(1,))

    def _init_state(self, input_shape) -> TrainState:
        """Weights and statistics from ``jax.random.key(seed)``; a fresh optimizer state."""
        variables = self.model.init(jax.random.key(self.config.seed),
                                    jnp.zeros((1, *input_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(params, variables["batch_stats"], self.optimizer.init(params))

    def _loss(self, params, batch_stats, x, y):
        """The training loss (label smoothing) in train mode, with the logits and the running
        statistics this forward pass produced."""
        logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x,
                                           train=True, mutable=["batch_stats"])
        loss = cross_entropy(logits, y, self.config.label_smoothing)
        return loss, (logits, updates["batch_stats"])

    def _step(self, state: TrainState, totals: jax.Array, x: jax.Array, y: jax.Array):
        """One optimizer step on the batch ``(x, y)``; adds ``[loss, correct, count]`` to
        ``totals``."""
        pass_one = []

        def grad_fn(params):
            """A forward/backward pass in train mode on this batch. Only the step's first pass,
            pass 1, has its loss, correct count and BatchNorm statistics kept (a Python list
            read at trace time); those of pass 2 are dropped."""
            (loss, (logits, stats)), grads = jax.value_and_grad(self._loss, has_aux=True)(
                params, state.batch_stats, x, y)
            if not pass_one:
                pass_one.append((loss, jnp.sum(jnp.argmax(logits, -1) == y), stats))
            return grads

        if self.config.optimizer == "bsam":
            # bSAM runs (1)-(5) itself: pass 1 is at its noisy point w + n / sqrt(N s)
            updates, opt_state = self.optimizer.update(None, state.opt_state, state.params,
                                                       grad_fn=grad_fn)
        else:
            # (1) gradient at the centre: g = grad L_B(w), pass 1
            grads = grad_fn(state.params)
            # (2) ascend to w + e, (3) g_adv = grad_fn(w + e) on the same batch, (4) nothing to
            # restore (w was never overwritten), (5) base step at w: all inside the optimizer
            # (sgd ignores grad_fn; LookSAM calls it on its SAM steps only)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params,
                                                       grad_fn=grad_fn)
        params = optax.apply_updates(state.params, updates)
        loss, correct, stats = pass_one[0]
        # a skipped step (non-finite gradient) leaves the statistics as they were, too
        skipped = skipped_steps(opt_state) > skipped_steps(state.opt_state)
        stats = jax.tree.map(lambda old, new: jnp.where(skipped, old, new),
                             state.batch_stats, stats)
        return TrainState(params, stats, opt_state), totals + jnp.stack([loss, correct, len(y)])

    def _evaluate_batch(self, state: TrainState, totals: jax.Array, x: jax.Array, y: jax.Array):
        """Adds ``[summed cross-entropy, correct, count]`` of one batch (eval mode) to totals."""
        logits = self.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                  train=False)
        loss = cross_entropy(logits, y) * len(y)
        return totals + jnp.stack([loss, jnp.sum(jnp.argmax(logits, -1) == y), len(y)])

    def _put(self, x: np.ndarray, y: np.ndarray):
        return jax.device_put((x, y), self._device)

    def train_epoch(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Every step of one epoch; the mean pass-1 loss and accuracy, and ``skipped_steps``
        (steps skipped for a non-finite gradient since the run began). One host sync, at the
        end."""
        totals = jax.device_put(jnp.zeros(3, jnp.float32), self._device)
        steps = 0
        for x, y in batches:
            self._state, totals = self._train_step(self._state, totals, *self._put(x, y))
            steps += 1
        (loss, correct, count), skipped = jax.device_get(
            (totals, skipped_steps(self._state.opt_state)))
        jax.block_until_ready(self._state)
        return {"loss": loss / steps, "accuracy": correct / count, "skipped_steps": int(skipped)}

    def evaluate(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Mean cross-entropy (no label smoothing) and accuracy, BatchNorm in eval mode."""
        totals = jax.device_put(jnp.zeros(3, jnp.float32), self._device)
        for x, y in batches:
            totals = self._eval_step(self._state, totals, *self._put(x, y))
        loss, correct, count = jax.device_get(totals)
        return {"loss": loss / count, "accuracy": correct / count}

    def lr(self) -> float:
        """The base learning rate of the next step: the schedule at its current position."""
        return float(self.schedule(schedule_position(self._state.opt_state)))

    def save(self, path: Path, epoch: int) -> None:
        """One msgpack file (``flax.serialization``): ``{"state": weights, BatchNorm statistics
        and the full optimizer state, "epoch": epochs done}``; PRNG keys as their raw data."""
        state = serialization.to_state_dict(jax.device_get(_key_data(self._state)))
        common.atomic_write(path, serialization.msgpack_serialize({"state": state,
                                                                   "epoch": epoch}))

    def load(self, path: Path) -> int:
        """Restore what :meth:`save` wrote into this trainer's state; return the epoch.

        The current state is the template: a checkpoint of another model or optimizer (other
        structure, shapes or dtypes) is refused with a ``ValueError``.
        """
        saved = serialization.msgpack_restore(Path(path).read_bytes())
        template = jax.device_get(_key_data(self._state))
        try:
            restored = serialization.from_state_dict(template, saved["state"])
            jax.tree_util.tree_map_with_path(_check_leaf, template, restored)
        except ValueError as error:
            raise ValueError(f"path: {path} is not a checkpoint of this model and optimizer "
                             f"({error})") from error
        typed = jax.tree.map(
            lambda now, got: jax.random.wrap_key_data(got, impl=jax.random.key_impl(now))
            if _is_key(now) else jnp.asarray(got), self._state, restored)
        self._state = jax.device_put(typed, self._device)
        return int(saved["epoch"])
