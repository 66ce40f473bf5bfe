"""pruning_data's distiller settings (net_width, inner_loop, batch_real, lr_img): they reach the
distiller, key the synthetic store, cost what they cost, and IDC's own values validate."""

import pytest

from prunelab.cost import forward_flops, synthetic_cost
from prunelab.errors import ConfigError
from prunelab.hparams import ChainHparams, DatasetHparams, ModelHparams, PruningDataHparams
from prunelab.synthetic import (build_synthetic, get_synthetic, idc_net_steps, idc_settings, load_pruning_data,
                                make_key, synthetic_spec)
from prunelab.synthetic import __main__ as synthetic_cli
from prunelab.synthetic import distill as distill_mod

SETTINGS = {"net_width": 8, "inner_loop": 2, "batch_real": 4, "lr_img": 0.01}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def captured(monkeypatch):
    """Replace both distillers by a cheap stand-in that records its keyword arguments."""
    calls = []

    def fake(method):
        def run(real, ipc, seed, budget=None, device="cpu", log=None, **kw):
            calls.append((method, {k: v for k, v in kw.items() if k not in distill_mod.RUN_CONTROLS}))
            return distill_mod.random_subset(real, ipc, seed)
        return run

    for m in ("idc", "dm"):
        monkeypatch.setitem(distill_mod.DISTILLERS, m, fake(m))
    return calls


def chain(tmp_path, **pd):
    return ChainHparams.from_dict({"pruning_data": {"kind": "distilled", "ipc": 1, "store": str(tmp_path / "store"),
                                                    **pd}})


def test_settings_reach_the_distiller(tmp_path, digits, captured):
    load_pruning_data(chain(tmp_path, method="idc", **SETTINGS), digits, "cpu")
    load_pruning_data(chain(tmp_path, method="dm", net_width=8, batch_real=4, lr_img=0.5), digits, "cpu")
    load_pruning_data(chain(tmp_path, method="dm", seed=1), digits, "cpu")
    assert captured == [("idc", {**SETTINGS, "factor": 1}),
                        ("dm", {"net_width": 8, "batch_real": 4, "lr_img": 0.5}),
                        ("dm", {})]  # unset: the distiller's own defaults


def test_real_distillers_accept_the_settings(tmp_path, digits):
    a = load_pruning_data(chain(tmp_path, method="idc", budget=1, **SETTINGS), digits, "cpu")
    b = load_pruning_data(chain(tmp_path, method="dm", budget=1, net_width=8, batch_real=4), digits, "cpu")
    assert len(a) == len(b) == 10 and a.meta["spec"]["net_width"] == 8 and b.meta["spec"]["batch_real"] == 4


def test_store_key_includes_settings_only_when_set(tmp_path, digits, captured):
    ds = DatasetHparams(name="digits")
    plain = synthetic_spec(ds, "idc", digits.train, ipc=1)
    assert set(plain) == {"dataset", "method", "ipc", "factor", "seed", "budget"}  # keys of existing sets unchanged
    keys = {make_key(plain)}
    for k, v in SETTINGS.items():
        keys.add(make_key(synthetic_spec(ds, "idc", digits.train, ipc=1, **{k: v})))
    assert len(keys) == 1 + len(SETTINGS)
    # coresets do not depend on them: same key
    herding = synthetic_spec(ds, "herding", digits.train, ipc=1)
    assert synthetic_spec(ds, "herding", digits.train, ipc=1, net_width=8) == herding

    store = str(tmp_path / "store")
    get_synthetic(ds, digits.train, "idc", ipc=1, store=store)
    get_synthetic(ds, digits.train, "idc", ipc=1, store=store, **SETTINGS)  # not served the default-settings set
    get_synthetic(ds, digits.train, "idc", ipc=1, store=store, **SETTINGS)  # served its own
    get_synthetic(ds, digits.train, "idc", ipc=1, store=store, **{**SETTINGS, "lr_img": 0.02})
    assert [kw.get("lr_img") for _, kw in captured] == [None, 0.01, 0.02]


