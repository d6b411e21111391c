"""The command line of :func:`sam_edu.train.train`: one flag per :class:`Config` field.

``python -m sam_edu.train --help`` lists them. Flags left out take the optimizer's defaults
(:func:`sam_edu.train.common.resolve`); a flag that does not apply to the chosen optimizer, or a
value out of range, stops the command with a message naming the flag. The run is written to
``--out`` (default ``runs/<framework>-<optimizer>-<model>-<dataset>-seed<seed>``): ``config.json``,
``log.jsonl`` (one JSON object per epoch) and a checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import sys

from sam_edu import data as datasets
from sam_edu.models import MODELS
from sam_edu.train.common import DEVICES, FRAMEWORKS, OPTIMIZERS, PRECISIONS, Config, train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sam_edu.train",
        description="Train a network with SGD or a SAM variant in PyTorch, JAX or TensorFlow.")
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sam")
    p.add_argument("--model", choices=MODELS, default="small-cnn")
    p.add_argument("--dataset", choices=datasets.DATASETS, default="digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule "
                   "(default 0.1; bsam 0.5)")
    p.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float,
                   help="L2 in the base step (default 5e-4; bsam's delta 1e-4)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--rho", type=float, help="radius (default 0.05; asam 0.5, looksam 0.1)")
    p.add_argument("--eta", type=float, help="asam: T_w = |w| + eta (default 0)")
    p.add_argument("--alpha", type=float, help="gsam (default 0.4) or looksam (default 0.7)")
    p.add_argument("--rho-min", "--rho_min", dest="rho_min", type=float,
                   help="gsam: rho follows the learning rate from --rho down to this")
    p.add_argument("--gamma", type=float, help="wsam: weight of sharpness (default 0.9)")
    p.add_argument("--k", type=int, help="looksam: a SAM step every k steps (default 10)")
    p.add_argument("--label-smoothing", "--label_smoothing", dest="label_smoothing", type=float,
                   default=0.0)
    p.add_argument("--label-noise", "--label_noise", dest="label_noise", type=float, default=0.0,
                   help="fraction of training labels replaced by a random class")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop and flip (the dataset's standard augmentation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--num-train", "--num_train", dest="num_train", type=int,
                   help="use the first N training images")
    p.add_argument("--num-test", "--num_test", dest="num_test", type=int)
    p.add_argument("--data-dir", "--data_dir", dest="data_dir",
                   help=f"dataset cache (default ${datasets.DATA_ENV} or {datasets.data_dir()})")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", help="run directory (default runs/<framework>-<optimizer>-<model>-"
                   "<dataset>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", "--stop_after", dest="stop_after", type=int,
                   help="end this session after epoch N; --resume continues the same schedule")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = vars(p.parse_args(argv))
    if args["out"] is None:
        args["out"] = (f"runs/{args['framework']}-{args['optimizer']}-{args['model']}-"
                       f"{args['dataset']}-seed{args['seed']}")
    try:
        train(Config(**args))
    except ValueError as error:
        p.error(str(error))  # exits with status 2, as for any bad argument
    except OSError as error:  # e.g. offline with an empty dataset cache
        print(f"{p.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0
