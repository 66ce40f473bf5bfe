"""The sweep layer end to end: sweeps.driver on a real local Ray, logging to a temporary MLflow SQLite
store, on tiny digits chains (ConvNet-3 width 8, a few 1-epoch rounds).

One Ray session is shared by the module (`ray_session`); the tests that must see no Ray at all
(--dry-run) come first and shut it down if something started it. The two-node test starts its
own cluster with `ray start` in subprocesses and runs the driver in a subprocess against it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sweeptools import (BASE, DISTILLED, FIGURE, ROOT, artifact_paths, cache_dir, check_metric_steps, drive,  # noqa: F401
                        figure_paths, masks, mlflow_client, mlflow_server, no_ray, ray_session,
                        reference_sweep, rest, runs, sweep_doc, two_nodes, write_config)

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# without Ray: --dry-run (bad input is in tests/reliability/test_bad_input.py)


def test_dry_run_starts_nothing(tmp_path, capsys, no_ray):
    config = write_config(tmp_path, sweep_doc(grid={"seed": [0, 1]}))
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--dry-run")
    assert rc == 0, err
    assert out.startswith("4 trials (0 already complete), resources per trial below; longest first")
    lines = [ln for ln in out.splitlines() if ln.startswith("  run  ")]
    assert len(lines) == 4
    # listed in the order they would start: the estimates never increase down the list
    from sweeps.config import expand, load_sweep

    estimate = {t.key: t.estimated_s() for t in expand(load_sweep(FIGURE, "demo", (), config)[0], FIGURE)}
    listed = [estimate[ln.split()[1]] for ln in lines]
    assert listed == sorted(listed, reverse=True) and listed[0] > listed[-1]
    assert sorted(ln.rsplit("[", 1)[1] for ln in lines) == ["0.5 CPU + 0 GPU]"] * 2 + ["1 CPU + 0 GPU]"] * 2
    labels = sorted(ln.split()[2] for ln in lines)
    assert labels == ["distilled,seed=0", "distilled,seed=1", "imp,seed=0", "imp,seed=1"]
    assert all("rounds->4 eval@[2, 4]" in ln for ln in lines)
    assert len({ln.split()[1] for ln in lines}) == 4  # distinct trial keys
    assert not no_ray.is_initialized()
    assert not storage.exists()


# ---------------------------------------------------------------------------------------------
# with the module's Ray


def test_sweep_end_to_end(reference_sweep):
    r = reference_sweep
    storage = r["storage"]
    assert r["rc"] == 0, r["out"][-3000:] + r["err"][-3000:]
    assert "2 trials, 2 run, 0 reused, 0 failed" in r["out"]

    parents = runs(storage, "sweep")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prunelab.figure"] == FIGURE
    local = mlflow_client(storage).download_artifacts(parent.info.run_id, "sweep/trials.json", str(storage / "dl"))
    trials = json.loads(Path(local).read_text())
    assert len(trials) == 2

    chains = runs(storage, "chain")
    assert len(chains) == 2
    assert {c.data.tags["prunelab.trial_key"] for c in chains} == {t["key"] for t in trials}
    kinds = set()
    for c in chains:
        tags, params = c.data.tags, c.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["prunelab.status"] == "finished"
        assert c.info.status == "FINISHED"
        assert tags["prunelab.variant"] in ("imp", "distilled")
        assert re.fullmatch(r"[0-9a-f]{20,}", tags["prunelab.node_id"]), tags.get("prunelab.node_id")
        # each variant got its own share: Ray's assignment, as the trial saw it
        want = {"imp": {"CPU": 1.0}, "distilled": {"CPU": 0.5}}[tags["prunelab.variant"]]
        assert json.loads(tags["prunelab.resources"]) == want
        assert params["dataset.name"] == "digits" and params["model.name"] == "convnet3"
        assert params["eval.rounds"] == "2,4"
        kinds.add(params["pruning_data.kind"])
        if tags["prunelab.variant"] == "distilled":
            assert params["pruning_data.method"] == "dm" and params["pruning_data.ipc"] == "1"
        check_metric_steps(storage, c)
        rid = c.info.run_id
        sparsity = {m.step: m.value for m in mlflow_client(storage).get_metric_history(rid, "eval_sparsity")}
        assert sparsity[4] == pytest.approx(1 - 0.8 ** 4, abs=0.01)
        assert artifact_paths(storage, rid, "lmc") == {"lmc/round_02.json", "lmc/round_04.json"}
        assert artifact_paths(storage, rid, "masks") == {f"masks/round_{r:02d}.pt{x}" for r in (2, 4) for x in ("", ".sha256")}
        lmc = json.loads(Path(mlflow_client(storage).download_artifacts(rid, "lmc/round_04.json",
                                                                        str(storage / "dl"))).read_text())
        assert isinstance(lmc, dict) and lmc, "empty LMC artifact"
        # the result store holds every round's mask of this chain
        assert sorted(masks(storage, tags["prunelab.chain_hash"])) == [f"round_{i:02d}.mask.pt" for i in range(5)]
    assert kinds == {"real", "distilled"}

    pngs = figure_paths(r["out"])
    assert pngs, r["out"][-2000:]
    for p in pngs:
        assert p.parent == storage / "figures" / FIGURE
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_computes_nothing(reference_sweep, capsys, no_ray):
    """No Ray is needed (or started) when every trial is already complete."""
    r = reference_sweep
    storage = r["storage"]
    assert r["rc"] == 0
    before = {c.info.run_id for c in runs(storage, "chain")}
    figures = storage / "figures" / FIGURE
    for p in figures.glob("*"):
        p.unlink()
    rc, out, err = drive(capsys, r["config"], storage)
    assert rc == 0, err
    assert "2 trials (2 already complete)" in out
    assert "nothing to compute" in out
    assert "2 trials, 0 run, 2 reused, 0 failed" in out
    assert {c.info.run_id for c in runs(storage, "chain")} == before
    parents = runs(storage, "sweep")
    assert len(parents) == 2
    # the new sweep run lists the reused runs, which the analysis reads through sweep/trials.json
    newest = max(parents, key=lambda p: p.info.start_time)
    c = mlflow_client(storage)
    local = c.download_artifacts(newest.info.run_id, "sweep/trials.json", str(storage / "dl2"))
    assert {t["run_id"] for t in json.loads(Path(local).read_text())} == before
    pngs = figure_paths(out)
    assert pngs and all(p.exists() and p.parent == figures for p in pngs)
    # the reused chain runs name the sweep run that reused them
    assert {c.get_run(i).data.tags.get("prunelab.reused_by") for i in before} == {newest.info.run_id}
    # nothing to compute and nothing to draw: no sweep run at all
    rc, out, err = drive(capsys, r["config"], storage, "--no-analysis")
    assert rc == 0 and "nothing to draw" in out, err
    assert len(runs(storage, "sweep")) == 2


def test_the_mlflow_view_of_a_sweep(reference_sweep, tmp_path):
    """What a researcher reads in the MLflow UI, through the REST API the UI uses (an `mlflow server`
    over the sweep's SQLite store): the experiment's kind and description, short distinct run names,
    the source commit, the data sets as inputs, LMC curves as metric series (one step per α); and
    masks that plain PyTorch reads."""
    import hashlib

    storage = reference_sweep["storage"]
    with mlflow_server(tmp_path, db=storage / "mlflow.db") as uri:
        exp = rest(uri, "experiments/get-by-name", {"experiment_name": f"prunelab-{FIGURE}"})["experiment"]
        exp_tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        found = rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
                     post=True)["runs"]
        chains = [run for run in found if {t["key"]: t["value"] for t in run["data"]["tags"]}.get(
            "prunelab.role") == "chain"]
        curves = {run["info"]["run_id"]: {
            r: rest(uri, "metrics/get-history", {"run_id": run["info"]["run_id"],
                                                 "metric_key": f"lmc_curve/r{r:02d}/interpolate/train_loss"})
            for r in (2, 4)} for run in chains}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development" and exp_tags.get("mlflow.note.content")
    names = [run["info"]["run_name"] for run in chains]
    assert len(set(names)) == len(names) == 2 and all("," not in n and "/" not in n for n in names), names
    assert any(n.startswith("distilled convnet3 digits ipc1 s0") for n in names), names
    c = mlflow_client(storage)
    for run in chains:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.source.git.commit"] == tags["prunelab.git_commit"]
        assert tags["prunelab.git_dirty"] in ("true", "false", "unknown") and tags["mlflow.source.name"] == "sweeps/fig6.py"
        inputs = {(d["dataset"]["name"], t["value"]) for d in run["inputs"]["dataset_inputs"] for t in d["tags"]}
        assert ("digits", "training") in inputs, inputs
        if tags["prunelab.variant"] == "distilled":
            assert ("digits-dm-ipc1", "pruning") in inputs, inputs
        for r, history in curves[run["info"]["run_id"]].items():
            assert sorted(m["step"] for m in history["metrics"]) == list(range(11)), r  # one step per α, once
        local = Path(c.download_artifacts(run["info"]["run_id"], "masks", str(tmp_path / run["info"]["run_id"])))
        mask = torch.load(local / "round_02.pt", weights_only=True)  # plain PyTorch, no prunelab needed
        assert mask and all(v.dtype == torch.bool for v in mask.values())
        digest = (local / "round_02.pt.sha256").read_text().split()[0]
        assert digest == hashlib.sha256((local / "round_02.pt").read_bytes()).hexdigest()
        # the dense initialization the masks apply to, as a plain state dict with its checksum
        weights = Path(c.download_artifacts(run["info"]["run_id"], "weights", str(tmp_path / "w" / run["info"]["run_id"])))
        init = torch.load(weights / "init.pt", weights_only=True)
        assert set(mask) <= set(init) and all(init[k].shape == mask[k].shape for k in mask)
        assert (weights / "init.pt.sha256").read_text().split()[0] == hashlib.sha256(
            (weights / "init.pt").read_bytes()).hexdigest()


def test_a_chain_being_computed_elsewhere_is_waited_for(tmp_path, capsys, ray_session):
    """A trial whose chain another process is computing (it holds the chain's lease, as a trial of
    another sweep leaves) waits, then continues from that state instead of training it again."""
    import threading

    from prunelab.chain import Chain
    from prunelab.store import ChainStore
    from sweeps.config import expand, load_sweep

    ray_session()
    config = write_config(tmp_path, sweep_doc(variants={"imp": {}}))
    storage = tmp_path / "storage"
    (trial,) = expand(load_sweep(FIGURE, "demo", (), config)[0], FIGURE)
    store = ChainStore(storage / "store", trial.chain)
    lease = store.lease()
    assert lease.try_acquire()  # this process computes the chain; the trial runs in another
    written, t0 = {}, time.time()

    def compute_elsewhere():
        chain = Chain(trial.chain, "cpu")
        while not chain.done:
            chain.step()
            store.save_state(chain.state)
        written["mtime"] = (store.dir / "state.pt").stat().st_mtime_ns
        time.sleep(max(0.0, t0 + 12 - time.time()))  # still "computing" well after the trial has started
        written["released"] = time.time()
        lease.release()

    other = threading.Thread(target=compute_elsewhere)
    other.start()
    rc, out, err = drive(capsys, config, storage)
    other.join()
    assert rc == 0, out[-2000:] + err[-2000:]
    assert (store.dir / "state.pt").stat().st_mtime_ns == written["mtime"]  # the trial trained nothing
    (chain_run,) = runs(storage, "chain")
    assert chain_run.info.status == "FINISHED"
    assert sorted(p.name for p in (store.dir / "evals").rglob("round_*.json")) == ["round_02.json", "round_04.json"]
    # it logged nothing before the other process let go of the chain
    client = mlflow_client(storage)
    stamps = [m.timestamp for key in chain_run.data.metrics
              for m in client.get_metric_history(chain_run.info.run_id, key)]
    assert stamps and min(stamps) >= written["released"] * 1000


# ---------------------------------------------------------------------------------------------
# two Ray nodes on this machine


@pytest.mark.slow
def test_two_node_cluster(two_nodes, tmp_path):
    config = write_config(tmp_path, sweep_doc(base={**BASE, "pruning": {"rounds": 3}}, grid={"seed": [0, 1]},
                                              variants={"imp": {}}, evaluation={"rounds": [], "lmc": False}))
    storage = tmp_path / "storage"
    code = ("import sys; from sweeps.driver import main; "
            f"sys.exit(main({FIGURE!r}, sys.argv[1:]))")
    # `--address auto` finds the cluster through RAY_ADDRESS, as on a cluster's head node
    argv = ["--config", config, "--storage-path", str(storage), "--address", "auto", "--no-analysis"]
    env = dict(two_nodes.env, PRUNELAB_CACHE=str(tmp_path / "cache"), RAY_ADDRESS=two_nodes.address)

    # the multi-node way: one `mlflow server` that every node reaches over HTTP (local storage on a
    # multi-node cluster is refused unless declared shared: tests/test_cluster.py)
    env["PRUNELAB_SHARED_STORAGE"] = "1"
    with mlflow_server(tmp_path) as uri:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code, *argv, "--tracking-uri", uri], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        wall = time.time() - t0
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # what the MLflow UI shows, read through the tracking server's REST API
        exp = rest(uri, "experiments/get-by-name", {"experiment_name": f"prunelab-{FIGURE}"})["experiment"]
        found = rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
                     post=True)["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in found]
    parents = [run["info"]["run_id"] for run, t in zip(found, tags) if t.get("prunelab.role") == "sweep"]
    chains = [(run, t) for run, t in zip(found, tags) if t.get("prunelab.role") == "chain"]
    assert len(parents) == 1 and len(chains) == 2
    for run, t in chains:
        assert t["prunelab.status"] == "finished" and run["info"]["status"] == "FINISHED"
        assert t["mlflow.parentRunId"] == parents[0]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["dataset.name"] == "digits" and params["pruning_data.kind"] == "real"
        assert {m["key"] for m in run["data"]["metrics"]} >= {"pruning_accuracy", "sparsity"}
    nodes = {t["prunelab.node_id"] for _, t in chains}
    print(f"two-node sweep {wall:.0f} s; cluster nodes {two_nodes.ids}, chain nodes {sorted(nodes)}")
    assert nodes == set(two_nodes.ids), "both chains ran on one node"


def test_start_from_a_variant_with_its_own_grid_axes_gives_one_chain_per_start_chain():
    from sweeps.config import SweepHparams, expand

    sweep = SweepHparams.from_dict({
        "base": {"model": {"name": "convnet3", "width": 8}, "pruning": {"rounds": 4},
                 "pruning_training": {"epochs": 1}, "training": {"epochs": 1}},
        "grid": {"seed": [0, 1]},
        "variants": [
            {"name": "distilled", "set": {"pruning": {"rounds": 2},
                                          "pruning_data": {"kind": "distilled", "method": "dm"}},
             "grid": {"pruning_data.ipc": [1, 10]}},
            {"name": "then_imp", "start_from": "distilled", "start_round": 2}],
        "evaluation": {"every_round": True, "lmc": False}})
    trials = expand(sweep, "fig7")
    combined = [t for t in trials if t.variant == "then_imp"]
    assert len(combined) == 4  # 2 seeds x 2 start chains (ipc 1, ipc 10)
    starts = {(t.chain.seed, t.chain.start_chain().pruning_data.ipc) for t in combined}
    assert starts == {(0, 1), (0, 10), (1, 1), (1, 10)}
    for t in combined:
        start = t.chain.start_chain()
        assert start.seed == t.chain.seed and t.axes["start.pruning_data.ipc"] == start.pruning_data.ipc
        assert f"start_ipc={start.pruning_data.ipc}" in t.label()
    assert len({t.key for t in combined}) == 4




def test_command_line_resources_win_over_the_variants_own(tmp_path, capsys, no_ray):
    """A preset packs a variant (its own gpus_per_trial); --gpus-per-trial 0 on the command line is
    for every trial, and a variant's GPU share brings its own memory cap, not the sweep's."""
    from sweeps.config import load_sweep

    variants = {"imp": {}, "distilled": {**DISTILLED, "resources": {"cpus_per_trial": 0.5, "gpus_per_trial": 0.25}}}
    doc = sweep_doc(variants=variants, resources={"cpus_per_trial": 1, "memory_fraction": 0.9})
    config = write_config(tmp_path, doc)
    sweep, _ = load_sweep(FIGURE, "demo", [], config)
    packed = sweep.resources_for(next(v for v in sweep.variants if v.name == "distilled"))
    assert packed.gpus_per_trial == 0.25 and packed.memory_fraction is None and sweep.resources.memory_fraction == 0.9
    rc, out, err = drive(capsys, config, tmp_path / "storage", "--dry-run", "--gpus-per-trial", "0")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("  run  ")]
    assert sorted(ln.rsplit("[", 1)[1] for ln in lines) == ["0.5 CPU + 0 GPU]", "1 CPU + 0 GPU]"]
    # without it, the packed variant's GPU request is refused here (no GPU), naming the variant
    rc, out, err = drive(capsys, config, tmp_path / "storage", "--num-cpus", "2")
    assert rc == 2 and err.startswith("error: resources.gpus_per_trial: each chain asks for 0.25 GPU"), err
    assert "(variants distilled)" in err and "variants.<name>.resources" in err
