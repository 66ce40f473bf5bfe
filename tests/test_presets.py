"""Preset mechanics the paper presets rely on: `extends`, zipped axes, named roots in IDC paths, the
authors' seed scope, and a missing IDC root stopping a sweep before Ray starts."""

from __future__ import annotations

import pytest
import yaml

from prunelab.errors import ConfigError
from sweeps.config import expand, load_sweep


def _write(tmp_path, presets: dict) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"figure": "fig6", "presets": presets}, sort_keys=False))
    return str(p)


BASE = {"base": {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 4}},
        "variants": {"imp": {}, "distilled": {"set": {"pruning_data": {"kind": "distilled", "method": "dm", "ipc": 1}},
                                              "grid": {"pruning_data.ipc": [1, 10]}}},
        "evaluation": {"sparsities": [0.6]}}


def test_extends_merges_and_null_clears(tmp_path):
    child = {"extends": "demo", "base": {"pruning": {"rounds": 5}},
             "variants": {"distilled": {"grid": None, "zip": {"pruning_data.ipc": [2, 3],
                                                               "pruning_data.lr_img": [0.1, 0.2]}}}}
    path = _write(tmp_path, {"demo": BASE, "more": child})
    sweep, raw = load_sweep("fig6", "more", path=path)
    assert raw["base"]["model"] == {"name": "convnet3", "width": 8} and raw["base"]["pruning"]["rounds"] == 5
    trials = expand(sweep, "fig6")
    got = sorted((t.chain.pruning_data.ipc, t.chain.pruning_data.lr_img) for t in trials if t.variant == "distilled")
    assert got == [(2, 0.1), (3, 0.2)]  # zipped: two chains, not four; the parent's ipc grid cleared
    with pytest.raises(ConfigError, match="loop"):
        load_sweep("fig6", "a", path=_write(tmp_path, {"a": {"extends": "b"}, "b": {"extends": "a"}}))
    with pytest.raises(ConfigError, match="extends"):
        load_sweep("fig6", "a", path=_write(tmp_path, {"a": {"extends": "nope"}}))


def test_zip_axes_must_match_in_length_and_not_repeat_the_grid(tmp_path):
    bad = {"extends": "demo", "variants": {"distilled": {"zip": {"pruning_data.ipc": [1, 2],
                                                                 "pruning_data.lr_img": [0.1]}}}}
    with pytest.raises(ConfigError, match="zip"):
        load_sweep("fig6", "bad", path=_write(tmp_path, {"demo": BASE, "bad": bad}))
    both = {"extends": "demo", "variants": {"distilled": {"zip": {"pruning_data.ipc": [1, 2]}}}}
    with pytest.raises(ConfigError, match="also a grid axis"):
        load_sweep("fig6", "both", path=_write(tmp_path, {"demo": BASE, "both": both}))


def test_named_roots_fill_idc_paths_and_a_missing_one_stays_visible(tmp_path):
    idc = {"kind": "idc_file", "path": "{idc}/{dataset}/conv3in_ipc{ipc}"}
    preset = {**BASE, "paths": {"idc": None},
              "variants": {"distilled": {"set": {"pruning_data": idc}, "grid": {"pruning_data.ipc": [1, 10]}}}}
    path = _write(tmp_path, {"demo": preset})
    trials = expand(load_sweep("fig6", "demo", [("paths.idc", "/abs/idc")], path=path)[0], "fig6")
    assert sorted(t.chain.pruning_data.path for t in trials) == ["/abs/idc/digits/conv3in_ipc1",
                                                                 "/abs/idc/digits/conv3in_ipc10"]
    trials = expand(load_sweep("fig6", "demo", path=path)[0], "fig6")
    assert all(t.chain.pruning_data.path.startswith("{idc}/digits/") for t in trials)
    preset["variants"]["distilled"]["set"]["pruning_data"]["path"] = "{nowhere}/x"
    with pytest.raises(ConfigError, match="unknown placeholder"):
        expand(load_sweep("fig6", "demo", path=_write(tmp_path, {"demo": preset}))[0], "fig6")


def test_paper_presets_use_the_authors_seed_scope_and_idc_files():
    for figure in ("fig2", "fig3_4", "fig5", "hessian", "fig6", "fig7"):
        trials = expand(load_sweep(figure, "paper")[0], figure)
        assert {t.chain.seed_scope for t in trials} == {"training"}, figure
        kinds = {t.chain.pruning_data.kind for t in trials if t.chain.pruning_data.kind != "real"}
        assert "idc_file" in kinds, figure
        builtin = expand(load_sweep(figure, "paper-builtin")[0], figure)
        assert "idc_file" not in {t.chain.pruning_data.kind for t in builtin}, figure
        assert len(builtin) == len(trials)


def test_a_missing_idc_root_stops_the_paper_preset_before_ray(tmp_path, capsys):
    from sweeps.driver import main

    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-100-python").mkdir()
    rc = main("fig2", ["--preset", "paper", "--set", f"root={tmp_path}", "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "paths.idc" in err
    assert "cifar10/conv3in_grad_mse_nd2000_cut_niter2000_factor2_lr0.005_mix_ipc10/data.pt" in err
    assert not (tmp_path / "runs" / "ray").exists()  # nothing started


def test_paper_builtin_follows_idc_settings():
    from prunelab.synthetic.idc import formation_factor
    from prunelab.synthetic.recipes import idc_settings

    for figure in ("fig2", "fig3_4", "fig5", "hessian", "fig6", "fig7"):
        for t in expand(load_sweep(figure, "paper-builtin")[0], figure):
            pd = t.chain.pruning_data
            if pd.kind == "real":
                continue
            want = idc_settings(t.chain.dataset.name, pd.ipc)
            got = {k: getattr(pd, k) for k in want}
            got["factor"] = formation_factor(t.chain.dataset.name, pd.factor)  # None: the data set's default
            assert got == want, (figure, t.label(), got, want)
