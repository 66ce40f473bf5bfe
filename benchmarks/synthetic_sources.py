"""Accuracy of a ConvNet-3 trained on each synthetic source (idc, dm, random_subset, herding) on
`digits`, and how long each source took to build on CPU.

    .venv/bin/python benchmarks/synthetic_sources.py [--ipc 1 10] [--seeds 0 1 2] [--sources ...]

Recipe (IDC's evaluation recipe, shortened): ConvNet-3 width 32, SGD momentum 0.9, lr 0.01,
weight decay 5e-4, batch 64, 300 epochs (at least 600 steps), x0.2 at 2/3 and 5/6, DSA augmentation;
test accuracy on the 360-image digits test split. Sets are built fresh (no store) so timings are real.
Seed s builds the set with seed s and trains with seed s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.data import load_dataset  # noqa: E402
from prunelab.hparams import DatasetHparams, ModelHparams, TrainingHparams  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.synthetic import build_synthetic  # noqa: E402
from prunelab.synthetic.idc import decode_set  # noqa: E402
from prunelab.train import evaluate, train  # noqa: E402

SOURCES = ("idc", "dm", "random_subset", "herding")


def recipe(n: int, epochs: int = 300, augment: str = "dsa") -> TrainingHparams:
    steps = max(600, epochs * max(1, -(-n // 64)))
    return TrainingHparams(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, steps=steps,
                           augment=augment)


def train_eval(data, test, seed: int, width: int = 32, augment: str = "dsa") -> float:
    model = build_model(ModelHparams(name="convnet3", width=width), data.shape, data.num_classes, seed=seed)
    train(model, data, recipe(len(data), augment=augment), order_seed=seed, aug_seed=seed)
    return evaluate(model, test)["accuracy"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--budget", type=int, default=None, help="distillation budget (default: the method's)")
    ap.add_argument("--factor", type=int, default=None, help="IDC multi-formation factor (default: digits' 1)")
    ap.add_argument("--augment", default="dsa", choices=["dsa", "dsa_cutmix", "standard", "none"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(DatasetHparams(name="digits"))
    rows = []
    for ipc in args.ipc:
        for src in args.sources:
            accs, secs = [], []
            for seed in args.seeds:
                t0 = time.perf_counter()
                syn = build_synthetic(src, data.train, ipc=ipc, seed=seed, budget=args.budget,
                                      factor=args.factor, device="cpu")
                secs.append(time.perf_counter() - t0)
                accs.append(train_eval(decode_set(syn), data.test, seed, augment=args.augment))
                print(f"ipc {ipc:3d} {src:14s} seed {seed}: acc {accs[-1]:.4f}  build {secs[-1]:.1f} s", flush=True)
            rows.append((ipc, src, accs, secs))
    print("\n| ipc | source | test accuracy (mean ± std) | build time on CPU (s, mean) |")
    print("|---:|---|---|---:|")
    for ipc, src, accs, secs in rows:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {ipc} | {src} | {100 * statistics.mean(accs):.1f} ± {100 * sd:.1f} % | {statistics.mean(secs):.1f} |")


if __name__ == "__main__":
    main()
