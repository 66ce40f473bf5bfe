"""Checks that stop a sweep with one clear message before it costs compute: data on disk, storage
that every node can reach, and resource requests the cluster can satisfy (Ray would otherwise leave
such trials pending forever)."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Optional

from prunelab.data import check_root
from prunelab.errors import ConfigError, DataNotFoundError
from prunelab.hparams import ChainHparams

URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")


def is_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


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
    from prunelab.synthetic.idc import check_idc_file

    check_idc_file(pd, dataset)  # shape, classes and ipc, read from the (small) file itself


def check_storage(storage: str, address) -> None:
    if is_uri(storage):
        return
    if not Path(storage).is_absolute():
        raise ConfigError("--storage-path", f"{storage} is not absolute", "give an absolute path or an s3:// / gs:// URI")


def check_cluster(res, address, storage: str) -> None:
    """After ray.init: resource requests fit a node, and multi-node clusters get shared storage."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if res.gpus_per_trial > 0:
        best = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        if res.gpus_per_trial > best:
            raise ConfigError("resources.gpus_per_trial",
                              f"each chain asks for {res.gpus_per_trial:g} GPU but no node has that many "
                              f"(cluster total: {total.get('GPU', 0):g})",
                              "lower --gpus-per-trial, or add GPU nodes to the cluster")
    best_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    if res.cpus_per_trial > best_cpu:
        raise ConfigError("resources.cpus_per_trial",
                          f"each chain asks for {res.cpus_per_trial:g} CPUs, the largest node has {best_cpu:g}",
                          "lower --cpus-per-trial")
    if len(nodes) > 1 and not is_uri(storage) and os.environ.get("PRUNELAB_SHARED_STORAGE") != "1":
        raise ConfigError("--storage-path", f"{storage} is local but the cluster has {len(nodes)} nodes",
                          "use an s3:// / gs:// URI, or a shared file system and set PRUNELAB_SHARED_STORAGE=1")


def check_local_resources(res, num_cpus=None) -> None:
    """Before starting a local Ray: the chains' requests fit this machine (its GPUs, its CPUs or
    --num-cpus), so an impossible request stops here instead of leaving trials pending."""
    if res.gpus_per_trial > 0:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if res.gpus_per_trial > have:
            raise ConfigError("resources.gpus_per_trial",
                              f"each chain asks for {res.gpus_per_trial:g} GPU but this machine has {have}",
                              "lower --gpus-per-trial (0 runs on the CPU), or join a GPU cluster with --address")
    cpus = num_cpus if num_cpus else (os.cpu_count() or 1)
    if res.cpus_per_trial > cpus:
        raise ConfigError("resources.cpus_per_trial",
                          f"each chain asks for {res.cpus_per_trial:g} CPUs but the local Ray has {cpus}",
                          "lower --cpus-per-trial" + (" or raise --num-cpus" if num_cpus else ""))
