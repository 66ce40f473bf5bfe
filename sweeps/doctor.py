"""`python -m sweeps.doctor`: check this machine before a sweep wastes compute on it.

    python -m sweeps.doctor
    python -m sweeps.doctor --address auto --tracking-uri sqlite:////abs/runs/mlflow.db \
        --data-root cifar10=/data/cifar --data-root imagenet10=/data/imagenet

Each check prints `ok`, `warn` or `FAIL` with what is wrong and how to fix it; the exit code is 1
when any check fails. torch, Ray, MLflow and what needs them are imported inside their checks: an
import that fails is a finding to report, not a crash of the doctor.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from prunelab.blobs import is_uri, open_root
from prunelab.errors import ConfigError, first_line
from prunelab.hparams import DatasetHparams


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        out = f"[{mark}] {self.name}: {self.detail}"
        return out + (f"\n         fix: {self.fix}" if self.fix and self.status != "ok" else "")


def check_imports() -> list[Check]:
    out = []
    for mod, fix in (("torch", "pip install -e . (installs torch)"),
                     ("torchvision", "pip install -e . ; do not pin torch to a version whose torchvision wheel "
                                     "fails to import on this machine"),
                     ("ray.tune", "pip install -e . (installs ray[tune,train]==2.60.0)"),
                     ("mlflow", "pip install -e . (installs mlflow>=3.17,<3.18)"),
                     ("sklearn", "pip install -e . (installs scikit-learn, which ships the digits set)")):
        try:
            m = importlib.import_module(mod)
            version = getattr(m, "__version__", "") or getattr(sys.modules[mod.split(".")[0]], "__version__", "")
            out.append(Check(f"import {mod}", "ok", version))
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            out.append(Check(f"import {mod}", "fail", f"{type(e).__name__}: {e}", fix))
    return out


def check_cuda() -> Check:
    import torch  # after the import checks, which report a torch that fails to import

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return Check("CUDA", "warn", f"no GPU visible{why}; chains run on the CPU",
                     "on a GPU machine install a CUDA build of torch and check nvidia-smi")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as e:  # noqa: BLE001
        return Check("CUDA", "fail", f"{len(names)} GPU(s) visible but a kernel failed: {e}",
                     "check the driver version against torch.version.cuda")
    return Check("CUDA", "ok", f"{len(names)} GPU(s): {', '.join(names)}; torch CUDA {torch.version.cuda}")


def check_digits() -> Check:
    try:
        from prunelab.data import load_dataset  # in the check: needs torch and scikit-learn (the finding)

        split = load_dataset(DatasetHparams(name="digits"))
        return Check("embedded data set", "ok", f"digits: {len(split.train)} train / {len(split.test)} test images")
    except Exception as e:  # noqa: BLE001
        return Check("embedded data set", "fail", f"digits cannot be loaded: {e}", "pip install scikit-learn")


def check_ray(address: Optional[str]) -> Check:
    from .preflight import resolve_ray_address  # needs torch: after the import checks

    if not address:
        return Check("Ray cluster", "ok", "no --address given: sweeps start a local Ray")
    try:
        resolved = resolve_ray_address(address)
    except ConfigError as e:
        return Check("Ray cluster", "fail", e.problem, e.fix)
    try:
        import ray  # inside the check: a broken Ray install is a finding

        ray.init(address=resolved, include_dashboard=False, log_to_driver=False)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            res = ray.cluster_resources()
        finally:
            ray.shutdown()
        return Check("Ray cluster", "ok", f"{resolved}: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, "
                                          f"{res.get('GPU', 0):g} GPUs")
    except Exception as e:  # noqa: BLE001
        first = first_line(e)
        return Check("Ray cluster", "fail", f"cannot join {resolved}: {first}",
                     "check the cluster's token (RAY_AUTH_TOKEN) and version match this machine's Ray")


def check_tracking(uri: Optional[str]) -> Check:
    from .preflight import check_tracking_uri  # needs torch: after the import checks

    if not uri:
        return Check("MLflow tracking", "ok", "no --tracking-uri given: sweeps use a SQLite file next to the results")
    if uri.startswith("sqlite:"):
        try:
            check_tracking_uri(uri)
        except ConfigError as e:
            return Check("MLflow tracking", "fail", e.problem, e.fix)
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            return Check("MLflow tracking", "fail", f"{folder} does not exist", f"mkdir -p {folder}")
        if not os.access(folder, os.W_OK):
            return Check("MLflow tracking", "fail", f"{folder} is not writable", "choose a writable directory")
    try:
        from mlflow import MlflowClient  # inside the check: a broken MLflow install is a finding

        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return Check("MLflow tracking", "ok", f"{uri} answers")
    except Exception as e:  # noqa: BLE001
        first = first_line(e)
        return Check("MLflow tracking", "fail", f"{uri}: {first}",
                     "start the server (mlflow server --backend-store-uri sqlite:////abs/mlflow.db) or fix the URI")


def check_writable(name: str, folder: str) -> Check:
    """A local folder, or a bucket: writable, and (for the result store's lease) refusing a second
    conditional create of one name, which some S3-compatible stores do not implement."""
    if is_uri(folder):
        try:
            store = open_root(folder)
            probe = f".doctor/{uuid.uuid4().hex}"
            first, second = store.create(probe, b"1"), store.create(probe, b"2")
            store.delete(probe)
        except ConfigError as e:
            return Check(name, "fail", e.problem, e.fix)
        except Exception as e:  # noqa: BLE001 - each SDK fails in its own way
            return Check(name, "fail", f"{folder}: {first_line(e)}",
                         "check the bucket's name, the credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS) and "
                         "AWS_ENDPOINT_URL for an S3-compatible store")
        if not (first and not second):
            return Check(name, "fail", f"{folder} does not honour conditional writes (If-None-Match)",
                         "use a store that does (AWS S3, GCS, recent MinIO) or a shared file system with "
                         "PRUNELAB_SHARED_STORAGE=1")
        return Check(name, "ok", f"{folder} is writable and honours conditional writes")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        return Check(name, "ok", f"{folder} is writable")
    except OSError as e:
        return Check(name, "fail", f"{folder}: {e.strerror}", "point it at a writable directory")


def check_data_root(spec: str) -> Check:
    from prunelab.data import ROOT_LAYOUTS, check_root  # needs torch: after the import checks

    if "=" not in spec:
        return Check("data root", "fail", f"{spec!r} is not NAME=PATH", "write e.g. --data-root cifar10=/data/cifar")
    name, root = spec.split("=", 1)
    try:
        hp = DatasetHparams.from_dict({"name": name, "root": root}, "dataset")
        if hp.name not in ROOT_LAYOUTS:
            return Check(f"data root {name}", "warn", f"{name} reads no root (it ships or is generated)",
                         "drop this --data-root")
        check_root(hp)
    except ConfigError as e:
        return Check(f"data root {name}", "fail", e.problem, e.fix)
    return Check(f"data root {name}", "ok", f"{root} has the expected layout")


def run_checks(address: Optional[str] = None, tracking_uri: Optional[str] = None, data_roots=(),
               storage: Optional[str] = None) -> list[Check]:
    """Every check, in order; imports first (the others need torch)."""
    checks = check_imports()
    if any(c.status == "fail" and c.name == "import torch" for c in checks):
        return checks
    from prunelab.data import cache_dir  # needs torch, checked just above

    steps: list[Callable[[], Check]] = [check_cuda, check_digits,
                                        lambda: check_writable("cache directory", cache_dir())]
    if storage:
        steps.append(lambda: check_writable("storage path", storage))
    steps += [lambda: check_ray(address), lambda: check_tracking(tracking_uri)]
    steps += [lambda s=s: check_data_root(s) for s in data_roots]
    for step in steps:
        checks.append(step())
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="Ray cluster to check (e.g. auto)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                   help="MLflow tracking URI to check (default: $MLFLOW_TRACKING_URI, as the sweeps use it)")
    p.add_argument("--storage-path", help="result directory or bucket (s3://, gs://) to check for write access")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH",
                   help="a data set root to check, e.g. cifar10=/data/cifar (repeatable)")
    args = p.parse_args(argv)
    checks = run_checks(args.address, args.tracking_uri, args.data_root, args.storage_path)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if c.status == "fail"]
    print(f"\n{len(checks)} checks: {len(failed)} failed, {sum(c.status == 'warn' for c in checks)} warnings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
