"""docs/fidelity.md against the resolved paper presets: the table's preset column is what the configs
hold, and every row either matches the paper/authors' value or says why not."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from sweeps.config import expand, load_sweep

DOC = Path(__file__).resolve().parent.parent / "docs" / "fidelity.md"


def rows() -> list[dict]:
    lines = [l for l in DOC.read_text().splitlines() if l.startswith("| ") and not l.startswith("| figure")]
    out = []
    for l in lines:
        cells = [c.strip() for c in l.strip().strip("|").split("|")]
        assert len(cells) == 7, l
        out.append(dict(zip(("figure", "variant", "setting", "paper", "source", "preset", "status"), cells)))
    return out


def dotted(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def plain(v):
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


@functools.lru_cache(maxsize=None)
def paper(figure: str):
    """The resolved paper preset of `figure` and its chains (once per figure)."""
    sweep, _ = load_sweep(figure, "paper")
    return sweep, tuple(expand(sweep, figure))


def resolved(figure: str, variant: str, setting: str):
    """The preset's value of `setting` (one value, or the sorted distinct values across the chains)."""
    sweep, chains = paper(figure)
    if setting.startswith("evaluation."):
        return plain(dotted(sweep.evaluation.to_dict(), setting[len("evaluation."):]))
    trials = [t for t in chains if variant == "*" or t.variant == variant]
    assert trials, f"{figure}: no chains of variant {variant!r}"
    values = []
    for t in trials:
        v = plain(dotted(t.chain.to_dict(), setting))
        if v not in values:
            values.append(v)
    return values[0] if len(values) == 1 else sorted(values)


ROWS = rows()


def test_the_table_covers_every_figure():
    assert {r["figure"] for r in ROWS} == {"fig2", "fig3_4", "fig5", "hessian", "fig6", "fig7"}
    assert len(ROWS) >= 40


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['figure']}-{r['variant']}-{r['setting']}" for r in ROWS])
def test_preset_column_is_the_resolved_config_and_every_difference_has_a_reason(row):
    status, field = row["status"], row["variant"] != "—"  # "—": a behaviour, not a config field
    assert status, "every row says 'matches' or gives its reason"
    if field:
        assert yaml.safe_load(row["preset"]) == resolved(row["figure"], row["variant"], row["setting"])
    if re.match(r"matches\b", status) and field:
        assert yaml.safe_load(row["paper"]) == yaml.safe_load(row["preset"]), "a match must be equal"
    if not status.startswith("matches"):
        assert len(status) > 20, "a difference needs its reason"
