"""Command line for synthetic sets.

    python -m prunelab.synthetic make --dataset digits --method idc --ipc 10 [--seed --budget --factor --store]
        [--net-width --inner-loop --batch-real --lr-img]
    python -m prunelab.synthetic show [--store DIR]
    python -m prunelab.synthetic grid KEY_OR_PATH --out grid.png [--store DIR] [--dataset digits]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..data import load_dataset
from ..errors import ConfigError
from ..hparams import DatasetHparams
from . import DISTILLER_SETTINGS, SOURCES, get_synthetic, synthetic_spec
from .idc import decode, read_idc_tensors, resolve_path
from .store import SyntheticStore, make_key


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cmd_make(a) -> int:
    ds = DatasetHparams.from_dict({"name": a.dataset, **({"root": a.root} if a.root else {})}, "dataset")
    real = load_dataset(ds).train
    settings = {k: getattr(a, k) for k in DISTILLER_SETTINGS}
    spec = synthetic_spec(ds, a.method, real, ipc=a.ipc, seed=a.seed, budget=a.budget, factor=a.factor, **settings)
    store = SyntheticStore(a.store)
    key = make_key(spec)
    if store.has(key):
        _log(f"already stored: {key}")
    else:
        _log(f"building {a.method} ipc {a.ipc} on {a.dataset} (seed {a.seed}) on {a.device}")
    data = get_synthetic(ds, real, a.method, ipc=a.ipc, seed=a.seed, budget=a.budget, factor=a.factor,
                         device=a.device, store=a.store, log=_log, decoded=False, **settings)
    print(f"key: {key}\npath: {store.dir(key)}/data.pt\nimages: {tuple(data.x.shape)} "
          f"(factor {data.meta.get('factor', 1)})")
    return 0


def cmd_show(a) -> int:
    store = SyntheticStore(a.store)
    entries = store.list()
    if not entries:
        print(f"no synthetic sets under {store.root}")
        return 0
    print(f"{len(entries)} synthetic set(s) under {store.root}")
    for m in entries:
        if "error" in m:
            print(f"{m['key']}  ERROR {m['error']}")
            continue
        spec = m.get("spec", {})
        settings = "".join(f" {k} {spec[k]}" for k in DISTILLER_SETTINGS if k in spec)
        print(f"{m['key']}  {spec.get('dataset', {}).get('name', '?'):8s} {spec.get('method', '?'):14s} "
              f"ipc {spec.get('ipc')} factor {spec.get('factor')} seed {spec.get('seed')} "
              f"budget {spec.get('budget')}{settings}  shape {m.get('shape')}  {m.get('seconds', 0):.1f} s  "
              f"{m.get('created', '')}")
    return 0


def cmd_grid(a) -> int:
    import matplotlib  # only this command draws: the others start without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    store = SyntheticStore(a.store)
    if store.has(a.target):
        x, y, meta = store.load_tensors(a.target)
        factor = int(meta.get("factor", 1) or 1)
        k = int(meta.get("num_classes", int(y.max()) + 1))
    else:
        try:
            path = resolve_path(a.target)
        except ConfigError:
            raise ConfigError("KEY_OR_PATH", f"{a.target!r} is neither a key under {store.root} nor a file",
                              "run `python -m prunelab.synthetic show` to list keys") from None
        x, y = read_idc_tensors(path)
        factor, k = a.factor or 1, int(y.max()) + 1
    if a.decoded and factor > 1:
        x, y = decode(x.float(), y.long(), factor, k)
    x = x.float().clamp(0, 1)
    ipc = len(x) // k
    cols = min(ipc, a.max_per_class)
    fig, axes = plt.subplots(k, cols, figsize=(cols * 0.8 + 0.4, k * 0.8 + 0.2), squeeze=False)
    for c in range(k):
        for j in range(cols):
            ax = axes[c][j]
            img = x[c * ipc + j]
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    plt.close(fig)
    print(f"wrote {a.out} ({k} classes x {cols} images)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prunelab.synthetic", description="build, list and view synthetic sets")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="build a synthetic set and store it (reused if already stored)")
    m.add_argument("--dataset", default="digits")
    m.add_argument("--root", default=None, help="dataset.root for cifar10/100, imagenet10")
    m.add_argument("--method", required=True, choices=SOURCES)
    m.add_argument("--ipc", type=int, required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--budget", type=int, default=None)
    m.add_argument("--factor", type=int, default=None)
    m.add_argument("--store", default=None)
    m.add_argument("--device", default="cpu")
    m.add_argument("--net-width", dest="net_width", type=int, default=None, help="distiller's ConvNet width")
    m.add_argument("--inner-loop", dest="inner_loop", type=int, default=None, help="idc: matching steps per iteration")
    m.add_argument("--batch-real", dest="batch_real", type=int, default=None, help="real images per class per step")
    m.add_argument("--lr-img", dest="lr_img", type=float, default=None, help="learning rate of the images")
    m.set_defaults(fn=cmd_make)
    s = sub.add_parser("show", help="list stored synthetic sets")
    s.add_argument("--store", default=None)
    s.set_defaults(fn=cmd_show)
    g = sub.add_parser("grid", help="save an image grid (one row per class)")
    g.add_argument("target", metavar="KEY_OR_PATH")
    g.add_argument("--out", required=True)
    g.add_argument("--store", default=None)
    g.add_argument("--factor", type=int, default=None, help="decode factor for an IDC file")
    g.add_argument("--decoded", action="store_true", help="show decoded images instead of stored ones")
    g.add_argument("--max-per-class", type=int, default=10)
    g.set_defaults(fn=cmd_grid)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
