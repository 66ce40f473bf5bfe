"""Chains whose masks come from a source at initialization (`pruning.method`): each round's mask at
the round's sparsity, deterministic, refused where it makes no sense, cheap in the planner, and a
masks sweep whose figures and tables come out of MLflow."""

from __future__ import annotations

import csv

import pytest
import torch

from prunelab import anatomy, catalog
from prunelab.allocation import erk_densities
from prunelab.chain import Chain
from prunelab.cost import chain_cost
from prunelab.errors import ConfigError
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams
from prunelab.masks import density_after
from prunelab.sources import SOURCES
from sweeptools import write_config

BASE = {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 2},
        "training": {"epochs": 1, "lr": 0.1}, "pruning_training": {"epochs": 1, "lr": 0.1}}


def chain(method: str, **pruning) -> ChainHparams:
    return ChainHparams.from_dict({**BASE, "pruning": {**BASE["pruning"], "method": method, **pruning}})


def test_the_catalog_names_the_registered_sources():
    assert set(SOURCES) == set(catalog.INIT_SOURCES)


@pytest.mark.parametrize("method", catalog.INIT_SOURCES)
def test_each_round_has_its_sparsity_and_the_same_config_gives_the_same_mask(method, digits):
    hp = chain(method, synflow_iterations=10)
    a = Chain(hp, data=digits)
    a.run()
    for r, rec in enumerate(a.state.history):
        want = 1 - round(a.mask.total * density_after(r + 1, 0.2)) / a.mask.total
        assert rec["sparsity"] == pytest.approx(want, abs=2e-3)  # erk/layerwise round per layer
        assert rec["pruning_accuracy"] >= 0 and rec["pruning_set_size"] == (0 if method in ("random", "magnitude_init", "synflow") else 256)
    b = Chain(hp, data=digits)
    b.run()
    assert a.mask.equal(b.mask)
    assert a.state.init.keys() == b.state.init.keys()


def test_sources_differ_and_keep_the_initialization(digits):
    masks = {}
    for method in ("magnitude_init", "snip", "synflow"):
        c = Chain(chain(method, synflow_iterations=10), data=digits)
        c.run()
        masks[method] = c.mask
        dense = Chain(chain("magnitude"), data=digits)
        assert all(torch.equal(c.state.init[k], dense.state.init[k]) for k in c.state.init)  # the same network
    assert not masks["magnitude_init"].equal(masks["snip"])
    assert anatomy.jaccard(masks["magnitude_init"], masks["snip"]) < 1


def test_random_layerwise_and_erk_allocations(digits):
    c = Chain(chain("random", scope="layerwise"), data=digits)
    c.run()
    dens = anatomy.layer_density(c.mask)
    assert max(dens.values()) - min(dens.values()) < 0.02  # one density in every layer
    e = Chain(chain("random", scope="erk"), data=digits)
    e.run()
    erk = anatomy.layer_density(e.mask)
    assert max(erk.values()) - min(erk.values()) > 0.1  # small layers denser than large ones


def test_imp_with_erk_allocation_prunes_to_the_schedule(digits):
    c = Chain(chain("magnitude", scope="erk"), data=digits)
    c.run()
    assert c.mask.sparsity == pytest.approx(1 - density_after(2, 0.2), abs=2e-3)
    want = erk_densities({n: tuple(m.shape) for n, m in c.mask.items()}, c.mask.density)
    for name, got in anatomy.layer_density(c.mask).items():
        assert got == pytest.approx(want[name], abs=1.0 / c.mask[name].numel() + 2e-3), name


def test_a_source_at_initialization_refuses_synthetic_data_and_start_chains():
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip"},
                                "pruning_data": {"kind": "distilled", "method": "dm", "ipc": 10}})
    assert e.value.field == "pruning_data.kind" and "magnitude" in e.value.fix
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({**BASE, "pruning": {"method": "synflow", "rounds": 3}, "start_round": 1,
                                "start_from": BASE})
    assert e.value.field == "start_from"
    with pytest.raises(ConfigError) as e:
        chain("snap")
    assert e.value.field == "pruning.method"


def test_the_default_method_leaves_every_hash_unchanged():
    hp = ChainHparams.from_dict(BASE)
    assert chain("magnitude").hash() == hp.hash()
    assert chain("snip").hash() != hp.hash()


def test_the_planner_knows_a_source_at_initialization_trains_nothing_to_prune():
    ev = EvalHparams(rounds=(), lmc=False)
    imp = chain_cost(chain("magnitude"), ev, [])["pruning"]
    snip = chain_cost(chain("snip"), ev, [])["pruning"]
    assert 0 < snip.flops < imp.flops
    assert chain_cost(chain("synflow"), ev, [])["pruning"].steps > chain_cost(chain("random"), ev, [])["pruning"].steps


