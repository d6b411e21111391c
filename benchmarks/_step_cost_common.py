"""The timing engine of ``benchmarks/step_cost.py``, shared by its three framework workers.

A *runner* is one optimizer (or pseudo-optimizer: the base step, a floor) set up on its own copy
of the model, with a ``step()`` that takes one whole training step. :func:`time_runners` checks
that every optimizer changes the weights, warms all of them up, then times interleaved blocks in
an order rotated from repeat to repeat; :func:`summarize` turns the blocks into the rows of the
JSON file (medians of paired per-repeat ratios to the base step).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

try:
    import resource  # Unix: page faults and system time of this process
except ImportError:  # Windows
    resource = None

ROLES = ("base", "floor", "ours", "peer")


@dataclass
class Runner:
    """One row of the table: how to take a step, and how to read the weights it changes."""

    name: str
    role: str  # one of ROLES
    implementation: str  # what is timed, e.g. "sam_edu.torch.SAM" or "pytorch_optimizer.SAM"
    step: Callable[[], object]
    weights: Callable[[], list]  # NumPy copies of the weights, for the correctness guard
    sync: Callable[[], object] = lambda: None  # wait for asynchronous work (JAX)
    floor: str | None = None  # the row this one's overhead is measured above
    peer: str | None = None  # the peer row this one is compared with
    mode: str = "eager"  # eager | jit | tf.function | tf.function+xla
    passes_per_step: float | None = None  # forward/backward passes per step, by design
    count_passes: Callable[[], int] | None = None  # passes so far, where they can be counted
    temp_bytes: Callable[[], int] | None = None  # scratch memory of a compiled step (JAX)
    note: str = ""
    times: list = field(default_factory=list)
    faults: list = field(default_factory=list)  # minor page faults per step, per timed block
    system: list = field(default_factory=list)  # system (kernel) CPU seconds per step, per block
    weights_changed: bool | None = None
    passes_measured: float | None = None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tensor_shapes(sizes: dict) -> list[tuple[int, ...]]:
    """Case ``tensors``: ``sizes["tensors"]`` tensors, alternately (width, width) and (width,)."""
    width = sizes["width"]
    return [(width, width) if i % 2 == 0 else (width,) for i in range(sizes["tensors"])]


def tensor_arrays(sizes: dict, rng: np.random.Generator) -> tuple[list, list, list]:
    """Case ``tensors`` in float32: the initial weights, the preset gradient at ``w`` and the
    quadratic loss's target, drawn from ``rng`` in that order."""
    shapes = tensor_shapes(sizes)
    return tuple([rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _changed(before: list, after: list) -> bool:
    return any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(before, after))


def time_runners(runners: list[Runner], repeats: int, steps: int, warmup: int,
                 label: str = "") -> None:
    """Guard, warm up and time ``runners``; fills each runner's ``times`` (seconds per step).

    The first warm-up step of every runner is the correctness guard: the weights are read before
    and after it, and an optimizer (``ours`` or ``peer``) that leaves them unchanged, or makes
    them non-finite, stops the benchmark (nothing is timed doing nothing). Floors that take no
    step of their own are exempt.
    """
    setup = time.perf_counter()
    for run in runners:
        row_start = time.perf_counter()
        before = run.weights()
        run.step()
        run.sync()
        after = run.weights()
        run.weights_changed = _changed(before, after)
        finite = all(np.all(np.isfinite(a)) for a in after)
        if run.role in ("ours", "peer") and not (run.weights_changed and finite):
            what = "left the weights unchanged" if finite else "gave non-finite weights"
            raise SystemExit(f"{label} {run.name}: one step {what}; refusing to time it")
        for _ in range(warmup - 1):
            run.step()
        run.sync()
        log(f"{label} {run.name}: first step and warm-up {time.perf_counter() - row_start:.1f} s")
    log(f"{label}: guard and warm-up (compilation included) {time.perf_counter() - setup:.1f} s; "
        f"timing {len(runners)} rows x {repeats} rounds")
    counts_at_start = {run.name: run.count_passes() for run in runners if run.count_passes}
    for r in range(repeats):
        for i in range(len(runners)):
            run = runners[(i + r) % len(runners)]  # rotate the order from repeat to repeat
            run.sync()
            usage = resource.getrusage(resource.RUSAGE_SELF) if resource else None
            start = time.perf_counter()
            for _ in range(steps):
                run.step()
            run.sync()
            run.times.append((time.perf_counter() - start) / steps)
            if usage:
                after = resource.getrusage(resource.RUSAGE_SELF)
                run.faults.append((after.ru_minflt - usage.ru_minflt) / steps)
                run.system.append((after.ru_stime - usage.ru_stime) / steps)
    for run in runners:
        if run.count_passes:
            run.passes_measured = ((run.count_passes() - counts_at_start[run.name])
                                   / (repeats * steps))


def summarize(runners: list[Runner]) -> list[dict]:
    """The rows of one (framework, case) run; the first runner is the base step."""
    base = runners[0]  # the denominator; TF has a second "base" row, its base without XLA
    assert base.role == "base"
    by_name = {run.name: run for run in runners}

    def ratios(run):
        return [t / b for t, b in zip(run.times, base.times)]

    rows = []
    for run in runners:
        ratio = ratios(run)
        times_ms = [1e3 * t for t in run.times]
        floor = by_name.get(run.floor) if run.floor else None
        floor_ratio = ratios(floor) if floor else None
        rows.append(dict(
            name=run.name,
            role=run.role,
            implementation=run.implementation,
            mode=run.mode,
            floor=run.floor,
            peer=run.peer,
            passes_per_step=run.passes_per_step,
            passes_measured=run.passes_measured,
            weights_changed=run.weights_changed,
            step_ms_median=statistics.median(times_ms),
            ratio_to_base=statistics.median(ratio),
            floor_ratio=statistics.median(floor_ratio) if floor else None,
            overhead_above_floor=(statistics.median(a - f for a, f in zip(ratio, floor_ratio))
                                  if floor else None),
            step_ms_per_repeat=times_ms,
            ratio_per_repeat=ratio,
            minor_faults_per_step=statistics.median(run.faults) if run.faults else None,
            system_ms_per_step=1e3 * statistics.median(run.system) if run.system else None,
            temp_bytes=run.temp_bytes() if run.temp_bytes else None,
            note=run.note,
        ))
    return rows
