"""Barriers beyond the plain line: the LMC pair measured again after permutation alignment (its mask
permuted along) and after alignment + REPAIR, as an evaluation option with its metrics, costs and
figure names."""

from __future__ import annotations

import pytest
import torch

from prunelab.chain import Chain
from prunelab.cost import chain_cost
from prunelab.evaluation import EvalHparams, evaluate_round, result_key
from prunelab.hparams import ChainHparams
from prunelab.metrics import barrier_flavour, barrier_name, parse_barrier

BASE = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 1},
        "training": {"epochs": 2, "lr": 0.1}, "pruning_training": {"epochs": 1, "lr": 0.1}}


@pytest.mark.parametrize("model", [{"name": "convnet3", "width": 8}, {"name": "resnet10_bn", "width": 4}])
def test_an_lmc_evaluation_measures_the_aligned_pair_too(model, digits):
    hp = ChainHparams.from_dict({**BASE, "model": model})
    c = Chain(hp, data=digits)
    c.step()
    ev = EvalHparams.from_dict({"lmc": True, "lmc_hparams": {"num_points": 3, "align": True, "bn_batches": 2},
                                "controls": ["shuffled"]})
    res = evaluate_round(hp, ev, digits, c.state.rewind_point, c.mask, 1)
    m, lmc = res["metrics"], res["lmc"]
    for flavour in ("aligned", "aligned_repair"):
        assert len(lmc[flavour]["train_loss"]) == len(lmc["alphas"]) == 3
        name = barrier_name("mid", "train", "loss", flavour=flavour)
        assert m[name] == lmc[flavour]["barrier_mid"]["train_loss"]
        assert barrier_name("mid", "train", "loss", control="shuffled", flavour=flavour) in m
    for mode in ("interpolate", "recompute"):
        assert barrier_name("mid", "train", "loss", mode, flavour="aligned") in m
    # the aligned pair's endpoints are the trained copies themselves: the same losses at α = 0 and 1
    for i in (0, -1):
        assert lmc["aligned"]["train_loss"][i] == pytest.approx(lmc["train_loss"][i], rel=1e-4)
    assert "models" not in lmc
    # copies from one initialization mostly keep their units in place: how many moved is recorded
    moved = lmc["alignment"]["channels_moved"]
    assert moved and all(isinstance(v, int) and v >= 0 for v in moved.values())


def test_alignment_is_a_new_measurement_with_its_own_key_and_cost():
    hp = ChainHparams.from_dict(BASE)
    plain = EvalHparams.from_dict({"lmc": True})
    aligned = EvalHparams.from_dict({"lmc": True, "lmc_hparams": {"align": True}})
    assert result_key(plain) == result_key(EvalHparams())  # stored evaluations keep their key
    assert result_key(aligned) != result_key(plain)
    assert chain_cost(hp, aligned, [1])["evaluation"].flops > chain_cost(hp, plain, [1])["evaluation"].flops


def test_barrier_specs_name_their_flavour():
    assert barrier_flavour("aligned_repair_train_loss") == ("aligned_repair", "train_loss")
    assert barrier_flavour("aligned_max_test_error") == ("aligned", "max_test_error")
    assert barrier_flavour("train_loss") == (None, "train_loss")
    assert parse_barrier("aligned_repair_mid_train_loss") == ("mid", "train", "loss")
    with pytest.raises(ValueError):
        parse_barrier("realigned_train_loss")


def test_filter_normalized_directions_follow_the_filters_and_the_mask(digits):
    from prunelab.landscape import LandscapeHparams, filter_normalized_directions, landscape
    from prunelab.masks import Mask

    hp = ChainHparams.from_dict(BASE)
    c = Chain(hp, data=digits)
    c.step()
    model = c.subnetwork()
    d1, d2 = filter_normalized_directions(model, c.mask, seed=3)
    params = dict(model.named_parameters())
    for n, m in c.mask.items():
        w = params[n].detach().double()
        assert not d1[n][~m].any()  # pruned weights stay pruned along the direction
        assert d1[n].flatten(1).norm(dim=1) == pytest.approx(w.flatten(1).norm(dim=1), rel=1e-6)
        assert not torch.equal(d1[n], d2[n])
    assert all(not d1[n].any() for n, p in params.items() if p.dim() < 2)  # biases and norms: no move
    again, _ = filter_normalized_directions(model, c.mask, seed=3)
    assert all(torch.equal(again[n], d1[n]) for n in d1)
    assert isinstance(c.mask, Mask)

    lh = LandscapeHparams.from_dict({"grid": 3, "seeds": [0], "directions": "filter_normalized", "span": 0.5})
    out = landscape(hp, digits, c.state.rewind_point, c.mask, lh)
    assert out["basis"] == "filter_normalized" and out["xs"] == [-0.5, 0.0, 0.5]
    (copy,) = out["copies"]
    assert copy["coords"] == [0.0, 0.0] and copy["loss_on_plane"] == pytest.approx(copy["loss"], rel=1e-5)
    assert out["loss"][1][1] == pytest.approx(copy["loss"], rel=1e-5)  # the grid's centre is the copy


def test_a_plane_of_copies_still_needs_three():
    from prunelab.errors import ConfigError
    from prunelab.landscape import LandscapeHparams

    with pytest.raises(ConfigError) as e:
        LandscapeHparams.from_dict({"seeds": [0]})
    assert e.value.field == "seeds" and "filter_normalized" in e.value.fix


