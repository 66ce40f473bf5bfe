"""Scaling of one chain's training over data-parallel workers (`prunelab.parallel`), in one run.

    python benchmarks/data_parallel.py --device cuda --workers 1 2 4 8 [--model resnet50_bn --image-size 224]

Strong scaling: the same global batch (`--batch-size`) and schedule split over N workers (one GPU
each, NCCL; or N CPU processes over gloo with `--device cpu`), the set device-resident or streamed
from host memory (`--stream`, with `--loader-workers` loader processes a worker). For each N:
training images/s over the timed epochs (the first is a warm-up, not timed), the speed-up over N=1
and the efficiency (images/s at N / (N x images/s at 1)). N=1 runs through the same data-parallel
path (a group of one), and plain `prunelab.train.train` is timed too, so the path's own overhead
shows. Worker counts above the GPUs present are skipped with a note. The data are random uint8 images
(throughput does not depend on their content).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine import device_name, sync, write_json  # noqa: E402
from prunelab.data import ImageData  # noqa: E402
from prunelab.hparams import ModelHparams, TrainingHparams  # noqa: E402
from prunelab.models import build_model  # noqa: E402
from prunelab.parallel import run_workers, train_data_parallel  # noqa: E402
from prunelab.train import train  # noqa: E402


def make_data(n: int, size: int, classes: int) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return ImageData(x, y, classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), name="random", crop_pad=size // 8)


def _timer():
    """An epoch callback recording the wall clock at each epoch's end (the device's work included)."""
    marks = []

    def hook(epoch, metrics):
        marks.append(time.perf_counter())

    return marks, hook


def _images_per_s(marks: list, per_epoch: int) -> float:
    timed = marks[1:]  # from the end of the warm-up epoch
    return per_epoch * (len(timed) - 1) / (timed[-1] - timed[0])


def _worker(rank: int, world: int, a: dict):
    device = torch.device(f"cuda:{rank}") if a["device"] == "cuda" else torch.device("cpu")
    data = make_data(a["train_size"], a["image_size"], a["classes"])  # each worker its own: nothing pickled
    model = build_model(ModelHparams(name=a["model"]), data.shape, data.num_classes, seed=0)
    marks, hook = _timer()

    def synced(epoch, metrics):
        sync(device)
        hook(epoch, metrics)

    train_data_parallel(model, data, a["hp"], rank=rank, world_size=world, device=device, order_seed=1, aug_seed=2,
                        callback=synced, stream={"auto": None, "on": True, "off": False}[a["stream"]],
                        num_workers=a["loader_workers"])
    return marks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="resnet18_bn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=512, help="the global batch")
    p.add_argument("--epochs", type=int, default=3, help="the first is a warm-up")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (one warm-up epoch, then at least two timed epoch ends)")

    hp = TrainingHparams(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, precision=args.precision,
                         channels_last=args.channels_last, augment="standard")
    data = make_data(args.train_size, args.image_size, args.classes)
    have = torch.cuda.device_count() if args.device == "cuda" else max(args.workers)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    res = {"device": device_name(device), "gpus": have if args.device == "cuda" else 0, "settings": {
        k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    print(f"{res['device']}: {args.model} at {args.image_size} px, global batch {args.batch_size}, "
          f"{args.train_size:,} images, {args.precision}, stream={args.stream}")

    # plain train(): the one-process engine, for the data-parallel path's own overhead at N=1
    model = build_model(ModelHparams(name=args.model), data.shape, data.num_classes, seed=0)
    marks, hook = _timer()
    train(model, data, hp, device=device, order_seed=1, aug_seed=2,
          callback=lambda e, m: (sync(device), hook(e, m)))
    plain = _images_per_s(marks, len(data))
    res["plain_train_images_per_s"] = plain
    print(f"  plain train(): {plain:,.0f} images/s")

    base = None
    spec = {"device": args.device, "model": args.model, "hp": hp, "stream": args.stream,
            "loader_workers": args.loader_workers, "train_size": args.train_size, "image_size": args.image_size,
            "classes": args.classes}
    for n in args.workers:
        if n > have:
            print(f"  N={n}: skipped ({have} GPUs here)")
            res["runs"].append({"workers": n, "skipped": f"{have} GPUs"})
            continue
        if args.batch_size % n:
            print(f"  N={n}: skipped (global batch {args.batch_size} does not split over {n})")
            continue
        marks = run_workers(_worker, n, spec, backend="nccl" if args.device == "cuda" else "gloo")
        ips = _images_per_s(marks, len(data))
        base = base or (ips if n == 1 else None)
        row = {"workers": n, "images_per_s": ips}
        if base:
            row.update(speedup=ips / base, efficiency=ips / (n * base))
        res["runs"].append(row)
        more = f", speed-up {row['speedup']:.2f}, efficiency {row['efficiency']:.2f}" if base else ""
        print(f"  N={n}: {ips:,.0f} images/s{more}")
    if args.out:
        write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
