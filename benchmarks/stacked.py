"""Training throughput of N copies stacked into one network against N one-by-one runs, in one run.

    python benchmarks/stacked.py [--device cuda --precision bf16 --channels-last] [--copies 2 4 8]
                                 [--compile --compile-mode reduce-overhead]

A distilled-size set (shapes: 10 classes x ipc 10 x 4 = 400 images, 32 px) at batch 64 with ConvNet-3
width 128: the regime where one small network leaves a GPU waiting on kernel launches. Measured, each
with the same training settings on the same device:
  (a) one `prunelab.train.train` run;
  (b) N `train` runs one after another (how LMC and the landscape train their copies by default);
  (c) `prunelab.stacked.train_copies` with N copies;
  (d) with --compile: one `train` run with the model under torch.compile (`--compile-mode
      reduce-overhead` replays CUDA graphs, which is what a launch-bound small batch needs).
Images/s count every copy's training images over the wall time of the whole call (setup included),
after one untimed warm-up call of each kind; the ratio is over (a).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.data import load_dataset  # noqa: E402
from prunelab.hparams import DatasetHparams, ModelHparams, TrainingHparams  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.stacked import train_copies  # noqa: E402
from prunelab.train import examples_drawn, resolve_device, total_steps, train  # noqa: E402

from engine import add_engine_switches, device_name, engine_switches, timed, write_json  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet3", choices=["convnet3", "resnet10_bn", "resnet18_bn"])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--train-size", type=int, default=400, help="shapes training images (10 classes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20, help="epochs per timed call")
    p.add_argument("--copies", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--augment", default="dsa", choices=["standard", "standard_cutmix", "none", "dsa", "dsa_cutmix"])
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_engine_switches(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    data = load_dataset(DatasetHparams(name="shapes", train_size=a.train_size, test_size=100))
    mhp = ModelHparams(name=a.model, width=a.width)
    make = lambda: build_model(mhp, data.train.shape, data.train.num_classes, seed=0)  # noqa: E731
    model = make()
    # (a)-(c) run uncompiled; --compile adds (d): one run compiled (mode --compile-mode)
    compiled = TrainingHparams(epochs=a.epochs, batch_size=a.batch_size, lr=0.01, augment=a.augment,
                               **engine_switches(a))
    hp = compiled.replace(compile=False, compile_mode="default")
    images = examples_drawn(len(data.train), hp.batch_size, total_steps(hp, len(data.train)))

    def one(seed: int = 0) -> None:
        train(make(), data.train, hp, device=device, order_seed=seed, aug_seed=seed)

    def stacked(n: int) -> None:
        train_copies(model, data.train, hp, device=device, seeds=[(i, i) for i in range(n)])

    warm = hp.replace(epochs=1)
    train(make(), data.train, warm, device=device)
    for n in a.copies:
        train_copies(model, data.train, warm, device=device, seeds=[(i, i) for i in range(n)])

    single_s = timed(one, device, a.repeats)
    single = images / single_s
    rows = [{"run": "one train()", "copies": 1, "seconds": single_s, "images_per_s": single, "ratio": 1.0}]
    if a.compile:
        # one model throughout, so that the timed calls reuse the compiled code and captured graphs
        cm = make()
        train(cm, data.train, compiled.replace(epochs=1), device=device)  # compilation, graph capture
        comp_s = timed(lambda: train(cm, data.train, compiled, device=device), device, a.repeats)
        rows.append({"run": f"one train(), compiled ({a.compile_mode})", "copies": 1, "seconds": comp_s,
                     "images_per_s": images / comp_s, "ratio": single_s / comp_s})
    for n in a.copies:
        seq_s = timed(lambda n=n: [one(i) for i in range(n)], device, a.repeats)
        stk_s = timed(lambda n=n: stacked(n), device, a.repeats)
        rows.append({"run": f"{n} x train() one by one", "copies": n, "seconds": seq_s,
                     "images_per_s": n * images / seq_s, "ratio": n * images / seq_s / single})
        rows.append({"run": f"train_copies, {n} copies", "copies": n, "seconds": stk_s,
                     "images_per_s": n * images / stk_s, "ratio": n * images / stk_s / single})

    name = device_name(device)
    res = {"device": name, "model": a.model, "width": a.width, "train_images": len(data.train),
           "batch_size": a.batch_size, "epochs": a.epochs, "augment": a.augment, **engine_switches(a),
           "images_per_call": images, "repeats": a.repeats, "rows": rows}
    print(f"{name}: {a.model} width {a.width}, {len(data.train)} images, batch {a.batch_size}, {a.epochs} epochs, "
          f"augment {a.augment}, {a.precision}{', channels-last' if a.channels_last else ''}")
    print(f"{'run':<40}{'seconds':>10}{'images/s':>12}{'x one run':>11}")
    for r in rows:
        print(f"{r['run']:<40}{r['seconds']:>10.2f}{r['images_per_s']:>12.0f}{r['ratio']:>11.2f}")
    write_json(res, a.out)
    return res


if __name__ == "__main__":
    main()
