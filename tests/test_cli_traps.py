"""Command-line overrides that used to be traps: a repeated --set, per-variant grid and set keys,
and images per class that are not positive."""

from __future__ import annotations

import pytest

from prunelab import cli
from prunelab.errors import ConfigError
from sweeps.config import expand, load_sweep
from sweeps.driver import _overrides, parse_args


def trials(*sets: str):
    args = parse_args("fig6", [x for s in sets for x in ("--set", s)])
    sweep, _ = load_sweep("fig6", "demo", _overrides(args), None)
    return expand(sweep, "fig6")


def ipcs(ts, variant: str) -> list:
    return sorted({t.chain.pruning_data.ipc for t in ts if t.variant == variant})


def test_a_repeated_set_keeps_every_value():
    assert parse_args("fig6", ["--set", "seeds=[0]", "--set", "ipc=[1]"]).set == ["seeds=[0]", "ipc=[1]"]
    assert {t.chain.seed for t in trials("seeds=[4]", "training.epochs=3")} == {4}
    assert {t.chain.training.epochs for t in trials("seeds=[4]", "training.epochs=3")} == {3}


def test_the_chain_cli_keeps_every_set(capsys):
    # pruning.rounds=2 comes from the first --set: the rounds check sees it
    assert cli.main(["run", "--set", "pruning.rounds=2", "--set", "training.epochs=1", "--eval-rounds", "0,3"]) == 2
    assert "exceed pruning.rounds=2" in capsys.readouterr().err


def test_a_variants_grid_from_the_command_line():
    ts = trials("variants.distilled.grid.pruning_data.ipc=[1,5]")
    assert ipcs(ts, "distilled") == [1, 5]
    assert ipcs(ts, "imp") == [None]  # the other variant is left alone


def test_a_variants_set_from_the_command_line_wins_over_its_axis():
    ts = trials("variants.distilled.set.pruning_data.ipc=5")
    assert ipcs(ts, "distilled") == [5] and ipcs(ts, "imp") == [None]


def test_an_unknown_variant_is_named():
    with pytest.raises(ConfigError) as e:
        trials("variants.nope.set.seed=1")
    assert e.value.field == "variants.nope" and "distilled" in e.value.fix


@pytest.mark.parametrize("ipc", [0, -1])
def test_images_per_class_must_be_positive(ipc):
    with pytest.raises(ConfigError) as e:
        trials(f"ipc={ipc}")
    assert e.value.field == "pruning_data.ipc"


def test_a_chain_key_reaches_only_the_variants_that_use_it():
    ts = trials("ipc=[1,5]")
    assert ipcs(ts, "distilled") == [1, 5]  # the variant's own axis [1, 10] is replaced
    assert ipcs(ts, "imp") == [None]  # IMP prunes on real data: no ipc axis, hashes unchanged
    imp_hashes = {t.chain.hash() for t in trials() if t.variant == "imp"}
    assert {t.chain.hash() for t in ts if t.variant == "imp"} == imp_hashes
    # a key every variant reads stays a shared axis and replaces the variants' own
    assert {t.chain.seed for t in trials("seeds=[7]")} == {7}


def test_a_chain_key_no_variant_uses_is_an_error_naming_them():
    with pytest.raises(ConfigError) as e:
        trials("variants.distilled.set.pruning_data.kind=real", "ipc=[1,5]")
    assert e.value.field == "ipc" and "imp (real)" in e.value.problem and "distilled (real)" in e.value.problem


def paper_trials(*sets: str):
    args = parse_args("fig6", ["--preset", "paper-builtin"] + [x for s in sets for x in ("--set", s)])
    sweep, _ = load_sweep("fig6", "paper-builtin", _overrides(args), None)
    return expand(sweep, "fig6")


