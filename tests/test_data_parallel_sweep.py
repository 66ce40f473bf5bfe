"""A sweep whose chains train data-parallel: each Tune trial launches a Ray Train TorchTrainer of two
workers (gloo on the CPU), and a worker killed mid-round is retried from the store."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.runner import run_chain
from prunelab.store import ChainStore
from sweeps.config import ResourcesHparams, expand, load_sweep
from sweeps.preflight import check_one_device, check_workers

from sweeptools import (BASE, drive, masks, no_ray, ray_session, runs, steps, sweep_doc,  # noqa: F401
                        write_config)

# two epochs a round, so that a fault after the first epoch lands mid-round
DP_BASE = {**BASE, "pruning": {"rounds": 3}, "pruning_training": {"epochs": 2, "lr": 0.1, "batch_size": 128},
           "training": {"epochs": 1, "lr": 0.1, "batch_size": 128}}
DP_EVAL = {"rounds": [3], "lmc": False}  # the LMC pair data-parallel: tests/test_parallel.py
DP_RESOURCES = {"cpus_per_trial": 1, "workers_per_trial": 2, "max_failures": 1, "checkpoint_minutes": 0}


def test_a_data_parallel_sweep_killed_mid_round_ends_with_one_process_masks(tmp_path, capsys, ray_session):  # noqa: F811
    """Rank 0 of the chain's group dies by SIGKILL after round 2's first epoch (after its mid-round
    checkpoint): Ray Train fails the group, Tune retries the trial, the new group goes on from the
    store. ConvNet-3 (no batch norm) at global batch 128 on two workers gives one process's masks
    (float rounding apart, see tests/test_parallel.py), and the chain has one MLflow run."""
    ray_session()
    doc = sweep_doc(base=DP_BASE, variants={"imp": {}}, resources=DP_RESOURCES, evaluation=DP_EVAL)
    config = write_config(tmp_path, doc)
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--inject-fault", "2:1::kill", "--no-analysis")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "1 trials, 1 run, 0 reused, 0 failed" in out
    assert "2 workers × (1 CPU + 0 GPU)" in out

    (chain,) = runs(storage, "chain")
    parent = runs(storage, "sweep")[0].info.run_id
    key, chash = chain.data.tags["prunelab.trial_key"], chain.data.tags["prunelab.chain_hash"]
    assert [p.name for p in (storage / "store" / "faults" / parent / key).iterdir()] == ["1"]  # it was killed once
    assert chain.data.tags["prunelab.status"] == "finished" and chain.info.status == "FINISHED"
    assert chain.data.tags["prunelab.workers"] == "2"  # rank 0 of a group of two ran it
    assert list((storage / "ray" / "train").iterdir())  # Ray Train's records of the attempts
    for key in chain.data.metrics:  # every round and evaluation logged once, the killed attempt's included
        s = steps(storage, chain.info.run_id, key)
        assert len(s) == len(set(s)), f"{key} logged twice at a step: {s}"
    assert steps(storage, chain.info.run_id, "sparsity") == [0, 1, 2]
    assert steps(storage, chain.info.run_id, "test_accuracy") == [3]
    assert chain.data.metrics["test_accuracy"] > 0.5

    # the same chain by one process, outside Ray
    sweep, _ = load_sweep("fig6", "demo", [], config)
    (trial,) = expand(sweep, "fig6")
    assert trial.chain.hash() == chash
    one = run_chain(trial.chain, trial.evaluation, trial.rounds, ChainStore(tmp_path / "one", trial.chain))
    got = masks(storage, chash)
    assert sorted(got) == [f"round_{i:02d}.mask.pt" for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got["round_03.mask.pt"].values(), one.mask.values()))


def test_worker_counts_a_chain_cannot_use_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"gpus_per_trial.*workers_per_trial: 2 with gpus_per_trial: 1"):
        check_one_device(ResourcesHparams(gpus_per_trial=2))
    with pytest.raises(ConfigError, match=r"gpus_per_trial.*one whole GPU"):
        ResourcesHparams.from_dict({"gpus_per_trial": 0.5, "workers_per_trial": 2})
    # a global batch of 128 does not split over 3 workers: refused before anything runs, with the fix
    doc = sweep_doc(base=DP_BASE, variants={"imp": {}}, resources={**DP_RESOURCES, "workers_per_trial": 3},
                    evaluation=DP_EVAL)
    sweep, _ = load_sweep("fig6", "demo", [], write_config(tmp_path, doc))
    with pytest.raises(ConfigError, match=r"training\.batch_size.*multiple of 3.*workers_per_trial"):
        check_workers(expand(sweep, "fig6"))
    # a distilled set of 10 images (1 per class) has steps of 10: 16 workers could not all take part
    doc = sweep_doc(base={**DP_BASE, "pruning_data": {"kind": "distilled", "method": "dm", "ipc": 1}},
                    variants={"distilled": {}}, resources={**DP_RESOURCES, "workers_per_trial": 16},
                    evaluation=DP_EVAL)
    sweep, _ = load_sweep("fig6", "demo", [], write_config(tmp_path / "b", doc))
    with pytest.raises(ConfigError, match=r"workers_per_trial.*16 workers.*10 examples.*at most 10"):
        check_workers(expand(sweep, "fig6"))


def test_the_plan_counts_every_worker(tmp_path, capsys, no_ray):  # noqa: F811
    doc = sweep_doc(base=DP_BASE, variants={"imp": {}}, resources={**DP_RESOURCES, "gpus_per_trial": 1},
                    evaluation=DP_EVAL)
    config = write_config(tmp_path, doc)
    rc, out, _ = drive(capsys, config, tmp_path / "storage", "--dry-run")
    assert rc == 0 and "each 2 workers × (1 CPU + 1 GPU)" in out
    rc, out, _ = drive(capsys, config, tmp_path / "storage", "--dry-run", "--workers-per-trial", "1")
    assert rc == 0 and "each 1 CPU + 1 GPU" in out
    sweep, _ = load_sweep("fig6", "demo", [], config)
    (trial,) = expand(sweep, "fig6")
    two_s = trial.estimated_s()
    one_s = replace(trial, resources=ResourcesHparams(gpus_per_trial=1)).estimated_s()
    # two workers split the training arithmetic, not the per-step overhead nor the measurements
    assert one_s / 2 < two_s < one_s


def test_data_parallel_trials_start_no_more_than_the_cluster_holds(tmp_path, monkeypatch, capsys):
    # they hold no Tune resources themselves: without a bound Tune would start every one at once
    import ray

    from sweeps import autoscaler, launch

    doc = sweep_doc(base=DP_BASE, grid={"seed": [0, 1, 2, 3, 4]}, variants={"imp": {}},
                    resources={**DP_RESOURCES, "gpus_per_trial": 1, "workers_per_trial": 4}, evaluation=DP_EVAL)
    sweep, _ = load_sweep("fig6", "demo", [], write_config(tmp_path, doc))
    trials = expand(sweep, "fig6")
    node = {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [node, dict(node), {"Alive": False, "Resources": {"GPU": 8.0}}])
    monkeypatch.setattr(autoscaler, "can_grow", lambda address=None: False)
    assert launch.concurrency(trials, sweep.resources) == 2  # two nodes of 4 GPUs, 4 workers a chain
    assert "at most 2 at once" in capsys.readouterr().out
    small = {"Alive": True, "Resources": {"CPU": 6.0, "GPU": 4.0}}  # CPUs for one worker of 4 CPUs a node
    monkeypatch.setattr(ray, "nodes", lambda: [small, dict(small)])
    wide = [replace(t, resources=replace(t.resources, cpus_per_trial=4, workers_per_trial=2)) for t in trials]
    assert launch.concurrency(wide, sweep.resources) == 1
    assert launch.concurrency(trials, replace(sweep.resources, max_concurrent=3)) == 3  # the user's bound
    monkeypatch.setattr(autoscaler, "can_grow", lambda address=None: True)
    assert launch.concurrency(trials, sweep.resources) is None  # pending workers make it grow
