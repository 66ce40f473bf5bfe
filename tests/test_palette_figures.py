"""One palette across the figures: colours follow the variant, markers and discrete colours the sparsity.

The figures are drawn from a `Sweep` whose MLflow client is an in-memory stand-in (`FakeClient`: metric
histories and artifact files), so no store is written and each test takes well under a second. The
figure a module draws is caught at `save_fig` and inspected before it is closed.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from matplotlib.colors import to_hex

from analysis import fig2, fig3_4, fig7, hessian
from analysis.load import Chain, Sweep
from analysis.palette import (DENSE, IMP, series_label, series_markers, sparsity_colors, sparsity_label,
                              sparsity_marker, sparsity_names, variant_color)

ALPHAS = [i / 10 for i in range(11)]


class FakeClient:
    """What analysis.load reads from an MlflowClient: metric histories and artifact files, in memory."""

    def __init__(self):
        self.metrics: dict = {}  # run_id -> key -> {step: value}
        self.files: dict = {}  # run_id -> artifact path -> text

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, timestamp=0, value=v)
                for s, v in self.metrics.get(run_id, {}).get(key, {}).items()]

    def list_artifacts(self, run_id, folder):
        return [SimpleNamespace(path=p, is_dir=False) for p in self.files.get(run_id, {})
                if p.startswith(folder.rstrip("/") + "/")]

    def download_artifacts(self, run_id, path, dst):
        hits = {p: t for p, t in self.files.get(run_id, {}).items() if p == path or p.startswith(path + "/")}
        if not hits:
            raise FileNotFoundError(path)
        for p, text in hits.items():
            os.makedirs(os.path.dirname(os.path.join(dst, p)), exist_ok=True)
            with open(os.path.join(dst, p), "w") as f:
                f.write(text)
        return os.path.join(dst, path)


def lmc_curve(barrier: float, r: int) -> list[float]:
    l0, l1 = 0.3 + 0.01 * r, 0.35 + 0.01 * r
    return [(1 - a) * l0 + a * l1 + barrier * 4 * a * (1 - a) for a in ALPHAS]


def add_chain(sweep: Sweep, variant: str, seed: int, model: str = "convnet3", ipc=None, rewind: int = 0,
              rounds=range(6), lmc: bool = True, hessian_rounds=(), dataset: str = "digits") -> Chain:
    """A finished chain run with per-round accuracy, LMC curves, data-used and (optionally) Hessian metrics."""
    client, rid = sweep.client, f"run{len(sweep.chains)}"
    kind = "real" if variant in ("imp", "dense") else variant
    params = {"dataset.name": dataset, "model.name": model, "seed": str(seed), "pruning_data.kind": kind,
              "pruning.rewind_epoch": str(rewind), "eval.rounds": ",".join(map(str, rounds))}
    if ipc is not None:
        params["pruning_data.ipc"] = str(ipc)
    if variant == "dense":
        params["pruning.rounds"] = "0"
    offset = {"imp": 0.05, "dense": 0.05}.get(variant, 0.0) + 0.01 * (ipc or 0) + 0.002 * seed
    m = {"test_accuracy": {r: 0.9 + offset - 0.03 * r for r in rounds},
         "eval_sparsity": {r: 1 - 0.8 ** r for r in rounds}}
    if variant != "dense":  # pruning records: every round before the last, evaluated or not
        trained = range(max(rounds))
        m["pruning_images_seen"] = {r: 1000.0 * (r + 1) if kind == "real" else 100.0 * (ipc or 1) for r in trained}
        m["pruning_set_size"] = {r: 1438.0 if kind == "real" else 10.0 * (ipc or 1) for r in trained}
    base = {"min": -2.0, "max": 30.0, "mean": 0.05, "std": 0.8, "abs_mean": 0.2, "top_eigenvalue": 120.0}
    for r in hessian_rounds:
        for stat in hessian.STATS:
            m.setdefault(f"hessian_{stat}", {})[r] = base[stat] * (1 + 0.1 * r) * (2 if kind != "real" else 1)
    files = {}
    if lmc and variant != "dense":
        for r in rounds:
            b = 0.05 * r * (1 if kind == "real" else 2)
            files[f"lmc/round_{r:02d}.json"] = json.dumps({"alphas": ALPHAS, "train_loss": lmc_curve(b, r)})
    client.metrics[rid], client.files[rid] = m, files
    chain = Chain(run_id=rid, name=rid, tags={"prunelab.variant": variant, "prunelab.status": "finished"},
                  params=params, last={k: v[max(v)] for k, v in m.items()}, _sweep=sweep)
    sweep.chains.append(chain)
    return chain


def fake_sweep(scratch, seeds=(0, 1, 2), models=("convnet3", "resnet10_bn"), dense_chain: bool = False,
               **kw) -> Sweep:
    """IMP (k=0) and distilled ipc1/ipc10 chains per model and seed, the given rounds evaluated."""
    sweep = Sweep(client=FakeClient(), tracking_uri="memory", experiment="palette", experiment_id="0",
                  parent_id="parent", parent_tags={}, parent_name="parent", chains=[], scratch=str(scratch))
    for model in models:
        for seed in seeds:
            add_chain(sweep, "imp", seed, model, **kw)
            add_chain(sweep, "distilled", seed, model, ipc=1, **kw)
            add_chain(sweep, "distilled", seed, model, ipc=10, **kw)
            if dense_chain:
                add_chain(sweep, "dense", seed, model, rounds=(0,), lmc=False)
    return sweep


def draw(module, sweep, out_dir, monkeypatch) -> tuple:
    """Run `module.make` and keep the figures it saves open for inspection."""
    figs = []
    os.makedirs(out_dir, exist_ok=True)

    def keep(fig, out, stem, res):
        figs.append(fig)
        for ext in ("png", "svg"):  # the paths a caller expects, without rendering
            res.figures.append(os.path.join(out, f"{stem}.{ext}"))

    monkeypatch.setattr(module, "save_fig", keep)
    res = module.make(sweep, str(out_dir))
    return res, figs


def line_colors(fig) -> set[str]:
    """Colours of every drawn line (errorbar lines included) in the figure's axes."""
    return {to_hex(l.get_color()) for ax in fig.axes for l in ax.get_lines() if l.get_xydata().size}


