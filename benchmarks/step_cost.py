"""What a SAM step costs, side by side with the base optimizer, the floor and the peers.

One command runs PyTorch, JAX and TensorFlow (each in its own subprocess, one after the other)
on three cases and writes one JSON file that chapter 11 reads::

    python benchmarks/step_cost.py                          # all frameworks and cases, ~6 min
    python benchmarks/step_cost.py --framework torch --case mlp --repeats 5
    python benchmarks/step_cost.py --tiny --out /tmp/t.json # seconds: the test's setting
    python benchmarks/step_cost.py --markdown book/results/step_cost_cpu.json  # README table
    python benchmarks/step_cost.py --framework jax --malloc no-mmap \
        --out book/results/step_cost_cpu_jax_no_mmap.json      # the same, glibc's mmap off

Cases (the same model in every framework, synthetic data, one fixed batch):

* ``cnn``: a small CNN on CIFAR-shaped images, batch 32 of 32x32x3: conv3x3(32)-ReLU,
  conv3x3/2(64)-ReLU, conv3x3(64)-ReLU, conv3x3/2(128)-ReLU, global average pool, linear(10);
  about 0.13 M parameters;
* ``mlp``: 3072-1024-1024-1024-10 with ReLU, batch 64: 5.26 M parameters;
* ``tensors``: 200 small tensors (100 of 32x32, 100 of 32), **optimizer only**. PyTorch: the
  gradients are set once and a step is ``first_step()`` + ``second_step()`` (bSAM:
  ``noisy_step()`` first) against ``SGD.step()``. JAX and TF cannot skip the gradient inside a
  compiled step without the compiler removing the perturbation (nothing would read it), so there
  the gradient of the quadratic loss ``0.5 ||w - t||^2`` (one subtraction per tensor) stands in
  for the passes; the gradient at ``w`` is an input, as in PyTorch.

Rows, per framework and case, every one on its own copy of the same initial weights:

* the base optimizer: SGD with momentum 0.9 (``torch.optim.SGD``, ``optax.sgd``,
  ``keras.optimizers.SGD``), one forward/backward pass and one step. Every ratio is to this row;
* ``floor``: two forward/backward passes and one base step, the least any SAM step can cost;
  ``floor bSAM``: two passes and drawing bSAM's noise (one normal draw of all the weights), no
  step; JAX also ``floor LookSAM k=5``: the floor's step every k-th step, the base step
  otherwise. In JAX and TF, where an unused result is removed as dead code, the floor steps with
  ``g1 + g2`` and ``floor bSAM`` sums its gradients and noise (see their modules).
  In case ``tensors`` (PyTorch) the floor of SAM-family rows is the base step itself;
* ours: SAM, ASAM, GSAM, WSAM, bSAM, LookSAM (k=5) from ``sam_edu.torch|jax|tf``; JAX also
  ``SAM (adversarial_sam)``, our drop-in for ``optax.contrib.sam``;
* peers in the same process: ``pytorch_optimizer`` SAM, GSAM, WSAM, BSAM, LookSAM (driven as
  their docstrings say: SAM and LookSAM ``closure(); step(closure)``, WSAM and BSAM
  ``step(closure)``, GSAM ``set_closure(); step(); update_rho_t()`` with a constant
  ``ProportionScheduler``; their own defaults, so ``foreach=None``: per-tensor loops on CPU,
  unless ``--peer-foreach``), and ``optax.contrib.sam`` in opaque mode with ``sync_period=2``:
  ``sam(sgd(lr, momentum), chain(normalize(), sgd(rho)), sync_period=2, opaque_mode=True)``, one
  ``update`` with ``grad_fn`` = one SAM step of two passes, which is what the other rows do per
  step (transparent mode would spread one SAM step over two jitted calls).

How each framework is driven: PyTorch eagerly (its normal use). JAX: each whole training step
(passes and update) is one ``jax.jit`` function with the parameters and optimizer state donated,
and each timed block ends with ``block_until_ready``. TensorFlow: each whole step is one
``tf.function``; every row first tries ``jit_compile=True`` (XLA) and falls back to a plain
``tf.function`` when tracing raises (sam_edu.tf refuses XLA: it would drop the finite checks);
``mode`` records which. The base and the floor are also timed without XLA (``SGD (graph)``,
``floor (graph)``), so both comparisons are at hand.

Hyperparameters (``settings.hyperparameters``): lr 0.01, momentum 0.9, rho 0.05 (ASAM 0.5 with
eta 0.01), GSAM alpha 0.4, WSAM gamma 0.9, LookSAM k 5 and alpha 0.7, the same for ours and the
peers. bSAM (ours and the peer): N = 50000, lr 0.01 and rho 0.001: ``pytorch_optimizer.BSAM``
never moves back from its noisy and ascended points (its step adds ``n`` and ``rho g / s`` to the
weights for good), so with rho 0.05 its weights turn NaN within ~40 steps of the CNN; a step's
cost does not depend on rho.

Timing, as in ``benchmarks/looksam_step_time.py``: before timing, one step of every row checks
that the weights changed and stayed finite (an optimizer that changes nothing stops the run);
then warm-up steps; then ``--repeats`` rounds, each timing one block of ``--steps`` steps per row
in an order rotated from round to round, so that drifts of the machine hit every row alike.
Blocks and the warm-up hold a multiple of k = 5 steps, so each LookSAM block holds exactly
steps/5 full SAM steps. One thread per framework by default (``torch.set_num_threads``;
TensorFlow's intra- and inter-op pools; JAX: the worker process is pinned to ``--threads`` CPUs
with ``os.sched_setaffinity``, since no XLA flag limits XLA:CPU's threads): on a two-core
machine more threads mostly measure the load.

Per row: ``ratio_to_base`` = median over rounds of (row's time per step / base's in the same
round); ``floor_ratio`` likewise for its floor; ``overhead_above_floor`` = median over rounds of
(ratio - floor's ratio), the paired difference. The targets of issue 8 are checked from these
medians in the same run and printed as ``pass``/``FAIL``. TensorFlow's target divides SAM's step
by the faster of ``SGD`` (XLA) and ``SGD (graph)``, whichever XLA helps.

Each row also records where time can go besides arithmetic: the process's minor page faults and
kernel CPU time per step, measured around the same timed blocks, and for JAX the scratch memory
of the compiled step. On Linux, glibc's ``malloc`` serves a block of more than 32 MiB with a
fresh ``mmap`` (its largest adaptive threshold) and returns it at ``free``, so a jitted step
whose scratch memory is one such block faults every page of it in again at every step.
``--malloc no-mmap`` runs the workers with glibc's ``mmap`` for large blocks turned off and the
top of its heap kept (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` at 4 GiB, mallopt(3)):
freed blocks are reused from step to step, as a GPU's caching allocator reuses its memory, and
what is left above the floor is the arithmetic. The default run is the one the targets are
judged on; the other says how much of a miss is the allocator's.

JSON schema (``schema_version`` 1), written to ``--out`` (default
``book/results/step_cost_cpu.json``)::

    schema_version: 1
    description, command, date (UTC ISO), duration_s (whole command)
    machine: {cpu_model, cpu_cores, cpu_cores_available, platform, threads}
    versions: {python, numpy, torch, jax, jaxlib, optax, tensorflow, keras, pytorch_optimizer,
               sam_edu_commit, sam_edu_dirty}  (a package not installed: null)
    settings: {frameworks, cases, repeats, steps_per_repeat, tensors_steps_per_repeat,
               warmup_steps, threads, seed, tiny, peer_foreach, malloc (default|no-mmap),
               malloc_environment (the variables the workers were started with),
               hyperparameters: {lr, momentum, rho, asam_rho, asam_eta, gsam_alpha,
                                 wsam_gamma, looksam_k, looksam_alpha, bsam_num_data, bsam_lr,
                                 bsam_rho},
               sizes: {cnn: {batch, image_size, channels}, mlp: {batch, widths},
                       tensors: {tensors, width}}}
    runs: list of {framework, case, parameters, tensors, input_shape (or null),
                   framework_info: {..., malloc_environment (the MALLOC_* variables the
                                    worker saw)}, duration_s, steps_per_repeat,
                   rows: list of {name, role (base|floor|ours|peer), implementation,
                                  mode (eager|jit|tf.function|tf.function+xla), floor (row name
                                  or null), peer (row name or null), passes_per_step (by design,
                                  or null), passes_measured (counted forward calls per timed
                                  step, PyTorch; else null), weights_changed, step_ms_median,
                                  ratio_to_base, floor_ratio, overhead_above_floor,
                                  step_ms_per_repeat: [..], ratio_per_repeat: [..],
                                  minor_faults_per_step, system_ms_per_step (medians over
                                  rounds of the process's minor page faults and kernel CPU time
                                  per step; null without the resource module), temp_bytes
                                  (XLA's scratch memory per step, JAX's jitted rows; else null),
                                  note}}
    targets: list of {framework, case, id, description, value, limit, passed, text}

Row names are stable: ``SGD``, ``floor``, ``floor bSAM``, ``SAM``, ``ASAM``, ``GSAM``, ``WSAM``,
``bSAM``, ``LookSAM k=5``, ``pytorch_optimizer <name>``, ``optax.contrib.sam``,
``SAM (adversarial_sam)``, ``floor LookSAM k=5`` (JAX), ``SGD (graph)``, ``floor (graph)`` (TF).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _step_cost_common import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FRAMEWORKS = ("torch", "jax", "tf")
CASES = ("cnn", "mlp", "tensors")

HYPERPARAMETERS = dict(lr=0.01, momentum=0.9, rho=0.05, asam_rho=0.5, asam_eta=0.01,
                       gsam_alpha=0.4, wsam_gamma=0.9, looksam_k=5, looksam_alpha=0.7,
                       bsam_num_data=50_000, bsam_lr=0.01, bsam_rho=0.001)
SIZES = dict(cnn=dict(batch=32, image_size=32, channels=32),
             mlp=dict(batch=64, widths=[3072, 1024, 1024, 1024, 10]),
             tensors=dict(tensors=200, width=32))
TINY_SIZES = dict(cnn=dict(batch=2, image_size=8, channels=4),
                  mlp=dict(batch=4, widths=[48, 16, 16, 16, 10]),
                  tensors=dict(tensors=20, width=4))
DEFAULT_TIMING = dict(repeats=10, steps=5, tensors_steps=20, warmup=5)
TINY_TIMING = dict(repeats=2, steps=5, tensors_steps=5, warmup=5)
# --malloc: the environment of the worker processes (glibc reads it when a process starts)
MALLOC_ENVIRONMENT = {"default": {},
                      "no-mmap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--framework", choices=(*FRAMEWORKS, "all"), default="all")
    p.add_argument("--case", choices=(*CASES, "all"), default="all")
    p.add_argument("--out", type=Path, default=ROOT / "book" / "results" / "step_cost_cpu.json",
                   help="where to write the JSON results")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default 10; --tiny: 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block, cases cnn and mlp; a multiple of k=5 "
                        "(default 5; --tiny: 5)")
    p.add_argument("--tensors-steps", type=int, default=None,
                   help="steps per timed block, case tensors; a multiple of 5 (default 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per row, the guard step included; a multiple of 5, "
                        ">= 5 (default 5)")
    p.add_argument("--threads", type=int, default=1, help="threads per framework")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and 2 short repeats: checks that everything runs")
    p.add_argument("--peer-foreach", action="store_true",
                   help="pytorch_optimizer peers with foreach=True (default: their default, "
                        "foreach=None, which loops per tensor on CPU)")
    p.add_argument("--malloc", choices=tuple(MALLOC_ENVIRONMENT), default="default",
                   help="glibc's malloc as it comes, or with mmap for large blocks off and the "
                        "heap kept (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=4 GiB)")
    p.add_argument("--markdown", type=Path, metavar="JSON",
                   help="run nothing: print the README's headline table from a results file")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = TINY_TIMING if args.tiny else DEFAULT_TIMING
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    k = HYPERPARAMETERS["looksam_k"]
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    for name in ("steps", "tensors_steps", "warmup"):
        value = getattr(args, name)
        if value < k or value % k:
            p.error(f"--{name.replace('_', '-')} must be a positive multiple of {k} (LookSAM's "
                    "k), so that every block holds the same share of full SAM steps")
    return args


def settings(args) -> dict:
    return dict(
        frameworks=list(FRAMEWORKS) if args.framework == "all" else [args.framework],
        cases=list(CASES) if args.case == "all" else [args.case],
        repeats=args.repeats, steps_per_repeat=args.steps,
        tensors_steps_per_repeat=args.tensors_steps, warmup_steps=args.warmup,
        threads=args.threads, seed=args.seed, tiny=args.tiny, peer_foreach=args.peer_foreach,
        malloc=args.malloc, malloc_environment=MALLOC_ENVIRONMENT[args.malloc],
        hyperparameters=dict(HYPERPARAMETERS),
        sizes=TINY_SIZES if args.tiny else SIZES,
    )


# --------------------------------------------------------------------------------------------
# worker: one framework, in its own process


def limit_threads(framework: str, threads: int) -> None:
    """Before the framework is imported: one intra-op pool of ``threads`` threads."""
    if framework == "jax":
        # XLA:CPU sizes its thread pools by the CPUs this process may run on, and none of its
        # flags limits them (measured: a jitted matmul took 2 cores with
        # --xla_cpu_multi_thread_eigen=false); so the process is restricted to `threads` CPUs
        if hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            if threads < len(cpus):
                os.sched_setaffinity(0, cpus[:threads])
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if framework == "tf":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def malloc_environment() -> dict:
    """The ``MALLOC_*`` variables of this process, which glibc read when it started."""
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith("MALLOC_")}


def worker(args) -> None:
    limit_threads(args.worker, args.threads)
    sys.path.insert(0, str(HERE))
    from _step_cost_common import log, summarize, time_runners

    if args.worker == "torch":
        import _step_cost_torch as fw
        import torch
        torch.set_num_threads(args.threads)
    elif args.worker == "jax":
        import _step_cost_jax as fw
    else:
        import _step_cost_tf as fw
        fw.set_threads(args.threads)
    s = settings(args)
    runs = []
    for case in s["cases"]:
        start = time.perf_counter()
        runners, info = fw.build(case, s["sizes"][case], s["hyperparameters"], args.peer_foreach,
                                 args.seed)
        steps = args.tensors_steps if case == "tensors" else args.steps
        time_runners(runners, args.repeats, steps, args.warmup, label=f"{args.worker} {case}")
        runs.append(dict(framework=args.worker, case=case, parameters=info.pop("parameters"),
                         tensors=info.pop("tensors"), input_shape=info.pop("input_shape", None),
                         framework_info={**fw.versions(), **info,
                                         "malloc_environment": malloc_environment()},
                         duration_s=round(time.perf_counter() - start, 1),
                         steps_per_repeat=steps, rows=summarize(runners)))
        log(f"{args.worker} {case}: {runs[-1]['duration_s']} s")
        del runners
    args.part_out.write_text(json.dumps(runs))


# --------------------------------------------------------------------------------------------
# driver


def machine(args) -> dict:
    return dict(
        cpu_model=cpu_model(), cpu_cores=os.cpu_count(),
        cpu_cores_available=(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count()),
        platform=platform.platform(), threads=args.threads)


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    out = dict(python=platform.python_version())
    for key, dist in (("numpy", "numpy"), ("torch", "torch"), ("jax", "jax"),
                      ("jaxlib", "jaxlib"), ("optax", "optax"), ("tensorflow", "tensorflow"),
                      ("keras", "keras"), ("pytorch_optimizer", "pytorch_optimizer")):
        out[key] = _version(dist)
    if out["tensorflow"] is None:
        out["tensorflow"] = _version("tensorflow-cpu")
    try:
        out["sam_edu_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True).stdout.strip()
        out["sam_edu_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "sam_edu"], cwd=ROOT, capture_output=True,
            text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        out["sam_edu_commit"], out["sam_edu_dirty"] = None, None
    return out


def _rows(runs, framework, case):
    for run in runs:
        if run["framework"] == framework and run["case"] == case:
            return {row["name"]: row for row in run["rows"]}
    return None


def targets(runs: list[dict], k: int) -> list[dict]:
    """The targets of issue 8, each computed from one run's medians."""
    out = []

    def check(framework, case, tid, description, value, limit):
        passed = value <= limit
        out.append(dict(framework=framework, case=case, id=tid, description=description,
                        value=value, limit=limit, passed=passed,
                        text=f"{description}: {value:.3f} <= {limit:.3f}: "
                             f"{'pass' if passed else 'FAIL'}"))

    look = f"LookSAM k={k}"
    rows = _rows(runs, "torch", "mlp")
    if rows:
        sam, peer = rows["SAM"], rows["pytorch_optimizer SAM"]
        check("torch", "mlp", "sam_overhead_half_of_peer",
              "SAM overhead above floor <= 0.5 x pytorch_optimizer SAM's",
              sam["overhead_above_floor"], 0.5 * peer["overhead_above_floor"])
        for name in ("GSAM", "WSAM"):
            check("torch", "mlp", f"{name.lower()}_within_0.1_of_sam",
                  f"{name} ratio <= SAM ratio + 0.1",
                  rows[name]["ratio_to_base"], sam["ratio_to_base"] + 0.1)
        check("torch", "mlp", "bsam_within_0.3_of_floor",
              "bSAM overhead above its floor (2 passes + noise)",
              rows["bSAM"]["overhead_above_floor"], 0.3)
        check("torch", "mlp", "looksam_k5_ratio", f"{look} ratio to SGD",
              rows[look]["ratio_to_base"], 1.35)
    rows = _rows(runs, "torch", "tensors")
    if rows:
        check("torch", "tensors", "sam_two_steps_ratio",
              "SAM first_step+second_step / SGD.step()", rows["SAM"]["ratio_to_base"], 1.5)
    for case in CASES:
        rows = _rows(runs, "torch", case)
        if not rows:
            continue
        for row in rows.values():
            if row["role"] == "ours" and row["peer"] in rows:
                peer = rows[row["peer"]]
                check("torch", case, f"{row['name']}_at_or_below_peer".replace(" ", "_"),
                      f"{row['name']} ratio <= {row['peer']}", row["ratio_to_base"],
                      peer["ratio_to_base"])
    for case in ("cnn", "mlp"):
        rows = _rows(runs, "jax", case)
        if rows:
            for row in rows.values():
                if row["role"] != "ours":
                    continue
                ref = row["peer"] or row["floor"]
                if ref not in rows:
                    continue
                check("jax", case, f"{row['name']}_within_2pct".replace(" ", "_"),
                      f"{row['name']} ratio <= 1.02 x {ref} ratio",
                      row["ratio_to_base"], 1.02 * rows[ref]["ratio_to_base"])
        rows = _rows(runs, "tf", case)
        if rows:
            # to the faster of the two base steps (XLA or not): XLA is used where it helps
            fastest = min(1.0, rows["SGD (graph)"]["ratio_to_base"])
            check("tf", case, "sam_ratio", f"SAM ({rows['SAM']['mode']}) step / the faster SGD "
                  "step (XLA or not)", rows["SAM"]["ratio_to_base"] / fastest, 2.1)
    return out


