"""Training throughput of prunelab's engine against a typical research loop, in one run.

    python benchmarks/engine.py --model convnet3 --data shapes [--device cuda] [--epochs 2]

Baseline (written here, the style of most pruning code): a torch DataLoader over per-sample
torchvision transforms (random crop with padding 4, horizontal flip, normalize) from uint8 HWC images,
fp32, batch 128, `--workers` loader processes. Engine: `prunelab.train.train` with the data resident on
the device and augmented there, with the switches given (`--precision bf16 --channels-last`, batch
`--batch-size`); `--compile` also times the engine under torch.compile and prints its ratio over the
uncompiled engine. Same model, same data, same device. Also times one LMC evaluation
(11 α, train and test sets) and reports the final test accuracy of both loops after the same epochs.
Images/s count training images over the timed epochs (the first epoch is a warm-up and not timed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.data import load_dataset  # noqa: E402
from prunelab.hparams import DatasetHparams, ModelHparams, TrainingHparams  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.train import evaluate, train  # noqa: E402


# ---- shared by the benchmarks -----------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on a GPU measure work done, not work queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls of `fn` (seconds), the device's work included."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def device_name(device: torch.device) -> str:
    """The GPU's name, or `cpu (N threads)`."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def write_json(res: dict, path) -> None:
    """The results as JSON at `path` (--out), if one was given."""
    if path:
        Path(path).write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------


class _HWCSet(torch.utils.data.Dataset):
    """uint8 CHW tensors served as PIL-free HWC arrays through per-sample transforms."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), int(self.y[i])


def baseline(data, model, epochs: int, device: torch.device, workers: int, batch_size: int = 128) -> dict:
    """DataLoader + per-sample transforms + fp32; returns images/s of the timed epochs."""
    from torchvision.transforms import v2

    tr = data.train
    tf = v2.Compose([v2.RandomCrop(tr.shape[-1], padding=tr.crop_pad),
                     v2.RandomHorizontalFlip() if tr.flip else v2.Identity(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(tr.mean), list(tr.std))])
    loader = torch.utils.data.DataLoader(_HWCSet(tr.x, tr.y, tf), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0, drop_last=False)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    seen, t_timed = 0, 0.0
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(xb)
        sync(device)
        if epoch > 0:
            t_timed += time.perf_counter() - t0
            seen += n
    acc = evaluate(model, data.test, device=device)["accuracy"]
    return {"images_per_s": seen / t_timed if t_timed else float("nan"), "test_accuracy": acc}


def engine(data, model, epochs: int, device: torch.device, hp: TrainingHparams) -> dict:
    """prunelab.train with the given switches; the callback marks epoch ends to time epochs 2..N."""
    marks = []

    def on_epoch(epoch, metrics):
        sync(device)
        marks.append(time.perf_counter())

    sync(device)
    train(model, data.train, hp.replace(epochs=epochs), device=device, callback=on_epoch)
    timed = marks[-1] - marks[0] if len(marks) > 1 else float("nan")
    seen = len(data.train) * (len(marks) - 1)
    acc = evaluate(model, data.test, device=device)["accuracy"]
    return {"images_per_s": seen / timed, "test_accuracy": acc}


def lmc_time(data, a, b, device: torch.device) -> float:
    from prunelab.stability import LMCHparams, lmc_curve

    lmc_curve(a, b, data, LMCHparams(), device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    lmc_curve(a, b, data, LMCHparams(), device)
    sync(device)
    return time.perf_counter() - t0


def add_engine_switches(p: argparse.ArgumentParser) -> None:
    """The engine's speed switches (TrainingHparams precision / channels_last / compile /
    compile_mode) and --out."""
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="with --compile: reduce-overhead replays CUDA graphs")
    p.add_argument("--out", help="write the results as JSON here")


def engine_switches(a: argparse.Namespace) -> dict:
    """TrainingHparams values of the switches `add_engine_switches` parsed."""
    return {"precision": a.precision, "channels_last": a.channels_last, "compile": a.compile,
            "compile_mode": a.compile_mode if a.compile else "default"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet3", choices=["convnet3", "resnet10_bn", "resnet18_bn"])
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's)")
    p.add_argument("--data", default="shapes", choices=["shapes", "digits"])
    p.add_argument("--train-size", type=int, default=10_000, help="shapes: training images")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop (the first is not timed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument("--batch-size", type=int, default=128, help="engine batch size")
    add_engine_switches(p)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    data = load_dataset(DatasetHparams(name=a.data, train_size=a.train_size if a.data == "shapes" else None))
    mhp = ModelHparams(name=a.model, width=a.width)
    make = lambda: build_model(mhp, data.train.shape, data.train.num_classes, seed=0)  # noqa: E731
    hp = TrainingHparams(batch_size=a.batch_size, augment="standard", lr=0.01, **engine_switches(a))
    base = baseline(data, make(), a.epochs, device, a.workers)
    m_engine = make()
    eng = engine(data, m_engine, a.epochs, device, hp.replace(compile=False))
    # --compile: the compiled engine too, in the same run, against the uncompiled one
    comp = engine(data, make(), a.epochs, device, hp) if a.compile else None
    m_other = make()
    train(m_other, data.train, hp.replace(epochs=1), device=device, order_seed=1, aug_seed=1)
    lmc_s = lmc_time(data, m_engine, m_other, device)
    res = {"device": device_name(device),
           "model": a.model, "data": a.data, "train_images": len(data.train), "epochs": a.epochs,
           "baseline": base, "engine": eng, "speedup": eng["images_per_s"] / base["images_per_s"],
           "engine_switches": {"batch_size": a.batch_size, "precision": a.precision,
                               "channels_last": a.channels_last},  # the compiled run adds compile_mode
           "lmc_eval_s": lmc_s, "lmc_eval_s_per_alpha": lmc_s / 11}
    if comp:
        res.update(compiled={**comp, "compile_mode": a.compile_mode},
                   compile_speedup=comp["images_per_s"] / eng["images_per_s"])
    print(f"{res['device']}: {a.model} on {a.data} ({len(data.train)} images), {a.epochs} epochs")
    print(f"  baseline (DataLoader, {a.workers} workers, fp32, batch 128): {base['images_per_s']:9.0f} images/s, "
          f"test accuracy {base['test_accuracy']:.3f}")
    print(f"  engine   ({a.precision}, batch {a.batch_size}, channels_last={a.channels_last}): "
          f"{eng['images_per_s']:9.0f} images/s, test accuracy {eng['test_accuracy']:.3f}")
    if comp:
        print(f"  engine compiled (torch.compile mode {a.compile_mode}): {comp['images_per_s']:9.0f} images/s, "
              f"test accuracy {comp['test_accuracy']:.3f}; {res['compile_speedup']:.2f}x the uncompiled engine")
    print(f"  speed-up {res['speedup']:.2f}x; LMC evaluation {lmc_s:.2f} s ({lmc_s / 11 * 1e3:.0f} ms per alpha)")
    write_json(res, a.out)
    return res


if __name__ == "__main__":
    main()
