"""Autoscaling clusters: which node types the cluster can add, and the pre-flight checks against them.

On a cluster with an autoscaler the GPU nodes usually do not exist yet when the driver starts
(`min_workers: 0` / `minReplicas: 0`): checking the resources of the *alive* nodes
(`preflight.check_cluster`) would reject every GPU sweep, and checking nothing would leave an
impossible request pending forever. The node types the autoscaler may add decide instead.

Where the node types come from, first found wins:

1. `PRUNELAB_CLUSTER_CONFIG`: a path to the cluster's YAML, either a Ray cluster-launcher config
   (`available_node_types`, as in cluster/aws.yaml) or a KubeRay RayCluster / RayJob manifest
   (`headGroupSpec` + `workerGroupSpecs`, as in cluster/kuberay.yaml).
2. The cluster config the autoscaler reported to the GCS (`ray._private.state.state.get_cluster_config()`,
   the private call Ray Data's own autoscaling code uses in Ray 2.60). The v1 autoscaler of the
   cluster launcher does not report it (verified here on a fake-provider cluster: it stays None);
   Ray 2.60 has no public API for node types.
3. `~/ray_bootstrap_config.yaml`, which `ray up` writes on the head node: found automatically when
   the driver runs on the head of a cluster-launcher cluster with `--address`.

None of these: the node types are unknown and the caller falls back to the alive nodes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from prunelab.errors import ConfigError

CLUSTER_CONFIG_ENV = "PRUNELAB_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
UNBOUNDED = -1


@dataclass(frozen=True)
class NodeType:
    """One kind of node the cluster has or can add. `resources` is None when the config leaves it
    to be detected at launch (e.g. `resources: {}` on AWS, where Ray reads the instance type)."""

    name: str
    resources: Optional[dict] = field(default=None, compare=False)
    min_workers: int = 0
    max_workers: int = UNBOUNDED  # nodes of this type the autoscaler may run; -1: no cap
    head: bool = False

    def can_exist(self) -> bool:
        return self.head or self.max_workers != 0

    def fits(self, cpus: float, gpus: float) -> Optional[bool]:
        """Whether one node of this type can hold a trial's bundle; None if its resources are unknown."""
        if self.resources is None:
            return None
        r = self.resources
        if gpus > 0 and r.get("GPU", 0) < gpus:
            return False
        return "CPU" not in r or r["CPU"] >= cpus  # CPU left out: auto-detected at launch

    def describe(self) -> str:
        res = "resources detected at launch" if self.resources is None else json.dumps(
            {k: v for k, v in self.resources.items() if k in ("CPU", "GPU") or not k.startswith(("memory", "object"))})
        cap = "head" if self.head else f"max {'unbounded' if self.max_workers < 0 else self.max_workers}"
        return f"{self.name} ({res}, {cap})"


# -- parsing ---------------------------------------------------------------------------------------

def _quantity(v) -> float:
    """A Kubernetes quantity or a number: 8, "8", "500m", "2.5"."""
    s = str(v).strip()
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def _launcher_types(cfg: dict) -> dict[str, NodeType]:
    head = cfg.get("head_node_type")
    cap = cfg.get("max_workers")
    out = {}
    for name, t in (cfg.get("available_node_types") or {}).items():
        res = t.get("resources")
        res = {k: float(v) for k, v in res.items()} if res else None
        if name == head:  # the one head node; its max_workers counts nothing
            out[name] = NodeType(name, res, 0, 0, head=True)
            continue
        mx = int(t.get("max_workers", cap if cap is not None else UNBOUNDED))
        if cap is not None:  # the cluster-wide cap bounds every type
            mx = min(mx, int(cap)) if mx >= 0 else int(cap)
        out[name] = NodeType(name, res, int(t.get("min_workers", 0)), mx)
    return out


