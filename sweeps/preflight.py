"""Checks that stop a sweep with one clear message before it costs compute: data on disk, storage and
a tracking store that every node can reach, a Ray cluster that answers, and resource requests the
machine or cluster can satisfy (Ray would otherwise leave such trials pending forever)."""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path
from typing import Callable, Optional

import torch

from prunelab.blobs import is_uri, join, open_root
from prunelab.data import check_root
from prunelab.files import cache_dir
from prunelab.errors import ConfigError, DataNotFoundError, first_line
from prunelab.hparams import ChainHparams
from prunelab.parallel import check_chain_workers
from prunelab.synthetic.idc import check_idc_file

from . import autoscaler
from .config import Trial, resource_kinds

STORE_ENV = "PRUNELAB_STORE"  # a shared file system for the result store instead of <storage>/store
LOCAL_ENV = "PRUNELAB_LOCAL"  # the driver's own files when the storage path is a bucket


# -- before Ray: config, data, storage, tracking store -----------------------------------------------

def check_data(hp: ChainHparams, problems: Optional[list] = None) -> None:
    """The data a chain reads exists (without loading it). The first problem raises; with a
    `problems` list, each failing check appends its error there instead and the rest still run."""
    for check, *args in ((check_root, hp.dataset), (_check_idc_file, hp.pruning_data, hp.dataset)):
        try:
            check(*args)
        except ConfigError as e:
            if problems is None:
                raise
            problems.append(e)
    if hp.start_from is not None:
        check_data(hp.start_chain(), problems)


def _check_idc_file(pd, dataset) -> None:
    """An IDC file the chain prunes with (pruning_data.kind idc_file) is there and fits `dataset`."""
    if pd.kind != "idc_file":
        return
    roots = sorted({f[1] for f in string.Formatter().parse(pd.path) if f[1]})
    if roots:  # a root the preset names (sweeps.config fills those given under `paths`)
        layout = pd.path.replace("{" + roots[0] + "}", f"<{roots[0]}>")
        raise DataNotFoundError(f"paths.{roots[0]}", f"the folder of IDC's distilled data is not given "
                                f"(the chain reads {layout}/data.pt)",
                                f"--set paths.{roots[0]}=/abs/folder holding IDC's release in that layout")
    p = Path(pd.path).expanduser()
    if not p.is_absolute():
        raise ConfigError("pruning_data.path", f"{pd.path} is relative", f"use an absolute path, e.g. {p.resolve()}")
    if not (p.is_file() or (p / "data.pt").is_file()):
        raise DataNotFoundError("pruning_data.path", f"no IDC data.pt at {p}",
                                "point it at IDC's data.pt or the folder holding it")
    check_idc_file(pd, dataset)  # shape, classes and ipc, read from the (small) file itself


def storage_path(path: str) -> str:
    """--storage-path as every node reads it: a URI, or an absolute path."""
    if is_uri(path):
        return path
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise ConfigError("--storage-path", f"{path} is relative; trials run in their own directories and "
                          "other nodes cannot resolve it", f"use an absolute path, e.g. {p.resolve()}")
    return str(p.resolve())


def check_storage(storage: str, address) -> None:
    """The storage path is absolute, or a bucket URI whose result store prunelab can open (its fsspec
    package installed); checked before anything runs."""
    if is_uri(storage):
        open_root(store_root(storage, Path("/")))  # ConfigError naming the scheme or the package to install
        return
    if not Path(storage).is_absolute():
        raise ConfigError("--storage-path", f"{storage} is not absolute", "give an absolute path or an s3:// / gs:// URI")


def local_storage(storage: str) -> Path:
    """The driver's own files (the default SQLite tracking store, figures, the per-node cache): the
    storage path itself, or for a bucket URI $PRUNELAB_LOCAL, else `<cache>/runs`."""
    if not is_uri(storage):
        return Path(storage)
    return Path(os.environ.get(LOCAL_ENV) or cache_dir() / "runs").expanduser().resolve()


