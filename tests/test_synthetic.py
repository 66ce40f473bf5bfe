import statistics

import pytest
import torch
import torch.nn.functional as F

from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams, DatasetHparams, ModelHparams, TrainingHparams
from prunelab.synthetic import (CorruptSyntheticSetError, decode, get_synthetic, load_idc_file,
                                load_pruning_data)
from prunelab.synthetic import distill as distill_mod


def _reference_decode(x, y, f, k):
    """Independent decode: explicit loops, one F.interpolate per crop, IDC's crop-major order."""
    ipc = len(x) // k
    h = x.shape[-1]
    s = -(-h // f)
    out_x, out_y = [], []
    for c in range(k):
        block = x[c * ipc:(c + 1) * ipc]
        padded = torch.full((ipc, x.shape[1], s * f, s * f), 0.5)
        padded[:, :, :h, :h] = block
        for i in range(f):
            for j in range(f):
                for n in range(ipc):
                    crop = padded[n:n + 1, :, i * s:(i + 1) * s, j * s:(j + 1) * s]
                    out_x.append(F.interpolate(crop, size=(h, h), mode="bilinear", align_corners=False)[0])
                    out_y.append(c)
    return torch.stack(out_x), torch.tensor(out_y)


@pytest.mark.parametrize("f,h", [(2, 8), (3, 8), (3, 9)])
def test_idc_decode_matches_reference(f, h):
    k, ipc = 3, 2
    x = torch.rand(k * ipc, 2, h, h, generator=torch.Generator().manual_seed(f * h))
    y = torch.arange(k).repeat_interleave(ipc)
    dx, dy = decode(x, y, f, k)
    rx, ry = _reference_decode(x, y, f, k)
    assert dx.shape == (k * ipc * f * f, 2, h, h)
    assert torch.allclose(dx, rx, atol=1e-6) and torch.equal(dy, ry)


def test_load_idc_file_decodes_and_keeps_normalization(tmp_path, digits):
    x = torch.rand(20, 1, 8, 8)
    y = torch.arange(10).repeat_interleave(2)
    torch.save([x, y], tmp_path / "data.pt")
    d = load_idc_file(str(tmp_path), digits.train, factor=2)
    assert len(d) == 80 and d.meta["ipc"] == 2 and d.meta["factor"] == 2 and d.meta["decoded_count"] == 80
    assert d.mean == digits.train.mean and d.num_classes == 10
    rx, ry = _reference_decode(x, y, 2, 10)
    assert torch.allclose(d.x, rx, atol=1e-6) and torch.equal(d.y, ry)


@pytest.mark.parametrize("bad,problem", [
    (lambda: [torch.rand(20, 3, 8, 8), torch.arange(10).repeat_interleave(2)], "channel"),
    (lambda: [torch.rand(20, 1, 16, 16), torch.arange(10).repeat_interleave(2)], "size"),
    (lambda: [torch.rand(10, 1, 8, 8), torch.arange(5).repeat_interleave(2)], "classes"),
    (lambda: [torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8), torch.arange(10).repeat_interleave(2)], "dtype"),
    (lambda: [torch.rand(20, 1, 8, 8), torch.arange(10).repeat(2)], "class-major"),
    (lambda: {"x": 1}, "[images, labels]"),
])
def test_bad_idc_files_raise_config_error(tmp_path, digits, bad, problem):
    torch.save(bad(), tmp_path / "data.pt")
    with pytest.raises(ConfigError) as e:
        load_idc_file(str(tmp_path / "data.pt"), digits.train)
    assert e.value.field == "pruning_data.path" and problem in str(e.value) and e.value.fix


