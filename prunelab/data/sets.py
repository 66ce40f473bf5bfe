"""The data sets prunelab knows: each loader maps DatasetHparams to a train/test DataSplit.

Nothing is ever downloaded: `digits` ships with scikit-learn, `shapes` is generated, and CIFAR /
ImageNet are read from a local root the user gives.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..catalog import DATASETS as FACTS
from ..catalog import IMAGENET10_WNIDS
from ..errors import ConfigError, DataNotFoundError
from ..files import cache_dir
from .base import DataSplit, ImageData
from .folder import FolderWriter, exclusive, open_folder

# IDC's normalization constants (distilled IDC images are normalized with the same ones)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _limit(data: ImageData, n, field: str, seed: int) -> ImageData:
    """A class-balanced-ish random subset of size n (keeps every class where possible)."""
    if n is None or n >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)[:n]
    return data.subset(perm.sort().values)


def load_digits(hp) -> DataSplit:
    """scikit-learn's 1,797 8x8 handwritten digits, a fixed stratified 80/20 split by `split_seed`."""
    from sklearn.datasets import load_digits as sk_digits  # ~2 s to import: only digits needs scikit-learn

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _stratified_split(d.target, 0.2, hp.split_seed)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    common = dict(num_classes=10, mean=(mean,), std=(std,), name="digits", crop_pad=1, flip=False)
    train = ImageData(x[tr], y[tr], **common)
    test = ImageData(x[te], y[te], **common)
    return DataSplit(_limit(train, hp.train_size, "train_size", hp.split_seed),
                     _limit(test, hp.test_size, "test_size", hp.split_seed + 1))


def make_shapes(n: int, num_classes: int, seed: int, size: int = 32, template_seed: int = 1234):
    """Class-structured 3xSxS images: a per-class smooth colour template, randomly shifted and
    scaled in brightness, plus pixel noise. Templates depend on `template_seed` only, so train and
    test (different `seed`) share classes."""
    tg = torch.Generator().manual_seed(template_seed)
    low = torch.rand(num_classes, 3, 4, 4, generator=tg)
    templates = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    x = templates[y]
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
    x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + 0.15 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def load_shapes(hp) -> DataSplit:
    """Generated CIFAR-shaped data of any size (default 10,000 / 2,000), for tests and benchmarks."""
    size = hp.image_size or FACTS["shapes"].size
    n_tr, n_te = hp.train_size or FACTS["shapes"].train, hp.test_size or FACTS["shapes"].test
    xtr, ytr = make_shapes(n_tr, 10, seed=2 * hp.split_seed, size=size)
    xte, yte = make_shapes(n_te, 10, seed=2 * hp.split_seed + 1, size=size)
    common = dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="shapes")
    return DataSplit(ImageData(xtr, ytr, **common), ImageData(xte, yte, **common))


def _require_root(hp, what: str, layout: str) -> Path:
    if not hp.root:
        raise DataNotFoundError("dataset.root", f"{hp.name} needs a local data directory",
                                f"set dataset.root to the folder that holds {layout}")
    root = Path(hp.root).expanduser()
    if not root.is_absolute():
        root = root.resolve()
    if not root.is_dir():
        raise DataNotFoundError("dataset.root", f"{root} does not exist",
                                f"put {what} there ({layout}) or point dataset.root at it")
    return root


def _load_cifar(hp, cls_name: str, folder: str, classes: int, mean, std) -> DataSplit:
    import torchvision  # ~1.8 s to import: only the CIFAR loaders need it

    root = _require_root(hp, cls_name, f"{folder}/ as extracted from the official python archive")
    if not (root / folder).is_dir():
        raise DataNotFoundError("dataset.root", f"no {folder}/ under {root}",
                                f"extract the official {cls_name} python archive into {root} "
                                f"so that {root / folder} exists")
    cls = getattr(torchvision.datasets, cls_name)
    try:
        tr = cls(str(root), train=True, download=False)
        te = cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise DataNotFoundError("dataset.root", f"{root / folder} is incomplete or corrupted ({e})",
                                f"re-extract the official {cls_name} archive there") from None

    def to_data(ds):
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets, dtype=torch.int64)
        return ImageData(x, y, num_classes=classes, mean=mean, std=std, name=hp.name)

    return DataSplit(_limit(to_data(tr), hp.train_size, "train_size", hp.split_seed),
                     _limit(to_data(te), hp.test_size, "test_size", hp.split_seed + 1))