def store_root(storage: str, local: Path) -> str:
    """The result store every trial reads and writes: `<storage>/store` (in the bucket for a URI, so
    a bucket alone runs a multi-node sweep), or $PRUNELAB_STORE where set."""
    shared = os.environ.get(STORE_ENV)
    if shared:
        return shared if is_uri(shared) else str(Path(shared).expanduser().resolve())
    return join(storage, "store") if is_uri(storage) else str(local / "store")


def synthetic_root(storage: str) -> Optional[str]:
    """Where the trials keep synthetic sets: beside the store in a bucket; None for a local storage
    path (each machine's cache, as for a chain run outside a sweep)."""
    return join(storage, "synthetic") if is_uri(storage) else None


def check_tracking_uri(uri: str) -> None:
    """A SQLite tracking URI names its file by an absolute path (trials run in other directories)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError("--tracking-uri", f"{uri} is a relative SQLite path; trials run in their own "
                          "directories", "use an absolute path: sqlite:////abs/path/mlflow.db (four slashes)")


# -- resources and the Ray cluster -------------------------------------------------------------------

def check_each_kind(trials: list[Trial], check: Callable) -> None:
    """`check(resources)` for each distinct request; an error names the variants asking for it when
    variants differ (their own `resources` are what to change)."""
    kinds = resource_kinds(trials)
    for kind in kinds:
        try:
            check(kind)
        except ConfigError as e:
            if len(kinds) == 1:
                raise
            names = sorted({t.variant for t in trials if t.resources == kind})
            raise ConfigError(e.field, f"{e.problem} (variants {', '.join(names)})",
                              f"{e.fix}, or change variants.<name>.resources") from None


def check_one_device(res) -> None:
    """A chain's worker trains on one device: a trial holding more GPUs per worker would leave all
    but one idle."""
    if res.gpus_per_trial > 1:
        n = int(res.gpus_per_trial)
        raise ConfigError("resources.gpus_per_trial",
                          f"{res.gpus_per_trial:g} GPUs per trial, but a chain's worker trains on one device (the "
                          "others would stay idle)", f"use workers_per_trial: {n} with gpus_per_trial: 1 to train "
                          f"each chain data-parallel on {n} GPUs, or 1, or a fraction to pack chains on a GPU "
                          "(0.25: four per GPU)")


def check_workers(trials: list[Trial]) -> None:
    """Data-parallel chains (`resources.workers_per_trial` > 1) can use their workers
    (`prunelab.parallel.check_chain_workers`)."""
    for t in trials:
        if t.resources.workers_per_trial > 1:
            try:
                check_chain_workers(t.chain, t.resources.workers_per_trial,
                                    f"variants.{t.variant}.resources.workers_per_trial")
            except ConfigError as e:
                raise ConfigError(e.field, f"{e.problem} ({t.label()})", e.fix) from None


def check_local_resources(res, num_cpus=None) -> None:
    """Before starting a local Ray: the chains' requests fit this machine (its GPUs, its CPUs or
    --num-cpus), so an impossible request stops here instead of leaving trials pending."""
    n = res.workers_per_trial
    workers = f" ({n} workers of {res.gpus_per_trial:g} GPU and {res.cpus_per_trial:g} CPU)" if n > 1 else ""
    if res.gpus_per_trial > 0:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if res.gpus_per_trial * n > have:
            raise ConfigError("resources.workers_per_trial" if n > 1 and res.gpus_per_trial <= have
                              else "resources.gpus_per_trial",
                              f"each chain asks for {res.gpus_per_trial * n:g} GPU{workers} but this machine has "
                              f"{have}",
                              "lower --gpus-per-trial (0 runs on the CPU) or --workers-per-trial, or join a GPU "
                              "cluster with --address")
    cpus = num_cpus if num_cpus else (os.cpu_count() or 1)
    if res.cpus_per_trial * n > cpus:
        raise ConfigError("resources.cpus_per_trial",
                          f"each chain asks for {res.cpus_per_trial * n:g} CPUs{workers} but the local Ray has {cpus}",
                          "lower --cpus-per-trial or --workers-per-trial"
                          + (" or raise --num-cpus" if num_cpus else ""))


def resolve_ray_address(address: str, timeout: float = 3.0) -> str:
    """`address` ('auto' or host:port) as the host:port of a Ray cluster that accepts connections.

    Raises ConfigError('--address', ...) at once when none is running there; `ray.init` itself would
    retry for minutes before giving up."""
    fix = "start one with `ray start --head`, or drop --address to start a local Ray"
    try:
        # Ray's private module, imported here so that a Ray without it fails this check only
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError/ValueError here
        raise ConfigError("--address", f"no Ray cluster found for {address!r} ({first_line(e)})", fix) from None
    if resolved is None:
        raise ConfigError("--address", f"no Ray cluster found for {address!r}", fix)
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConfigError("--address", f"no Ray cluster answers at {resolved} ({e})", fix) from None
    return resolved


def check_before_ray(trials: list[Trial], address: Optional[str], num_cpus=None) -> Optional[str]:
    """Before Ray starts (a caller's own Ray session is taken as it is): the chains fit the local Ray
    the driver would start, or a cluster answers at `address`. Returns `address`, resolved to the
    cluster's host:port."""
    import ray  # ~0.5 s to import: --dry-run and --help, which also load this module, go without it

    check_each_kind(trials, check_one_device)
    if ray.is_initialized():
        return address
    if not address:
        check_each_kind(trials, lambda kind: check_local_resources(kind, num_cpus))
        return address
    # no cluster there: say so at once (ray.init retries for minutes), before anything is written
    return resolve_ray_address(address)


def check_cluster(res, address, storage: str) -> None:
    """After ray.init: resource requests fit a node, and multi-node clusters get shared storage."""
    import ray  # ~0.5 s to import: --dry-run and --help, which also load this module, go without it

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if res.gpus_per_trial > 0:
        best = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        if res.gpus_per_trial > best:
            raise ConfigError("resources.gpus_per_trial",
                              f"each chain asks for {res.gpus_per_trial:g} GPU but no node has that many "
                              f"(cluster total: {total.get('GPU', 0):g})",
                              "lower --gpus-per-trial, or add GPU nodes to the cluster")
    held = autoscaler.alive_capacity(res.cpus_per_trial, res.gpus_per_trial)
    if res.workers_per_trial > 1 and res.workers_per_trial > held:
        raise ConfigError("resources.workers_per_trial",
                          f"each chain asks for {res.workers_per_trial} workers of {res.cpus_per_trial:g} CPU + "
                          f"{res.gpus_per_trial:g} GPU but the cluster's nodes hold {held} at once",
                          "lower --workers-per-trial or --cpus-per-trial, or add nodes to the cluster")
    best_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    if res.cpus_per_trial > best_cpu:
        raise ConfigError("resources.cpus_per_trial",
                          f"each chain asks for {res.cpus_per_trial:g} CPUs, the largest node has {best_cpu:g}",
                          "lower --cpus-per-trial")
    if len(nodes) > 1 and not is_uri(storage) and os.environ.get("PRUNELAB_SHARED_STORAGE") != "1":
        raise ConfigError("--storage-path", f"{storage} is local but the cluster has {len(nodes)} nodes",
                          "use an s3:// / gs:// URI, or a shared file system and set PRUNELAB_SHARED_STORAGE=1")


def check_tracking_reach(tracking_uri: str, address) -> None:
    """After ray.init: a SQLite tracking store is a file on one machine, which trials on other machines
    cannot reach (and SQLite on a network file system loses writes of concurrent writers): a cluster
    that spans, or can come to span, several machines needs a tracking server."""
    if not tracking_uri.startswith("sqlite:"):
        return
    why = autoscaler.multi_host(address)
    if why:
        raise ConfigError("--tracking-uri", f"{tracking_uri} is a SQLite file on this machine, but the cluster {why}",
                          "start `mlflow server` on the head (the recipes in cluster/ do) and pass "
                          "--tracking-uri http://<head>:5000, or set MLFLOW_TRACKING_URI")


def check_cluster_resources(trials: list[Trial], address, storage: str) -> None:
    """After ray.init: each resource request the trials make fits the cluster, judged by the node
    types it can start when they are known (`autoscaler.check_cluster`), else by its alive nodes."""
    check_each_kind(trials, lambda kind: autoscaler.check_cluster(kind, address, storage))
