"""`python -m prunelab`: run one IMP chain (real or synthetic pruning data) from the command line.

    python -m prunelab run                              # IMP on digits, evaluated at 0%, 59%, 87%
    python -m prunelab run --set pruning_data.kind=distilled pruning_data.method=dm pruning_data.ipc=10
    python -m prunelab run --config chain.yaml --eval-rounds 0,4,9 --out results/
    python -m prunelab run --device cuda --workers 4   # one chain data-parallel on 4 GPUs
    python -m prunelab describe                         # every hyperparameter with its help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .checkpoint import CHECKPOINT_EVERY_S
from .data import check_root, load_dataset
from .errors import ConfigError
from .evaluation import EvalHparams, result_key
from .hparams import ChainHparams, set_path
from .parallel import check_chain_workers, lead_or_follow, run_workers
from .runner import run_chain
from .store import ChainStore
from .train import resolve_device

# A chain on the embedded digits set that runs in about a minute on a laptop CPU.
DEMO_CHAIN = {
    "dataset": {"name": "digits"},
    "model": {"name": "convnet3", "width": 32},
    "pruning": {"rounds": 9},
    "pruning_training": {"epochs": 20, "lr": 0.05},
    "training": {"epochs": 20, "lr": 0.05},
}


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """`key.sub=value` strings -> (key, YAML-parsed value); `seeds=[0,1]` gives a list."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError("--set", f"{item!r} is not key=value", "write e.g. --set training.lr=0.1")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value)))
    return out


def load_chain_config(path: str | None, overrides: list[str]) -> ChainHparams:
    data = json.loads(json.dumps(DEMO_CHAIN))
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError("--config", f"cannot read {path}: {e}", "give a readable YAML file") from None
        data = loaded or {}
    for key, value in parse_overrides(overrides):
        set_path(data, key, value)
    return ChainHparams.from_dict(data)


def cmd_run(args) -> int:
    hp = load_chain_config(args.config, args.set)
    eval_rounds = sorted({int(r) for r in args.eval_rounds.split(",")}) if args.eval_rounds else []
    bad = [r for r in eval_rounds if r > hp.pruning.rounds]
    if bad:
        raise ConfigError("--eval-rounds", f"rounds {bad} exceed pruning.rounds={hp.pruning.rounds}",
                          "evaluate at rounds up to pruning.rounds")
    device = resolve_device(args.device)
    if args.workers == 1:
        return _run(args, hp, eval_rounds, device)
    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}", "e.g. --workers 2")
    check_chain_workers(hp, args.workers, "--workers")
    if not hp.dataset.root or Path(hp.dataset.root).is_absolute():  # the workers share this directory
        check_root(hp.dataset)  # a missing data root named here, not in a worker's traceback
    if device.type == "cuda" and args.workers > torch.cuda.device_count():
        raise ConfigError("--workers", f"{args.workers} workers, one GPU each, but "
                          f"{torch.cuda.device_count()} GPUs here",
                          f"use --workers {torch.cuda.device_count()} or fewer")
    return run_workers(_data_parallel_run, args.workers, args, hp, eval_rounds,
                       backend="nccl" if device.type == "cuda" else "gloo")


def _data_parallel_run(rank: int, world: int, args, hp: ChainHparams, eval_rounds: list[int]) -> int:
    """`prunelab run --workers N` as rank `rank`: rank 0 runs the chain as one process would, inside
    `prunelab.parallel.Leader`; the others follow its trainings (GPU r for rank r on CUDA)."""
    device = torch.device(f"cuda:{rank}") if resolve_device(args.device).type == "cuda" else torch.device("cpu")
    data = load_dataset(hp.dataset)
    # a set streamed from host memory (too large for the device) is gathered by this rank's share of the CPUs
    leader = lead_or_follow(rank, world, device, {"train": data.train},
                            num_workers=max(0, (os.cpu_count() or 1) // world - 1))
    if leader is None:
        return 0
    with leader:
        return _run(args, hp, eval_rounds, device, data)


def _run(args, hp: ChainHparams, eval_rounds: list[int], device, data=None) -> int:
    out = Path(args.out).resolve() if args.out else None
    # the subnetwork of each evaluation round trained once on real data (no LMC pair)
    ev = EvalHparams(rounds=tuple(eval_rounds), lmc=False)
    t0 = time.time()

    def opened(chain) -> None:
        print(f"chain {hp.hash()}: {hp.model.name} on {hp.dataset.name}, pruning data {hp.pruning_data.kind} "
              f"({len(chain.pruning_data)} images), {hp.pruning.rounds} rounds", flush=True)

    def stepped(chain, rec: dict) -> None:
        print(f"  round {rec['round']:2d}  trained on pruning data: accuracy {rec['pruning_accuracy']:.3f}"
              f" -> pruned to {rec['sparsity']:.1%}", flush=True)

    def evaluated(chain, r: int, res: dict) -> None:
        m = res["metrics"]
        print(f"  round {r:2d}  sparsity {m['eval_sparsity']:6.1%}  test accuracy "
              f"{m['test_accuracy']:.3f}  (subnetwork trained on real data)", flush=True)

    with contextlib.ExitStack() as stack:
        # with --out the store lives there (a second run resumes it); else it is temporary
        root = args.store or (out / "store" if out else Path(stack.enter_context(tempfile.TemporaryDirectory())))
        store = ChainStore(root, hp)
        chain = run_chain(hp, ev, eval_rounds, store, device=device, data=data,
                          on_open=opened, on_round=stepped, on_eval=evaluated,
                          checkpoint_every_s=CHECKPOINT_EVERY_S if out or args.store else None)  # resumable
        # every evaluation, those reused from an earlier run with the same --out included
        rows = [{"round": r, "sparsity": m["eval_sparsity"], "test_accuracy": m["test_accuracy"],
                 "test_loss": m["test_loss"]}
                for r in eval_rounds for m in [store.load_eval(result_key(ev), r)["metrics"]]]
    print(f"done in {time.time() - t0:.1f} s; final mask {chain.mask.hash()}")
    if out:
        chain.mask.save(out / "mask.pt")
        (out / "results.json").write_text(json.dumps(
            {"config": hp.to_dict(), "hash": hp.hash(), "evaluations": rows, "history": chain.state.history},
            indent=2))
        print(f"wrote {out / 'mask.pt'} (read it with prunelab.masks.Mask.load) and {out / 'results.json'}; "
              f"the chain's store is {args.store or out / 'store'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prunelab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one IMP chain")
    r.add_argument("--config", help="chain YAML (ChainHparams); default: the digits demo chain")
    r.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config values")
    r.add_argument("--eval-rounds", default="0,4,9", help="rounds whose subnetwork is trained on real data")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    r.add_argument("--workers", type=int, default=1,
                   help="train the chain data-parallel in this many processes (one GPU each with --device cuda; "
                   "the global batch is split; on GPUs, and for networks without batch norm on the CPU, the "
                   "masks are those of one process up to float rounding)")
    r.add_argument("--out", help="directory for the final mask, results.json and the chain's store "
                   "(run again with the same --out to resume or reuse it)")
    r.add_argument("--store", help="the result store instead of OUT/store: a folder or a bucket (s3://bucket/prefix, "
                   "gs://...), shared with sweeps and other runs (a chain stored there is reused, one being "
                   "computed elsewhere is waited for)")
    sub.add_parser("describe", help="list every chain hyperparameter with its default and help")
    args = p.parse_args(argv)
    try:
        if args.cmd == "describe":
            print(ChainHparams.describe())
            return 0
        return cmd_run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