def print_tables(record) -> None:
    for run in record["runs"]:
        print(f"\n== {run['framework']} / {run['case']}: {run['parameters']:,} parameters in "
              f"{run['tensors']} tensors, {run['duration_s']} s ==")
        print(f"{'optimizer':32s} {'mode':16s} {'ms/step':>9s} {'ratio':>7s} {'floor':>7s} "
              f"{'overhead':>9s} {'passes':>7s} {'faults':>7s} {'temp MB':>8s}")
        for row in run["rows"]:
            floor = "" if row["floor_ratio"] is None else f"{row['floor_ratio']:.3f}"
            over = ("" if row["overhead_above_floor"] is None
                    else f"{row['overhead_above_floor']:+.3f}")
            passes = row["passes_measured"] if row["passes_measured"] is not None else \
                row["passes_per_step"]
            passes = "" if passes is None else f"{passes:.2f}"
            faults = ("" if row["minor_faults_per_step"] is None
                      else f"{row['minor_faults_per_step']:.0f}")
            temp = "" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2**20:.1f}"
            print(f"{row['name']:32s} {row['mode']:16s} {row['step_ms_median']:9.3f} "
                  f"{row['ratio_to_base']:7.3f} {floor:>7s} {over:>9s} {passes:>7s} "
                  f"{faults:>7s} {temp:>8s}")
    if record["targets"]:
        print("\n== targets (issue 8) ==")
        for t in record["targets"]:
            print(f"{t['framework']:5s} {t['case']:7s} {t['text']}")