def has_colorbar(fig) -> bool:
    return any(getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>" for ax in fig.axes)


def legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for lg in legends for t in lg.get_texts()]


# ------------------------------------------------------------------------------------------------
# the palette itself


def test_variant_color_is_stable_and_distinct():
    labels = ("IMP (k=0)", "distilled ipc1", "distilled ipc10", "dense")
    first = [variant_color(l) for l in labels]
    assert first == [variant_color(l) for l in labels]  # a label always gets the same colour
    assert len({c.lower() for c in first}) == 4
    assert variant_color("IMP (k=0)") == IMP and variant_color("dense") == DENSE
    assert variant_color("dense (k=3)") == DENSE  # the dense network at a rewind point is still dense
    assert variant_color("IMP (k=3)") != IMP
    assert variant_color("imp_from_distilled (from ipc10 r8)") not in first


def test_sparsity_markers_and_colors():
    assert sparsity_marker("60%") != sparsity_marker("87%")
    assert sparsity_marker(0.59) == "o" and sparsity_marker(1 - 0.8 ** 9) == sparsity_marker("87%")
    assert sparsity_label(1 - 0.8 ** 4) == "60%"
    for sps in ([0.59, 0.866], [0.0, 0.2, 0.59, 0.866, 0.95], [1 - 0.8 ** r for r in range(11)]):
        colors = sparsity_colors(sps)
        assert set(colors) == set(sps) and len({to_hex(c) for c in colors.values()}) == len(sps)
    assert sparsity_colors([0.2, 0.59]) == sparsity_colors([0.59, 0.2])  # order of appearance does not matter
    names = sparsity_names([0.998, 0.9985, 0.59])
    assert names[0.59] == "60%" and names[0.998] != names[0.9985]


def test_series_helpers():
    assert series_label("IMP (k=0)", [3, 3]) == "IMP (k=0), n=3"
    assert series_label("distilled ipc1", [2, 3]) == "distilled ipc1, n=2–3"
    m = series_markers(["IMP (k=0)", "IMP (k=3)", "IMP (k=5)", "distilled ipc10"])
    assert m["IMP (k=3)"] != m["IMP (k=5)"]  # same colour: told apart by marker


# ------------------------------------------------------------------------------------------------
# figures drawn with it


def test_fig2_palette_dense_baseline_and_n(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch")
    res, (fig,) = draw(fig2, sweep, tmp_path, monkeypatch)
    assert not has_colorbar(fig)
    assert {variant_color(l).lower() for l in ("IMP (k=0)", "distilled ipc1", "distilled ipc10")} \
        <= line_colors(fig)
    texts = legend_texts(fig)
    assert "IMP (k=0), n=3" in texts and "distilled ipc10, n=3" in texts and "dense, n=3" in texts
    # two accuracy panels (one per model) and one data-used panel for the data set they share
    titles = [ax.get_title() for ax in fig.axes]
    assert sum("data used" in t for t in titles) == 1 and len(fig.axes) == 3
    dense = [l for ax in fig.axes for l in ax.get_lines() if l.get_label().startswith("dense")]
    assert len(dense) == 2 and all(to_hex(l.get_color()) == DENSE.lower() and l.get_linestyle() == "--"
                                   for l in dense)
    assert dense[0].get_ydata()[0] == pytest.approx(100 * (0.95 + 0.002))  # IMP round 0, mean over seeds 0..2
    assert any("dense baseline on digits/convnet3" in n for n in res.notes)


def test_fig2_dense_chain_is_the_baseline_not_a_series(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0, 1), models=("convnet3",), dense_chain=True)
    res, (fig,) = draw(fig2, sweep, tmp_path, monkeypatch)
    texts = legend_texts(fig)
    assert texts.count("dense, n=2") == 1 and not any(t.startswith("dense") and t != "dense, n=2" for t in texts)
    assert any("(dense chains)" in n for n in res.notes)