def test_dm_rejects_inner_loop_before_any_compute(tmp_path, digits, captured):
    with pytest.raises(ConfigError) as e:  # the config itself: before a sweep plans anything
        chain(tmp_path, method="dm", inner_loop=10)
    assert e.value.field == "pruning_data.inner_loop" and "remove pruning_data.inner_loop" in e.value.fix
    assert captured == [] and not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="inner_loop"):  # and the distiller's own door
        build_synthetic("dm", digits.train, ipc=1, inner_loop=10)


def test_synthetic_cost_uses_configured_settings():
    def cost(**pd):
        return synthetic_cost(ChainHparams.from_dict({"pruning_data": {"kind": "distilled", "ipc": 1, **pd}}))

    kw = distill_mod.distill_idc.__kwdefaults__
    budget, k = distill_mod.DEFAULT_BUDGETS["idc"], 10
    for inner in (None, 10):
        n = inner or kw["inner_loop"]
        assert cost(method="idc", inner_loop=inner).steps == budget * (n * k + (n - 1) * kw["net_steps"])
    ds = DatasetHparams(name="digits")
    ratio = forward_flops(ModelHparams(name="convnet3", width=64), ds) / forward_flops(
        ModelHparams(name="convnet3", width=kw["net_width"]), ds)
    assert cost(method="idc", net_width=64).flops == pytest.approx(ratio * cost(method="idc").flops)
    dm_kw = distill_mod.distill_dm.__kwdefaults__
    assert cost(method="dm", batch_real=2 * dm_kw["batch_real"] + 2).flops == pytest.approx(
        2 * cost(method="dm").flops)  # per class: batch_real + 2 * ipc images
    assert cost(method="dm", lr_img=1.0).flops == cost(method="dm").flops


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_idc_settings_cifar(dataset):
    for ipc, lr in ((1, 0.0005), (10, 0.005), (50, 0.025)):
        s = idc_settings(dataset, ipc)
        assert s == {"kind": "distilled", "method": "idc", "ipc": ipc, "factor": 2, "budget": 2000, "net_width": 128,
                     "inner_loop": 100, "batch_real": 64, "lr_img": lr}
        assert PruningDataHparams.from_dict(s).lr_img == lr
        ChainHparams.from_dict({"dataset": {"name": dataset}, "pruning_data": s})
    assert idc_net_steps(dataset) == 32  # n_data 2,000 in batches of 64


def test_idc_settings_imagenet10_and_others():
    s = idc_settings("imagenet10", 10)
    assert s == {"kind": "distilled", "method": "idc", "ipc": 10, "factor": 3, "budget": 500, "inner_loop": 100,
                 "batch_real": 64, "lr_img": 0.003}
    assert "net_width" not in s  # IDC's ResNetAP-10 has no counterpart in the distiller
    ChainHparams.from_dict({"dataset": {"name": "imagenet10"}, "pruning_data": s})
    assert idc_settings("imagenet10", 1)["lr_img"] == 0.0003 and idc_net_steps("imagenet10") == 8
    for bad in ("digits", "shapes", "svhn"):
        with pytest.raises(ValueError, match="cifar10"):
            idc_settings(bad, 10)
    with pytest.raises(ValueError):
        idc_settings("cifar10", 0)


def test_cli_make_takes_settings(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert synthetic_cli.main(["make", "--method", "dm", "--ipc", "1", "--budget", "1", "--net-width", "8",
                               "--batch-real", "4", "--store", store]) == 0
    assert synthetic_cli.main(["show", "--store", store]) == 0
    assert "net_width 8 batch_real 4" in capsys.readouterr().out
    assert synthetic_cli.main(["make", "--method", "dm", "--ipc", "1", "--inner-loop", "3", "--store", store]) == 2