def test_a_masks_sweep_draws_its_figures(tmp_path, capsys):
    """The masks figure from a tiny sweep: IMP and three sources, two seeds, every round's mask logged."""
    from sweeps.driver import main

    preset = {
        "base": {**BASE, "pruning": {"rounds": 2}},  # the rounds evaluated, no more
        "grid": {"seed": [0, 1]},
        "variants": {"imp": {}, "snip": {"set": {"pruning": {"method": "snip"}}},
                     "random_erk": {"set": {"pruning": {"method": "random", "scope": "erk"}}},
                     "synflow": {"set": {"pruning": {"method": "synflow", "synflow_iterations": 10}}}},
        "evaluation": {"rounds": [2], "lmc": True, "lmc_hparams": {"num_points": 3}, "masks_every_round": True},
        "resources": {"cpus_per_trial": 1, "max_failures": 0},
    }
    config = write_config(tmp_path, {"figure": "masks", "description": "A tiny masks sweep.", "presets": {"demo": preset}})
    storage = tmp_path / "runs"
    rc = main("masks", ["--config", config, "--storage-path", str(storage), "--num-cpus", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    figures = storage / "figures" / "masks"
    assert (figures / "masks_digits_convnet3.png").is_file()
    rows = list(csv.DictReader(open(figures / "masks_overlap.csv")))
    sources = {r["source_a"] for r in rows}
    assert sources == {"IMP (k=0)", "snip", "random_erk", "synflow"}
    diag = [r for r in rows if r["source_a"] == r["source_b"]]
    assert diag and all(r["pairs"] == "across seeds" for r in diag)
    conv = list(csv.DictReader(open(figures / "masks_convergence.csv")))
    assert {r["source"] for r in conv} >= {"IMP (k=0)"} and all(r["n_seeds"] == "2" for r in conv)
    last = [r for r in conv if r["round"] == "2"]
    assert last and all(float(r["jaccard_with_last_mean"]) == 1.0 for r in last)
    barrier = list(csv.DictReader(open(figures / "masks_barrier.csv")))
    imp = [r for r in barrier if r["source"] == "IMP (k=0)"]
    assert imp and all(float(r["overlap_imp_mean"]) == 1.0 for r in imp)
    assert {r["source"] for r in barrier} == sources
    import analysis

    again = analysis.run("masks", "prunelab-masks", f"sqlite:///{storage / 'mlflow.db'}", str(tmp_path / "again"),
                         log_to_mlflow=False)
    assert any("nested" in n for n in again["notes"])  # IMP's masks are: convergence is the density ratio


def test_the_masks_presets_compare_every_source_at_both_sparsities():
    from sweeps.config import expand, load_sweep

    for preset in ("demo", "paper", "paper-builtin"):
        trials = expand(load_sweep("masks", preset)[0], "masks")
        methods = {t.chain.pruning.method for t in trials}
        assert methods == set(catalog.MASK_METHODS), preset
        assert {t.chain.pruning.scope for t in trials if t.variant.startswith("random")} == {"layerwise", "erk"}
        for t in (t for t in trials if t.variant == "snip_imp_layers"):  # IMP's chain of the same point
            imp = [i for i in trials if i.variant == "imp" and i.chain.seed == t.chain.seed
                   and i.chain.model == t.chain.model]
            assert t.chain.pruning.scope == "chain" and t.chain.allocation_chain().hash() == imp[0].chain.hash()
        assert {tuple(t.rounds) for t in trials} == {(4, 9)}, preset  # 59% and 87% at 20% per round
        assert {t.chain.seed_scope for t in trials} == {"all"}, preset  # the seed may decide the mask
        assert len({t.chain.seed for t in trials}) >= 3
        assert {t.chain.pruning_data.ipc for t in trials if t.variant == "distilled"} == {1, 10}
        assert all(t.evaluation.controls == ("shuffled", "reinit") and t.evaluation.masks_every_round for t in trials)


def test_the_masks_demo_shares_its_imp_and_distilled_chains_with_the_fig6_demo():
    from prunelab.evaluation import result_key
    from sweeps.config import expand, load_sweep

    def keyed(figure):
        return {(t.chain.hash(), result_key(t.evaluation)) for t in expand(load_sweep(figure, "demo")[0], figure)
                if t.variant in ("imp", "distilled")}

    assert keyed("masks") == keyed("fig6")  # computed once in the shared store, whichever runs first


def test_a_chain_takes_its_per_layer_counts_from_another_chain(tmp_path, digits):
    """SNIP (and IMP itself) within another chain's per-layer counts, round by round: the runner
    computes that chain through the store, once."""
    from prunelab.runner import run_chain
    from prunelab.store import ChainStore

    imp = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 3}})
    ev = EvalHparams(rounds=(), lmc=False)
    for method in ("snip", "magnitude", "synflow"):
        hp = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 2, "method": method, "scope": "chain",
                                                         "synflow_iterations": 10},
                                     "allocation_from": imp.to_dict()})
        done = run_chain(hp, ev, [], ChainStore(tmp_path, hp), data=digits)
        reference = ChainStore(tmp_path, imp)
        for r in (1, 2):
            mine, theirs = ChainStore(tmp_path, hp).mask_at(r), reference.mask_at(r)
            assert {n: int(m.sum()) for n, m in mine.items()} == {n: int(m.sum()) for n, m in theirs.items()}
            if method == "snip":
                assert not mine.equal(theirs)  # the same counts, other weights
        assert done.round == 2
    assert reference.load_state().round == 2  # as far as needed, computed once and reused
    # the allocation chain's length is not part of the identity: chains of any length share it
    longer = ChainHparams.from_dict({**BASE, "pruning": {"rounds": 2, "method": "snip", "scope": "chain"},
                                     "allocation_from": {**imp.to_dict(), "pruning": {"rounds": 9}}})
    assert longer.hash() == ChainHparams.from_dict({**BASE, "pruning": {"rounds": 2, "method": "snip", "scope": "chain"},
                                                   "allocation_from": imp.to_dict()}).hash()


