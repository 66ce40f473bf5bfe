"""Planning at paper scale: `--dry-run` plans without data roots (each data problem one warning line),
ends with the plan's totals, and costs each training phase in its own precision. Nothing here
starts Ray: a dry run never does, and a run with missing data stops before it."""

from __future__ import annotations

import re

import pytest

from prunelab.cost import Cost, chain_cost
from prunelab.errors import ConfigError
from prunelab.evaluation import EvalHparams
from prunelab.hparams import ChainHparams
from sweeps.config import ResourcesHparams, Trial, expand, load_sweep
from sweeps.driver import main
from sweeps.plan import estimates
from sweeps.preflight import check_data
from sweeptools import FIGURE, no_ray, sweep_doc, write_config  # noqa: F401

TOTALS = re.compile(r"^total: (\d+) trials \((\d+) to run\), ([\d.]+) chain-hours; (.*)$")


def dry_run(capsys, monkeypatch, *argv: str) -> tuple[int, list[str], str]:
    monkeypatch.delenv("PRUNELAB_STORE", raising=False)
    capsys.readouterr()
    rc = main(FIGURE, ["--dry-run", *argv])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_paper_preset_plans_without_data_roots(tmp_path, capsys, monkeypatch, no_ray):
    storage = tmp_path / "runs"
    rc, lines, err = dry_run(capsys, monkeypatch, "--preset", "paper", "--storage-path", str(storage))
    assert rc == 0, err
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    assert any(ln.startswith("warning: dataset.root: cifar10 needs a local data directory — fix: --set root=")
               for ln in warnings), lines[:10]
    assert len(warnings) == len(set(warnings)), "a problem was reported twice"
    listing = next(i for i, ln in enumerate(lines) if re.match(r"^\d+ trials \(", ln))
    assert max(lines.index(w) for w in warnings) < listing, "warnings come before the trial list"

    trials = expand(load_sweep("fig6", "paper", [])[0], "fig6")
    totals = [m for m in map(TOTALS.match, lines) if m]
    assert len(totals) == 1 and lines[-1] == totals[0].group(0), lines[-3:]
    n, todo, chain_hours, rest = totals[0].groups()
    assert int(n) == int(todo) == len(trials)
    # the sums of the per-trial estimates: every chain's hours, and g x hours on a GPU
    est = estimates(trials)
    assert float(chain_hours) == pytest.approx(sum(est.values()) / 3600, rel=0.01)
    gpu = sum(t.resources.gpus_per_trial * est[t.key] / 3600 for t in trials)
    gpu_shown = re.search(r"([\d.]+) GPU-hours with packing", rest)
    assert gpu_shown and float(gpu_shown.group(1)) == pytest.approx(gpu, rel=0.01)
    assert gpu < sum(est.values()) / 3600  # the distilled variants pack four chains to a GPU
    largest = max(trials, key=lambda t: est[t.key])
    assert f"largest: {largest.label()} " in rest
    assert "CPU-hours" not in rest  # every paper chain has a GPU
    assert not storage.exists(), "a dry run wrote to the storage path"