HEADLINE = ("floor", "floor bSAM", "SAM", "ASAM", "GSAM", "WSAM", "bSAM", "LookSAM k=5")


def markdown(record: dict) -> str:
    """The README's headline table: ratios to the base step, case mlp (and tensors, PyTorch)."""
    columns = [("torch", "mlp", "PyTorch MLP"), ("torch", "tensors", "PyTorch 200 tensors"),
               ("jax", "mlp", "JAX MLP (jit)"), ("tf", "mlp", "TF MLP")]
    columns = [c for c in columns if _rows(record["runs"], c[0], c[1])]
    head = ["step time / base step"]
    for framework, case, title in columns:
        head.append(f"{title}: sam_edu")
        if framework == "torch":
            head.append("pytorch_optimizer")
        if framework == "jax":
            head.append("optax.contrib.sam")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(row):
        return "" if row is None else f"{row['ratio_to_base']:.2f}"

    for name in HEADLINE:
        cells = [name]
        for framework, case, _ in columns:
            rows = _rows(record["runs"], framework, case)
            row = rows.get(name)
            if name == "floor":  # the floor SAM is measured against (TF: in SAM's mode)
                row = rows.get(rows["SAM"]["floor"])
            cells.append(cell(row))
            if framework == "torch":
                cells.append(cell(rows.get(f"pytorch_optimizer {name}")))
            if framework == "jax":
                cells.append(cell(rows.get("optax.contrib.sam") if name == "SAM" else None))
        lines.append("| " + " | ".join(cells) + " |")
    passed = sum(t["passed"] for t in record["targets"])
    m, v = record["machine"], record["versions"]
    lines.append("")
    lines.append(f"{m['cpu_model']}, {m['cpu_cores']} cores, {m['threads']} thread per framework; "
                 f"torch {v['torch']}, pytorch_optimizer {v['pytorch_optimizer']}, jax "
                 f"{v['jax']}, optax {v['optax']}, tensorflow {v['tensorflow']}; "
                 f"{record['date'][:10]}. Targets of issue 8 met: {passed} of "
                 f"{len(record['targets'])}.")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return None
    if args.worker:
        worker(args)
        return None
    start = time.perf_counter()
    s = settings(args)
    runs = []
    passthrough = ["--repeats", str(args.repeats), "--steps", str(args.steps),
                   "--tensors-steps", str(args.tensors_steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--seed", str(args.seed),
                   "--case", args.case]
    if args.tiny:
        passthrough.append("--tiny")
    if args.peer_foreach:
        passthrough.append("--peer-foreach")
    with tempfile.TemporaryDirectory() as tmp:
        for framework in s["frameworks"]:
            part = Path(tmp) / f"{framework}.json"
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                   framework, "--part-out", str(part), *passthrough], cwd=ROOT,
                                  env={**os.environ, **MALLOC_ENVIRONMENT[args.malloc]})
            if done.returncode != 0:
                raise SystemExit(f"the {framework} worker failed (exit {done.returncode})")
            runs.extend(json.loads(part.read_text()))
    record = dict(
        schema_version=1,
        description=("Time per training step of SAM-family optimizers relative to the base "
                     "optimizer (SGD, momentum 0.9), with the floor (two passes + one base "
                     "step) and the peers (pytorch_optimizer, optax.contrib.sam) in the same "
                     "process; interleaved blocks, order rotated per round, medians of paired "
                     "per-round ratios. See benchmarks/step_cost.py."),
        command=" ".join(["python benchmarks/step_cost.py",
                          *(sys.argv[1:] if argv is None else argv)]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        duration_s=None,
        machine=machine(args),
        versions=versions(),
        settings=s,
        runs=runs,
        targets=targets(runs, HYPERPARAMETERS["looksam_k"]),
    )
    record["duration_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    m = record["machine"]
    print(f"{m['cpu_model']} ({m['cpu_cores']} cores), {m['threads']} thread(s) per framework; "
          f"{record['duration_s']} s")
    print_tables(record)
    print("written to", args.out)
    return record


if __name__ == "__main__":
    main()