def test_an_allocation_needs_its_scope_and_a_chain_of_the_same_schedule():
    imp = ChainHparams.from_dict(BASE).to_dict()
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip"}, "allocation_from": imp})
    assert e.value.field == "pruning.scope"
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip", "scope": "chain"}})
    assert e.value.field == "pruning.scope"
    with pytest.raises(ConfigError) as e:
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip", "scope": "chain"},
                                "allocation_from": {**imp, "pruning": {"fraction": 0.5}}})
    assert e.value.field == "allocation_from.pruning.fraction"
    with pytest.raises(ConfigError) as e:  # its masks would be found on other data than this chain's
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip", "scope": "chain"},
                                "allocation_from": {**imp, "dataset": {"name": "digits", "train_size": 500}}})
    assert e.value.field == "allocation_from.dataset"
    with pytest.raises(ConfigError) as e:  # a chain that starts from another: not an allocation source
        ChainHparams.from_dict({**BASE, "pruning": {"method": "snip", "scope": "chain", "rounds": 5},
                                "allocation_from": {**imp, "start_from": imp, "start_round": 1,
                                                    "pruning": {"rounds": 5}}})
    assert e.value.field == "allocation_from"
    # the allocation chain's config is stripped of unhashed defaults like any chain's
    a = ChainHparams.from_dict({**BASE, "pruning": {"method": "snip", "scope": "chain"}, "allocation_from": imp})
    assert "score_examples" not in a.canonical_json().split('"allocation_from"')[1].split('"dataset"')[0]


def test_the_spectrum_is_an_evaluation_option(digits):
    """evaluation.spectrum: top eigenvalue, trace and density of a trained copy on the mask's subspace,
    in the round's result and its metrics; off, every stored evaluation keeps its key."""
    import json

    from prunelab.evaluation import evaluate_round, result_key
    from prunelab.metrics import SPECTRUM_TOP, SPECTRUM_TRACE_PER_WEIGHT

    hp = chain("magnitude")
    c = Chain(hp, data=digits)
    c.step()
    ev = EvalHparams.from_dict({"lmc": False, "spectrum": {"k": 3, "trace_samples": 30, "density_vectors": 2,
                                                           "density_steps": 20}})
    res = evaluate_round(hp, ev, digits, c.state.rewind_point, c.mask, 1)
    sp = res["spectrum"]
    assert sp["unpruned"] == c.mask.remaining and len(sp["top_eigenvalues"]) == 3
    assert res["metrics"][SPECTRUM_TOP] == sp["top_eigenvalues"][0] >= sp["top_eigenvalues"][2]
    assert res["metrics"][SPECTRUM_TRACE_PER_WEIGHT] == pytest.approx(sp["trace"] / sp["unpruned"])
    json.dumps(sp)
    assert result_key(EvalHparams(lmc=False)) != result_key(ev)
    assert chain_cost(hp, ev, [1])["evaluation"].flops > chain_cost(hp, EvalHparams(lmc=False), [1])["evaluation"].flops


def test_two_random_sources_of_one_seed_draw_independently(digits):
    a = Chain(chain("random", scope="layerwise"), data=digits)
    b = Chain(chain("random", scope="erk"), data=digits)
    a.run()
    b.run()
    o = anatomy.overlap(a.mask, b.mask)
    assert abs(o["excess_jaccard"]) < 0.05  # as two independent random masks of those densities
