"""IDC's own condensation settings, as `pruning_data` values for prunelab's built-in `idc` distiller.

Sources, in IDC's official code (github.com/snu-mllab/Efficient-Dataset-Condensation, Kim et al.,
ICML 2022): `argument.py` (defaults and `tune_lr_img`), `misc/reproduce.py` (`set_arguments`, what
`condense.py --reproduce` runs), `condense.py` (the loop) and `test.py` (the names of the released
sets, e.g. `cifar10/conv3in_grad_mse_nd2000_cut_niter2000_factor2_lr0.005_mix`).
"""

from __future__ import annotations

import math

# IDC's real images per network update inside the inner loop (`n_data`): 2,000 for CIFAR-10
# (reproduce.py), 500 for ImageNet-10 (its default there)
_N_DATA = {"cifar10": 2000, "cifar100": 2000, "imagenet10": 500}
_BATCH_REAL = 64  # argument.py; ImageNet raises it to 128 only from 100 classes on


def _check(dataset: str, ipc: int) -> None:
    if dataset not in _N_DATA:
        raise ValueError(f"no IDC settings for data set {dataset!r}: IDC's recipe is known here for "
                         + ", ".join(sorted(_N_DATA)))
    if ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc}")


def idc_settings(dataset: str, ipc: int) -> dict:
    """`pruning_data` values (PruningDataHparams fields) of IDC's condensation of `dataset` at `ipc`.

    cifar10 (reproduce.py's cifar10 branch; ConvNet-3, instance norm, `--reproduce -f 2`):
      factor 2 (README: `-f 2` for all but ImageNet); budget 2000 (`niter = 2000`; condense.py runs
      niter * 100 // inner_loop = 2,000 outer iterations); inner_loop 100 (argument.py default);
      batch_real 64 (argument.py); net_width 128 (train.py's `define_model`: int(128 * width),
      width 1.0); lr_img 0.005 x ipc / 10 (reproduce.py's 5e-3, scaled by `tune_lr_img` with
      ipc_base 10 at 32 px; tuned there for the squared-distance 'mse' metric prunelab uses).
    cifar100: reproduce.py has no CIFAR-100 branch (it raises) and IDC's README reports none, so
      these are CIFAR-10's values.
    imagenet10 (reproduce.py's imagenet branch, nclass 10; `-f 3`): factor 3; budget 500
      (`niter = 500`, inner_loop 100); inner_loop 100; batch_real 64; lr_img 0.003 x ipc / 10
      (`tune_lr_img` at IDC's 224 px; it scales by (size / 224)^2 at other sizes). What prunelab
      cannot follow: IDC distils with ResNetAP-10 (instance norm), prunelab's distiller has only its
      ConvNet (5 blocks at 224 px), so net_width is left to the distiller's default rather than
      passed off as IDC's; IDC's 0.003 was tuned for an L1 gradient distance (`metric = 'l1'`) while
      prunelab matches squared distances, so it is IDC's number, not one tuned for this loss; IDC
      trains each fresh network 10 epochs on real data first (`early = 10`), and at ipc >= 20 bounds
      the decoded images matched per class to 128 (`decode_type = 'bound'`); prunelab does neither.

    Not PruningDataHparams fields, so a chain does not follow them either: the network updates per
    inner step (`idc_net_steps`; distill_idc's `net_steps`), IDC's CutMix in those updates
    (`mixup_net = 'cut'`), its cap of 128 decoded synthetic images per class and matching step
    (`batch_syn_max`; reached at CIFAR ipc 50, factor 2), and its leaving the classifier's gradient
    out of the matching distance (`fc = False`).
    """
    _check(dataset, ipc)
    lr_base = 0.003 if dataset == "imagenet10" else 0.005
    out = {"kind": "distilled", "method": "idc", "ipc": int(ipc),
           "factor": 3 if dataset == "imagenet10" else 2,
           "budget": 500 if dataset == "imagenet10" else 2000,
           "inner_loop": 100, "batch_real": _BATCH_REAL,
           "lr_img": float(f"{lr_base * ipc / 10:.12g}")}  # 0.005 * 50 / 10 is not exactly 0.025 in floats
    if dataset != "imagenet10":
        out["net_width"] = 128
    return out


def idc_net_steps(dataset: str) -> int:
    """Network updates per inner step in IDC's recipe: `n_data` real images in batches of
    batch_real (condense.py's `train_epoch(..., n_data=...)`), i.e. distill_idc's `net_steps`."""
    _check(dataset, 1)
    return math.ceil(_N_DATA[dataset] / _BATCH_REAL)
