"""Where the sweep logs: $MLFLOW_TRACKING_URI is honoured, a SQLite file is refused on a cluster whose
nodes are (or may become) several machines, and the closing hint fits the kind of tracking URI."""

from __future__ import annotations

import pytest
import ray

from prunelab.errors import ConfigError
from sweeps import autoscaler, preflight
from sweeps.driver import browse_hint, parse_args

LAUNCHER = """
cluster_name: c
provider: {{type: {provider}, region: us-west-2}}
head_node_type: head
available_node_types:
  head: {{resources: {{CPU: 2}}, node_config: {{}}, max_workers: 0}}
  gpu: {{resources: {{CPU: 8, GPU: 1}}, node_config: {{}}, min_workers: 0, max_workers: 4}}
"""


def test_the_tracking_uri_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_args("fig6", []).tracking_uri is None  # the driver then uses <storage>/mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert parse_args("fig6", []).tracking_uri == "http://mlflow.internal:5000"
    assert parse_args("fig6", ["--tracking-uri", "http://other:5000"]).tracking_uri == "http://other:5000"


def test_the_browse_hint_fits_the_uri():
    assert browse_hint("http://10.0.0.5:5000").startswith("open http://10.0.0.5:5000")
    assert "mlflow ui --backend-store-uri sqlite:////r/mlflow.db" in browse_hint("sqlite:////r/mlflow.db")
    # with the experiment: straight to its runs table in the model-training view (not the GenAI one)
    assert "http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning" in browse_hint(
        "http://10.0.0.5:5000", "7")


def nodes(*addresses):
    return [{"Alive": True, "NodeManagerAddress": a} for a in addresses] + [{"Alive": False, "NodeManagerAddress": "x"}]


@pytest.mark.parametrize("alive,provider,expected", [
    (("10.0.0.1", "10.0.0.2"), None, "its nodes run on 2 hosts"),
    (("127.0.0.1", "127.0.0.1"), None, ""),  # two Ray nodes of one machine
    (("10.0.0.1",), "aws", "it can add worker nodes"),
    (("10.0.0.1",), "fake_multinode", ""),  # Ray's simulated cluster: its nodes are local processes
])
def test_multi_host(monkeypatch, tmp_path, alive, provider, expected):
    monkeypatch.setattr(ray, "nodes", lambda: nodes(*alive))
    if provider:
        path = tmp_path / "cluster.yaml"
        path.write_text(LAUNCHER.format(provider=provider))
        monkeypatch.setenv(autoscaler.CLUSTER_CONFIG_ENV, str(path))
    else:
        monkeypatch.setattr(autoscaler, "cluster_node_types", lambda address=None: (None, ""))
    assert autoscaler.multi_host("auto") == expected


def test_sqlite_is_refused_on_several_machines_only(monkeypatch):
    asked = []

    def spans(address):
        asked.append(address)
        return "its nodes run on 3 hosts"

    monkeypatch.setattr(autoscaler, "multi_host", spans)
    with pytest.raises(ConfigError) as e:
        preflight.check_tracking_reach("sqlite:////runs/mlflow.db", "auto")
    assert e.value.field == "--tracking-uri" and "3 hosts" in str(e.value) and "mlflow server" in e.value.fix
    preflight.check_tracking_reach("http://head:5000", "auto")  # a server: fine, the cluster is not even asked
    assert asked == ["auto"]
    monkeypatch.setattr(autoscaler, "multi_host", lambda address: "")
    preflight.check_tracking_reach("sqlite:////runs/mlflow.db", None)  # one machine: SQLite is fine


def test_run_names_hold_no_machine_paths():
    from sweeps.config import expand, load_sweep

    sweep, _ = load_sweep("fig6", "demo", [("root", "/mnt/team/data/digits")], None)
    labels = [t.label() for t in expand(sweep, "fig6")]
    assert labels and all("/mnt" not in label and "root=digits" in label for label in labels)
    names = [t.run_name() for t in expand(sweep, "fig6")]
    assert names and all("/" not in n for n in names)


@pytest.mark.parametrize("figure", ["fig2", "fig3_4", "fig5", "fig6", "fig7", "hessian"])
def test_every_chain_of_a_preset_has_a_short_distinct_run_name(figure):
    """MLflow's run table shows the run name first: each chain's must tell it apart from the others."""
    import yaml

    from sweeps.config import CONFIG_DIR, expand, load_sweep

    for preset in yaml.safe_load((CONFIG_DIR / f"{figure}.yaml").read_text())["presets"]:
        names = [t.run_name() for t in expand(load_sweep(figure, preset, [], None)[0], figure)]
        assert len(set(names)) == len(names), (figure, preset, sorted(n for n in names if names.count(n) > 1))
        assert max(map(len, names)) <= 60, (figure, preset, max(names, key=len))
