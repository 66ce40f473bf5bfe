"""One full round of distilled pruning, timed: prunelab's engine against a DataLoader loop, in one run.

    python benchmarks/imp_round.py --device cuda --precision bf16 --channels-last \
        --distilled-epochs 300 --real-epochs 30 [--out imp_round.json]

A round is: train ConvNet-3 on a distilled-size set (`--ipc` x 4 decoded crops per class, CIFAR-shaped,
batch 64, `--distilled-epochs`), prune 20% of the weights by magnitude, then train the subnetwork on
the real-size set (`--real-images`, batch `--real-batch-size`, `--real-epochs`). The engine is
`prunelab.train.train` (device-resident data, augmentation on the device, the switches given); the
baseline is the loop of `benchmarks/engine.py` (DataLoader with per-sample transforms, fp32, batch
128 for real data, 64 for the distilled set). Both train the same model on the same data on the same
device; the script prints each phase's seconds and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import add_engine_switches, baseline, device_name, engine_switches, timed, write_json  # noqa: E402

from prunelab.data import DataSplit, ImageData, make_shapes  # noqa: E402
from prunelab.hparams import ModelHparams, TrainingHparams  # noqa: E402
from prunelab.masks import Mask, magnitude_prune  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.train import train  # noqa: E402


def _set(n: int, seed: int) -> ImageData:
    x, y = make_shapes(n, 10, seed=seed)
    return ImageData(x, y, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="shapes")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10, help="stored images per class (x 4 crops after decoding)")
    p.add_argument("--distilled-epochs", type=int, default=300)
    p.add_argument("--real-images", type=int, default=50_000)
    p.add_argument("--real-epochs", type=int, default=2)
    p.add_argument("--real-batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=8, help="baseline DataLoader workers")
    add_engine_switches(p)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    distilled = _set(a.ipc * 4 * 10, seed=1)
    real = DataSplit(_set(a.real_images, seed=2), _set(2000, seed=3))
    make = lambda: build_model(ModelHparams(name="convnet3", width=a.width), real.train.shape, 10, seed=0)  # noqa: E731
    engine_hp = TrainingHparams(augment="standard", lr=0.01, **engine_switches(a))

    # warm-up of both loops (cuDNN autotuning, compilation) outside the timings
    train(make(), distilled, engine_hp.replace(epochs=1), device=device)
    baseline(DataSplit(distilled, real.test), make(), 1, device, a.workers, batch_size=64)

    model = make()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mask = Mask.ones_like(model)
    t_eng_dist = timed(lambda: train(model, distilled, engine_hp.replace(epochs=a.distilled_epochs),
                                     device=device, mask=mask), device)
    new_mask = magnitude_prune(mask, model.state_dict(), 0.2)
    sub = make()
    sub.load_state_dict(init)
    t_eng_real = timed(lambda: train(sub, real.train, engine_hp.replace(epochs=a.real_epochs,
                                                                        batch_size=a.real_batch_size),
                                     device=device, mask=new_mask), device)

    base_dist = baseline(DataSplit(distilled, real.test), make(), a.distilled_epochs + 1, device, a.workers,
                         batch_size=64)
    base_real = baseline(real, make(), a.real_epochs + 1, device, a.workers, batch_size=128)
    # the baseline times epochs 2..N+1 (the first is its warm-up): its seconds for N epochs
    t_base_dist = a.distilled_epochs * len(distilled) / base_dist["images_per_s"]
    t_base_real = a.real_epochs * a.real_images / base_real["images_per_s"]
    name = device_name(device)
    res = {"device": name, "settings": vars(a),
           "engine_s": {"distilled": t_eng_dist, "real": t_eng_real, "round": t_eng_dist + t_eng_real},
           "baseline_s": {"distilled": t_base_dist, "real": t_base_real, "round": t_base_dist + t_base_real}}
    res["speedup"] = {k: res["baseline_s"][k] / res["engine_s"][k] for k in res["engine_s"]}
    print(f"{name}: one round of distilled pruning, ConvNet-3 width {a.width}; {len(distilled)} distilled images x "
          f"{a.distilled_epochs} epochs, then {a.real_images} real images x {a.real_epochs} epochs")
    for k in ("distilled", "real", "round"):
        print(f"  {k:9s} engine {res['engine_s'][k]:8.1f} s   baseline {res['baseline_s'][k]:8.1f} s   "
              f"{res['speedup'][k]:5.2f}x")
    write_json(res, a.out)
    return res


if __name__ == "__main__":
    main()
