"""Cluster recipes (cluster/) and autoscaling support (sweeps/autoscaler.py).

Static checks: the cluster-launcher YAMLs validate against the JSON schema shipped with Ray, the
KubeRay manifests hold what KubeRay needs, the shell recipes parse. Unit tests of the node-type
pre-flight check. One slow test runs the real sweep driver on a simulated autoscaling cluster
(Ray's fake multi-node provider on this machine): it starts with no worker, the autoscaler adds
workers for the trials, the trials run on them, and the idle workers go away again.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from prunelab.errors import ConfigError
from sweeps import autoscaler
from sweeps.config import ResourcesHparams

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBE_MANIFESTS = ["kuberay.yaml", "rayjob.yaml"]


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def kube_doc(name: str, kind: str) -> dict:
    docs = [d for d in load_all(name) if d.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def res(cpus=1.0, gpus=0.0) -> ResourcesHparams:
    return ResourcesHparams(cpus_per_trial=cpus, gpus_per_trial=gpus)


# -- cluster-launcher YAMLs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_rays_schema(name, ray_schema):
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray, not declared by prunelab
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.Draft7Validator(ray_schema).validate(cfg)
    # what `ray up` does before launching anything: fill in the provider's defaults, validate again
    validate_config(copy.deepcopy(cfg))
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_has_gpu_autoscaling_mlflow_and_pinned_install(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and 0 < gpu[0]["max_workers"] <= cfg["max_workers"]
    assert gpu[0]["resources"] == {"CPU": 8, "GPU": 1}
    assert cfg["idle_timeout_minutes"] > 0
    setup = " ".join(cfg["setup_commands"])
    assert "__PRUNELAB_COMMIT__" in setup and 'git checkout --quiet --detach "$PRUNELAB_COMMIT"' in setup
    assert "exit 1" in setup  # an unset placeholder stops `ray up` with a message
    scheme = {"aws.yaml": "s3://", "gcp.yaml": "gs://"}[name]
    extra = {"aws.yaml": "s3", "gcp.yaml": "gcs"}[name]  # the result store lives in the bucket: its fsspec backend
    assert "pip install" in setup and f"-e '.[{extra}]'" in setup
    head_cmds = " ".join(cfg["head_start_ray_commands"] + cfg["head_setup_commands"])
    assert "mlflow server --backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in head_cmds
    assert f"--artifacts-destination {scheme}" in head_cmds and "--host 0.0.0.0 --port 5000" in head_cmds
    # token authentication: the same token on every node, token mode for every `ray start`
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in cfg["head_start_ray_commands"])


# -- KubeRay manifests -----------------------------------------------------------------------------

def _check_cluster_spec(spec: dict, where: str):
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"], where
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert not any(k.endswith("/gpu") for k in head_limits), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for g in groups:
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"{where}: worker group lacks {key}"
    gpu = [g for g in groups
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] > 0, where
    # a token for every Ray process: head, workers, autoscaler
    for container in [head["template"]["spec"]["containers"][0], gpu[0]["template"]["spec"]["containers"][0],
                      spec["autoscalerOptions"]]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    mlflow = [c for c in head["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    assert mlflow and "sqlite:////home/ray/mlflow/mlflow.db" in mlflow[0]["command"]


def test_kuberay_raycluster_manifest():
    rc = kube_doc("kuberay.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"], "kuberay.yaml")


def test_kuberay_rayjob_manifest():
    job = kube_doc("rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert "python sweeps/fig6.py --address auto --preset paper" in entry
    assert "--storage-path gs://" in entry and "--tracking-uri http://prunelab-mlflow:5000" in entry
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")
    # one cluster definition: the RayJob's cluster is the RayCluster of kuberay.yaml
    assert job["spec"]["rayClusterSpec"] == kube_doc("kuberay.yaml", "RayCluster")["spec"]


def test_k8s_common_manifest_matches_the_clusters():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all("k8s-common.yaml")}
    assert docs[("PersistentVolumeClaim", "prunelab-shared")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("PersistentVolumeClaim", "prunelab-mlflow") in docs
    svc = docs[("Service", "prunelab-mlflow")]
    head = kube_doc("kuberay.yaml", "RayCluster")["spec"]["headGroupSpec"]["template"]
    labels = head["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items() if k != "ray.io/node-type")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["spec"]["volumes"]}
    assert claims == {"prunelab-shared", "prunelab-mlflow"}


# -- the MLflow tracking server of every recipe ----------------------------------------------------

def mlflow_server_command(name: str) -> list[str]:
    """The argv of the `mlflow server` a recipe starts (shell variables and $(...) left as written)."""
    if name in KUBE_MANIFESTS:
        spec = kube_doc(name, "RayCluster")["spec"] if name == "kuberay.yaml" else \
            kube_doc(name, "RayJob")["spec"]["rayClusterSpec"]
        cmds = [c["command"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
                if c.get("command", [])[:2] == ["mlflow", "server"]]
        assert len(cmds) == 1, f"{name}: expected one mlflow server container"
        return list(cmds[0])
    if name in LAUNCHER_YAMLS:
        cfg = yaml.safe_load((CLUSTER / name).read_text())
        cmds = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
        assert len(cmds) == 1, f"{name}: expected one mlflow server command"
        text = cmds[0][cmds[0].index("mlflow server"):]
    else:  # a shell recipe: from `"$bin/mlflow" server` to the end of its (continued) line
        text = (CLUSTER / name).read_text()
        assert text.count('"$bin/mlflow" server') == 1, name
        text = text[text.index('"$bin/mlflow" server'):].replace("\\\n", " ").split("\n")[0]
    return shlex.split(text.split(" > ")[0])


def _options(argv: list[str]) -> dict[str, str]:
    return {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--") and i + 1 < len(argv)}


def _shell_value(name: str, value: str) -> str:
    """`$hosts` of a shell recipe: its assignment plus every `hosts+=` appended to it."""
    if value != "$hosts":
        return value
    text = (CLUSTER / name).read_text()
    parts = re.findall(r'^\s*hosts="([^"]*)"', text, re.M) + re.findall(r'hosts\+=",([^"]*)"', text)
    assert parts, f"{name}: no hosts= assignment"
    return ",".join(parts)


# recipe -> (where its artifacts go, Host patterns its clients send besides localhost/127.0.0.1)
MLFLOW_RECIPES = {
    "aws.yaml": ("s3://__BUCKET__/", ["$head_ip:*", "$(hostname):*"]),
    "gcp.yaml": ("gs://__BUCKET__/", ["$head_ip:*", "$(hostname):*"]),
    "kuberay.yaml": ("gs://__BUCKET__/", ["prunelab-mlflow:*"]),
    "rayjob.yaml": ("gs://__BUCKET__/", ["prunelab-mlflow:*"]),
    "onprem.sh": ("$shared/", ["$ip:*", "$(hostname):*"]),
    "slurm.sbatch": ("$shared/", ["$head_ip:*", "$head_node:*"]),
}


@pytest.mark.parametrize("name", sorted(MLFLOW_RECIPES))
def test_every_mlflow_server_proxies_artifacts_and_names_its_hosts(name):
    """MLflow 3.17 answers 403 to a Host header outside --allowed-hosts (default: localhost and private
    addresses; an explicit list replaces it), and --artifacts-destination with the default
    --serve-artifacts proxies artifacts, so clients need no bucket credentials."""
    argv = mlflow_server_command(name)
    assert argv[1] == "server" and argv[0].endswith("mlflow"), argv
    opts = _options(argv)
    assert "--default-artifact-root" not in argv and "--no-serve-artifacts" not in argv, argv
    destination, hosts = MLFLOW_RECIPES[name]
    assert opts.get("--artifacts-destination", "").startswith(destination), argv
    assert "--allowed-hosts" in opts, argv
    allowed = _shell_value(name, opts["--allowed-hosts"]).split(",")
    assert "*" not in allowed and {"localhost:*", "127.0.0.1:*", *hosts} <= set(allowed), allowed
    assert opts["--host"] == "0.0.0.0" and opts["--backend-store-uri"].startswith("sqlite:///"), argv


def test_the_kubernetes_tracking_uri_is_an_allowed_host():
    from mlflow.server.security_utils import is_allowed_host_header  # the server's own check

    job = kube_doc("rayjob.yaml", "RayJob")
    host = re.search(r"--tracking-uri http://([^/\s]+)", job["spec"]["entrypoint"]).group(1)
    assert host == "prunelab-mlflow:5000"
    for name in KUBE_MANIFESTS:
        allowed = _options(mlflow_server_command(name))["--allowed-hosts"].split(",")
        for h in (host, "localhost:5000", "127.0.0.1:5000", "localhost:15000"):  # trials; port-forward
            assert is_allowed_host_header(allowed, h), (name, h)
        for h in ("evil.example:5000", "prunelab-mlflow.evil.example:5000", "10.0.0.7:5000"):
            assert not is_allowed_host_header(allowed, h), (name, h)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_mlflow_hosts_are_the_head_address_the_tracking_uri_uses(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    cmd = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c][0]
    # the same private IP as `--tracking-uri http://$(hostname -I | cut -d" " -f1):5000` (cluster/README.md)
    assert cmd.startswith('head_ip=$(hostname -I | cut -d" " -f1);')
    assert "--tracking-uri http://$(hostname -I | cut -d\" \" -f1):5000" in (CLUSTER / "README.md").read_text()


# -- shell recipes and docs ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["onprem.sh", "slurm.sbatch"])
def test_shell_recipes_parse(name):
    r = subprocess.run(["bash", "-n", str(CLUSTER / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_script_brings_up_ray_with_symmetric_run():
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "scontrol show hostnames" in text
    assert "export RAY_AUTH_MODE=token" in text
    # one srun over every node runs `ray symmetric-run`; no hand-made head/worker starts, no fixed sleeps
    assert 'ray" start' not in text and "sleep 20" not in text and not re.search(r"sleep [0-9]{2,}", text)
    step = text[text.index("\nsrun --nodes="):]
    step = step[:step.index("\nif ")].replace("\\\n", " ")
    assert 'srun --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1' in step
    assert 'num_nodes="${SLURM_JOB_NUM_NODES' in text
    ray_part, entry = step.split(" -- ", 1)
    assert '"$bin/ray" symmetric-run --address "$head_ip:$port" --min-nodes "$num_nodes"' in ray_part
    assert not any(f in ray_part for f in ("--head", "--node-ip-address", "--block"))  # symmetric-run refuses them
    assert '"$bin/python" sweeps/fig6.py --address auto' in entry and '"${args[@]}"' in entry
    assert '--tracking-uri "http://$head_ip:$mlflow_port"' in entry
    # the MLflow server is up on the head before Ray and the sweep start
    assert text.index('"$bin/mlflow" server') < text.index("/health") < text.index("symmetric-run --address")
    # symmetric-run exits 0 when `ray start` fails: the driver's own exit status decides
    assert 'echo "$rc" > "$PRUNELAB_DRIVER_RC"' in entry and '[[ ! -s "$PRUNELAB_DRIVER_RC" ]]' in text


def test_onprem_script_usage_runs_without_ray():
    r = subprocess.run(["bash", str(CLUSTER / "onprem.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "onprem.sh head" in r.stdout


def test_readme_covers_every_recipe():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("cluster/aws.yaml > aws-prunelab.yaml", "ray up aws-prunelab.yaml",
                   "cluster/gcp.yaml > gcp-prunelab.yaml", "ray up gcp-prunelab.yaml", "ray job submit",
                   "kubectl apply -f cluster/k8s-common.yaml", "cluster/kuberay.yaml", "cluster/rayjob.yaml",
                   "docker build -f cluster/Dockerfile", "sbatch cluster/slurm.sbatch", "cluster/onprem.sh head",
                   "RAY_AUTH_MODE=token", "ray get-auth-token", "PRUNELAB_STORE", "PRUNELAB_COMMIT",
                   "ray dashboard", "port-forward", "8265", "5000"):
        assert needle in text, needle


# -- node types and the pre-flight check (sweeps/autoscaler.py) ------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_YAMLS + KUBE_MANIFESTS)
def test_node_types_of_the_shipped_configs(name):
    types = autoscaler.node_types_from_yaml(CLUSTER / name)
    gpu = [t for t in types.values() if not t.head]
    assert len(gpu) == 1 and gpu[0].resources == {"CPU": 8.0, "GPU": 1.0}
    assert gpu[0].min_workers == 0 and gpu[0].max_workers == 8
    head = [t for t in types.values() if t.head]
    assert len(head) == 1 and head[0].resources.get("GPU", 0) == 0
    # GPU nodes start at zero: a GPU sweep passes on the node types alone
    assert autoscaler.check_node_types(res(4, 1), types=types) is types
    assert autoscaler.check_node_types(res(1, 0.25), types=types) is types
    with pytest.raises(ConfigError) as e:
        autoscaler.check_node_types(res(4, 2), types=types, source=name)
    assert e.value.field == "resources.gpus_per_trial" and name in e.value.problem and "GPU" in e.value.fix
    with pytest.raises(ConfigError) as e:
        autoscaler.check_node_types(res(16, 1), types=types)
    assert e.value.field == "resources.cpus_per_trial"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_cluster_config_from_env_var(tmp_path, monkeypatch):
    p = _write(tmp_path, """
        cluster_name: c
        max_workers: 3
        provider: {type: local}
        head_node_type: head
        available_node_types:
          head: {resources: {CPU: 4}, node_config: {}}
          cpu: {resources: {CPU: 16}, node_config: {}, min_workers: 0, max_workers: 5}
          gpu: {resources: {CPU: 8, GPU: 2}, node_config: {}, min_workers: 0, max_workers: 0}
        """)
    monkeypatch.setenv(autoscaler.CLUSTER_CONFIG_ENV, str(p))
    types, source = autoscaler.cluster_node_types("auto")
    assert source == str(p) and types["cpu"].max_workers == 3  # the cluster-wide cap wins
    assert autoscaler.check_node_types(res(16), "auto") is not None
    # the GPU type may never start (max_workers 0): a GPU request can never be met
    with pytest.raises(ConfigError, match="resources.gpus_per_trial.*no node type"):
        autoscaler.check_node_types(res(1, 1), "auto")


def test_cluster_config_unreadable_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(autoscaler.CLUSTER_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError) as e:
        autoscaler.check_node_types(res(1, 1), "auto")
    assert e.value.field == autoscaler.CLUSTER_CONFIG_ENV
    (tmp_path / "x.yaml").write_text("a: 1\n")
    monkeypatch.setenv(autoscaler.CLUSTER_CONFIG_ENV, str(tmp_path / "x.yaml"))
    with pytest.raises(ConfigError, match="no node types"):
        autoscaler.check_node_types(res(1, 1), "auto")


def test_resources_detected_at_launch_make_the_check_inconclusive(tmp_path):
    p = _write(tmp_path, """
        cluster_name: c
        provider: {type: aws, region: us-west-2}
        head_node_type: head
        available_node_types:
          head: {resources: {CPU: 0}, node_config: {InstanceType: m5.large}}
          w: {resources: {}, node_config: {InstanceType: g5.xlarge}, max_workers: 2}
        """)
    types = autoscaler.node_types_from_yaml(p)
    assert types["w"].resources is None
    assert autoscaler.check_node_types(res(1, 1), types=types) is None  # unknown: the caller checks alive nodes


def test_node_types_from_the_gcs_cluster_config(monkeypatch):
    import ray
    import ray._private.state
    from ray.core.generated import autoscaler_pb2

    cfg = autoscaler_pb2.ClusterConfig()
    g = cfg.node_group_configs.add()
    g.name, g.min_count, g.max_count = "cpu", 0, 4
    g.resources["CPU"] = 8
    monkeypatch.delenv(autoscaler.CLUSTER_CONFIG_ENV, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: cfg)
    types, source = autoscaler.cluster_node_types("auto")
    assert types["cpu"].resources == {"CPU": 8.0} and "GCS" in source
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        autoscaler.check_node_types(res(1, 1), "auto")
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
    assert autoscaler.node_types_from_gcs() is None


def test_bootstrap_config_on_a_launcher_head(tmp_path, monkeypatch):
    monkeypatch.delenv(autoscaler.CLUSTER_CONFIG_ENV, raising=False)
    monkeypatch.setattr(autoscaler, "node_types_from_gcs", lambda: None)
    boot = tmp_path / "ray_bootstrap_config.yaml"
    monkeypatch.setattr(autoscaler, "BOOTSTRAP_CONFIG", str(boot))
    assert autoscaler.cluster_node_types("auto") == (None, "")
    shutil.copy(CLUSTER / "aws.yaml", boot)
    types, source = autoscaler.cluster_node_types("auto")
    assert source == str(boot) and types["gpu_worker"].resources["GPU"] == 1
    assert autoscaler.cluster_node_types(None) == (None, "")  # a local Ray is not that cluster


def test_check_cluster_uses_node_types_then_storage_rule(tmp_path, monkeypatch):
    import ray

    from sweeps import preflight

    head = {"Alive": True, "Resources": {"CPU": 0.0, "node:__internal_head__": 1.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [head])
    monkeypatch.delenv("PRUNELAB_SHARED_STORAGE", raising=False)
    # no node types: exactly preflight.check_cluster, which rejects a GPU nobody has yet
    monkeypatch.delenv(autoscaler.CLUSTER_CONFIG_ENV, raising=False)
    monkeypatch.setattr(autoscaler, "node_types_from_gcs", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0})
    with pytest.raises(ConfigError, match="no node has that many"):
        autoscaler.check_cluster(res(1, 1), None, str(tmp_path))
    # two alive nodes and a local storage path: refused unless declared shared
    worker = {"Alive": True, "Resources": {"CPU": 2.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [head, worker])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError) as e:
        autoscaler.check_cluster(res(1, 0), None, str(tmp_path))
    assert e.value.field == "--storage-path" and "2 nodes" in e.value.problem
    monkeypatch.setenv("PRUNELAB_SHARED_STORAGE", "1")
    autoscaler.check_cluster(res(1, 0), None, str(tmp_path))
    monkeypatch.delenv("PRUNELAB_SHARED_STORAGE")
    monkeypatch.setattr(ray, "nodes", lambda: [head])
    # node types with a GPU worker type: the same request passes, but local storage does not
    monkeypatch.setenv(autoscaler.CLUSTER_CONFIG_ENV, str(CLUSTER / "aws.yaml"))
    with pytest.raises(ConfigError) as e:
        autoscaler.check_cluster(res(1, 1), "auto", str(tmp_path))
    assert e.value.field == "--storage-path" and "can add worker nodes" in e.value.problem
    autoscaler.check_cluster(res(1, 1), "auto", "s3://bucket/prunelab")
    monkeypatch.setenv("PRUNELAB_SHARED_STORAGE", "1")
    autoscaler.check_cluster(res(1, 1), "auto", str(tmp_path))
    assert preflight.check_cluster is not autoscaler.check_cluster


def test_data_parallel_workers_are_judged_against_what_the_node_types_hold():
    from sweeps.config import ResourcesHparams

    gpu = autoscaler.NodeType("gpu", {"CPU": 16, "GPU": 4}, max_workers=1)
    cpu = autoscaler.NodeType("cpu", {"CPU": 8}, max_workers=3)
    head = autoscaler.NodeType("head", {"CPU": 2}, head=True)
    types = {t.name: t for t in (gpu, cpu, head)}
    assert autoscaler.worker_capacity(types.values(), 4, 1) == 4  # one GPU node of 4, CPUs to spare
    assert autoscaler.worker_capacity(types.values(), 2, 0) == 8 + 3 * 4 + 1
    assert autoscaler.worker_capacity([autoscaler.NodeType("any", {"GPU": 8})], 1, 1) is None  # unbounded
    assert autoscaler.check_node_types(ResourcesHparams(cpus_per_trial=4, gpus_per_trial=1, workers_per_trial=4),
                                       types=types) is types
    with pytest.raises(ConfigError) as e:
        autoscaler.check_node_types(ResourcesHparams(cpus_per_trial=4, gpus_per_trial=1, workers_per_trial=8),
                                    types=types)
    assert e.value.field == "resources.workers_per_trial" and "at most 4" in e.value.problem
    assert "--workers-per-trial 4" in e.value.fix


def test_token_auth_helpers(tmp_path, monkeypatch):
    refreshed = []
    # keep the Ray config of this process as it is
    monkeypatch.setattr(autoscaler, "_refresh_ray_config", lambda: refreshed.append(1))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(var, "x")  # recorded by monkeypatch, restored after the test
        monkeypatch.delenv(var)
    assert not autoscaler.token_available() and not autoscaler.enable_token_auth_if_available()
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret\n")
    assert autoscaler.enable_token_auth_if_available() and os.environ["RAY_AUTH_MODE"] == "token"
    assert refreshed == [1]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit mode is respected
    assert not autoscaler.enable_token_auth_if_available() and os.environ["RAY_AUTH_MODE"] == "disabled"
    err = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    err.__cause__ = RuntimeError("... ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: ...")
    assert "RAY_AUTH_MODE=token" in autoscaler.auth_hint(err)
    assert autoscaler.auth_hint(ConnectionError("connection refused")) == ""


# -- a simulated autoscaling cluster ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d))
    return out


class FakeAutoscalingCluster:
    """A Ray head with the v1 autoscaler and Ray's fake multi-node provider: worker "nodes" are extra
    raylets on this machine, started and stopped by the autoscaler like cloud VMs.

    Modelled on `ray.cluster_utils.AutoscalingCluster`, which cannot be used as it is in Ray 2.60:
    it reads `fake_multi_node/example.yaml`, which the wheel does not ship (FileNotFoundError), and
    its start()/shutdown() run `ray stop --force`, which kills every Ray process of the user on the
    machine (other test runs included) and it binds the fixed ports 6379/8265. Here the head gets
    free ports and its own temp dir, starts in a new session, and shutdown() ends exactly the
    processes of that session (the autoscaler's worker raylets included) by pid.
    """

    def __init__(self, head_resources: dict, worker_node_types: dict, idle_timeout_minutes: float, env=None):
        self.head_resources = dict(head_resources)
        self.worker_node_types = worker_node_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.env = dict(env or {})
        self.sid = None
        self.tmp = None
        self.address = None
        self.config_path = None

    def config(self, gcs_address: str) -> dict:
        types = {"ray.head.default": {"resources": self.head_resources, "node_config": {}, "max_workers": 0},
                 **self.worker_node_types}
        return {
            "cluster_name": "prunelab-fake", "upscaling_speed": 1.0,
            "max_workers": sum(t.get("max_workers", 0) for t in self.worker_node_types.values()),
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {}, "docker": {}, "head_node_type": "ray.head.default", "available_node_types": types,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}

    def start(self) -> "FakeAutoscalingCluster":
        self.tmp = tempfile.mkdtemp(prefix="prunelab-fc-", dir="/tmp")  # short: Ray's socket paths
        port = _free_port()
        self.config_path = os.path.join(self.tmp, "autoscaling.json")
        Path(self.config_path).write_text(json.dumps(self.config(f"127.0.0.1:{port}")))
        head = dict(self.head_resources)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
               f"--temp-dir={self.tmp}", f"--autoscaling-config={self.config_path}",
               f"--dashboard-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               "--include-dashboard=false", "--disable-usage-stats",
               f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}",
               f"--object-store-memory={head.pop('object_store_memory', 100_000_000)}"]
        if head:
            cmd.append("--resources=" + json.dumps(head))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **self.env}
        p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.sid = p.pid  # session leader: every Ray process of this cluster keeps this session id
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out = "ray start timed out"
        if p.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        self.address = f"127.0.0.1:{port}"
        return self

    def log_tail(self, name="monitor.log", chars=4000) -> str:
        try:
            return (Path(self.tmp) / "session_latest" / "logs" / name).read_text()[-chars:]
        except (OSError, TypeError):
            return ""

    def shutdown(self) -> None:
        sid = self.sid
        if sid and sid > 1 and sid != os.getsid(0):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _session_pids(sid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.time() + 10
                while _session_pids(sid) and time.time() < deadline:
                    time.sleep(0.2)
            assert not _session_pids(sid), f"processes of the fake cluster left: {_session_pids(sid)}"
        self.sid = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


TINY_SWEEP = """\
figure: fig6
description: two one-round IMP chains on digits, for the autoscaling-cluster test
presets:
  demo:
    base:
      dataset: {name: digits}
      model: {name: convnet3, width: 4}
      pruning: {rounds: 1}
      pruning_training: {epochs: 1, lr: 0.1}
      training: {epochs: 1, lr: 0.1}
    grid:
      seed: [0, 1]
    variants:
      imp: {}
    evaluation:
      rounds: [1]
      lmc: false
    resources: {cpus_per_trial: 1, max_failures: 0}
"""

# Runs in its own process (Ray's client state and the auth env stay out of pytest's process).
DRIVER_SCRIPT = """\
import json, sys, time
import ray
import ray._private.state
from sweeps import autoscaler, driver

address, config, storage, out = sys.argv[1:5]
report = {}
# this script's own ray.init needs token mode switched on, as the driver does for itself
report["token_mode"] = autoscaler.enable_token_auth_if_available()

ray.init(address=address, log_to_driver=False)
report["alive_before"] = sum(n["Alive"] for n in ray.nodes())
ray.shutdown()

t0 = time.time()
report["rc"] = driver.main("fig6", ["--config", config, "--address", address, "--storage-path", storage,
                                    "--no-analysis"])
report["sweep_s"] = time.time() - t0

ray.init(address=address, log_to_driver=False)
nodes = ray.nodes()
report["head"] = [n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]]
report["workers_seen"] = sorted(n["NodeID"] for n in nodes if "node:__internal_head__" not in n["Resources"])
report["alive_after_sweep"] = sum(n["Alive"] for n in nodes)
actors = ray._private.state.state.actor_table(None)
report["trial_nodes"] = sorted(a["Address"]["NodeID"] for a in actors.values()
                               if a.get("ActorClassName") == "ImplicitFunc")  # Tune's function-trainable actor
