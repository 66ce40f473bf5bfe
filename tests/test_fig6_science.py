"""Figure 6's science: paired-bootstrap intervals, the controls, both BN modes, the undefined strip and
the verdict. Expected numbers are worked out by hand in the comments, never by calling the code under
test."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from analysis import fig6, stats
from prunelab.chain import Chain
from prunelab.data import DataSplit, ImageData
from prunelab.errors import ConfigError
from prunelab.evaluation import EvalHparams, control_subnetwork, evaluate_round
from prunelab.hparams import ChainHparams
from prunelab.masks import Mask, magnitude_prune, shuffle_layerwise
from prunelab.metrics import barrier_name
from prunelab.stability import LMCHparams, bn_batches, lmc_curve

# ------------------------------------------------------------------------------------------------
# the paired bootstrap


def test_bootstrap_intervals_match_hand_computation():
    # n = 2 enumerates the 4 resamples: means of (0,0) (0,1) (1,0) (1,1) = 0, .5, .5, 1.
    # numpy's linear percentile: 2.5% sits at position 0.025·3 = 0.075 → 0 + 0.075·0.5 = 0.0375;
    # 97.5% at 2.925 → 0.5 + 0.925·0.5 = 0.9625.
    i = stats.mean_interval([0.0, 1.0])
    assert (i.mean, i.lo, i.hi, i.n) == pytest.approx((0.5, 0.0375, 0.9625, 2))
    # paired difference: a − b = (1, 2) → resample means 1, 1.5, 1.5, 2 → [1.0375, 1.9625]
    d = stats.diff_interval([3.0, 5.0], [2.0, 3.0])
    assert (d.mean, d.lo, d.hi) == pytest.approx((1.5, 1.0375, 1.9625))
    # ratio of means: num (1, 3), den (1, 1) → 1, 2, 2, 3 → [1.075, 2.925]
    r = stats.ratio_interval([1.0, 3.0], [1.0, 1.0])
    assert (r.mean, r.lo, r.hi) == pytest.approx((2.0, 1.075, 2.925))
    # pairing matters: num = den seed by seed → every resample's ratio is exactly 1
    r = stats.ratio_interval([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert (r.mean, r.lo, r.hi, r.n) == (1.0, 1.0, 1.0, 3)
    # n = 3: the 27 resample means of (0, 0, 3) are 0 (×8), 1 (×12), 2 (×6), 3 (×1); sorted, the
    # 2.5% point is at position 0.65 (between two zeros) → 0, the 97.5% point at 25.35: the values
    # at 25 and 26 are 2 and 3 → 2.35
    i = stats.mean_interval([0.0, 0.0, 3.0])
    assert (i.mean, i.lo, i.hi) == pytest.approx((1.0, 0.0, 2.35))


def test_interval_edge_cases():
    one = stats.mean_interval([0.7])
    assert (one.mean, one.lo, one.hi, one.n) == (0.7, 0.7, 0.7, 1) and not one.excludes_zero
    assert stats.mean_interval([]).n == 0 and math.isnan(stats.mean_interval([]).mean)
    assert stats.mean_interval([1.0, float("nan"), 3.0]).n == 2  # non-finite seeds are dropped
    assert stats.mean_interval([1.0, 2.0]).excludes_zero and stats.mean_interval([-2.0, -1.0]).excludes_zero
    assert not stats.mean_interval([-1.0, 2.0]).excludes_zero
    big = stats.mean_interval([float(x) for x in range(10)])  # above EXACT_MAX_N: seeded draws
    assert big == stats.mean_interval([float(x) for x in range(10)]) and big.lo < 4.5 < big.hi
    with pytest.raises(ValueError):
        stats.diff_interval([1.0], [1.0, 2.0])


def test_verdict_word_follows_the_interval():
    I = stats.Interval
    assert stats.compare_word(I(-0.3, -0.5, -0.1, 3)) == "lower"
    assert stats.compare_word(I(0.3, 0.1, 0.5, 3)) == "higher"
    assert stats.compare_word(I(-0.3, -0.5, 0.1, 3)) == "indistinguishable from"
    assert stats.compare_word(I(-0.3, -0.3, -0.3, 1)) == "indistinguishable from"  # one seed: no claim


# ------------------------------------------------------------------------------------------------
# controls


def test_shuffled_mask_keeps_every_layer_count_and_moves_weights(tiny_chain_hp, digits):
    chain = Chain(tiny_chain_hp, data=digits, pruning_data=digits.train)
    mask = magnitude_prune(chain.mask, chain.state.init, 0.6)
    shuffled = shuffle_layerwise(mask, seed=3)
    assert list(shuffled) == list(mask)
    for n in mask:
        assert shuffled[n].shape == mask[n].shape and shuffled[n].dtype == torch.bool
        assert int(shuffled[n].sum()) == int(mask[n].sum()), n
    assert not shuffled.equal(mask)
    assert shuffle_layerwise(mask, seed=3).equal(shuffled) and not shuffle_layerwise(mask, seed=4).equal(shuffled)
    w, m = control_subnetwork(tiny_chain_hp, digits, chain.state.init, mask, "shuffled")
    assert w is chain.state.init and [int(v.sum()) for v in m.values()] == [int(v.sum()) for v in mask.values()]


def test_reinit_control_keeps_the_mask_and_changes_the_init(tiny_chain_hp, digits):
    chain = Chain(tiny_chain_hp, data=digits, pruning_data=digits.train)
    mask = magnitude_prune(chain.mask, chain.state.init, 0.5)
    w, m = control_subnetwork(tiny_chain_hp, digits, chain.state.init, mask, "reinit")
    assert m is mask
    assert set(w) == set(chain.state.init)
    for k in mask:
        assert w[k].shape == chain.state.init[k].shape and not torch.equal(w[k], chain.state.init[k])
    again, _ = control_subnetwork(tiny_chain_hp, digits, chain.state.init, mask, "reinit")
    assert all(torch.equal(again[k], w[k]) for k in w)  # seeded: reproducible
    other, _ = control_subnetwork(tiny_chain_hp.replace(seed=1), digits, chain.state.init, mask, "reinit")
    assert not torch.equal(other["features.0.weight"], w["features.0.weight"])
    # not the initialization of any chain seed either (IMP and synthetic chains of seed s share Chain.new_model)
    for s in range(3):
        init = Chain(tiny_chain_hp.replace(seed=s), data=digits, pruning_data=digits.train).state.init
        assert not torch.equal(init["features.0.weight"], w["features.0.weight"])


def test_evaluate_round_records_controls_in_both_bn_modes(digits):
    hp = ChainHparams.from_dict({"model": {"name": "resnet10_bn", "width": 4}, "pruning": {"rounds": 1},
                                 "training": {"epochs": 1, "lr": 0.05}})
    ev = EvalHparams(rounds=(1,), controls=("shuffled", "reinit"),
                     lmc_hparams=LMCHparams(num_points=3, eval_examples=120, bn_batches=2, bn_batch_size=32))
    chain = Chain(hp, data=digits, pruning_data=digits.train)
    mask = magnitude_prune(chain.mask, chain.state.init, 0.5)
    out = evaluate_round(hp, ev, digits, chain.state.init, mask, 1)
    m = out["metrics"]
    for ctl in (None, "shuffled", "reinit"):
        for mode in ("interpolate", "recompute"):
            assert barrier_name("mid", "test", "error", mode, ctl) in m
        assert ("control_" + ctl + "_test_accuracy" if ctl else "test_accuracy") in m
    # the plain names are the primary mode's (interpolate), the BN modes differ on a BN network
    assert m["barrier_mid_train_loss"] == m[barrier_name("mid", "train", "loss", "interpolate")]
    assert m[barrier_name("mid", "train", "loss", "recompute")] != m["barrier_mid_train_loss"]
    assert set(out["lmc"]["controls"]) == {"shuffled", "reinit"}
    assert set(out["lmc"]["by_bn_mode"]) == {"interpolate", "recompute"}
    with pytest.raises(ConfigError, match="controls"):
        EvalHparams.from_dict({"controls": ["bogus"]})
    with pytest.raises(ConfigError, match="controls"):
        EvalHparams.from_dict({"controls": ["shuffled"], "lmc": False})


# ------------------------------------------------------------------------------------------------
# BN recompute against a hand reset of the running statistics


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_bn_recompute_equals_a_hand_reset(digits):
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    for m in (a, b):  # trained-looking, different statistics
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    small = DataSplit(digits.train.subset(torch.arange(200)), digits.test.subset(torch.arange(100)))
    lh = LMCHparams(num_points=3, bn_mode="recompute", bn_batches=3, bn_batch_size=40, splits=("test",),
                    both_bn_modes=False)
    curve = lmc_curve(a, b, small, lh)
    assert curve["bn_recomputed"]
    # by hand at α = 0.5: average the weights, then set running mean / var to the average over the same
    # three batches of each batch's mean / unbiased variance (momentum None: a plain average)
    hand = Tiny()
    sa, sb = a.state_dict(), b.state_dict()
    hand.load_state_dict({k: (0.5 * sa[k] + 0.5 * sb[k]) if sa[k].is_floating_point() else sa[k] for k in sa})
    batches = bn_batches(small.train, "cpu", 3, 40)
    with torch.no_grad():
        feats = [hand.conv(x) for x in batches]
        hand.bn.running_mean.copy_(torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0))
        hand.bn.running_var.copy_(torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True)
                                               for f in feats]).mean(0))
        hand.eval()
        x = small.test.normalize(small.test.pixels(small.test.x))
        loss = nn.functional.cross_entropy(hand(x), small.test.y).item()
    assert curve["test_loss"][1] == pytest.approx(loss, rel=1e-5)
    interp = lmc_curve(a, b, small, lh.replace(bn_mode="interpolate"))
    assert interp["test_loss"][1] != pytest.approx(loss, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# Figure 6 from fake chains: the strip, the CSV, the verdict


class FakeChain:
    """What analysis.fig6 reads of a chain: identity, and per-round metric histories."""

    def __init__(self, kind: str, seed: int, metrics: dict, ipc=None):
        self.seed, self.ipc, self.kind = seed, ipc, kind
        self.dataset, self.model, self.rewind_epoch = "digits", "resnet10_bn", 0
        self.is_imp, self.is_synthetic = kind == "imp", kind == "synthetic"
        self.label = "IMP (k=0)" if kind == "imp" else f"distilled ipc{ipc}"
        self.setting = (self.dataset, self.model)
        self.real_per_class = 143.8
        self.params = {"training.lr": "0.1", "training.epochs": "10", "pruning_training.lr": "0.1",
                       "pruning_training.epochs": "10", "model.width": "8"}
        self.tags = {}
        self.seed_scope = "training"
        self._m = metrics  # name -> {round: value}

    def has(self, key):
        return key in self._m

    def history(self, key):
        return self._m.get(key, {})

    def sparsity_at(self, r):
        return 1 - 0.8 ** r

    def describe(self):
        return f"{self.label} seed {self.seed}"


def _metrics(acc: dict, bar: dict, controls: dict | None = None) -> dict:
    """acc/bar: round -> value, the same barrier in both BN modes (recompute = half) and the controls'."""
    m = {"test_accuracy": acc}
    for mode, scale in (("interpolate", 1.0), ("recompute", 0.5)):
        m[barrier_name("mid", "train", "loss", mode)] = {r: v * scale for r, v in bar.items()}
    for ctl, (cacc, cbar) in (controls or {}).items():
        m[f"control_{ctl}_test_accuracy"] = cacc
        for mode, scale in (("interpolate", 1.0), ("recompute", 0.5)):
            m[barrier_name("mid", "train", "loss", mode, ctl)] = {r: v * scale for r, v in cbar.items()}
    return m


