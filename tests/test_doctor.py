"""`python -m sweeps.doctor` names what is wrong and how to fix it, and fails for it."""

import sqlite3

from sweeps import doctor


def by_name(checks):
    return {c.name: c for c in checks}


def test_healthy_machine_passes(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).close()
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    rc = doctor.main(["--tracking-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "runs"),
                      "--data-root", f"cifar10={tmp_path / 'cifar'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("import torch", "import ray.tune", "import mlflow", "embedded data set", "MLflow tracking",
                 "data root cifar10", "storage path"):
        assert f"[ok  ] {name}" in out


def test_problems_are_named_with_a_fix(tmp_path):
    checks = by_name(doctor.run_checks(tracking_uri="sqlite:///relative.db",
                                       data_roots=[f"cifar100={tmp_path}", "imagenet10=relative/dir", "nonsense"]))
    assert checks["MLflow tracking"].status == "fail" and "four slashes" in checks["MLflow tracking"].fix
    c = checks["data root cifar100"]
    assert c.status == "fail" and "cifar-100-python" in c.detail
    assert checks["data root imagenet10"].status == "fail" and "absolute" in checks["data root imagenet10"].fix
    assert checks["data root"].status == "fail" and "NAME=PATH" in checks["data root"].detail


def test_unreachable_cluster_fails_clearly():
    c = doctor.check_ray("127.0.0.1:1")  # answers at once, where ray.init would retry for minutes
    assert c.status == "fail" and "ray start --head" in c.fix and ":1 " in c.detail
    assert doctor.main(["--tracking-uri", "sqlite:///x.db"]) == 1


def test_sweep_with_no_cluster_at_address_stops_at_once(tmp_path, capsys):
    import ray

    from sweeps.driver import main

    rc = main("fig6", ["--address", "127.0.0.1:1", "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "--address" in err and "ray start --head" in err
    assert not ray.is_initialized() and not (tmp_path / "runs" / "mlflow.db").exists()
