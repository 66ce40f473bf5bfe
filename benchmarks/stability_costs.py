"""What each stability analysis costs per subnetwork, on the CPU at the demo's size.

One subnetwork of the Figure 6 demo (digits, ResNet-10 width 8, lr 0.1, 10 epochs; IMP's round-4 mask,
59 % sparse, found here by 4 rounds of IMP): each analysis timed once in this process, one thread,
and given as seconds and as a multiple of training the LMC pair (the baseline every LMC evaluation
pays; a one-epoch pair is trained first, untimed, so that no analysis pays the process's warm-up). Analyses with options of their own run at the demo's settings (11 α, BN statistics from 8
batches of 128, the spectrum's defaults).

    .venv/bin/python benchmarks/stability_costs.py            # ~5 minutes on one core
    .venv/bin/python benchmarks/stability_costs.py --rounds 2 --epochs 3   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.align import aligned_curves  # noqa: E402
from prunelab.chain import Chain  # noqa: E402
from prunelab.data import load_dataset  # noqa: E402
from prunelab.hessian import HessianHparams, hessian_analysis  # noqa: E402
from prunelab.hparams import ChainHparams, DatasetHparams  # noqa: E402
from prunelab.landscape import LandscapeHparams, landscape  # noqa: E402
from prunelab.spectrum import SpectrumHparams, spectrum_analysis  # noqa: E402
from prunelab.stability import (LMCHparams, bn_curves, previous_round_curves, spawned_instability,  # noqa: E402
                                train_pair)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="IMP rounds before the measured subnetwork (4: 59%%)")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(DatasetHparams(name="digits"))
    hp = ChainHparams.from_dict({"dataset": {"name": "digits"}, "model": {"name": "resnet10_bn", "width": 8},
                                 "pruning": {"rounds": a.rounds},
                                 "pruning_training": {"epochs": a.epochs, "lr": 0.1},
                                 "training": {"epochs": a.epochs, "lr": 0.1}})
    chain = Chain(hp, data=data)
    masks = {0: chain.mask}
    while not chain.done:
        chain.step()
        masks[chain.round] = chain.mask
    weights, mask, previous = chain.state.rewind_point, chain.mask, masks[chain.round - 1]
    lmc = LMCHparams(bn_batches=8)
    rows = []

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t0))
        return out

    train_pair(hp.replace(training=hp.training.replace(epochs=1)), data, weights, mask)  # warm-up, untimed
    (ma, mb), _ = timed("train the LMC pair (2 copies)", lambda: train_pair(hp, data, weights, mask, device="cpu"))
    timed("LMC line, both BN modes (11 α)", lambda: bn_curves(ma, mb, data, lmc, "cpu", mask=mask))
    timed("aligned line (both modes) + REPAIR line", lambda: aligned_curves(ma, mb, data, lmc, "cpu", mask))
    timed("pair spawned after 1 epoch (train + line)", lambda: spawned_instability(hp, data, weights, mask, 1, lmc))
    timed("previous round's solution (train + line)",
          lambda: previous_round_curves(hp, data, weights, ma, previous, lmc))
    timed("spectrum, one batch (309 HVPs)", lambda: spectrum_analysis(ma, data, SpectrumHparams(), mask=mask))
    timed("spectrum, full training set", lambda: spectrum_analysis(ma, data, SpectrumHparams(data="full"), mask=mask))
    timed("Hessian diagonal, Hutchinson (200) + top eigenvalue",
          lambda: hessian_analysis(ma, data, HessianHparams(method="hutchinson"), mask=mask))
    timed("landscape, plane of 3 copies, 10x10 (train + grid)",
          lambda: landscape(hp, data, weights, mask, LandscapeHparams(grid=10, seeds=(0, 1, 2))))
    timed("landscape, filter-normalized, 10x10 (train 1 + grid)",
          lambda: landscape(hp, data, weights, mask, LandscapeHparams(grid=10, seeds=(0,), directions="filter_normalized")))
    base = rows[0][1]
    print(f"ResNet-10 width 8 on digits, {a.epochs} epochs, round {a.rounds} ({mask.sparsity:.0%} sparse), 1 thread")
    print(f"{'analysis':58s} {'seconds':>8s} {'x pair':>7s}")
    for name, s in rows:
        print(f"{name:58s} {s:8.1f} {s / base:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