def test_the_imagenet_scale_preset_plans_its_workers(tmp_path, capsys, monkeypatch, no_ray):  # noqa: F811
    # fig7's paper+: ResNet-50 on ImageNet-1k, each chain on 8 data-parallel workers of one GPU each
    monkeypatch.delenv("PRUNELAB_STORE", raising=False)
    capsys.readouterr()
    assert main("fig7", ["--dry-run", "--preset", "paper+", "--storage-path", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("warning: dataset.root: imagenet needs a local data directory") for ln in lines)
    assert any(ln.endswith("each 8 workers × (8 CPU + 1 GPU); longest first (~ a rough time left per chain, "
                           "from its config and what the store holds):") for ln in lines), lines[:3]
    trials = expand(load_sweep("fig7", "paper+", [])[0], "fig7")
    assert {(t.chain.model.name, t.chain.dataset.name, t.chain.pruning.rewind_epoch) for t in trials} == {
        ("resnet50_bn", "imagenet", 0), ("resnet50_bn", "imagenet", 6)}
    est = estimates(trials)
    (total,) = [m for m in map(TOTALS.match, lines) if m]
    gpu_shown = float(re.search(r"([\d.]+) GPU-hours", total.group(4)).group(1))
    assert gpu_shown == pytest.approx(sum(8 * est[t.key] / 3600 for t in trials), rel=0.01)  # every worker's GPU
    # the recipe's schedule: 5 warm-up epochs at batch 1024, x0.1 at epochs 30, 60, 80 of 90
    tr = trials[0].chain.training
    assert tr.warmup_steps == 5 * -(-1_281_167 // 1024) and tr.batch_size == 1024
    assert [round(m * tr.epochs) for m in tr.milestones] == [30, 60, 80]


def test_demo_dry_run_has_no_warnings(tmp_path, capsys, monkeypatch, no_ray):
    rc, lines, err = dry_run(capsys, monkeypatch, "--storage-path", str(tmp_path / "runs"))
    assert rc == 0, err
    assert not [ln for ln in lines if "warning" in ln], lines
    m = TOTALS.match(lines[-1])
    assert m and int(m.group(1)) == len(expand(load_sweep("fig6", "demo", [])[0], "fig6"))
    assert "CPU-hours" in m.group(4) and "GPU-hours" not in m.group(4)


MISSING = ["--set", "dataset=cifar10", "root=/nonexistent/cifar", "pruning_data.kind=idc_file",
           "pruning_data.path=/nonexistent/idc/data.pt"]


def test_every_data_problem_is_one_warning(tmp_path, capsys, monkeypatch, no_ray):
    config = write_config(tmp_path, sweep_doc())
    rc, lines, err = dry_run(capsys, monkeypatch, "--config", config, "--storage-path", str(tmp_path / "runs"),
                             *MISSING)
    assert rc == 0, err
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    # the root and the IDC file, each checked for every trial (two here), each said once
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("warning: dataset.root: /nonexistent/cifar lacks ") and "fix:" in warnings[0]
    assert warnings[1].startswith("warning: pruning_data.path: no IDC data.pt at /nonexistent/idc/data.pt — fix:")
    assert all(w.endswith("[2 trials]") for w in warnings)
    assert TOTALS.match(lines[-1])


def test_missing_data_still_stops_a_run_before_ray(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.delenv("PRUNELAB_STORE", raising=False)
    storage = tmp_path / "runs"
    config = write_config(tmp_path, sweep_doc())
    for argv, field in ((["--preset", "paper"], "dataset.root"), (["--config", config, *MISSING], "dataset.root"),
                        (["--config", config, *MISSING[:1], *MISSING[3:]], "pruning_data.path")):
        capsys.readouterr()
        rc = main(FIGURE, ["--storage-path", str(storage), *argv])
        out, err = capsys.readouterr()
        assert rc == 2, (out, err)
        assert err.startswith(f"error: {field}: ") and len(err.strip().splitlines()) == 1, err
        assert "warning" not in out and "total:" not in out
        assert not storage.exists()


def test_check_data_raises_the_first_problem_or_collects_them_all():
    hp = ChainHparams.from_dict({"dataset": {"name": "cifar10", "root": "/nonexistent/cifar"},
                                 "pruning_data": {"kind": "idc_file", "path": "relative/idc"}})
    with pytest.raises(ConfigError) as first:
        check_data(hp)
    found: list = []
    check_data(hp, found)
    assert [e.field for e in found] == ["dataset.root", "pruning_data.path"]
    assert str(found[0]) == str(first.value)


def chain(pruning: str, training: str) -> ChainHparams:
    return ChainHparams.from_dict({
        "dataset": {"name": "cifar10"}, "model": {"name": "convnet3"}, "pruning": {"rounds": 2},
        "pruning_data": {"kind": "distilled", "method": "dm", "ipc": 10},
        "pruning_training": {"epochs": 20, "precision": pruning}, "training": {"epochs": 2, "precision": training}})


def test_gpu_estimates_follow_each_phase_precision():
    ev = EvalHparams(lmc=True)
    cost = {p: chain_cost(chain(*p), ev, [1, 2]) for p in
            (("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"))}
    gpu = {p: c["total"].seconds("gpu") for p, c in cost.items()}
    assert gpu["bf16", "bf16"] < gpu["bf16", "fp32"] < gpu["fp32", "fp32"]
    assert gpu["bf16", "bf16"] < gpu["fp32", "bf16"] < gpu["fp32", "fp32"]
    # precision changes the rate, never what is counted
    assert len({(c["total"].steps, c["total"].flops) for c in cost.values()}) == 1
    # in a bf16 phase only the training runs under autocast: the pruning set's fit passes, the
    # evaluation's forward passes and the distiller stay fp32
    pruning_bf16 = cost["bf16", "fp32"]
    assert 0 < pruning_bf16["pruning"].bf16_flops < pruning_bf16["pruning"].flops
    assert pruning_bf16["evaluation"].bf16_flops == 0 and pruning_bf16["synthetic"].bf16_flops == 0
    ev_bf16 = cost["fp32", "bf16"]["evaluation"]
    assert 0 < ev_bf16.bf16_flops < ev_bf16.flops and cost["fp32", "bf16"]["pruning"].bf16_flops == 0
    for p, c in cost.items():  # a CPU ignores precision
        assert c["total"].seconds("cpu") == cost["fp32", "fp32"]["total"].seconds("cpu")
        assert c["total"].seconds("cpu", threads=4) == cost["fp32", "fp32"]["total"].seconds("cpu", threads=4)


def test_trial_estimates_follow_precision_on_a_gpu_only():
    def trial(precision: str, gpus: float) -> Trial:
        return Trial("imp", chain(precision, precision), [2], EvalHparams(lmc=False), {},
                     ResourcesHparams(cpus_per_trial=2, gpus_per_trial=gpus))

    assert trial("bf16", 1).estimated_s() < trial("fp32", 1).estimated_s()
    assert trial("bf16", 0).estimated_s() == trial("fp32", 0).estimated_s()


def test_cost_arithmetic_keeps_the_bf16_share():
    a, b = Cost(2, 10.0, 4.0), Cost(1, 5.0)
    assert a + b == Cost(3, 15.0, 4.0) and 2 * a == Cost(4, 20.0, 8.0)
    assert Cost(0, 1e13, 1e13).seconds("gpu") < Cost(0, 1e13).seconds("gpu")
    assert Cost(0, 1e13, 1e13).seconds("cpu") == Cost(0, 1e13).seconds("cpu")
