"""analysis/ against a small MLflow store with known metrics (no training).

The store is written by the sweep layer's own code paths: trials from `sweeps.config.expand`, the
parent run from `sweeps.tracking.start_parent_run` (with `sweep/trials.json`), child runs from
`sweeps.tracking.ChainRun`, metrics and artifacts from `sweeps.sync.sync_run` fed by a fake chain
store that returns hand-made evaluation results. Every expected number below is computed by hand
from the tables in this file, never by calling analysis code.

One store and one `analysis.run("all")` are shared by the module.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

EXPERIMENT = "prunelab-test-analysis"
SEEDS = (0, 1)
ROUNDS = 10  # every chain but the then-IMP ones
THEN_START, THEN_ROUNDS = 8, 12
ALPHAS = [i / 10 for i in range(11)]
LAND_XS, LAND_YS = np.linspace(-1, 2, 12), np.linspace(-0.5, 1.5, 10)  # nx=12, ny=10: catches transposes

SWEEP = {
    "base": {"dataset": {"name": "digits"}, "model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": ROUNDS},
             "pruning_training": {"epochs": 2}, "training": {"epochs": 10}},
    "grid": {"model.name": ["convnet3", "resnet10_bn"], "seed": list(SEEDS)},
    # variant names as a user would write them in the YAML; analysis must not rely on naming conventions
    "variants": {
        "imp": {},
        "rewind3": {"set": {"pruning": {"rewind_epoch": 3}}},
        "distilled": {"set": {"pruning_data": {"kind": "distilled", "method": "dm"}},
                      "grid": {"pruning_data.ipc": [1, 10]}},
        "imp_from_distilled": {"start_from": "distilled", "start_round": THEN_START,
                               "set": {"pruning": {"rounds": THEN_ROUNDS}}},
    },
    "evaluation": {"every_round": True, "lmc": True},
}

# (model, kind, seed) -> {round: (test_accuracy, barrier_mid_train_loss)} at the Figure 6 rounds (4, 9).
# kind: imp | d1 | d10 (distilled ipc 1 / 10). Every other round uses default_point(), far from these.
FIG6 = {
    ("convnet3", "imp", 0): {4: (0.9, 0.4), 9: (0.5, 0.0)},        # IMP barrier 0 at 87%: excluded
    ("convnet3", "imp", 1): {4: (0.8, 0.5), 9: (0.4, 0.2)},
    ("convnet3", "d10", 0): {4: (0.8, 0.1), 9: (0.45, 0.3)},
    ("convnet3", "d10", 1): {4: (0.6, 0.25), 9: (0.3, 0.3)},
    ("convnet3", "d1", 0): {4: (0.7, 0.2), 9: (0.4, 0.1)},
    # ("convnet3", "d1", 1): listed in trials.json, never started -> missing
    ("resnet10_bn", "imp", 0): {4: (0.85, 0.2), 9: (0.6, -0.05)},  # negative IMP barrier
    ("resnet10_bn", "imp", 1): {4: (0.75, 0.4), 9: (0.5, 0.0005)},  # barely positive: one seed of two
    ("resnet10_bn", "d10", 0): {4: (0.68, 0.3), 9: (0.3, 0.2)},
    # ("resnet10_bn", "d10", 1): fails in round 3 (diverged)
    ("resnet10_bn", "d1", 0): {4: (0.425, 0.1), 9: (0.3, 0.1)},
    ("resnet10_bn", "d1", 1): {4: (0.6, 0.2), 9: (0.45, 0.001)},
}
MISSING = ("convnet3", "d1", 1)
FAILED = ("resnet10_bn", "d10", 1)
FAILURE = "diverged: training loss is nan in round 3"
FAILED_ACC = 0.0123  # what the failed run logged before failing: must never be plotted
LANDSCAPES = {("convnet3", "imp", 0): (0, 4), ("convnet3", "imp", 1): (4,), ("convnet3", "d10", 0): (0, 4)}
HESSIAN_ROUNDS = (0, 4, 9)
HESSIAN_STATS = ("min", "max", "mean", "std", "abs_mean", "top_eigenvalue")


def sparsity(r: int) -> float:
    return round(1 - 0.8 ** r, 6)


def default_point(kind: str, seed: int, r: int) -> tuple[float, float]:
    return 0.2 + 0.01 * r + 0.001 * seed + (0.05 if kind == "imp" else 0.0), 0.9 + 0.01 * r


def point(model, kind, seed, r):
    return FIG6.get((model, kind, seed), {}).get(r) or default_point(kind, seed, r)


def curve(barrier: float, l0: float, l1: float) -> list[float]:
    """Train loss along α: the linear path, a parabola of height `barrier` at α=0.5 and a bump at α=0.4
    (so the max-over-α barrier differs from the mid one). mid = barrier, max = 1.46·barrier or 0."""
    return [(1 - a) * l0 + a * l1 + barrier * (4 * a * (1 - a) + (0.5 if abs(a - 0.4) < 1e-9 else 0.0))
            for a in ALPHAS]


def hand_barriers(values: list[float]) -> tuple[float, float]:
    v0, v1 = values[0], values[-1]
    return values[5] - 0.5 * (v0 + v1), max(v - ((1 - a) * v0 + a * v1) for a, v in zip(ALPHAS, values))


def hessian_value(stat: str, kind: str, seed: int, r: int) -> float:
    base = {"min": -2.0, "max": 30.0, "mean": 0.05, "std": 0.8, "abs_mean": 0.2, "top_eigenvalue": 120.0}[stat]
    if r == 0:
        kind = "dense"  # the dense network of one seed is the same whichever chain measured it
    return base * (1 + 0.1 * seed) * {"dense": 1.0, "imp": 1.5, "d10": 3.0}[kind] * (1 + 0.05 * r)


def images_seen(kind: str, seed: int, r: int) -> int:
    return (1000 * (r + 1) if kind == "imp" else 500) + 10 * seed


def set_size(kind: str) -> int:
    return {"imp": 1438, "d10": 100, "d1": 10}.get(kind, 1438)


# ------------------------------------------------------------------------------------------------
# writing the store the way the sweep layer does


class FakeStore:
    """What sweeps.sync.sync_run reads from prunelab.store.ChainStore: evaluations and mask files."""

    def __init__(self, dir: Path, evals: dict):
        self.dir, self.evals = dir, evals

    def load_eval(self, rkey, r):
        return self.evals.get(r)

    def mask_bytes(self, r):
        p = self.dir / "rounds" / f"round_{r:02d}.mask.pt"
        return p.read_bytes() if p.exists() else None


def kind_of(t) -> str:
    if t.variant == "distilled":
        return f"d{t.chain.pruning_data.ipc}"
    return {"imp": "imp", "rewind3": "rewind3", "imp_from_distilled": "then"}[t.variant]


def eval_result(model: str, kind: str, seed: int, r: int, extras: bool = True) -> dict:
    """One round's evaluation in the shape of prunelab.evaluation.evaluate_round; `extras`: LMC,
    Hessian and landscape where the tables above say so, else accuracy only."""
    m = {"eval_sparsity": sparsity(r)}
    res = {"round": r, "lmc": None, "landscape": None, "hessian": None}
    if not extras:
        m.update(test_accuracy=point(model, kind, seed, r)[0], test_loss=0.5, train_loss=0.3)
    elif kind in ("imp", "d1", "d10"):
        if (model, kind, seed) == FAILED and r < 3:
            acc, b = FAILED_ACC, 9.99
        else:
            acc, b = point(model, kind, seed, r)
        l0, l1 = 0.3 + 0.01 * r, 0.35 + 0.01 * r
        tr = curve(b, l0, l1)
        te = curve(b / 2, l0 + 0.2, l1 + 0.2)
        mid_tr, max_tr = hand_barriers(tr)
        mid_te, max_te = hand_barriers(te)
        acc_curve = [acc - 0.1 * 4 * a * (1 - a) for a in ALPHAS]
        m.update(test_accuracy=acc, test_loss=l0 + 0.2, train_loss=l0, barrier_mid_train_loss=mid_tr,
                 barrier_max_train_loss=max_tr, barrier_mid_test_loss=mid_te, barrier_max_test_loss=max_te,
                 barrier_mid_train_error=0.1, barrier_max_train_error=0.1, barrier_mid_test_error=0.1,
                 barrier_max_test_error=0.1)
        res["lmc"] = {"alphas": ALPHAS, "train_loss": tr, "train_accuracy": acc_curve, "test_loss": te,
                      "test_accuracy": acc_curve,
                      "barrier_mid": {"train_loss": mid_tr, "test_loss": mid_te},
                      "barrier_max": {"train_loss": max_tr, "test_loss": max_te},
                      "bn_mode": "interpolate", "copies": [{"seed": 0, "test_accuracy": acc}] * 2,
                      "copy_test_accuracy": acc, "sparsity": sparsity(r)}
    elif kind == "rewind3":
        m["test_accuracy"] = 0.7 + 0.01 * r + 0.02 * seed
    elif kind == "then":
        m["test_accuracy"] = 0.6 + 0.005 * r + 0.02 * seed
    if extras and model == "convnet3" and kind in ("imp", "d10") and r in HESSIAN_ROUNDS:
        stats = {s: hessian_value(s, kind, seed, r) for s in HESSIAN_STATS}
        for s, v in stats.items():
            m[f"hessian_{s}"] = v
        res["hessian"] = {"method": "exact", "stats": {k: v for k, v in stats.items() if k != "top_eigenvalue"},
                          "top_eigenvalue": stats["top_eigenvalue"]}
    if extras and r in LANDSCAPES.get((model, kind, seed), ()):
        yy, xx = np.meshgrid(LAND_YS, LAND_XS, indexing="ij")
        grid = 0.1 + (xx - 0.5) ** 2 + 2 * (yy - 0.5) ** 2 + 0.1 * r + 0.01 * seed
        res["landscape"] = {"xs": LAND_XS.tolist(), "ys": LAND_YS.tolist(), "loss": grid.tolist(),
                            "accuracy": (1 - grid / grid.max()).tolist(),
                            "copies": [{"coords": c} for c in ([0, 0], [1, 0], [0, 1], [1, 1])],
                            "distances": np.ones((4, 4)).tolist()}
    res["metrics"] = m
    return res


def history(kind: str, seed: int, first: int, last: int) -> list[dict]:
    """Chain.step records for rounds first..last-1."""
    return [{"round": r, "trained_sparsity": sparsity(r), "sparsity": sparsity(r + 1),
             "pruning_train_loss": 0.1, "pruning_accuracy": 0.99, "pruning_set_size": set_size(kind),
             "pruning_images_seen": images_seen(kind, seed, r)} for r in range(first, last)]


def build_store(tmp: Path, sweep: dict, figure: str = "fig6", experiment: str = EXPERIMENT,
                skip=(MISSING,), fail=(FAILED,), extras: bool = True) -> dict:
    from sweeps import sync
    from sweeps.config import SweepHparams, expand
    from sweeps.launch import trial_spec
    from sweeps.tracking import ChainRun, ensure_experiment, start_parent_run

    uri = f"sqlite:///{tmp / 'mlflow.db'}"  # tmp is absolute: sqlite:////abs/path (four slashes)
    assert uri.startswith("sqlite:////")
    typed = dict(sweep, variants=[{"name": n, **v} for n, v in sweep["variants"].items()])
    hp = SweepHparams.from_dict(typed)
    # one then-IMP chain per (model, seed): the one started from the ipc-10 distilled chain
    trials = [t for t in expand(hp, figure)
              if not (t.chain.start_from and t.chain.start_chain().pruning_data.ipc != 10)]
    exp_id = ensure_experiment(uri, experiment)
    summary = [{"key": t.key, "variant": t.variant, "label": t.label(), "chain_hash": t.chain.hash(),
                "rounds": t.rounds, "run_id": None} for t in trials]  # as sweeps.driver.run_sweep
    parent = start_parent_run(uri, exp_id, figure, "test", sweep, summary)
    extra = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent, "git_commit": "abc123"}
    runs = {}
    for t in trials:
        model, kind, seed = t.chain.model.name, kind_of(t), t.chain.seed
        ident = (model, kind, seed)
        if ident in skip:
            continue
        spec = trial_spec(t, figure, tmp, extra)
        run = ChainRun.open(uri, exp_id, parent, spec)
        first = t.chain.start_round
        last = 3 if ident in fail else t.chain.pruning.rounds
        # a then-IMP chain starts at its start round: earlier rounds belong to the start chain
        evals = {r: eval_result(model, kind, seed, r, extras) for r in t.rounds if first <= r <= last and
                 not (ident in fail and r >= last)}
        state = SimpleNamespace(history=history(kind, seed, first, last))
        store = FakeStore(tmp / "store" / t.chain.hash(), evals)
        sync.sync_run(run, store, state.history, "rkey", t.rounds, set())
        if ident in fail:
            run.finish("FAILED", FAILURE)
        else:
            run.finish("FINISHED")
        runs[ident] = run.run_id
    return {"uri": uri, "experiment": experiment, "exp_id": exp_id, "parent": parent, "trials": trials,
            "runs": runs}


def _no_fsync(dbapi_conn, _record):
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")  # durability only: what is stored is unchanged
        cur.close()


@contextlib.contextmanager
def fast_sqlite():
    """SQLite without fsync while writing the store (several times faster; nothing else changes)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    added = not event.contains(Engine, "connect", _no_fsync)
    if added:
        event.listen(Engine, "connect", _no_fsync)
    try:
        yield
    finally:
        if added:
            event.remove(Engine, "connect", _no_fsync)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The store and one run of every figure, logged to the parent run."""
    import analysis

    tmp = tmp_path_factory.mktemp("analysis_store")
    with fast_sqlite():
        store = build_store(tmp, SWEEP)
        out = tmp / "figures"
        res = analysis.run("all", EXPERIMENT, store["uri"], str(out), parent_run_id=store["parent"])
    return SimpleNamespace(**store, out=out, res=res, tmp=tmp)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(x: str) -> float:
    return float(x) if x != "" else float("nan")


def sample_std(xs) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ------------------------------------------------------------------------------------------------
# the store itself mirrors the sweep layer


def test_store_is_shaped_like_the_sweep_layer_writes_it(built):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=built.uri)
    parent = c.get_run(built.parent)
    assert parent.data.tags["prunelab.role"] == "sweep"
    listed = json.loads(Path(c.download_artifacts(built.parent, "sweep/trials.json", str(built.tmp / "dl")))
                        .read_text())
    assert {t["key"] for t in listed} == {t.key for t in built.trials} and len(listed) == 20
    run = c.get_run(built.runs[("convnet3", "imp", 0)])
    assert run.data.tags["mlflow.parentRunId"] == built.parent
    assert run.data.tags["prunelab.variant"] == "imp" and run.data.tags["prunelab.status"] == "finished"
    assert run.data.params["seed"] == "0" and run.data.params["pruning_data.kind"] == "real"
    assert run.data.params["eval.rounds"] == ",".join(map(str, range(ROUNDS + 1)))
    then = c.get_run(built.runs[("convnet3", "then", 0)])
    assert then.data.params["start_round"] == str(THEN_START)
    assert then.data.params["start_from.start_round"] == "0"  # the start chain's own field: not the one
    assert sorted(m.step for m in c.get_metric_history(then.info.run_id, "test_accuracy")) == \
        list(range(THEN_START, THEN_ROUNDS + 1))
    assert {f.path for f in c.list_artifacts(run.info.run_id, "lmc")} >= {"lmc/round_04.json", "lmc/round_09.json"}
    assert {f.path for f in c.list_artifacts(run.info.run_id, "landscape")} == \
        {"landscape/round_00.npz", "landscape/round_04.npz"}


def test_chain_identity_comes_from_what_the_sweep_logs(built):
    from analysis.load import load_sweep

    sweep = load_sweep(EXPERIMENT, built.uri, built.parent)
    by_id = {c.run_id: c for c in sweep.chains}
    labels = {}
    for ident, rid in built.runs.items():
        labels[ident] = by_id[rid].label
    assert labels[("convnet3", "imp", 0)] == "IMP (k=0)"
    assert labels[("convnet3", "rewind3", 0)] == "IMP (k=3)"  # variant `rewind3`: real data, k=3
    assert labels[("convnet3", "d10", 1)] == "distilled ipc10"
    then = by_id[built.runs[("convnet3", "then", 0)]]
    assert then.then_imp and not then.is_imp and not then.is_synthetic
    assert then.start_round == THEN_START
    assert then.label == f"imp_from_distilled (from ipc10 r{THEN_START})"
    rewind = by_id[built.runs[("convnet3", "rewind3", 1)]]
    assert rewind.is_imp and not rewind.is_synthetic and rewind.rewind_epoch == 3
    # rounds are counted from the dense network in a then-IMP chain too
    assert then.sparsity_at(THEN_START) == pytest.approx(sparsity(THEN_START))
    assert then.sparsity_at(THEN_START + 1) == pytest.approx(sparsity(THEN_START + 1))
    then.history("eval_sparsity").clear()
    then.history("sparsity").clear()
    assert then.sparsity_at(10) == pytest.approx(1 - 0.8 ** 10)  # the fallback, too
    assert then.eval_rounds == list(range(THEN_START, THEN_ROUNDS + 1))
    assert len(sweep.failed) == 1 and sweep.failed[0].run_id == built.runs[FAILED]


# ------------------------------------------------------------------------------------------------
# Figure 6


def test_fig6_pairs_use_rounds_4_and_9_and_hand_ratios(built):
    rows = read_csv(built.out / "fig6_pairs.csv")
    got = {(r["model"], r["variant"], r["target"], int(r["seed"])): r for r in rows}
    kinds = {"distilled ipc1": "d1", "distilled ipc10": "d10"}
    expected = 0
    for (model, kind, seed), vals in FIG6.items():
        if kind == "imp":
            continue
        label = {v: k for k, v in kinds.items()}[kind]
        for target, r in (("60%", 4), ("87%", 9)):
            row = got[(model, label, target, seed)]
            expected += 1
            acc, bar = vals[r]
            iacc, ibar = FIG6[(model, "imp", seed)][r]
            assert int(row["syn_round"]) == r and int(row["imp_round"]) == r
            assert num(row["syn_sparsity"]) == pytest.approx(1 - 0.8 ** r, abs=1e-5)
            assert num(row["acc_ratio"]) == pytest.approx(acc / iacc, rel=1e-5)
            assert row["paired_with"] == f"IMP seed {seed}"
            if ibar > 0:
                assert row["imp_barrier_ok"] == "True"
                assert num(row["barrier_ratio"]) == pytest.approx(bar / ibar, rel=1e-5)
            else:
                assert row["imp_barrier_ok"] == "False" and row["barrier_ratio"] == ""
    assert len(rows) == expected  # no pair from the failed or the missing run, none from rewind/then-IMP
    c = got[("convnet3", "distilled ipc10", "60%", 0)]
    assert num(c["acc_ratio"]) == pytest.approx(0.8 / 0.9, rel=1e-5)  # 0.888...
    assert num(c["barrier_ratio"]) == pytest.approx(0.25, rel=1e-5)


def test_fig6_rows_are_ratios_of_seed_means_with_bootstrap_intervals(built):
    rows = read_csv(built.out / "fig6.csv")
    # the store logs only the plain barrier names (runs from before both BN modes were recorded): they
    # are the interpolated mode's; no recompute rows, no control rows
    assert {r["bn_mode"] for r in rows} == {"interpolate"} and {r["source"] for r in rows} == {"imp", "synthetic"}
    pts = {(r["model"], r["variant"], r["source"], r["sparsity"][:4]): r for r in rows}
    assert len(rows) == 12  # 2 models x (IMP + 2 ipc) x 2 targets
    p = pts[("convnet3", "distilled ipc10", "synthetic", "0.59")]
    assert num(p["acc_ratio_mean"]) == pytest.approx((0.8 + 0.6) / (0.9 + 0.8), rel=1e-5)
    assert num(p["barrier_ratio_mean"]) == pytest.approx((0.1 + 0.25) / (0.4 + 0.5), rel=1e-5)
    # IMP barriers (0.4, 0.5): the 4 resample means 0.4, 0.45, 0.45, 0.5 → 2.5% / 97.5% by linear
    # interpolation: 0.4 + 0.075·0.05 and 0.45 + 0.925·0.05
    assert num(p["imp_barrier_mean"]) == pytest.approx(0.45) and p["n_seeds"] == "2"
    assert num(p["imp_barrier_lo"]) == pytest.approx(0.40375) and num(p["imp_barrier_hi"]) == pytest.approx(0.49625)
    assert num(p["synthetic_barrier_mean"]) == pytest.approx(0.175) and p["ratio_defined"] == "True"
    assert int(p["ipc"]) == 10 and num(p["compression"]) == pytest.approx(14.38, rel=1e-4)
    # resnet10_bn at 87%: IMP barriers (−0.05, 0.0005) → interval below/through 0: ratio undefined,
    # written empty; the accuracy ratio is still real
    for label in ("distilled ipc1", "distilled ipc10"):
        q = pts[("resnet10_bn", label, "synthetic", "0.86")]
        assert q["ratio_defined"] == "False" and q["barrier_ratio_mean"] == ""
        assert num(q["imp_barrier_lo"]) < 0 and q["acc_ratio_mean"] != ""
    assert num(pts[("resnet10_bn", "distilled ipc1", "synthetic", "0.86")]["acc_ratio_mean"]) == \
        pytest.approx((0.3 + 0.45) / (0.6 + 0.5), rel=1e-5)
    # one seed (the other failed): no interval, no defined ratio
    q = pts[("resnet10_bn", "distilled ipc10", "synthetic", "0.59")]
    assert q["n_seeds"] == "1" and q["ratio_defined"] == "False"
    assert num(q["acc_ratio_mean"]) == pytest.approx(0.68 / 0.85, rel=1e-5)
    imp = pts[("convnet3", "", "imp", "0.59")]
    assert num(imp["acc_ratio_mean"]) == 1.0 and num(imp["barrier_ratio_lo"]) == 1.0


def test_fig6_notes_undefined_ratios_and_writes_a_verdict(built):
    fig6 = next(r for r in built.res["results"] if r.name == "fig6")
    text = "\n".join(fig6.notes)
    assert "resnet10_bn distilled ipc1 at 87%" in text and "barrier ratio undefined" in text
    html = (built.out / "report.html").read_text()
    assert "barrier ratio undefined" in html and "synthetic barrier" in html
    verdict = (built.out / "verdict.md").read_text()
    assert "| digits/convnet3 distilled ipc10 | 60% | interpolate | synthetic vs IMP |" in verdict
    assert "indistinguishable" in verdict  # n = 1 and wide intervals make no claim
    assert "fig6.png" in {Path(p).name for p in fig6.figures}
    assert "fig6_bn_recompute.png not drawn" in text  # these runs recorded one BN mode only


# ------------------------------------------------------------------------------------------------
# Figure 2


def test_fig2_mean_and_sample_std_per_round(built):
    rows = read_csv(built.out / "fig2.csv")
    got = {(r["model"], r["variant"], int(r["round"])): r for r in rows}
    for model in ("convnet3", "resnet10_bn"):
        for label, kind in (("IMP (k=0)", "imp"), ("distilled ipc10", "d10"), ("distilled ipc1", "d1")):
            for r in range(ROUNDS + 1):
                seeds = [s for s in SEEDS if (model, kind, s) not in (MISSING, FAILED)]
                accs = [point(model, kind, s, r)[0] for s in seeds]
                row = got[(model, label, r)]
                assert num(row["test_accuracy_mean"]) == pytest.approx(sum(accs) / len(accs), rel=1e-5)
                assert int(row["n_seeds"]) == len(seeds)
                assert row["seeds"] == " ".join(map(str, seeds))
                assert num(row["sparsity"]) == pytest.approx(1 - 0.8 ** r, abs=1e-5)
                if len(seeds) > 1:
                    assert num(row["test_accuracy_std"]) == pytest.approx(sample_std(accs), rel=1e-4)
                else:
                    assert row["test_accuracy_std"] == ""
    r4 = got[("convnet3", "IMP (k=0)", 4)]
    assert num(r4["test_accuracy_mean"]) == pytest.approx(0.85) and \
        num(r4["test_accuracy_std"]) == pytest.approx(math.sqrt(0.005), rel=1e-5)
    assert FAILED_ACC not in {round(num(r["test_accuracy_mean"]), 4) for r in rows}


def test_fig2_data_used_panel(built):
    rows = read_csv(built.out / "fig2.csv")
    got = {(r["model"], r["variant"], int(r["round"])): r for r in rows}
    for label, kind in (("IMP (k=0)", "imp"), ("distilled ipc10", "d10")):
        assert got[("convnet3", label, 0)]["images_seen_cumulative"] == ""  # the dense mask needs no data
        for r in range(1, ROUNDS + 1):
            seen = [sum(images_seen(kind, s, q) for q in range(r)) for s in SEEDS]
            row = got[("convnet3", label, r)]
            assert num(row["images_seen_cumulative"]) == pytest.approx(sum(seen) / 2, rel=1e-6)
            assert num(row["distinct_images"]) == set_size(kind)
    assert num(got[("convnet3", "IMP (k=0)", 3)]["images_seen_cumulative"]) == 6015  # (6000 + 6030) / 2
    assert num(got[("convnet3", "distilled ipc10", 3)]["images_seen_cumulative"]) == 1515  # (1500 + 1530) / 2
    # IMP from a distilled mask at round 8: its own rounds only, counted from round 8
    then = f"imp_from_distilled (from ipc10 r{THEN_START})"
    assert got[("convnet3", then, THEN_START)]["images_seen_cumulative"] == ""
    assert num(got[("convnet3", then, THEN_START + 1)]["images_seen_cumulative"]) == 505
    assert num(got[("convnet3", then, THEN_START + 2)]["images_seen_cumulative"]) == 1010
    assert not any("imp_from_distilled" in m and "pruning_images_seen" in m for m in built.res["missing"])


# ------------------------------------------------------------------------------------------------
# Figures 3/4


def test_fig3_4_barriers_per_round_from_the_curves(built):
    rows = read_csv(built.out / "fig3_4_barriers.csv")
    got = {(r["model"], r["variant"], int(r["seed"]), int(r["round"])): r for r in rows}
    n = 0
    for model in ("convnet3", "resnet10_bn"):
        for label, kind in (("IMP (k=0)", "imp"), ("distilled ipc10", "d10"), ("distilled ipc1", "d1")):
            for s in SEEDS:
                if (model, kind, s) in (MISSING, FAILED):
                    assert not any(k[:3] == (model, label, s) for k in got)
                    continue
                for r in range(ROUNDS + 1):
                    b = point(model, kind, s, r)[1]
                    tr = curve(b, 0.3 + 0.01 * r, 0.35 + 0.01 * r)
                    mid = tr[5] - (tr[0] + tr[-1]) / 2
                    mx = max(v - ((1 - a) * tr[0] + a * tr[-1]) for a, v in zip(ALPHAS, tr))
                    row = got[(model, label, s, r)]
                    assert row["split"] == "train"
                    assert num(row["barrier_mid_loss"]) == pytest.approx(mid, abs=1e-6)
                    assert num(row["barrier_max_loss"]) == pytest.approx(mx, abs=1e-6)
                    assert mid == pytest.approx(b) and mx == pytest.approx(max(1.46 * b, 0.0))
                    n += 1
    assert len(rows) == n  # then-IMP and rewind chains have no LMC; the failed run is not plotted


def test_fig3_4_curves_are_seed_means(built):
    rows = read_csv(built.out / "fig3_4_curves.csv")
    sel = [r for r in rows if r["model"] == "convnet3" and r["variant"] == "distilled ipc10" and r["round"] == "4"]
    assert len(sel) == len(ALPHAS)
    c0, c1 = curve(0.1, 0.34, 0.39), curve(0.25, 0.34, 0.39)
    for row, a, v0, v1 in zip(sel, ALPHAS, c0, c1):
        assert num(row["alpha"]) == pytest.approx(a)
        assert num(row["loss_seed_mean"]) == pytest.approx((v0 + v1) / 2, abs=1e-6)
        assert int(row["n_seeds"]) == 2


# ------------------------------------------------------------------------------------------------
# Figure 5, Hessian, Figure 7


def test_fig5_landscapes_plotted(built):
    png = built.out / "fig5_digits_convnet3_r04.png"
    assert png.exists() and str(png) in built.res["figures"]
    rows = read_csv(built.out / "fig5.csv")
    panels = {r["panel"]: r for r in rows}
    assert set(panels) == {"dense", "IMP (k=0) r4", "distilled ipc10 r4"}
    assert panels["IMP (k=0) r4"]["seed"] == "0"  # lowest seed of two
    assert (int(panels["dense"]["ny"]), int(panels["dense"]["nx"])) == (10, 12)
    yy, xx = np.meshgrid(LAND_YS, LAND_XS, indexing="ij")
    g = 0.1 + (xx - 0.5) ** 2 + 2 * (yy - 0.5) ** 2 + 0.4
    assert num(panels["IMP (k=0) r4"]["loss_min"]) == pytest.approx(g.min(), rel=1e-5)
    assert num(panels["IMP (k=0) r4"]["loss_max"]) == pytest.approx(g.max(), rel=1e-5)
    assert num(panels["dense"]["sparsity"]) == 0.0
    fig5 = next(r for r in built.res["results"] if r.name == "fig5")
    assert any("IMP (k=0) round 4 on digits/convnet3: 2 runs" in n and "seed 0" in n for n in fig5.notes)


def test_hessian_table_is_the_seed_mean_of_the_metrics(built):
    rows = read_csv(built.out / "hessian.csv")
    got = {(r["subnetwork"], int(r["round"])): r for r in rows}
    assert set(got) == {("dense", 0), ("IMP (k=0)", 4), ("IMP (k=0)", 9), ("distilled ipc10", 4),
                        ("distilled ipc10", 9)}
    for (sub, r), row in got.items():
        kind = {"dense": "dense", "IMP (k=0)": "imp", "distilled ipc10": "d10"}[sub]
        assert int(row["n_seeds"]) == 2  # the dense network counted once per seed, not once per chain
        for s in HESSIAN_STATS:
            want = sum(hessian_value(s, kind, seed, r) for seed in SEEDS) / 2
            assert num(row[s]) == pytest.approx(want, rel=1e-5), (sub, r, s)
    md = (built.out / "hessian.md").read_text()
    line = next(l for l in md.splitlines() if "| distilled ipc10 |" in l and "86.6%" in l)
    mean = sum(hessian_value("mean", "d10", s, 9) for s in SEEDS) / 2
    std = sum(hessian_value("std", "d10", s, 9) for s in SEEDS) / 2
    assert f"{mean:.3g} ± {std:.3g}" in line
    top = sum(hessian_value("top_eigenvalue", "d10", s, 9) for s in SEEDS) / 2
    assert f"{top:.4g}" in line


def test_fig7_series_from_sweep_variants(built):
    rows = read_csv(built.out / "fig7.csv")
    labels = {r["variant"] for r in rows}
    then = f"imp_from_distilled (from ipc10 r{THEN_START})"
    assert labels == {"IMP (k=0)", "IMP (k=3)", then}
    got = {(r["model"], r["variant"], int(r["round"])): r for r in rows}
    for model in ("convnet3", "resnet10_bn"):
        for r in range(ROUNDS + 1):
            row = got[(model, "IMP (k=3)", r)]
            accs = [0.7 + 0.01 * r + 0.02 * s for s in SEEDS]
            assert num(row["test_accuracy_mean"]) == pytest.approx(sum(accs) / 2, rel=1e-5)
            assert num(row["test_accuracy_std"]) == pytest.approx(sample_std(accs), rel=1e-4)
        then_rounds = sorted(k[2] for k in got if k[:2] == (model, then))
        assert then_rounds == list(range(THEN_START, THEN_ROUNDS + 1))
        for r in then_rounds:
            row = got[(model, then, r)]
            assert num(row["sparsity"]) == pytest.approx(1 - 0.8 ** r, abs=1e-5)
            assert num(row["test_accuracy_mean"]) == pytest.approx(0.6 + 0.005 * r + 0.01, rel=1e-5)
    fig7 = next(r for r in built.res["results"] if r.name == "fig7")
    assert not any("no synthetic-then-IMP" in m or "no IMP with rewinding" in m for m in fig7.missing)


# ------------------------------------------------------------------------------------------------
# outputs, report, MLflow, missing and failed runs


def test_every_output_exists_is_valid_and_logged(built):
    from mlflow import MlflowClient
    from PIL import Image

    res = built.res
    made = {r.name for r in res["results"] if r.made}
    assert made == {"fig2", "fig3_4", "fig5", "hessian", "fig6", "fig7"}
    assert not any("failed to draw" in m for m in res["missing"])
    pngs = [p for p in res["figures"] if p.endswith(".png")]
    svgs = [p for p in res["figures"] if p.endswith(".svg")]
    assert {Path(p).stem for p in pngs} == {Path(p).stem for p in svgs}
    assert {"fig2", "fig3_4", "fig6", "fig7", "hessian", "fig5_digits_convnet3_r04"} <= {Path(p).stem for p in pngs}
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    for p in svgs:
        assert Path(p).stat().st_size > 1000 and "<svg" in Path(p).read_text()[:2000]
    html = (built.out / "report.html").read_text()
    for p in res["figures"] + res["tables"]:
        assert f"'{os.path.basename(p)}'" in html, p
    logged = {f.path for f in MlflowClient(tracking_uri=built.uri).list_artifacts(built.parent, "figures")}
    want = {f"figures/{os.path.basename(p)}" for p in res["figures"] + res["tables"] + [res["report"]]}
    assert want <= logged


def test_missing_and_failed_runs_reported_by_name(built):
    res = built.res
    missing_trial = next(t for t in built.trials if t.variant == "distilled" and t.chain.seed == 1
                         and t.chain.pruning_data.ipc == 1 and t.chain.model.name == "convnet3")
    hits = [m for m in res["missing"] if missing_trial.key in m]
    assert hits and missing_trial.label() in hits[0] and "no run" in hits[0]
    failed = [m for m in res["missing"] if FAILURE in m]
    assert failed and "distilled ipc10" in failed[0] and "resnet10_bn" in failed[0] and "seed 1" in failed[0]
    html = (built.out / "report.html").read_text()
    assert missing_trial.key in html and FAILURE in html
    # never plotted: the failed run's accuracies and barrier appear in no table
    for name in ("fig2.csv", "fig6_pairs.csv", "fig3_4_barriers.csv", "fig7.csv"):
        text = (built.out / name).read_text()
        assert "9.99" not in text and str(FAILED_ACC) not in text


@pytest.fixture(scope="module")
def only_imp(built):
    """A second experiment in the same SQLite file (creating a store's tables takes seconds): IMP only,
    accuracy only, then a re-run of the sweep that reuses every finished run (as sweeps.driver does)."""
    from sweeps.tracking import start_parent_run

    sweep = {**SWEEP, "grid": {"seed": [0, 1]}, "variants": {"imp": {}},
             "evaluation": {"rounds": [0, 2, 4], "lmc": False}}
    with fast_sqlite():
        store = build_store(built.tmp, sweep, figure="fig2", experiment="only-imp", skip=(), fail=(), extras=False)
        reuse = [{"key": t.key, "variant": t.variant, "label": t.label(), "chain_hash": t.chain.hash(),
                  "rounds": t.rounds, "run_id": store["runs"][("convnet3", "imp", t.chain.seed)]}
                 for t in store["trials"]]
        rerun = start_parent_run(store["uri"], store["exp_id"], "fig2", "test", sweep, reuse)
    return SimpleNamespace(**store, rerun=rerun)


def test_figures_without_data_say_so(only_imp, tmp_path):
    import analysis

    out = tmp_path / "out"
    res = analysis.run("all", "only-imp", only_imp.uri, str(out), parent_run_id=only_imp.parent)
    made = {r.name for r in res["results"] if r.made}
    assert made == {"fig2"}
    for name in ("fig3_4", "fig5", "hessian", "fig6", "fig7"):
        assert not list(out.glob(f"{name}*.png")) and not list(out.glob(f"{name}*.csv")), name
        r = next(r for r in res["results"] if r.name == name)
        assert r.missing and not r.figures
    assert any("no distilled/synthetic run" in m for m in res["missing"])
    html = (out / "report.html").read_text()
    assert "not made (no data)" in html and "no run has landscape" in html
    rows = read_csv(out / "fig2.csv")
    assert {int(r["round"]) for r in rows} == {0, 2, 4}


def test_rerun_sweep_reads_reused_runs_through_trials_json(only_imp, tmp_path):
    import analysis

    # default: the newest sweep run of the experiment, which owns no child run itself
    res = analysis.run("fig2", "only-imp", only_imp.uri, str(tmp_path / "out"), log_to_mlflow=False)
    assert res["missing"] == [m for m in res["missing"] if m.startswith("fig2: no distilled")]
    rows = read_csv(tmp_path / "out" / "fig2.csv")
    r4 = next(r for r in rows if r["round"] == "4")
    assert int(r4["n_seeds"]) == 2 and num(r4["test_accuracy_mean"]) == pytest.approx(0.85)
    assert only_imp.rerun in (tmp_path / "out" / "report.html").read_text()


def test_cli_all_prints_paths(only_imp, tmp_path, capsys):
    from analysis.__main__ import main  # what `python -m analysis` runs

    out = tmp_path / "cli"
    rc = main(["all", "--experiment", "only-imp", "--tracking-uri", only_imp.uri, "--out", str(out),
               "--run-id", only_imp.parent, "--no-log"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    printed = re.findall(r"^(?:figure|table|report)\s+(\S+)$", stdout, re.M)
    assert sorted(printed) == sorted(str(out / n) for n in ("fig2.png", "fig2.svg", "fig2.csv", "report.html"))
    assert all(Path(x).exists() for x in printed)
    assert "missing: fig6: needs synthetic and IMP runs" in stdout


def test_cli_unknown_experiment_exits_2(built, capsys):
    from analysis.__main__ import main

    assert main(["fig6", "--experiment", "no-such-experiment", "--tracking-uri", built.uri,
                 "--out", str(built.tmp / "x")]) == 2
    err = capsys.readouterr().err
    assert "no-such-experiment" in err and "not found" in err


def test_cli_all_without_experiment_draws_every_sweep(only_imp, tmp_path, capsys):
    from analysis.__main__ import main

    out = tmp_path / "every"
    rc = main(["all", "--tracking-uri", only_imp.uri, "--out", str(out), "--no-log"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    for name in (EXPERIMENT, "only-imp"):  # both experiments of the store, each in its own folder
        assert (out / name / "report.html").exists() and f"{name}: " in stdout
    assert (out / EXPERIMENT / "fig6.png").exists() and (out / "only-imp" / "fig2.png").exists()
    index = (out / "index.html").read_text()
    assert f"{EXPERIMENT}/report.html" in index and "only-imp/report.html" in index
