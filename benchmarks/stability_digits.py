"""Measure LMC barriers on `digits`: dense and IMP subnetworks at 60% / 87% sparsity (rounds 4 / 9).

For every chain seed, an IMP chain (pruning data: `--pruning-data`, real by default) is advanced round
by round; at each measured round the subnetwork (rewind point ⊙ mask) is trained twice on the real
data with different data orders and interpolated (11 α, train and test). Prints mean ± std over chain
seeds of the paper's barrier (loss at α=0.5 minus the mean endpoint loss) and the timings.

    .venv/bin/python benchmarks/stability_digits.py                      # IMP, seeds 0 1 2
    .venv/bin/python benchmarks/stability_digits.py --pruning-data distilled --ipc 10 --out res.json
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

from prunelab.chain import Chain  # noqa: E402
from prunelab.data import load_dataset  # noqa: E402
from prunelab.hparams import (ChainHparams, DatasetHparams, ModelHparams, PruningDataHparams,  # noqa: E402
                              PruningHparams, TrainingHparams)
from prunelab.stability import EvalSet, LMCHparams, instability, lmc_curve, train_pair  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruning-data", default="real",
                   help="ChainHparams.pruning_data.kind: real, distilled, idc_file, random_subset, herding")
    p.add_argument("--ipc", type=int, default=None, help="images per class of a synthetic pruning set (default 10)")
    p.add_argument("--pruning-data-path", default=None, help="IDC data.pt (kind idc_file)")
    p.add_argument("--method", default="dm", help="distillation method (kind distilled): dm or idc")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="chain seeds (init, masks, orders)")
    p.add_argument("--rounds", type=int, nargs="+", default=[0, 4, 9], help="rounds measured (20%%/round)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pruning-epochs", type=int, default=None, help="epochs on the pruning data (default --epochs)")
    p.add_argument("--pruning-lr", type=float, default=None, help="lr on the pruning data (default --lr)")
    p.add_argument("--bn-mode", default="interpolate", choices=["interpolate", "recompute"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def make_hp(a, seed: int) -> ChainHparams:
    train = TrainingHparams(lr=a.lr, epochs=a.epochs, batch_size=a.batch_size)
    prune_train = train.replace(epochs=a.pruning_epochs or a.epochs, lr=a.pruning_lr or a.lr)
    kind = a.pruning_data
    pd = PruningDataHparams(kind=kind, ipc=(a.ipc or 10) if kind not in ("real", "idc_file") else a.ipc,
                            path=a.pruning_data_path, method=a.method if kind == "distilled" else None)
    hp = ChainHparams(dataset=DatasetHparams(name="digits"), model=ModelHparams(name="convnet3", width=a.width),
                      pruning=PruningHparams(fraction=0.2, rounds=max(a.rounds)), pruning_data=pd,
                      pruning_training=prune_train, training=train, seed=seed)
    hp.validate()
    return hp


def mean_std(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_dataset(DatasetHparams(name="digits"))
    lmc_hp = LMCHparams(bn_mode=a.bn_mode)
    rows, t_start = [], time.perf_counter()
    for seed in a.seeds:
        hp = make_hp(a, seed)
        chain = Chain(hp, a.device, data=data)
        while True:
            r = chain.round
            if r in a.rounds:
                res = instability(hp, data, chain.state.rewind_point, chain.mask, lmc_hp, a.device)
                row = {"seed": seed, "round": r, "sparsity": res["sparsity"],
                       "copy_test_accuracy": res["copy_test_accuracy"],
                       "endpoint_train_loss": [res["train_loss"][0], res["train_loss"][-1]],
                       "barrier_mid": res["barrier_mid"], "barrier_max": res["barrier_max"],
                       "lmc_wall_s": res["wall_s"], "train_s": res["train_s"], "curve": res}
                rows.append(row)
                print(f"seed {seed} round {r} sparsity {res['sparsity']:.3f} acc {res['copy_test_accuracy']:.4f} "
                      f"barrier_mid train {res['barrier_mid']['train_loss']:+.4f} "
                      f"test {res['barrier_mid']['test_loss']:+.4f}  (lmc {res['wall_s']:.2f}s, "
                      f"train {res['train_s']:.1f}s)", flush=True)
            if chain.done or r >= max(a.rounds):
                break
            chain.step()

    # one LMC evaluation timed on its own, on a fresh pair (eval sets built inside, as in a sweep)
    hp = make_hp(a, a.seeds[0])
    chain = Chain(hp, a.device, data=data)
    (m0, m1), _ = train_pair(hp, data, chain.state.init, chain.mask, (0, 1), a.device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        lmc_curve(m0, m1, data, lmc_hp, a.device)
        times.append(time.perf_counter() - t)
    ev = EvalSet(data.train, a.device)
    t = time.perf_counter()
    for _ in range(10):
        ev.evaluate(m0)
    one_eval = (time.perf_counter() - t) / 10

    print(f"\npruning data: {a.pruning_data}; recipe: convnet3 width {a.width}, SGD lr {a.lr} momentum 0.9 "
          f"wd 5e-4, {a.epochs} epochs, batch {a.batch_size}, standard augmentation; chain seeds {a.seeds}; "
          f"LMC: 11 α, bn_mode {a.bn_mode}, full train (1437) and test (360) sets")
    print(f"{'round':>5} {'sparsity':>8} {'test acc':>15} {'barrier_mid train loss':>24} "
          f"{'barrier_mid test loss':>24} {'barrier_mid test err':>22} {'barrier_max train loss':>24}")
    summary = []
    for r in a.rounds:
        rs = [x for x in rows if x["round"] == r]
        if not rs:
            continue
        acc = mean_std([x["copy_test_accuracy"] for x in rs])
        btr = mean_std([x["barrier_mid"]["train_loss"] for x in rs])
        bte = mean_std([x["barrier_mid"]["test_loss"] for x in rs])
        bee = mean_std([x["barrier_mid"]["test_error"] for x in rs])
        bmx = mean_std([x["barrier_max"]["train_loss"] for x in rs])
        summary.append({"round": r, "sparsity": rs[0]["sparsity"], "n": len(rs), "test_accuracy": acc,
                        "barrier_mid_train_loss": btr, "barrier_mid_test_loss": bte,
                        "barrier_mid_test_error": bee, "barrier_max_train_loss": bmx})
        f = lambda m: f"{m[0]:+.4f} ± {m[1]:.4f}"  # noqa: E731
        print(f"{r:>5} {rs[0]['sparsity']:>8.3f} {acc[0]:>7.4f} ± {acc[1]:.4f} {f(btr):>24} {f(bte):>24} "
              f"{f(bee):>22} {f(bmx):>24}")
    print(f"\nLMC evaluation (11 α, train+test, CPU threads={a.threads}): median {statistics.median(times):.3f} s "
          f"(min {min(times):.3f} s); one full-train-set evaluation {one_eval * 1e3:.1f} ms; "
          f"mean training run {statistics.fmean(x['train_s'] for x in rows) / 2:.2f} s; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "summary": summary, "rows": rows,
                                           "lmc_eval_s": times, "one_eval_s": one_eval}, indent=1))


if __name__ == "__main__":
    main()