def test_truncated_idc_file_raises(tmp_path, digits):
    torch.save([torch.rand(20, 1, 8, 8), torch.arange(10).repeat_interleave(2)], tmp_path / "data.pt")
    raw = (tmp_path / "data.pt").read_bytes()
    (tmp_path / "data.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match="truncated"):
        load_idc_file(str(tmp_path), digits.train)
    with pytest.raises(ConfigError, match="does not exist"):
        load_idc_file(str(tmp_path / "missing"), digits.train)


def test_store_reuses_and_verifies(tmp_path, digits, monkeypatch):
    calls = []
    real_fn = distill_mod.DISTILLERS["dm"]

    def counting(*a, **k):
        calls.append(1)
        return real_fn(*a, **k)

    monkeypatch.setitem(distill_mod.DISTILLERS, "dm", counting)
    ds = DatasetHparams(name="digits")
    kw = dict(ipc=2, seed=0, budget=3, store=str(tmp_path))
    a = get_synthetic(ds, digits.train, "dm", **kw)
    b = get_synthetic(ds, digits.train, "dm", **kw)
    assert len(calls) == 1 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    first = (d / "data.pt").read_bytes()
    get_synthetic(ds, digits.train, "dm", **kw)
    assert (d / "data.pt").read_bytes() == first and len(calls) == 1
    get_synthetic(ds, digits.train, "dm", **{**kw, "seed": 1})
    assert len(calls) == 2
    (d / "data.pt").write_bytes(first[:100])
    with pytest.raises(CorruptSyntheticSetError, match="data.pt"):
        get_synthetic(ds, digits.train, "dm", **kw)


def test_sources_are_seeded_and_shaped(digits):
    for name, fn in [("random_subset", distill_mod.random_subset), ("herding", distill_mod.herding)]:
        a, b = fn(digits.train, 3, 0), fn(digits.train, 3, 0)
        assert torch.equal(a.x, b.x) and a.x.shape == (30, 1, 8, 8)
        assert torch.equal(a.y, torch.arange(10).repeat_interleave(3)) and a.x.dtype == torch.float32
    a = distill_mod.distill_idc(digits.train, 1, 0, budget=1, inner_loop=2)
    b = distill_mod.distill_idc(digits.train, 1, 0, budget=1, inner_loop=2)
    assert torch.equal(a.x, b.x)
    enc = distill_mod.distill_idc(digits.train, 1, 0, budget=1, inner_loop=1, factor=2)
    assert enc.x.shape == (10, 1, 8, 8) and enc.meta["factor"] == 2


def _acc(data, test, seed):
    from prunelab.models import build_model
    from prunelab.train import evaluate, train

    model = build_model(ModelHparams(name="convnet3", width=32), data.shape, 10, seed=seed)
    hp = TrainingHparams(steps=400, batch_size=64, augment="dsa")
    train(model, data, hp, order_seed=seed, aug_seed=seed)
    return evaluate(model, test)["accuracy"]


def test_distilled_beats_random_subset(digits):
    # seen here at ipc 10 (seeds 0 / 1, 2026-12-06): idc 91.4 / 92.5 %, dm 91.6 / 92.2 %, random subsets
    # 91.1 / 87.2 %: mean margins of 2.8 and 2.8 points, most of them from seed 1 (one seed would not do)
    accs = {"idc": [], "dm": [], "random": []}
    for seed in (0, 1):
        accs["idc"].append(_acc(distill_mod.distill_idc(digits.train, 10, seed), digits.test, seed))
        accs["dm"].append(_acc(distill_mod.distill_dm(digits.train, 10, seed), digits.test, seed))
        accs["random"].append(_acc(distill_mod.random_subset(digits.train, 10, seed), digits.test, seed))
    for method in ("idc", "dm"):
        assert statistics.mean(accs[method]) > statistics.mean(accs["random"]) + 0.02, accs


def test_config_errors_before_compute(digits):
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({"pruning_data": {"kind": "distilled", "ipc": 2, "method": "dc"}})
    assert e.value.field == "pruning_data.method" and "idc" in str(e.value)
    hp = ChainHparams.from_dict({"pruning_data": {"kind": "random_subset", "ipc": 1000}})
    with pytest.raises(ConfigError) as e:
        load_pruning_data(hp, digits, "cpu")
    assert e.value.field == "pruning_data.ipc"


@pytest.mark.parametrize("pd", [
    {"kind": "distilled", "method": "idc", "ipc": 2, "budget": 1},
    {"kind": "distilled", "method": "dm", "ipc": 2, "budget": 2},
    {"kind": "random_subset", "ipc": 2},
    {"kind": "herding", "ipc": 2},
    {"kind": "idc_file", "path": "IDC"},
])
def test_distilled_pruning_chain_end_to_end(tmp_path, digits, pd):
    from prunelab.chain import Chain

    if pd["kind"] == "idc_file":
        torch.save([torch.rand(20, 1, 8, 8), torch.arange(10).repeat_interleave(2)], tmp_path / "data.pt")
        pd = {**pd, "path": str(tmp_path), "factor": 2}
    else:
        pd = {**pd, "store": str(tmp_path / "store")}
    hp = ChainHparams.from_dict({
        "model": {"name": "convnet3", "width": 8},
        "pruning": {"rounds": 1},
        "pruning_data": pd,
        "pruning_training": {"epochs": 2, "lr": 0.05, "augment": "dsa_cutmix"},
        "training": {"epochs": 1, "lr": 0.05},
    })
    chain = Chain(hp, data=digits)
    assert len(chain.pruning_data) == (80 if pd["kind"] == "idc_file" else 20)
    rec = chain.step()
    assert rec["sparsity"] > 0.19 and chain.done
    assert 0 <= chain.evaluate()["test_accuracy"] <= 1