def load_cifar10(hp) -> DataSplit:
    return _load_cifar(hp, "CIFAR10", "cifar-10-batches-py", 10, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(hp) -> DataSplit:
    return _load_cifar(hp, "CIFAR100", "cifar-100-python", 100, CIFAR100_MEAN, CIFAR100_STD)


def _image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]


def _decode_folder(folder: Path, size: int) -> torch.Tensor:
    """Every image of one class folder, resized (shorter side size*8/7) and center-cropped to size."""
    from PIL import Image  # only decoding ImageNet needs it

    resize = int(round(size * 8 / 7))
    out = []
    for p in _image_files(folder):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not out:
        raise DataNotFoundError("dataset.root", f"no images in {folder}", "check the ImageNet layout")
    return torch.stack(out)


def load_imagenet10(hp) -> DataSplit:
    """ImageNet-10 (IDC's first 10 classes) from an ImageNet `train/` + `val/` ImageFolder root.

    Images are decoded once, resized to `image_size` (default 224, as the authors' code), stored as
    uint8 and cached under the prunelab cache directory.
    """
    root = _require_root(hp, "ImageNet", "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    size = hp.image_size or FACTS["imagenet10"].size
    splits = {}
    for split in ("train", "val"):
        missing = [w for w in IMAGENET10_WNIDS if not (root / split / w).is_dir()]
        if missing:
            raise DataNotFoundError("dataset.root", f"{root / split} lacks class folders {missing}",
                                    "give the root of an ImageNet ImageFolder with train/ and val/ "
                                    "(val sorted into one folder per WordNet id)")
        key = hashlib.sha256(f"{root.resolve()}|{split}|{size}".encode()).hexdigest()[:16]
        cached = cache_dir() / "imagenet10" / f"{key}.pt"
        if cached.exists():
            x, y = torch.load(cached, weights_only=True)
        else:
            xs, ys = [], []
            for c, w in enumerate(IMAGENET10_WNIDS):
                xc = _decode_folder(root / split / w, size)
                xs.append(xc)
                ys.append(torch.full((len(xc),), c, dtype=torch.int64))
            x, y = torch.cat(xs), torch.cat(ys)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            torch.save((x, y), tmp)
            os.replace(tmp, cached)
        splits[split] = ImageData(x, y, num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  name="imagenet10", crop_pad=size // 8)
    return DataSplit(_limit(splits["train"], hp.train_size, "train_size", hp.split_seed),
                     _limit(splits["val"], hp.test_size, "test_size", hp.split_seed + 1))


DECODE_IN_PROCESSES_FROM = 20_000  # images of a split decoded by a pool of processes


def _decode_to_folder(split: Path, classes: list[str], size: int, folder: Path) -> None:
    """Every image of `split`'s class folders decoded as `_decode_folder`, class by class in parallel
    processes, into the streaming folder `folder` (class index = position in `classes`)."""
    counts = [len(_image_files(split / w)) for w in classes]
    writer = FolderWriter(folder, sum(counts), (3, size, size))
    print(f"prunelab: decoding {sum(counts):,} images of {split} into {folder} (once)", flush=True)
    workers = os.cpu_count() or 1
    # processes for a large split (spawned, not forked: the caller may be a threaded process, a Ray
    # worker or one with CUDA initialized); a small one is decoded here, sooner than processes start
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            if sum(counts) >= DECODE_IN_PROCESSES_FROM else ThreadPoolExecutor(max_workers=1))
    with pool:
        pending: deque = deque()

        def write_oldest() -> None:
            c, future = pending.popleft()
            x = future.result()
            if len(x) != counts[c]:
                raise DataNotFoundError("dataset.root", f"{split / classes[c]} changed while it was decoded",
                                        "decode it again from a root nobody is writing to")
            writer.add(x, torch.full((len(x),), c, dtype=torch.int64))

        for c, w in enumerate(classes):  # a few classes in flight, not all 1,000 decoded sets in memory
            pending.append((c, pool.submit(_decode_folder, split / w, size)))
            if len(pending) > 2 * workers:
                write_oldest()
        while pending:
            write_oldest()
    writer.finish(len(classes), IMAGENET_MEAN, IMAGENET_STD, "imagenet", crop_pad=size // 8)


def load_imagenet(hp) -> DataSplit:
    """ImageNet-1k (ILSVRC-2012) from an ImageFolder root: train/<wnid>/ and val/<wnid>/ (the
    validation images sorted into one folder per WordNet id), class index = the sorted ids.

    Images are decoded once, as ImageNet-10's (resized, center-cropped to `image_size`, default 224),
    into a memory-mapped streaming folder under the prunelab cache directory (`prunelab.data.folder`;
    about 193 GB at 224 px), then mapped: a training set this size is streamed from host memory
    (`prunelab.data.stream`), not held on the device.
    """
    facts = FACTS["imagenet"]
    root = _require_root(hp, "ImageNet", "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    size = hp.image_size or facts.size
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) != facts.classes:
        raise DataNotFoundError("dataset.root", f"{root / 'train'} has {len(classes)} class folders, ImageNet-1k "
                                f"{facts.classes}", "give the root of the ILSVRC-2012 ImageFolder (train/ and val/, "
                                "one folder per WordNet id), or use imagenet10 for IDC's 10 classes")
    splits = {}
    for split in ("train", "val"):
        missing = [w for w in classes if not (root / split / w).is_dir()]
        if missing:
            raise DataNotFoundError("dataset.root", f"{root / split} lacks {len(missing)} class folders "
                                    f"({missing[0]}, ...)", "sort the validation images into one folder per "
                                    "WordNet id, as train/ is")
        key = hashlib.sha256(f"{root.resolve()}|{split}|{size}".encode()).hexdigest()[:16]
        folder = cache_dir() / "imagenet" / key
        if not (folder / "meta.json").is_file():
            with exclusive(folder):  # the workers of a node load it at once: one decodes, the others wait
                if not (folder / "meta.json").is_file():
                    _decode_to_folder(root / split, classes, size, folder)
        splits[split] = open_folder(folder)
    return DataSplit(_limit(splits["train"], hp.train_size, "train_size", hp.split_seed),
                     _limit(splits["val"], hp.test_size, "test_size", hp.split_seed + 1))


def _facts(hp):
    if hp.name not in FACTS:
        raise ConfigError("dataset.name", f"unknown data set {hp.name!r}", "use one of " + ", ".join(sorted(FACTS)))
    return FACTS[hp.name]


def dataset_shape(hp) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and the class count of the data set `hp` (DatasetHparams) names, without loading it."""
    f = _facts(hp)
    s = (hp.image_size or f.size) if f.resizable else f.size
    return (f.channels, s, s), f.classes


def dataset_sizes(hp) -> tuple[int, int]:
    """(train, test) example counts of the data set `hp` (DatasetHparams) names, without loading it:
    the data set's own sizes, or `train_size` / `test_size` where smaller (shapes: where given)."""
    f = _facts(hp)
    n_train, n_test = f.train, f.test
    if hp.name == "shapes":
        return hp.train_size or n_train, hp.test_size or n_test
    return min(n_train, hp.train_size or n_train), min(n_test, hp.test_size or n_test)


# the folders each data set's root holds (those without a root are generated or shipped)
ROOT_LAYOUTS = {name: list(f.layout) for name, f in FACTS.items() if f.layout}


def check_root(hp) -> None:
    """Without loading anything: the folders `hp` (DatasetHparams) reads are there, at an absolute
    path (sweep trials run in their own directories). Data sets without a root pass."""
    if hp.name not in ROOT_LAYOUTS:
        return
    layout = ROOT_LAYOUTS[hp.name]
    if not hp.root:
        raise DataNotFoundError("dataset.root", f"{hp.name} needs a local data directory",
                                f"--set root=/path/to/data (holding {layout[0]}/)")
    root = Path(hp.root).expanduser()
    if not root.is_absolute():
        raise ConfigError("dataset.root", f"{hp.root} is relative; trials run in their own directories",
                          f"use an absolute path, e.g. {root.resolve()}")
    missing = [p for p in layout if not (root / p).is_dir()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataNotFoundError("dataset.root", f"{root} lacks {missing[0]}/{more}",
                                f"put the {hp.name} data there or point dataset.root at it")


# the loaders; each name is a data set of prunelab.catalog.DATASETS (its facts)
DATASETS = {
    "digits": load_digits,
    "shapes": load_shapes,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagenet10": load_imagenet10,
    "imagenet": load_imagenet,
}


def load_dataset(hp) -> DataSplit:
    """Load the train/test split that `hp` (DatasetHparams) names."""
    if hp.name not in DATASETS:
        raise ConfigError("dataset.name", f"unknown data set {hp.name!r}",
                          "use one of " + ", ".join(sorted(DATASETS)))
    return DATASETS[hp.name](hp)