def _group_resources(group: dict) -> Optional[dict]:
    """A KubeRay group's Ray resources: rayStartParams (num-cpus, num-gpus, resources) first, then
    the container's limits, as the KubeRay autoscaler reads them."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    res: dict = {}
    if "num-cpus" in params:
        res["CPU"] = _quantity(params["num-cpus"])
    elif "cpu" in limits:
        res["CPU"] = float(int(_quantity(limits["cpu"])))
    if "num-gpus" in params:
        res["GPU"] = _quantity(params["num-gpus"])
    else:
        for k, v in limits.items():
            if k.endswith("/gpu"):  # nvidia.com/gpu, amd.com/gpu
                res["GPU"] = _quantity(v)
    if params.get("resources"):
        raw = str(params["resources"]).strip().strip("'\"")
        try:
            res.update({k: float(v) for k, v in json.loads(raw.replace('\\"', '"')).items()})
        except ValueError:
            pass
    return res or None


def _kuberay_types(manifest: dict) -> dict[str, NodeType]:
    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    out = {}
    head = spec.get("headGroupSpec")
    if head:
        out["head"] = NodeType("head", _group_resources(head), 0, 0, head=True)
    for g in spec.get("workerGroupSpecs") or []:
        name = g.get("groupName", f"group{len(out)}")
        mn = int(g.get("minReplicas", g.get("replicas", 0)))
        mx = int(g.get("maxReplicas", g.get("replicas", mn))) * int(g.get("numOfHosts", 1))
        out[name] = NodeType(name, _group_resources(g), mn, mx)
    return out


def node_types_from_yaml(path) -> dict[str, NodeType]:
    """The node types of a Ray cluster-launcher YAML or of a KubeRay RayCluster/RayJob manifest
    (the first document that holds one, in a multi-document file)."""
    p = Path(path).expanduser()
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(CLUSTER_CONFIG_ENV, f"cannot read the cluster config {p}: {e}",
                          "point it at the cluster YAML you started the cluster with (e.g. cluster/aws.yaml)") from None
    for d in docs:
        if "available_node_types" in d:
            return _launcher_types(d)
        if str(d.get("apiVersion", "")).startswith("ray.io/") and d.get("kind") in ("RayCluster", "RayJob"):
            return _kuberay_types(d)
    raise ConfigError(CLUSTER_CONFIG_ENV, f"{p} has no node types (no available_node_types, no RayCluster/RayJob)",
                      "point it at a Ray cluster-launcher YAML or a KubeRay manifest")


def node_types_from_gcs() -> Optional[dict[str, NodeType]]:
    """The node groups the autoscaler reported to the GCS, or None (not reported, or no Ray)."""
    try:
        import ray  # inside the try, with the private module below: no Ray is also "not reported"
        import ray._private.state  # private: absent or changed in other Ray versions

        if not ray.is_initialized():
            return None
        cfg = ray._private.state.state.get_cluster_config()
    except Exception:  # private API: absent or changed in another Ray version
        return None
    if cfg is None or not cfg.node_group_configs:
        return None
    out = {}
    for g in cfg.node_group_configs:
        res = {k: float(v) for k, v in g.resources.items()}
        out[g.name] = NodeType(g.name, res or None, int(g.min_count), int(g.max_count))
    return out


def cluster_node_types(address=None) -> tuple[Optional[dict[str, NodeType]], str]:
    """(node types, where they came from); (None, "") when no source knows them."""
    path = os.environ.get(CLUSTER_CONFIG_ENV)
    if path:
        return node_types_from_yaml(path), path
    types = node_types_from_gcs()
    if types:
        return types, "the autoscaler's cluster config in the GCS"
    boot = Path(BOOTSTRAP_CONFIG).expanduser()
    if address and boot.is_file():
        return node_types_from_yaml(boot), str(boot)
    return None, ""


# Ray's simulated clusters: every node they add is a process on this machine
SINGLE_HOST_PROVIDERS = ("fake_multinode", "fake_multinode_docker")


def _provider(path: str) -> str:
    """The provider type of a cluster-launcher YAML ('' for a KubeRay manifest or an unreadable file)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).expanduser().read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return ""
    return next((str((d.get("provider") or {}).get("type", "")) for d in docs if "available_node_types" in d), "")