def test_fig2_one_data_panel_per_model_when_the_data_used_differs(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0,))
    for c in sweep.chains:  # resnet10_bn trains its pruning rounds on twice the images
        if c.model == "resnet10_bn":
            seen = sweep.client.metrics[c.run_id]["pruning_images_seen"]
            seen.update({r: 2 * v for r, v in seen.items()})
    _, (fig,) = draw(fig2, sweep, tmp_path, monkeypatch)
    texts = legend_texts(fig)
    assert "IMP (k=0) — convnet3" in texts and "IMP (k=0) — resnet10_bn" in texts


def test_fig2_missing_dense_is_reported_not_drawn(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0,), models=("convnet3",), rounds=(2, 4))
    res, (fig,) = draw(fig2, sweep, tmp_path, monkeypatch)
    assert any("no dense (round 0) test_accuracy on digits/convnet3" in m for m in res.missing)
    assert not any(t.startswith("dense") for t in legend_texts(fig))


def test_fig3_4_discrete_sparsity_colors_and_no_colorbar(tmp_path, monkeypatch):
    rounds = (0, 4, 9)
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0, 1), rounds=rounds)
    res, (fig,) = draw(fig3_4, sweep, tmp_path, monkeypatch)
    assert not has_colorbar(fig)
    sps = [1 - 0.8 ** r for r in rounds]
    want = sparsity_colors(sps)
    texts = legend_texts(fig)
    for s in sps:  # a legend entry per sparsity, in its discrete colour and marker
        assert sparsity_label(s) in texts
    curve_colors = {to_hex(l.get_color()) for ax in fig.axes if "interpolation" in ax.get_xlabel()
                    for l in ax.get_lines()}
    assert curve_colors == {to_hex(c) for c in want.values()}
    markers = {l.get_marker() for ax in fig.axes if "interpolation" in ax.get_xlabel() for l in ax.get_lines()}
    assert sparsity_marker(sps[1]) in markers and sparsity_marker(sps[2]) in markers
    # barrier panels: one colour per variant, n seeds in the legend
    barrier = {to_hex(l.get_color()) for ax in fig.axes if "barrier" in ax.get_title() for l in ax.get_lines()
               if l.get_xydata().size > 2}
    assert {variant_color(l).lower() for l in ("IMP (k=0)", "distilled ipc1", "distilled ipc10")} <= barrier
    assert "IMP (k=0), n=2" in texts and "distilled ipc1, n=2" in texts
    assert any("n=2" in ax.get_title() and "distilled ipc10" in ax.get_title() for ax in fig.axes)


def test_fig3_4_many_sparsities_stay_discrete(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0,), models=("convnet3",), rounds=range(11))
    _, (fig,) = draw(fig3_4, sweep, tmp_path, monkeypatch)
    assert not has_colorbar(fig)
    texts = legend_texts(fig)
    assert all(sparsity_label(1 - 0.8 ** r) in texts for r in range(11))


def test_fig7_and_hessian_use_variant_colors(tmp_path, monkeypatch):
    sweep = fake_sweep(tmp_path / "scratch", seeds=(0, 1), models=("convnet3",), lmc=False, hessian_rounds=(0, 4))
    for seed in (0, 1):
        add_chain(sweep, "imp", seed, rewind=3, lmc=False)
    _, (fig,) = draw(fig7, sweep, tmp_path / "f7", monkeypatch)
    assert {variant_color("IMP (k=0)").lower(), variant_color("IMP (k=3)").lower()} <= line_colors(fig)
    assert "IMP (k=3), n=2" in legend_texts(fig)
    _, (fig,) = draw(hessian, sweep, tmp_path / "h", monkeypatch)
    colors = line_colors(fig)
    assert {DENSE.lower(), variant_color("IMP (k=0)").lower(), variant_color("distilled ipc10").lower()} <= colors
    assert not {"#1f77b4", "#d62728"} & colors  # matplotlib's C0 / C3