def test_a_zipped_axis_is_narrowed_and_its_partner_follows():
    def pairs(ts, variant):
        return sorted({(t.chain.pruning_data.ipc, t.chain.pruning_data.lr_img) for t in ts if t.variant == variant})

    ts = paper_trials("variants.distilled.grid.pruning_data.ipc=[1,50]")
    assert pairs(ts, "distilled") == [(1, 0.0005), (50, 0.025)]
    assert pairs(ts, "distilled_imagenet10") == [(10, 0.003), (20, 0.006)]  # left alone
    ts = paper_trials("ipc=[10]")  # every synthetic variant, each with its own partner value
    assert pairs(ts, "distilled") == [(10, 0.005)] and pairs(ts, "distilled_imagenet10") == [(10, 0.003)]
    with pytest.raises(ConfigError) as e:
        paper_trials("ipc=[5]")
    assert "pruning_data.lr_img" in e.value.problem and "not among them" in e.value.problem


def test_help_names_the_presets_examples_and_environment(capsys):
    with pytest.raises(SystemExit):
        parse_args("fig6", ["--help"])
    out = capsys.readouterr().out
    assert "{demo,paper,paper-builtin}" in out and "examples:" in out
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PRUNELAB_CACHE", "PRUNELAB_STORE", "PRUNELAB_SYNTHETIC_STORE",
                "AWS_ENDPOINT_URL"):
        assert var in out


def test_more_than_one_gpu_per_trial_is_refused():
    from sweeps.preflight import check_before_ray

    ts = trials("resources.gpus_per_trial=2")
    with pytest.raises(ConfigError) as e:
        check_before_ray(ts, None)
    assert e.value.field == "resources.gpus_per_trial" and "one device" in e.value.problem


def test_a_kind_set_from_the_command_line_decides_who_reads_the_pruning_data_keys():
    # in either order: the IMP variant turned into an IDC-file chain gets the path too
    for sets in (("pruning_data.kind=idc_file", "pruning_data.path=/x/data.pt"),
                 ("pruning_data.path=/x/data.pt", "pruning_data.kind=idc_file")):
        ts = trials(*sets, "ipc=[10]")
        assert {(t.variant, t.chain.pruning_data.path) for t in ts} == {("imp", "/x/data.pt"), ("distilled", "/x/data.pt")}


def fig7_trials(*sets: str):
    args = parse_args("fig7", [x for s in sets for x in ("--set", s)])
    sweep, _ = load_sweep("fig7", "demo", _overrides(args), None)
    return expand(sweep, "fig7")


def test_a_chain_key_moved_into_variant_grids_keeps_start_chains_paired():
    # both the start variant and the one starting from it read ipc, IMP does not: ipc leaves the
    # shared grid for their own grids, and each follower still starts from the chain of its own ipc
    ts = fig7_trials("variants.distilled_then_imp.set.pruning_data.kind=distilled",
                     "variants.distilled_then_imp.set.pruning_data.method=dm", "ipc=[1,5]")
    followers = [t for t in ts if t.variant == "distilled_then_imp"]
    assert len(followers) == 2 * 2  # ipc x seed, not ipc x start ipc x seed
    for t in followers:
        assert t.chain.start_chain().pruning_data.ipc == t.chain.pruning_data.ipc
        assert t.chain.start_chain().seed == t.chain.seed


def test_a_null_grid_takes_a_set(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("presets:\n  demo:\n    base: {dataset: {name: digits}}\n    grid: null\n"
                      "    variants:\n      imp: {grid: null}\n      distilled:\n        grid: null\n"
                      "        set: {pruning_data: {kind: distilled, method: dm, ipc: 10}}\n")
    sweep, _ = load_sweep("fig6", "demo", [("seeds", [3, 4]), ("ipc", [2])], str(config))
    ts = expand(sweep, "fig6")
    assert {(t.variant, t.chain.seed, t.chain.pruning_data.ipc) for t in ts} == {
        ("imp", 3, None), ("imp", 4, None), ("distilled", 3, 2), ("distilled", 4, 2)}
    sweep, _ = load_sweep("fig6", "demo", [("grid.seed", [5]), ("variants.distilled.grid.pruning_data.ipc", [1])],
                          str(config))
    assert {(t.variant, t.chain.seed, t.chain.pruning_data.ipc) for t in expand(sweep, "fig6")} == {
        ("imp", 5, None), ("distilled", 5, 1)}