def multi_host(address=None) -> str:
    """After ray.init: why the cluster's nodes are, or may come to be, on more than one machine (its
    alive nodes have several addresses, or the autoscaler can add worker nodes), or '' when they are all
    on this one."""
    import ray  # ~0.5 s to import: --dry-run and --help, which also load this module, go without it

    hosts = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        return f"its nodes run on {len(hosts)} hosts"
    return "it can add worker nodes" if can_grow(address) else ""


def can_grow(address=None) -> bool:
    """After ray.init: whether the autoscaler can add worker nodes on other machines (node types with
    max_workers > 0, not of a single-host provider)."""
    types, source = cluster_node_types(address)
    grows = bool(types) and any(not t.head and t.max_workers != 0 for t in types.values())
    return grows and not (Path(source).expanduser().is_file() and _provider(source) in SINGLE_HOST_PROVIDERS)


def alive_capacity(cpus: float, gpus: float) -> int:
    """After ray.init: how many workers of `cpus` CPUs and `gpus` GPUs the alive nodes hold at once,
    node by node (a worker does not span nodes)."""
    import ray  # ~0.5 s to import: --dry-run and --help, which also load this module, go without it

    # an alive node without a CPU entry has none
    return sum(_workers_on({"CPU": 0, **n.get("Resources", {})}, cpus, gpus) for n in ray.nodes() if n.get("Alive"))


