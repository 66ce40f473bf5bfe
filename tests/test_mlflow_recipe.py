"""The MLflow tracking server as cluster/kuberay.yaml starts it, run on this machine.

The server's command is read from the manifest's MLflow container; only what cannot exist here is
replaced: the SQLite path, the bucket (`--artifacts-destination`: a temporary directory instead of
gs://) and `--host`/`--port` (127.0.0.1 and a free port). Every other argument, `--allowed-hosts`
included, stays as the manifest has it. A client then reaches it under the Kubernetes Service name
(`prunelab-mlflow`, mapped to 127.0.0.1 in this process only) as trials do: it creates an
experiment and a run, logs a metric and an artifact (uploaded through the server) and reads both
back. The same server without the manifest's `--allowed-hosts` answers that Host header with 403:
MLflow 3.17 accepts only localhost and private addresses by default.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SERVICE = "prunelab-mlflow"  # the Service of cluster/k8s-common.yaml; trials log to http://prunelab-mlflow:5000
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # an API path (/health skips the Host check)


def recipe_command() -> list[str]:
    """The `mlflow server` command of the RayCluster's head pod in cluster/kuberay.yaml."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    (cluster,) = [d for d in docs if d.get("kind") == "RayCluster"]
    containers = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (cmd,) = [c["command"] for c in containers if c.get("command", [])[:2] == ["mlflow", "server"]]
    return [str(a) for a in cmd]


def set_option(argv: list[str], flag: str, value: str) -> list[str]:
    assert flag in argv, f"the recipe's mlflow server has no {flag}: {argv}"
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def drop_option(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def local_command(recipe: list[str], where: Path, port: int) -> list[str]:
    argv = [str(Path(sys.executable).with_name("mlflow"))] + recipe[1:]
    argv = set_option(argv, "--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}")
    argv = set_option(argv, "--artifacts-destination", str(where / "artifacts"))
    argv = set_option(argv, "--host", "127.0.0.1")
    argv = set_option(argv, "--port", str(port))
    if "--workers" not in argv and "-w" not in argv:
        argv += ["--workers", "1"]  # the recipe leaves MLflow's default (4): one is enough here
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port: int, path: str, host: str) -> int:
    """The HTTP status of one GET to 127.0.0.1:port with the given Host header (no proxy involved)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def no_proxy_value() -> str:
    old = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    return ",".join(x for x in (SERVICE, "127.0.0.1", "localhost", old) if x)


class Server:
    def __init__(self, argv: list[str], where: Path, port: int):
        self.argv, self.where, self.port = argv, where, port
        self.log = where / "server.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE",
                            "MLFLOW_TRACKING_URI")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                   NO_PROXY=no_proxy_value(), no_proxy=no_proxy_value())
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, deadline: float) -> None:
        while True:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            try:
                if status(self.port, "/health", f"127.0.0.1:{self.port}") == 200:
                    return
            except OSError:
                pass
            assert time.time() < deadline, f"mlflow server did not answer:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.25)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the server and its uvicorn workers
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers started side by side: the recipe's command, and the same without --allowed-hosts."""
    recipe = recipe_command()
    started = {}
    try:
        for name in ("recipe", "default_hosts"):
            where = tmp_path_factory.mktemp(f"mlflow-{name}")
            port = free_port()
            argv = local_command(recipe, where, port)
            if name == "default_hosts":
                argv = drop_option(argv, "--allowed-hosts")
            started[name] = Server(argv, where, port)
        t0 = time.time()
        for server in started.values():
            server.wait(t0 + 90)
        print(f"\ntwo mlflow servers answered {time.time() - t0:.1f} s after start")
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_the_local_command_keeps_every_recipe_argument_but_paths_and_address():
    recipe = recipe_command()
    opts = dict(zip(recipe, recipe[1:]))
    assert opts["--allowed-hosts"] == "prunelab-mlflow:*,localhost:*,127.0.0.1:*"
    assert opts["--artifacts-destination"].startswith("gs://") and "--default-artifact-root" not in recipe
    assert "--no-serve-artifacts" not in recipe  # MLflow's default: the server proxies artifacts
    expected = recipe[1:]
    for flag, value in (("--backend-store-uri", "sqlite:////x/mlflow.db"), ("--artifacts-destination", "/x/artifacts"),
                        ("--host", "127.0.0.1"), ("--port", "1234")):
        expected = set_option(expected, flag, value)
    argv = local_command(recipe, Path("/x"), 1234)
    assert argv[0] == str(Path(sys.executable).with_name("mlflow"))
    assert argv[1:] == expected + ([] if "--workers" in recipe else ["--workers", "1"])


def test_a_client_logs_through_the_service_name(servers, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = servers["recipe"]
    port = server.port
    uri = f"http://{SERVICE}:{port}"
    # raw Host headers: the Service name and `kubectl port-forward` pass, any other name does not
    assert status(port, PROBE, f"{SERVICE}:{port}") == 200
    assert status(port, PROBE, f"localhost:{port}") == 200
    assert status(port, PROBE, f"127.0.0.1:{port}") == 200
    assert status(port, PROBE, f"evil.example:{port}") == 403
    assert status(port, PROBE, f"{SERVICE}.evil.example:{port}") == 403

    # the Service name resolves to 127.0.0.1 in this process only; every other lookup is recorded
    real_getaddrinfo = socket.getaddrinfo
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        looked_up.append(name)
        return real_getaddrinfo("127.0.0.1" if name == SERVICE else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, no_proxy_value())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refusal shows at once, not after backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("prunelab-recipe-check")
    # no artifact location given: the server's proxied root (what the sweep driver gets over HTTP)
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    run_id = client.create_run(exp_id).info.run_id
    client.log_metric(run_id, "barrier", 0.25, step=1)
    client.log_text(run_id, "uploaded through the tracking server\n", "notes/check.txt")
    client.set_terminated(run_id)

    [metric] = client.get_metric_history(run_id, "barrier")
    assert (metric.value, metric.step) == (0.25, 1)
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/check.txt"]
    local = client.download_artifacts(run_id, "notes/check.txt", str(tmp_path))
    assert Path(local).read_text() == "uploaded through the tracking server\n"
    assert client.get_run(run_id).info.status == "FINISHED"
    # the server wrote the artifact to its destination (the bucket in the recipe); the client only
    # ever resolved the Service name (and the loopback address), nothing else
    stored = list((server.where / "artifacts").rglob("check.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "uploaded through the tracking server\n"
    assert SERVICE in looked_up and set(looked_up) <= {SERVICE, "127.0.0.1", "localhost"}, looked_up


def test_without_the_recipes_allowed_hosts_the_service_name_gets_403(servers):
    server = servers["default_hosts"]
    assert "--allowed-hosts" not in server.argv
    port = server.port
    assert status(port, PROBE, f"{SERVICE}:{port}") == 403  # the name trials use
    assert status(port, PROBE, f"127.0.0.1:{port}") == 200  # MLflow's default list: loopback ...
    assert status(port, PROBE, f"10.1.2.3:{port}") == 200  # ... and private addresses
