"""Step time of a base optimizer, SAM and LookSAM, measured side by side (PyTorch).

LookSAM's cost model (Liu et al., CVPR 2022, arXiv:2203.02714): a SAM step costs two
forward/backward passes, a base step one, and LookSAM with period ``k`` costs ``1 + 1/k`` on
average. This script measures how close real step times come to that model:

* four optimizers on four copies of one small convolutional network: the base optimizer (SGD with
  momentum), ``sam_edu.torch.SAM`` and ``sam_edu.torch.LookSAM`` with ``k = 5`` and ``k = 10``;
* every optimizer is driven the same way, ``optimizer.step(closure)``, on the same fixed batch of
  synthetic images (step time does not depend on the pixel values);
* the four are **interleaved**: each repeat times one block of ``--steps`` steps of every
  optimizer, in an order rotated from repeat to repeat, so that drifts of the machine (frequency
  scaling, other processes) hit all four alike;
* one torch thread by default: with two threads on a two-core machine that also runs anything
  else, the threads wait for each other and blocks come out several times slower at random;
* a block holds a multiple of 10 steps and starts at a step count that is a multiple of 10, so
  it contains exactly ``steps / k`` full SAM steps for both ``k``;
* per repeat, each optimizer's time per step is divided by the base optimizer's in the same
  repeat; the recorded ratio is the median of these paired ratios over the repeats.

The hardware (CPU model, cores, threads, torch version) and every setting are written to the JSON
file next to the numbers; ``book/07_looksam.ipynb`` reads it. Run from the repository root::

    python benchmarks/looksam_step_time.py       # writes book/results/looksam_step_time.json
    python benchmarks/looksam_step_time.py --repeats 3 --steps 10 --out /tmp/t.json   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _step_cost_common import cpu_model
from torch import nn

from sam_edu.torch import SAM, LookSAM

BLOCK = 10  # steps per block must be a multiple of every k measured (5 and 10)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("book/results/looksam_step_time.json"),
                   help="where to write the JSON results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; with more threads than idle cores, threads wait "
                        "for each other and the timings mostly measure the machine's load")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument("--channels", type=int, default=32, help="width of the first convolution")
    p.add_argument("--repeats", type=int, default=25, help="timed blocks per optimizer")
    p.add_argument("--steps", type=int, default=10,
                   help=f"steps per timed block (a multiple of {BLOCK})")
    p.add_argument("--warmup", type=int, default=10,
                   help=f"untimed steps per optimizer before timing (a multiple of {BLOCK})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("threads", "batch", "image_size", "channels", "repeats", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("steps", "warmup"):
        if getattr(args, name) % BLOCK or getattr(args, name) < 0:
            p.error(f"--{name} must be a non-negative multiple of {BLOCK}, so that every timed "
                    "block holds the same share of full SAM steps")
    return args


def make_model(channels: int) -> nn.Module:
    """A small CNN for 3 x H x W images and 10 classes: forward/backward dominates a step."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
    )


def hardware(device: torch.device) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    init = make_model(args.channels).to(device)
    base_kwargs = dict(lr=0.01, momentum=0.9)
    rho, alpha = 0.05, 0.7
    methods = [
        ("SGD", None, 1.0),
        ("SAM", None, 2.0),
        ("LookSAM k=5", 5, 1.0 + 1.0 / 5),
        ("LookSAM k=10", 10, 1.0 + 1.0 / 10),
    ]
    runs = []
    for name, k, cost in methods:
        model = make_model(args.channels).to(device)
        model.load_state_dict(init.state_dict())
        if name == "SGD":
            opt = torch.optim.SGD(model.parameters(), **base_kwargs)
        elif name == "SAM":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, **base_kwargs)
        else:
            opt = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha,
                          **base_kwargs)
        runs.append(dict(name=name, k=k, cost_model=cost, model=model, opt=opt,
                         evaluations=0, times=[]))

    def closure_for(run):
        def closure():
            run["evaluations"] += 1
            run["opt"].zero_grad()
            loss = F.cross_entropy(run["model"](x), y)
            loss.backward()
            return loss
        return closure

    closures = [closure_for(run) for run in runs]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run, closure in zip(runs, closures):  # untimed: allocator, caches, lazy state
        for _ in range(args.warmup):
            run["opt"].step(closure)
        run["evaluations"] = 0
    for r in range(args.repeats):
        for i in range(len(runs)):
            j = (i + r) % len(runs)  # rotate the order from repeat to repeat
            run, closure = runs[j], closures[j]
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                run["opt"].step(closure)
            sync()
            run["times"].append((time.perf_counter() - start) / args.steps)

    base_times = runs[0]["times"]
    results = []
    for run in runs:
        times_ms = [1e3 * t for t in run["times"]]
        q1, _, q3 = (statistics.quantiles(times_ms, n=4, method="inclusive")
                     if len(times_ms) > 1 else [times_ms[0]] * 3)
        results.append(dict(
            name=run["name"], k=run["k"], cost_model=run["cost_model"],
            gradient_evaluations_per_step=run["evaluations"] / (args.repeats * args.steps),
            step_ms_median=statistics.median(times_ms), step_ms_q1=q1, step_ms_q3=q3,
            ratio_to_base=statistics.median(t / b for t, b in zip(run["times"], base_times)),
            step_ms_per_repeat=times_ms,
        ))
    record = dict(
        description=("Time per optimizer step of SGD, SAM and LookSAM (k=5, k=10) on one small "
                     "CNN, interleaved blocks, median over repeats; ratio_to_base is the median "
                     "of the per-repeat ratios to SGD. cost_model is 1 + 1/k gradient "
                     "evaluations per step (SAM: 2, SGD: 1)."),
        command=" ".join(["python benchmarks/looksam_step_time.py",
                          *(sys.argv[1:] if argv is None else argv)]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hardware=hardware(device),
        settings=dict(
            model=f"CNN, 4 conv layers (widths {args.channels}, {2 * args.channels}, "
                  f"{2 * args.channels}, {4 * args.channels}), ReLU, global average pool, linear",
            parameters=sum(p.numel() for p in init.parameters()),
            input_shape=[args.batch, 3, args.image_size, args.image_size],
            data="synthetic: one fixed random batch",
            dtype=str(x.dtype).replace("torch.", ""),
            base_optimizer="torch.optim.SGD", base_kwargs=base_kwargs, rho=rho, alpha=alpha,
            repeats=args.repeats, steps_per_repeat=args.steps, warmup_steps=args.warmup,
            threads=args.threads, seed=args.seed,
        ),
        results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")

    hw = record["hardware"]
    print(f"{hw['cpu_model']} ({hw['cpu_cores']} cores), {hw['torch_threads']} torch threads, "
          f"torch {hw['torch_version']}, device {hw['device']}")
    print(f"{'optimizer':14s} {'ms/step':>9s} {'ratio':>7s} {'model':>7s} {'grads/step':>11s}")
    for res in results:
        print(f"{res['name']:14s} {res['step_ms_median']:9.2f} {res['ratio_to_base']:7.3f} "
              f"{res['cost_model']:7.3f} {res['gradient_evaluations_per_step']:11.3f}")
    print("written to", args.out)
    return record


if __name__ == "__main__":
    main()
