"""A SQLite tracking store keeps its artifacts beside the database, never in the working directory."""

from __future__ import annotations

from pathlib import Path

from sweeps.tracking import artifact_root, client, ensure_experiment


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's default would put ./mlruns here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    exp = ensure_experiment(uri, "prunelab-test")
    c = client(uri)
    assert c.get_experiment(exp).artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    run = c.create_run(exp)
    note = tmp_path / "note.txt"
    note.write_text("x")
    c.log_artifact(run.info.run_id, str(note), "figures")
    assert list((tmp_path / "store" / "mlartifacts").rglob("note.txt"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())
    assert ensure_experiment(uri, "prunelab-test") == exp  # found, not created again
    assert artifact_root("http://127.0.0.1:5000") is None


def test_relative_sqlite_paths_resolve():
    assert artifact_root("sqlite:///runs/mlflow.db") == (Path("runs").resolve() / "mlartifacts").as_uri()
