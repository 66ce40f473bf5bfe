"""Chains per GPU: aggregate training throughput of N processes sharing one device, in one run.

    python benchmarks/packing.py --device cuda --procs 1 2 4 8 --batch-size 64 --images 400 \
        --precision bf16 --channels-last [--out packing.json]

Each process trains its own ConvNet-3 with `prunelab.train.train` on a distilled-size set (`--images`
CIFAR-shaped images, e.g. 10 classes x ipc 10 x 4 decoded crops = 400) at the given batch size: the
regime of distilled pruning, where one process leaves a GPU mostly idle. The processes start
together (a barrier after a warm-up epoch) and train `--epochs` epochs each; the aggregate is all
their images over the wall time from the first start to the last end. Ratios are against N = 1
measured in the same run. This is what `gpus_per_trial: 0.25` buys a sweep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank: int, args: dict, barrier, out) -> None:
    import torch

    from prunelab.data import make_shapes
    from prunelab.hparams import ModelHparams, TrainingHparams
    from prunelab.models import build_model
    from prunelab.train import train

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    x, y = make_shapes(args["images"], 10, seed=rank)
    from prunelab.data import ImageData

    data = ImageData(x, y, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="shapes")
    model = build_model(ModelHparams(name="convnet3", width=args["width"]), data.shape, 10, seed=rank)
    hp = TrainingHparams(batch_size=args["batch_size"], precision=args["precision"],
                         channels_last=args["channels_last"], augment="standard", lr=0.01, epochs=1)
    train(model, data, hp, device=device)  # warm-up: allocator, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier.wait()
    t0 = time.perf_counter()
    train(model, data, hp.replace(epochs=args["epochs"]), device=device, order_seed=1, aug_seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    out.put({"rank": rank, "t0": t0, "t1": t1, "images": args["epochs"] * len(data)})


def measure(n: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, barrier, out)) for r in range(n)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a worker exited with code {p.exitcode}")
    wall = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
    images = sum(r["images"] for r in rows)
    return {"procs": n, "images_per_s": images / wall, "wall_s": wall,
            "per_process_images_per_s": [r["images"] / (r["t1"] - r["t0"]) for r in rows]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--images", type=int, default=400, help="training images per process")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20, help="timed epochs per process")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    args = {"device": a.device, "images": a.images, "batch_size": a.batch_size, "width": a.width,
            "epochs": a.epochs, "precision": a.precision, "channels_last": a.channels_last, "threads": a.threads}
    rows = [measure(n, args) for n in a.procs]
    base = rows[0]["images_per_s"] if rows[0]["procs"] == 1 else None
    import torch

    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"{device}: ConvNet-3 width {a.width}, {a.images} images per process, batch {a.batch_size}, "
          f"{a.precision}, channels_last={a.channels_last}, {a.epochs} timed epochs")
    for r in rows:
        ratio = f"{r['images_per_s'] / base:5.2f}x one process" if base else ""
        print(f"  {r['procs']} process(es): {r['images_per_s']:9.0f} images/s in total  {ratio}")
    res = {"device": device, "settings": args, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
