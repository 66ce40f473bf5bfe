"""The built-in `idc` distiller at IDC's settings: distil, train ConvNet-3 on the decoded set with
IDC's evaluation recipe, and print test accuracy per ipc next to IDC's published ConvNet-3 CIFAR-10
figures (Kim et al. 2022: 50.6 / 67.5 / 74.5 % at ipc 1 / 10 / 50).

    # GPU, full budget (IDC's settings; hours per ipc), CIFAR-10 extracted under /abs/cifar:
    .venv/bin/python benchmarks/idc_distiller.py --dataset cifar10 --root /abs/cifar --device cuda [--out r.json]
    # CPU, reduced budget, on the generated CIFAR-shaped `shapes` (not CIFAR: not comparable to IDC's figures):
    .venv/bin/python benchmarks/idc_distiller.py --dataset shapes --quick

Distillation: `idc_settings(dataset, ipc)` (CIFAR-10's for shapes: factor 2, 2,000 outer iterations,
inner loop 100, batch_real 64, lr_img 0.005 x ipc / 10, ConvNet-3 width 128) and `idc_net_steps`
(32 network updates per inner step); each can be overridden. Evaluation (IDC's train.py/test.py on
CIFAR): ConvNet-3 (instance norm) of the distiller's width, SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 64, 1,000 epochs, x0.2 at 2/3 and 5/6, DSA without cutout plus CutMix on half the
batches; test accuracy after the last epoch (IDC logs the best and the last of four evaluations).
References at the same ipc, trained alike: `random` (ipc random real images per class, the same
storage) and `init` (IDC's starting point: the multi-formation set of real images before any step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.chain import derive_seed  # noqa: E402
from prunelab.data import load_dataset  # noqa: E402
from prunelab.hparams import DatasetHparams, ModelHparams, TrainingHparams  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.synthetic import decode_set, idc_net_steps, idc_settings, random_subset  # noqa: E402
from prunelab.synthetic.distill import distill_idc, init_from_real  # noqa: E402
from prunelab.train import evaluate, train  # noqa: E402

PUBLISHED = {"cifar10": {1: 50.6, 10: 67.5, 50: 74.5}}  # Kim et al. 2022, IDC (factor 2), ConvNet-3
# CPU mode: small enough for a few minutes on one thread; every value is a departure from IDC's
QUICK = {"ipc": [1, 10], "budget": 10, "inner_loop": 5, "batch_real": 32, "width": 32, "net_steps": 4,
         "epochs": 50}


def recipe(epochs: int) -> TrainingHparams:
    return TrainingHparams(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=epochs,
                           milestones=(2 / 3, 5 / 6), gamma=0.2, augment="dsa_cutmix", cutmix_prob=0.5)


def train_eval(data, test, width: int, epochs: int, seed: int, device: str) -> float:
    model = build_model(ModelHparams(name="convnet3", width=width), data.shape, data.num_classes, seed=seed)
    train(model, data, recipe(epochs), device=device, order_seed=seed, aug_seed=seed)
    return evaluate(model, test, device=device)["accuracy"]


def idc_init(real, ipc: int, factor: int, seed: int):
    """distill_idc's starting set for this seed (the same generator draws), decoded."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "idc", "data"))
    x, y = init_from_real(real, ipc, gen, factor)
    return decode_set(real.with_images(x.clamp(0, 1), y, name=f"{real.name}-idc-init-ipc{ipc}",
                                       meta={"method": "idc_init", "ipc": ipc, "factor": factor}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="shapes", choices=["cifar10", "cifar100", "shapes"])
    ap.add_argument("--root", default=None, help="absolute folder holding the extracted CIFAR archive")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU mode: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    ap.add_argument("--ipc", type=int, nargs="+", default=None, help="default: 1 10 50 (--quick: 1 10)")
    ap.add_argument("--budget", type=int, default=None, help="outer iterations (IDC: 2000)")
    ap.add_argument("--inner-loop", type=int, default=None, help="IDC: 100")
    ap.add_argument("--batch-real", type=int, default=None, help="IDC: 64")
    ap.add_argument("--width", type=int, default=None, help="ConvNet-3 width, distiller and evaluation (IDC: 128)")
    ap.add_argument("--net-steps", type=int, default=None, help="network updates per inner step (IDC: 32)")
    ap.add_argument("--epochs", type=int, default=None, help="evaluation epochs (IDC: 1000)")
    ap.add_argument("--repeats", type=int, default=1, help="evaluation trainings per set (seeds seed, seed+1, ...)")
    ap.add_argument("--no-references", action="store_true", help="skip the random and init rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    quick = QUICK if a.quick else {}
    recipe_of = "cifar10" if a.dataset == "shapes" else a.dataset  # shapes follows CIFAR-10's recipe
    ipcs = a.ipc or quick.get("ipc", [1, 10, 50])
    epochs = a.epochs or quick.get("epochs", 1000)
    ds = DatasetHparams(name=a.dataset, root=a.root)
    data = load_dataset(ds)
    print(f"{a.dataset}: {len(data.train)} train / {len(data.test)} test images {data.train.shape}, device {a.device}, "
          f"{a.threads} thread(s)", flush=True)
    rows = []
    for ipc in ipcs:
        s = idc_settings(recipe_of, ipc)
        kw = {"factor": s["factor"], "lr_img": s["lr_img"],
              "net_width": a.width or quick.get("width", s["net_width"]),
              "inner_loop": a.inner_loop or quick.get("inner_loop", s["inner_loop"]),
              "batch_real": a.batch_real or quick.get("batch_real", s["batch_real"]),
              "net_steps": a.net_steps or quick.get("net_steps", idc_net_steps(recipe_of))}
        budget = a.budget or quick.get("budget", s["budget"])
        print(f"ipc {ipc}: distilling, budget {budget}, " + ", ".join(f"{k} {v}" for k, v in kw.items()), flush=True)
        t0 = time.perf_counter()
        syn = distill_idc(data.train, ipc, a.seed, budget, a.device, lambda m: print("  " + m, flush=True), **kw)
        build_s = time.perf_counter() - t0
        sets = {"idc": decode_set(syn)}
        if not a.no_references:
            sets["init"] = idc_init(data.train, ipc, kw["factor"], a.seed)
            sets["random"] = random_subset(data.train, ipc, a.seed)
        for name, train_set in sets.items():
            t0 = time.perf_counter()
            accs = [train_eval(train_set, data.test, kw["net_width"], epochs, a.seed + r, a.device)
                    for r in range(a.repeats)]
            eval_s = (time.perf_counter() - t0) / a.repeats
            row = {"ipc": ipc, "set": name, "images": len(train_set), "accuracy": statistics.mean(accs),
                   "accuracies": accs, "build_s": build_s if name == "idc" else 0.0, "train_s": eval_s,
                   "published": PUBLISHED.get(a.dataset, {}).get(ipc) if name == "idc" else None,
                   "budget": budget, **kw, "epochs": epochs}
            rows.append(row)
            print(f"ipc {ipc:3d} {name:6s} ({len(train_set)} images): test accuracy {100 * row['accuracy']:.1f} %  "
                  f"build {row['build_s']:.0f} s, train+eval {eval_s:.0f} s", flush=True)
    print(f"\n| ipc | set | images | test accuracy | IDC published (CIFAR-10) | distil (s) | train (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        pub = f"{r['published']:.1f} %" if r["published"] is not None else "–"
        sd = f" ± {100 * statistics.stdev(r['accuracies']):.1f}" if len(r["accuracies"]) > 1 else ""
        print(f"| {r['ipc']} | {r['set']} | {r['images']} | {100 * r['accuracy']:.1f}{sd} % | {pub} | "
              f"{r['build_s']:.0f} | {r['train_s']:.0f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"dataset": a.dataset, "device": a.device, "threads": a.threads,
                                           "quick": a.quick, "seed": a.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