report["actor_classes"] = sorted({a.get("ActorClassName", "") for a in actors.values()})
t1 = time.time()
alive = report["alive_after_sweep"]
while alive > 1 and time.time() - t1 < 120:
    time.sleep(1)
    alive = sum(n["Alive"] for n in ray.nodes())
report["alive_at_end"] = alive
report["scale_down_s"] = time.time() - t1
report["dead_workers"] = sorted(n["NodeID"] for n in ray.nodes() if not n["Alive"])
ray.shutdown()
with open(out, "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_sweep_driver_on_a_simulated_autoscaling_cluster(tmp_path):
    token = "prunelab-test-" + os.urandom(12).hex()
    worker_type = {"resources": {"CPU": 1, "fake_gpu": 1, "object_store_memory": 100_000_000},
                   "node_config": {}, "min_workers": 0, "max_workers": 2}
    cluster = FakeAutoscalingCluster({"CPU": 0}, {"fake_gpu_worker": worker_type}, idle_timeout_minutes=0.3,
                                     env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    config = tmp_path / "fig6-tiny.yaml"
    config.write_text(TINY_SWEEP)
    script = tmp_path / "drive.py"
    script.write_text(DRIVER_SCRIPT)
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    t0 = time.time()
    cluster.start()
    t_start = time.time() - t0
    try:
        env.update(RAY_AUTH_TOKEN=token, PRUNELAB_CLUSTER_CONFIG=cluster.config_path, PRUNELAB_SHARED_STORAGE="1",
                   PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, str(script), cluster.address, str(config), str(tmp_path / "runs"),
                            str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and out.exists(), (
            f"driver process failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n"
            f"monitor.log:\n{cluster.log_tail()}")
        rep = json.loads(out.read_text())
    finally:
        cluster.shutdown()
    print(f"\nfake cluster: head up in {t_start:.1f} s; sweep {rep['sweep_s']:.1f} s; "
          f"{len(rep['workers_seen'])} workers added, {len(rep['dead_workers'])} removed "
          f"{rep['scale_down_s']:.1f} s after the sweep; total {time.time() - t0:.1f} s")
    assert rep["token_mode"] is True
    assert rep["alive_before"] == 1, "the cluster starts with its head only"
    assert rep["rc"] == 0, r.stdout[-3000:]
    head = rep["head"]
    assert len(head) == 1
    # the autoscaler added workers (at most max_workers) and both trials ran on them, not on the head
    assert 1 <= len(rep["workers_seen"]) <= 2
    assert len(rep["trial_nodes"]) == 2, rep["actor_classes"]
    assert set(rep["trial_nodes"]) <= set(rep["workers_seen"]) and head[0] not in rep["trial_nodes"]
    # after the idle timeout the workers are gone again
    assert rep["alive_at_end"] == 1, f"workers still alive {rep['scale_down_s']:.0f} s after the sweep"
    assert set(rep["dead_workers"]) == set(rep["workers_seen"])
    # the sweep's record: both chains finished in MLflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prunelab-fig6")
    children = [run for run in client.search_runs([exp.experiment_id]) if run.data.tags.get("mlflow.parentRunId")]
    assert sorted(run.info.status for run in children) == ["FINISHED", "FINISHED"]
