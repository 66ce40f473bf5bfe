"""The experiment a sweep logs to opens as a model-training experiment (not MLflow's GenAI view) and
says what its figure shows; tags a user set are kept."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from prunelab import schema
from sweeps.config import figure_description
from sweeps.tracking import ensure_experiment


def test_the_experiment_is_tagged_and_described(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    description = figure_description("fig6")
    assert "barrier" in description and "\n" not in description
    exp_id = ensure_experiment(uri, "prunelab-fig6", description)
    tags = MlflowClient(uri).get_experiment(exp_id).tags
    assert tags[schema.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tags[schema.DESCRIPTION_TAG] == description
    assert ensure_experiment(uri, "prunelab-fig6", description) == exp_id  # found, not created again


def test_an_older_experiment_gets_the_tags_and_keeps_the_users(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp_id = c.create_experiment("prunelab-fig2", artifact_location=str(tmp_path / "artifacts"),
                                tags={schema.DESCRIPTION_TAG: "my own notes"})
    assert ensure_experiment(uri, "prunelab-fig2", figure_description("fig2")) == exp_id
    tags = c.get_experiment(exp_id).tags
    assert tags[schema.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tags[schema.DESCRIPTION_TAG] == "my own notes"


def test_system_metrics_reach_the_run(tmp_path):
    """What a GPU trial starts (here on the CPU, whose metrics it logs the same way)."""
    import time

    from sweeps.tracking import system_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(ensure_experiment(uri, "prunelab-fig6"))
    monitor = system_metrics(uri, run.info.run_id, every_s=0.2)
    assert monitor is not None  # psutil comes with the test extras
    deadline = time.time() + 20
    while not c.get_run(run.info.run_id).data.metrics and time.time() < deadline:
        time.sleep(0.2)
    monitor.finish()
    metrics = c.get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_progress_inside_a_round_reaches_the_run(tmp_path, monkeypatch):
    """The training callback of a round reports its epochs to Tune and to the chain's MLflow run,
    as a series whose step counts pruning-data epochs since the chain began."""
    from prunelab.hparams import ChainHparams
    from sweeps import trainable
    from sweeps.sync import TrialLog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "prunelab-fig6")
    parent = MlflowClient(uri).create_run(exp).info.run_id
    hp = ChainHparams.from_dict({"dataset": {"name": "digits"}, "pruning_training": {"epochs": 4}})
    spec = {"key": "k1", "variant": "imp", "label": "imp", "figure": "fig6", "chain": hp.to_dict(),
            "chain_hash": hp.hash(), "eval": {"rounds": [], "lmc": False}, "rounds": [],
            "store": str(tmp_path / "store"), "tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent}
    log = TrialLog(spec, quiet=True)
    assert log.open()
    reports = []
    monkeypatch.setattr(trainable.tune, "report", reports.append)
    monkeypatch.setattr(trainable, "PROGRESS_EVERY_S", 0.0)
    hook = trainable.round_hook(spec, 2, log)
    for epoch, loss in ((1, 0.9), (2, 0.7)):
        hook(epoch, {"train_loss": loss})
    history = MlflowClient(uri).get_metric_history(log.run_id, schema.PROGRESS_TRAIN_LOSS)
    assert [(m.step, m.value) for m in history] == [(9, 0.9), (10, 0.7)]
    assert [r["epoch"] for r in reports] == [1, 2]


def test_a_bucket_sweeps_trials_use_their_own_nodes_cache(tmp_path):
    from sweeps.config import Trial
    from sweeps.launch import trial_spec
    from prunelab.evaluation import EvalHparams
    from prunelab.hparams import ChainHparams

    t = Trial("imp", ChainHparams(), [], EvalHparams(rounds=(), lmc=False), {})
    assert trial_spec(t, "fig6", tmp_path, {}, store="s3://bucket/runs/store")["cache_dir"] is None
    assert trial_spec(t, "fig6", tmp_path, {})["cache_dir"] == str(tmp_path / "cache")
