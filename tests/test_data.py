import pickle

import numpy as np
import pytest
import torch

from prunelab.data import ImageData, load_dataset, random_crop_flip
from prunelab.errors import ConfigError, DataNotFoundError
from prunelab.hparams import ChainHparams, DatasetHparams


def test_digits_split_is_fixed_and_stratified(digits):
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.shape == (1, 8, 8) and digits.train.num_classes == 10
    again = load_dataset(DatasetHparams(name="digits"))
    assert torch.equal(again.train.x, digits.train.x)
    other = load_dataset(DatasetHparams(name="digits", split_seed=1))
    assert not torch.equal(other.train.x, digits.train.x)
    counts = digits.test.counts()
    assert counts.min() >= 30  # every class in the test split
    assert float(digits.train.x.min()) >= 0 and float(digits.train.x.max()) <= 1


def test_shapes_is_class_structured_and_sized():
    d = load_dataset(DatasetHparams(name="shapes", train_size=200, test_size=50))
    assert d.train.x.shape == (200, 3, 32, 32) and d.train.x.dtype == torch.uint8
    assert len(d.test) == 50
    # nearest-class-mean on raw pixels beats chance by far: the classes carry signal
    xtr, xte = d.train.x.float().flatten(1), d.test.x.float().flatten(1)
    means = torch.stack([xtr[d.train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(xte, means).argmin(1)
    assert (pred == d.test.y).float().mean() > 0.5


def test_crop_flip_is_seeded_and_keeps_content():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    a = random_crop_flip(x, 1, True, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, 1, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # with no padding and no flip it is the identity
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)
    # a crop with padding p of an image is a shifted copy: every value is either 0 or from the image
    vals = set(a.flatten().tolist()) - {0.0}
    assert vals <= set(x.flatten().tolist())


def test_unknown_dataset_and_missing_cifar_root(tmp_path):
    with pytest.raises(ConfigError, match="dataset.name"):
        ChainHparams.from_dict({"dataset": {"name": "svhn"}})
    with pytest.raises(DataNotFoundError, match="dataset.root"):
        load_dataset(DatasetHparams(name="cifar10"))
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset(DatasetHparams(name="cifar10", root=str(tmp_path)))


def _fake_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_cifar10_reads_a_local_root(tmp_path, monkeypatch):
    import torchvision

    _fake_cifar10(tmp_path)
    # the fake files fail torchvision's md5 check; the loader itself is what is under test
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    d = load_dataset(DatasetHparams(name="cifar10", root=str(tmp_path)))
    assert d.train.x.shape == (100, 3, 32, 32) and d.test.x.shape == (20, 3, 32, 32)
    assert d.train.x.dtype == torch.uint8 and d.train.num_classes == 10


def test_imagenet10_reads_an_imagefolder(tmp_path, monkeypatch):
    from PIL import Image

    from prunelab.data import IMAGENET10_WNIDS

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    for split in ("train", "val"):
        for i, w in enumerate(IMAGENET10_WNIDS):
            (tmp_path / "in" / split / w).mkdir(parents=True)
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(tmp_path / "in" / split / w / "a.JPEG")
    d = load_dataset(DatasetHparams(name="imagenet10", root=str(tmp_path / "in"), image_size=16))
    assert d.train.x.shape == (10, 3, 16, 16) and d.test.y.tolist() == list(range(10))
    assert int(d.train.x[3, 0, 8, 8]) == 60  # class index = position in IDC's list
    assert any((tmp_path / "cache" / "imagenet10").iterdir())
    (tmp_path / "in" / "val" / IMAGENET10_WNIDS[0] / "a.JPEG").unlink()
    (tmp_path / "in" / "val" / IMAGENET10_WNIDS[0]).rmdir()
    with pytest.raises(DataNotFoundError, match=IMAGENET10_WNIDS[0]):
        load_dataset(DatasetHparams(name="imagenet10", root=str(tmp_path / "in"), image_size=16))


def test_imagenet_1k_is_decoded_once_into_a_memory_mapped_folder(tmp_path, monkeypatch):
    from PIL import Image

    from prunelab.data.stream import resident_fits

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    wnids = [f"n{i:08d}" for i in range(1000)]
    for split, per_class in (("train", 2), ("val", 1)):
        for i, w in enumerate(wnids):
            (tmp_path / "in" / split / w).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (20, 12), (i % 256, j * 100, 0)).save(tmp_path / "in" / split / w / f"{j}.png")
    hp = DatasetHparams(name="imagenet", root=str(tmp_path / "in"), image_size=8)
    from prunelab.data import sets

    monkeypatch.setattr(sets, "DECODE_IN_PROCESSES_FROM", 1500)  # train/ by a pool of processes, val/ here
    d = load_dataset(hp)
    assert d.train.x.shape == (2000, 3, 8, 8) and d.test.x.shape == (1000, 3, 8, 8)
    assert d.train.y.tolist() == [c for c in range(1000) for _ in range(2)]  # class index = sorted WordNet ids
    assert int(d.train.x[2 * 200 + 1, 0, 4, 4]) == 200 and int(d.train.x[2 * 200 + 1, 1, 4, 4]) == 100
    names = sorted(f.name for f in (tmp_path / "cache" / "imagenet").iterdir())
    assert len(names) == 4 and not [n for n in names if ".partial" in n]  # two whole folders, their locks
    # a set larger than the byte budget is streamed rather than placed on the device
    assert not resident_fits(d.train, "cpu", budget_bytes=d.train.nbytes)
    # mapped again, not decoded again
    (tmp_path / "in" / "train" / wnids[5] / "0.png").unlink()
    assert torch.equal(load_dataset(hp).train.x[10], d.train.x[10])
    # not ImageNet-1k: refused with the fix
    (tmp_path / "in" / "train" / wnids[7] / "0.png").unlink()
    (tmp_path / "in" / "train" / wnids[7] / "1.png").unlink()
    (tmp_path / "in" / "train" / wnids[7]).rmdir()
    with pytest.raises(DataNotFoundError, match=r"999 class folders.*imagenet10"):
        load_dataset(hp)


def test_a_folder_is_written_whole_under_its_lock(tmp_path):
    import socket

    from prunelab.data.folder import FolderWriter, exclusive, open_folder

    folder = tmp_path / "set"
    (tmp_path / f"set.partial-{socket.gethostname()}-4242").mkdir()  # left by a writer killed part-way
    (tmp_path / "set.partial-othermachine-77").mkdir()  # another machine's, maybe at work
    with exclusive(folder):
        w = FolderWriter(folder, 3, (3, 2, 2))
        assert not (tmp_path / f"set.partial-{socket.gethostname()}-4242").exists()
        w.add(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))
        with pytest.raises(RuntimeError, match="2 of 3"):
            w.finish(2, (0.5,) * 3, (0.2,) * 3, "toy", crop_pad=0)
        assert not folder.exists()  # nothing a reader could map
        w.add(torch.full((1, 3, 2, 2), 7, dtype=torch.uint8), torch.tensor([1]))
        w.finish(2, (0.5,) * 3, (0.2,) * 3, "toy", crop_pad=0)
    d = open_folder(folder)
    assert d.y.tolist() == [0, 1, 1] and int(d.x[2].max()) == 7 and d.num_classes == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "set.lock", "set.partial-othermachine-77"]


def test_imagedata_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ImageData(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long), 10, (0.0,), (1.0,))