def test_a_pair_spawned_after_k_epochs(digits):
    hp = ChainHparams.from_dict(BASE)
    c = Chain(hp, data=digits)
    c.step()
    ev = EvalHparams.from_dict({"lmc": True, "lmc_hparams": {"num_points": 3, "spawn_epochs": [1], "bn_batches": 2},
                                "controls": ["shuffled"]})
    res = evaluate_round(hp, ev, digits, c.state.rewind_point, c.mask, 1)
    assert "control_shuffled_spawn1_barrier_mid_train_loss" in res["metrics"]  # named as the other flavours'
    assert not any(k.startswith("spawn1_control") for k in res["metrics"])
    spawned = res["lmc"]["spawn"]["1"]
    assert spawned["spawn_epoch"] == 1 and all(cp["steps"] > 0 for cp in spawned["copies"])
    assert res["metrics"]["spawn1_barrier_mid_train_loss"] == spawned["barrier_mid"]["train_loss"]
    assert result_key(ev) != result_key(EvalHparams.from_dict({"lmc": True, "controls": ["shuffled"],
                                                               "lmc_hparams": {"num_points": 3, "bn_batches": 2}}))
    from prunelab.errors import ConfigError

    late = EvalHparams.from_dict({"lmc": True, "rounds": [1], "lmc_hparams": {"spawn_epochs": [2]}})
    with pytest.raises(ConfigError) as e:
        late.resolve_rounds(hp)
    assert e.value.field == "evaluation.lmc_hparams.spawn_epochs"


def test_the_deeper_stability_figures_come_out_of_a_sweep(tmp_path, capsys):
    """A tiny sweep with alignment, spawned pairs and the spectrum: the aligned Figures 3/4, the
    instability figure and the spectrum figure, with their tables."""
    import csv

    import analysis
    from sweeps.driver import main
    from sweeptools import write_config

    preset = {"base": BASE, "grid": {"seed": [0, 1]}, "variants": {"imp": {}},
              "evaluation": {"rounds": [1], "lmc": True,
                             "lmc_hparams": {"num_points": 3, "align": True, "spawn_epochs": [1], "bn_batches": 2},
                             "spectrum": {"k": 2, "trace_samples": 12, "density_vectors": 1, "density_steps": 10}},
              "resources": {"cpus_per_trial": 1, "max_failures": 0}}
    config = write_config(tmp_path, {"figure": "fig3_4", "description": "tiny", "presets": {"demo": preset}})
    storage = tmp_path / "runs"
    rc = main("fig3_4", ["--config", config, "--storage-path", str(storage), "--num-cpus", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    figs = tmp_path / "figs"
    for figure, options in (("spectrum", {}), ("instability", {}), ("fig3_4", {"flavour": "aligned_repair"})):
        got = analysis.run(figure, "prunelab-fig3_4", uri, str(figs), log_to_mlflow=False,
                           options={figure: options})
        assert got["figures"], (figure, got["missing"])
    rows = list(csv.DictReader(open(figs / "instability.csv")))
    assert {r["spawn_epoch"] for r in rows} == {"0", "1"} and all(r["n_seeds"] == "2" for r in rows)
    spec = list(csv.DictReader(open(figs / "spectrum.csv")))
    assert spec and all(float(r["spectrum_top_eigenvalue_mean"]) > 0 for r in spec)
    assert (figs / "fig3_4_aligned_repair_barriers.csv").is_file()


def test_the_barrier_between_consecutive_rounds(tmp_path, digits):
    """lmc_hparams.previous_round: copy A of round r against round r−1's subnetwork trained with A's
    data order, through the chain runner (which hands the previous round's mask over)."""
    from prunelab.runner import run_chain
    from prunelab.store import ChainStore

    hp = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 2}})
    ev = EvalHparams.from_dict({"rounds": [0, 2], "lmc": True,
                                "lmc_hparams": {"num_points": 3, "previous_round": True, "bn_batches": 2}})
    store = ChainStore(tmp_path, hp)
    run_chain(hp, ev, [0, 2], store, data=digits)
    first, last = store.load_eval(result_key(ev), 0), store.load_eval(result_key(ev), 2)
    assert "previous_round" not in first["lmc"]  # the dense network has no previous round
    prev = last["lmc"]["previous_round"]
    assert prev["previous_sparsity"] == pytest.approx(store.mask_at(1).sparsity)
    # the line starts at copy A itself
    assert prev["train_loss"][0] == pytest.approx(last["lmc"]["train_loss"][0], rel=1e-4)
    assert last["metrics"][barrier_name("mid", "train", "loss", flavour="previous_round")] == prev["barrier_mid"]["train_loss"]
    assert chain_cost(hp, ev, [2])["evaluation"].flops > chain_cost(
        hp, EvalHparams.from_dict({"rounds": [2], "lmc": True, "lmc_hparams": {"num_points": 3, "bn_batches": 2}}),
        [2])["evaluation"].flops


def test_an_evaluation_survives_its_round_trip_through_a_trial_spec():
    """A trial rebuilds its evaluation from the spec's dict: an option left out (spectrum: null) stays
    out, and the evaluation keeps its key."""
    for raw in ({"lmc": True}, {"lmc": True, "spectrum": {"k": 3}}, {"lmc": False, "spectrum": None}):
        ev = EvalHparams.from_dict(raw)
        again = EvalHparams.from_dict(ev.to_dict())
        assert again == ev and result_key(again) == result_key(ev)
    assert EvalHparams.from_dict({"spectrum": None}).spectrum is None
