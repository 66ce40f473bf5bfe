"""Does a recipe make Figure 6 measurable? IMP (and other) barriers at 59% / 87% over seeds, both BN modes.

For each chain seed, one chain per pruning-data kind is run to the last measured round (the IMP and
synthetic chains of a seed share their initialization); at rounds 4 and 9 (59% / 87% at 20% per
round) the subnetwork is evaluated exactly as a sweep's trial does (`prunelab.runner.run_chain` on a
temporary store: an LMC pair measured with BN statistics interpolated and recomputed, and the
controls asked for).
Prints, per round and source, the mean and 95% paired-bootstrap interval over seeds of the test
accuracy and of the midpoint barriers (test error in percentage points, train loss), and whether
IMP's test-error barrier is clear: a mean of at least `--threshold` percentage points with its 95%
interval above zero (the criterion for a default on which Figure 6 can be read; its ratios divide by
the train-loss barrier, defined when that is positive in every seed).

    .venv/bin/python benchmarks/fig6_default.py                       # the demo's recipe, IMP, 3 seeds
    .venv/bin/python benchmarks/fig6_default.py --set model.name=convnet3 model.width=16 --out res.json
    .venv/bin/python benchmarks/fig6_default.py --sources real distilled --controls shuffled reinit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.stats import mean_interval  # noqa: E402
from prunelab.cli import parse_overrides  # noqa: E402
from prunelab.data import load_dataset  # noqa: E402
from prunelab.evaluation import EvalHparams  # noqa: E402
from prunelab.hparams import ChainHparams, set_path  # noqa: E402
from prunelab.metrics import BN_MODES, CONTROLS, accuracy_name, barrier_name  # noqa: E402
from prunelab.runner import run_chain  # noqa: E402
from prunelab.stability import LMCHparams  # noqa: E402
from prunelab.store import ChainStore  # noqa: E402

# the recipe the demo preset uses (sweeps/configs/fig6.yaml); --set changes it
BASE = {"dataset": {"name": "digits"}, "model": {"name": "resnet10_bn", "width": 8}, "pruning": {"rounds": 9},
        "pruning_training": {"epochs": 10, "lr": 0.1}, "training": {"epochs": 10, "lr": 0.1}}
SYNTHETIC = {"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 10},
             "pruning_training": {"epochs": 100, "augment": "dsa"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="chain config overrides (all sources)")
    p.add_argument("--sources", nargs="+", default=["real"], choices=["real", "distilled"],
                   help="pruning data: real (IMP) and/or distilled (DM, --ipc)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, nargs="+", default=[4, 9])
    p.add_argument("--controls", nargs="*", default=[], choices=CONTROLS)
    p.add_argument("--bn-batches", type=int, default=LMCHparams().bn_batches,
                   help="training batches of 128 that re-estimate BN statistics per α (the demo uses 8)")
    p.add_argument("--threshold", type=float, default=2.0, help="IMP test-error barrier (pp) to clear")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write every row and the summary as JSON here")
    return p.parse_args(argv)


def chain_hp(a, source: str, seed: int) -> ChainHparams:
    data = json.loads(json.dumps(BASE))
    if source == "distilled":
        for k, v in SYNTHETIC.items():
            data.setdefault(k, {}).update(v)
        data["pruning_data"]["ipc"] = a.ipc
    for key, value in parse_overrides(a.set):
        if source == "distilled" and key.startswith("pruning_training.epochs"):
            continue  # a distilled set's epochs are its own
        set_path(data, key, value)
    data["seed"] = seed
    data["pruning"]["rounds"] = max(a.rounds)
    return ChainHparams.from_dict(data)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ev = EvalHparams(rounds=tuple(a.rounds), controls=tuple(a.controls),
                     lmc_hparams=LMCHparams(bn_batches=a.bn_batches))
    rows, t0 = [], time.perf_counter()
    data = None
    for seed in a.seeds:
        for source in a.sources:
            hp = chain_hp(a, source, seed)
            data = data or load_dataset(hp.dataset)

            def evaluated(chain, r, res, seed=seed, source=source):
                rows.append({"seed": seed, "source": source, "round": r, "metrics": res["metrics"],
                             "wall_s": res["wall_s"]})
                m = res["metrics"]
                print(f"seed {seed} {source:9s} round {r} acc {m['test_accuracy']:.4f} "
                      + " ".join(f"{mode[:5]}: err {100 * m[barrier_name('mid', 'test', 'error', mode)]:+.2f}pp "
                                 f"loss {m[barrier_name('mid', 'train', 'loss', mode)]:+.3f}"
                                 for mode in BN_MODES)
                      + f"  ({res['wall_s']:.0f} s)", flush=True)

            with tempfile.TemporaryDirectory() as store:  # measured afresh: nothing reused between runs
                run_chain(hp, ev, a.rounds, ChainStore(store, hp), data=data, on_eval=evaluated)
    print(f"\n{hp.model.name} width {hp.model.width} on {hp.dataset.name}; real training lr {hp.training.lr}, "
          f"{hp.training.epochs} epochs; seeds {a.seeds}; total {time.perf_counter() - t0:.0f} s (1 thread each)")
    summary = []
    sources = [(s, None) for s in a.sources] + [(s, c) for s in a.sources for c in a.controls]
    for r in a.rounds:
        for source, control in sources:
            rs = [x["metrics"] for x in rows if x["round"] == r and x["source"] == source]
            line = {"round": r, "source": source, "control": control,
                    "acc": mean_interval([m[accuracy_name(control)] for m in rs])}
            for mode in BN_MODES:
                line[f"err_{mode}"] = mean_interval([100 * m[barrier_name("mid", "test", "error", mode, control)]
                                                     for m in rs])
                line[f"loss_{mode}"] = mean_interval([m[barrier_name("mid", "train", "loss", mode, control)]
                                                      for m in rs])
            summary.append(line)
            name = source + (f"/{control}" if control else "")
            print(f"round {r} {name:18s} acc {line['acc'].fmt(3)}")
            for mode in BN_MODES:
                e = line[f"err_{mode}"]
                clear = e.n >= 2 and e.mean >= a.threshold and e.lo > 0
                print(f"    {mode:11s} test-error barrier (pp) {e.fmt(3)}"
                      f"{'  CLEARS' if clear and source == 'real' and not control else ''}; "
                      f"train-loss barrier {line[f'loss_{mode}'].fmt(3)}")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows,
                                           "summary": [{k: (v.__dict__ if hasattr(v, "__dict__") else v)
                                                        for k, v in s.items()} for s in summary]}, indent=1))


if __name__ == "__main__":
    main()