def _workers_on(resources: dict, cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs one node of `resources` holds (CPUs left out of
    a node type's config are detected at launch: not the limit here)."""
    by_cpu = int(resources["CPU"] // cpus) if cpus and "CPU" in resources else 1 << 30
    by_gpu = int(resources.get("GPU", 0) // gpus) if gpus else 1 << 30
    return min(by_cpu, by_gpu)


# -- checks ----------------------------------------------------------------------------------------

def check_node_types(res, address=None, types: Optional[dict] = None, source: str = "") -> Optional[dict]:
    """Stop a sweep whose trials no node type of the cluster can ever hold (Ray would leave them
    pending forever). `res` is the sweep's ResourcesHparams. Returns the node types when they are
    known (the request fits one of them), None when they are not (check the alive nodes instead)."""
    if types is None:
        types, source = cluster_node_types(address)
    if not types:
        return None
    live = [t for t in types.values() if t.can_exist()]
    verdicts = [t.fits(res.cpus_per_trial, res.gpus_per_trial) for t in live]
    if any(v is True for v in verdicts):
        n = res.workers_per_trial
        most = worker_capacity(live, res.cpus_per_trial, res.gpus_per_trial)
        if n > 1 and most is not None and most < n:
            where = f" (node types from {source})" if source else ""
            raise ConfigError("resources.workers_per_trial",
                              f"each chain asks for {n} workers of {res.cpus_per_trial:g} CPU + "
                              f"{res.gpus_per_trial:g} GPU but the node types the cluster can start hold at most "
                              f"{most}{where}: " + "; ".join(t.describe() for t in types.values()),
                              f"use --workers-per-trial {most} or fewer, or raise max_workers of a node type")
        return types
    if any(v is None for v in verdicts):
        return None  # some node type's resources are only known at launch: not decidable here
    kinds = "; ".join(t.describe() for t in types.values())
    where = f" (node types from {source})" if source else ""
    if res.gpus_per_trial > 0 and not any(t.fits(0, res.gpus_per_trial) for t in live):
        raise ConfigError("resources.gpus_per_trial",
                          f"each chain asks for {res.gpus_per_trial:g} GPU but no node type the cluster can "
                          f"start has that many{where}: {kinds}",
                          "lower --gpus-per-trial, or add a worker type with resources "
                          f"{{\"GPU\": {max(1, math.ceil(res.gpus_per_trial))}}} and max_workers > 0 to the "
                          "cluster config (available_node_types / workerGroupSpecs)")
    raise ConfigError("resources.cpus_per_trial",
                      f"each chain asks for {res.cpus_per_trial:g} CPUs"
                      + (f" with {res.gpus_per_trial:g} GPU" if res.gpus_per_trial else "")
                      + f" but no node type the cluster can start has that many{where}: {kinds}",
                      "lower --cpus-per-trial, or give a node type more CPUs")


def worker_capacity(types, cpus: float, gpus: float) -> Optional[int]:
    """The most data-parallel workers of `cpus` CPUs and `gpus` GPUs that the node types `types` can
    hold at once, every type at its max_workers (the head once); None when that is unbounded or unknown."""
    total = 0
    for t in types:
        fits = t.fits(cpus, gpus)
        if fits is None:
            return None
        if not fits:
            continue
        count = 1 if t.head else t.max_workers
        if count < 0:
            return None
        total += _workers_on(t.resources, cpus, gpus) * count
    return total


def check_cluster(res, address, storage: str) -> None:
    """Drop-in for `preflight.check_cluster` that knows autoscaling clusters: with known node types
    a request is judged against them (GPU nodes may not exist yet), and a cluster that can add
    worker nodes counts as multi-node for the shared-storage rule. Without node types it is exactly
    `preflight.check_cluster`."""
    import ray  # ~0.5 s to import: --dry-run and --help, which also load this module, go without it

    from .preflight import check_cluster as check_alive_nodes, is_uri  # preflight imports this module

    types = check_node_types(res, address)
    if types is None:
        return check_alive_nodes(res, address, storage)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    can_grow = any(not t.head and t.max_workers != 0 for t in types.values())
    if (len(nodes) > 1 or can_grow) and not is_uri(storage) and os.environ.get("PRUNELAB_SHARED_STORAGE") != "1":
        raise ConfigError("--storage-path", f"{storage} is local but the cluster "
                          + (f"has {len(nodes)} nodes" if len(nodes) > 1 else "can add worker nodes"),
                          "use an s3:// / gs:// URI, or a shared file system and set PRUNELAB_SHARED_STORAGE=1")


# -- token authentication --------------------------------------------------------------------------

def token_available() -> bool:
    """A Ray auth token is at hand: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return bool(Path(path).expanduser().read_text().strip())
    except OSError:
        return False


def enable_token_auth_if_available() -> bool:
    """Before `ray.init(address=...)`: turn on token authentication (RAY_AUTH_MODE=token) when the
    mode is unset and a token is available, as `ray start` does for the cluster itself. Without it,
    joining a cluster whose head started with a token fails with "Authentication token is missing
    or incorrect" (Ray 2.60 clients do not switch to token mode on their own). An explicit
    RAY_AUTH_MODE is left alone. Returns whether token mode is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if not token_available():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_config()
    return True


def _refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config when it is imported: make it read it again, as
    `ray start` does (ray._private.authentication.authentication_token_setup._enable_token_auth).
    Measured: without this, setting the variable after `import ray` has no effect."""
    try:
        from ray._raylet import Config  # inside the try: private, absent or changed in other Ray versions

        Config.initialize("")
    except Exception:  # another Ray version without this call: the variable alone must do
        pass


_AUTH_RE = re.compile(r"InvalidAuthToken|Authentication token is missing|AuthenticationError", re.I)


def auth_hint(error: BaseException) -> str:
    """A fix for a failed `ray.init(address=...)` that was an authentication failure, else ''."""
    text = f"{error!r} {getattr(error, '__cause__', '')!r}"
    if not _AUTH_RE.search(text):
        return ""
    return ("the cluster uses token authentication: export RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")
