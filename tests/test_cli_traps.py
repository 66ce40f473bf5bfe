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