def _sweep():
    # IMP barriers: clearly positive at round 4 (0.4, 0.5, 0.6); around zero at round 9 (0.1, −0.1, 0.05)
    imp_bar = {0: {4: 0.4, 9: 0.1}, 1: {4: 0.5, 9: -0.1}, 2: {4: 0.6, 9: 0.05}}
    syn_bar = {0: {4: 0.1, 9: 0.2}, 1: {4: 0.2, 9: 0.1}, 2: {4: 0.15, 9: 0.3}}
    chains = []
    for s in (0, 1, 2):
        shuf = ({4: 0.8, 9: 0.7}, {4: 0.9 + 0.1 * s, 9: 0.8})  # shuffled: always far higher
        chains.append(FakeChain("imp", s, _metrics({4: 0.9, 9: 0.8}, imp_bar[s], {"shuffled": shuf})))
        chains.append(FakeChain("synthetic", s, _metrics({4: 0.85, 9: 0.7}, syn_bar[s], {"shuffled": shuf}), ipc=10))
    return SimpleNamespace(ok=chains, failed=[])


def test_fig6_rows_strip_and_verdict(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(fig6, "save_fig", lambda fig, out, stem, res: figs.append((stem, fig)))
    res = fig6.make(_sweep(), str(tmp_path))
    with open(tmp_path / "fig6.csv", newline="") as f:
        rows = {(r["sparsity"][:4], r["bn_mode"], r["source"]): r for r in csv.DictReader(f)}
    assert {k[2] for k in rows} == {"imp", "synthetic", "shuffled_imp", "shuffled_synthetic"}
    r = rows[("0.59", "interpolate", "synthetic")]
    # ratio of seed means: (0.1 + 0.2 + 0.15) / (0.4 + 0.5 + 0.6) = 0.45 / 1.5 = 0.3
    assert float(r["barrier_ratio_mean"]) == pytest.approx(0.3)
    assert float(r["acc_ratio_mean"]) == pytest.approx(0.85 / 0.9)
    assert float(r["imp_barrier_mean"]) == pytest.approx(0.5) and float(r["synthetic_barrier_mean"]) == pytest.approx(0.15)
    assert r["ratio_defined"] == "True" and r["n_seeds"] == "3"
    assert float(r["barrier_ratio_lo"]) < 0.3 < float(r["barrier_ratio_hi"])
    assert rows[("0.59", "recompute", "synthetic")]["imp_barrier_mean"] != r["imp_barrier_mean"]
    u = rows[("0.86", "interpolate", "synthetic")]
    # IMP at 87%: (0.1 − 0.1 + 0.05) / 3 with an interval that includes 0 → undefined, no ratio written
    assert u["ratio_defined"] == "False" and u["barrier_ratio_mean"] == ""
    assert float(u["imp_barrier_lo"]) < 0 < float(u["imp_barrier_hi"])
    assert u["acc_ratio_mean"] != ""  # the accuracy ratio stays real

    # the figure: undefined points sit in the strip (2nd axes), never on the ratio axis (1st)
    stem, fig = figs[0]
    assert stem == "fig6" and [s for s, _ in figs] == ["fig6", "fig6_bn_recompute"]
    ratio_ax, strip_ax = fig.axes[0], fig.axes[1]
    on_axis = [tuple(p) for c in ratio_ax.collections for p in c.get_offsets()]
    in_strip = [tuple(p) for c in strip_ax.collections for p in c.get_offsets()]
    acc87 = 0.7 / 0.8
    assert any(y == pytest.approx(acc87) for _, y in in_strip)
    assert not any(y == pytest.approx(acc87) for _, y in on_axis)
    assert any(x == pytest.approx(0.3) and y == pytest.approx(0.85 / 0.9) for x, y in on_axis)
    title = fig._suptitle.get_text()
    assert "interpolated" in title and "train loss" in title and "seeds vary the training only" in title

    verdict = (tmp_path / "verdict.md").read_text()
    lines = [l for l in verdict.splitlines() if l.startswith("| digits")]
    at = lambda sp, mode, comp: next(l for l in lines if f"| {sp} | {mode} | {comp} |" in l)  # noqa: E731
    # 60%: synthetic − IMP = (−0.3, −0.3, −0.45): every resample below 0 → lower
    assert "synthetic barrier lower than IMP" in at("60%", "interpolate", "synthetic vs IMP")
    assert "n=3" in at("60%", "interpolate", "synthetic vs IMP")
    # 87%: synthetic − IMP = (0.1, 0.2, 0.25) → higher
    assert "synthetic barrier higher than IMP" in at("87%", "interpolate", "synthetic vs IMP")
    assert "lower than shuffled synthetic" in at("60%", "interpolate", "synthetic vs shuffled synthetic")
    assert "IMP barrier lower than shuffled IMP" in at("60%", "interpolate", "IMP vs shuffled IMP")
    assert any("undefined" in n for n in res.notes) and res.markdown


def test_one_seed_makes_no_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(fig6, "save_fig", lambda *a: None)
    sweep = _sweep()
    sweep.ok = [c for c in sweep.ok if c.seed == 0]
    fig6.make(sweep, str(tmp_path))
    with open(tmp_path / "fig6.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["ratio_defined"] == "False" and r["n_seeds"] == "1" for r in rows)
    assert "indistinguishable" in (tmp_path / "verdict.md").read_text()
    assert "lower" not in (tmp_path / "verdict.md").read_text().split("---|")[-1]


def test_seeds_pair_by_seed():
    assert stats.pair_by_seed({0: 1.0, 2: 3.0, 5: 9.0}, {2: 4.0, 0: 2.0}) == ([0, 2], [1.0, 3.0], [2.0, 4.0])


def test_a_ratio_needs_imp_barriers_above_zero_in_every_seed():
    row = lambda bars: fig6.Row("digits", "m", "x", 10, "60%", "interpolate", "synthetic", [0, 1, 2],  # noqa: E731
                                extra={"imp_barriers": bars})
    assert row([0.5, 0.2, 0.8]).defined
    assert not row([0.1, -0.1, 0.3]).defined        # one seed without a barrier
    assert not row([-0.01, -0.02, -0.005]).defined  # below 0: IMP is already linearly connected
    assert not row([0.5]).defined                   # one seed: no interval
    # (−0.1, 1, 1): the mean's 2.5% point is above 0 (exact enumeration: 0.138), yet the resample
    # (−0.1, −0.1, −0.1) divides by a negative barrier, and the ratio interval straddles 0
    assert stats.mean_interval([-0.1, 1.0, 1.0]).lo > 0 and not row([-0.1, 1.0, 1.0]).defined
    assert stats.ratio_interval([0.5, 0.5, 0.5], [-0.1, 1.0, 1.0]).lo < 0
