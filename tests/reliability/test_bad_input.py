"""Bad input is refused before any compute, with one message that names the field and the fix.

Each case runs the real sweep driver (`sweeps/fig6.py`'s `main`) on a broken config or command line
and checks: exit code 2, stderr `error: <field>: <problem> — fix: <how>`, no Ray started, nothing
written (a tracking server that does not answer is found after the storage folder exists: it
stays empty).
"""

from __future__ import annotations

import pytest
import torch

from sweeptools import BASE, FIGURE, cache_dir, drive, free_port, no_ray, ray_session, runs, sweep_doc, write_config  # noqa: F401

pytestmark = pytest.mark.slow


CONFIG_ERRORS = {
    "unknown sweep key": (dict(resources={"cpus_per_trial": 1, "gpu": 1}), [], "resources.gpu"),
    "unknown chain key": (dict(base={**BASE, "training": {"epochs": 1, "lrr": 0.1}}), [], "training.lrr"),
    "bad type": (dict(base={**BASE, "pruning": {"rounds": "four"}}), [], "pruning.rounds"),
    "sparsity out of range": (dict(evaluation={"sparsities": [1.5]}), [], "evaluation.sparsities[0]"),
    "sparsity beyond the chain": (dict(evaluation={"sparsities": [0.87]}), [], "evaluation"),
    "gpus beyond the machine": (dict(resources={"cpus_per_trial": 1, "gpus_per_trial": 1}), [],
                                "resources.gpus_per_trial"),
    "more than one GPU per trial": (dict(resources={"cpus_per_trial": 1, "gpus_per_trial": 2}), [],
                                    "resources.gpus_per_trial: 2 GPUs per trial, but a chain's worker trains on one device"),
    "gpus not a fraction of one": (dict(resources={"gpus_per_trial": 0.3}), [], "resources.gpus_per_trial"),
    "cpus beyond --num-cpus": (dict(resources={"cpus_per_trial": 3}), ["--num-cpus", "2"],
                               "resources.cpus_per_trial"),
    "relative storage path": ({}, ["--storage-path", "relative/runs"], "--storage-path"),
    "relative sqlite uri": ({}, ["--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri"),
    "bad --set": ({}, ["--set", "training.epochs"], "--set"),
    "missing data root": ({}, ["--set", "dataset=cifar10", "root=/nonexistent/cifar"], "dataset.root"),
    "unknown model": ({}, ["--set", "model=vgg16"], "model.name"),
    "unknown synthetic method": ({}, ["--set", "pruning_data.method=dc"], "pruning_data.method"),
    "missing IDC file": ({}, ["--set", "pruning_data.kind=idc_file", "pruning_data.path=/nonexistent/data.pt"],
                         "pruning_data.path"),
    # {tmp} is the test's temporary directory; the IDC files are written there by `idc_files`
    "IDC file of another image shape": ({}, ["--set", "pruning_data.kind=idc_file",
                                             "pruning_data.path={tmp}/rgb32/data.pt"], "pruning_data.path"),
    "IDC file with other classes": ({}, ["--set", "pruning_data.kind=idc_file",
                                         "pruning_data.path={tmp}/classes20/data.pt"], "pruning_data.path"),
    "IDC file that is no torch file": ({}, ["--set", "pruning_data.kind=idc_file",
                                            "pruning_data.path={tmp}/text/data.pt"], "pruning_data.path"),
    "IDC file of another ipc": ({}, ["--set", "pruning_data.kind=idc_file", "pruning_data.ipc=5",
                                     "pruning_data.path={tmp}/ipc2/data.pt"], "pruning_data.ipc"),
    "pruning fraction out of range": (dict(base={**BASE, "pruning": {"rounds": 4, "fraction": 1.5}}), [],
                                      "pruning.fraction"),
    "ipc out of range": ({}, ["--set", "pruning_data.ipc=0"], "pruning_data.ipc"),
    "unknown data set": ({}, ["--set", "dataset=mnist"], "dataset.name"),
    "unknown preset": ({}, ["--preset", "huge"], "--preset"),
    "retries set per variant": (dict(variants={"imp": {"resources": {"max_failures": 3}}}), [],
                                "variants.imp.resources.max_failures"),
    "variant's GPU share not a fraction of one": (dict(variants={"imp": {"resources": {"gpus_per_trial": 0.3}}}),
                                                  [], "variants.imp.resources.gpus_per_trial"),
    "malformed YAML": ("malformed", [], "{tmp}/sweep.yaml: malformed YAML"),
    "unknown top-level YAML key": ("unknown top", [], "sweep.yaml: figures"),
    "storage URI the result store cannot open": ({}, ["--storage-path", "hdfs://namenode/prunelab"], "--storage-path"),
    "--address auto with no cluster": ({}, ["--address", "auto"], "--address"),
    "tracking server that does not answer": ({}, ["--tracking-uri", "http://127.0.0.1:{port}"], "--tracking-uri"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_stops_before_ray(case, tmp_path, capsys, no_ray, monkeypatch):
    changes, args, field = CONFIG_ERRORS[case]
    if case == "gpus beyond the machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: one per trial fits it")
    idc_files(tmp_path)
    fill = {"tmp": tmp_path, "port": free_port()}
    if changes == "malformed":
        config = str(tmp_path / "sweep.yaml")
        (tmp_path / "sweep.yaml").write_text("figure: fig6\npresets:\n  demo:\n    base: {model: [convnet3\n")
    elif changes == "unknown top":
        config = write_config(tmp_path, {**sweep_doc(), "figures": 1})
    else:
        config = write_config(tmp_path, sweep_doc(**changes))
    storage = tmp_path / "storage"
    monkeypatch.delenv("PRUNELAB_STORE", raising=False)
    argv = ["--config", config, "--storage-path", str(storage)] + [a.format(**fill) for a in args]
    from sweeps.driver import main

    rc = main(FIGURE, argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith(f"error: {field.format(**fill)}"), err
    assert "fix:" in err
    assert len(err.strip().splitlines()) == 1, f"more than one message: {err}"
    assert not no_ray.is_initialized()
    left = sorted(p.name for p in storage.rglob("*")) if storage.exists() else []
    assert left == [], f"a config error left files behind: {left}"


def idc_files(tmp) -> None:
    """IDC-format files that do not fit digits (1x8x8, 10 classes), and one that is not a torch file."""
    def save(name, x, y):
        (tmp / name).mkdir(exist_ok=True)
        torch.save([x, y], tmp / name / "data.pt")

    save("rgb32", torch.rand(10, 3, 32, 32), torch.arange(10))
    save("classes20", torch.rand(20, 1, 8, 8), torch.arange(20))
    save("ipc2", torch.rand(20, 1, 8, 8), torch.arange(10).repeat_interleave(2))
    (tmp / "text").mkdir(exist_ok=True)
    (tmp / "text" / "data.pt").write_text("not a tensor file")


def test_gpus_beyond_cluster_after_ray(tmp_path, capsys, ray_session):
    """With Ray already up (0 GPUs), the request is checked against the cluster before any run exists."""
    ray_session()
    config = write_config(tmp_path, sweep_doc())
    storage = tmp_path / "storage"
    rc, out, err = drive(capsys, config, storage, "--gpus-per-trial", "1")
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert errors and errors[0].startswith("error: resources.gpus_per_trial: each chain asks for 1 GPU but no node "
                                           "has that many"), err
    assert runs(storage) == [], "the sweep left an MLflow run behind"
