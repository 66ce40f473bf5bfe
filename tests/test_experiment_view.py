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
