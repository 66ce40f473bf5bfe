"""The package as a user installs it from a wheel, away from the checkout: the sweeps' YAML configs
travel with it, so a sweep can be planned from an installed prunelab."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_wheel_plans_a_sweep(tmp_path):
    # built from a copy of the tracked files: the build writes nothing into the checkout
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = wheels.glob("prunelab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sweeps/configs/fig6.yaml" in names and "sweeps/configs/hessian.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    # the dependencies come from this environment; prunelab itself only from the installed wheel
    env = dict(os.environ, PYTHONPATH=str(site), PRUNELAB_CACHE=str(tmp_path / "cache"))
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", "import sweeps, prunelab; print(sweeps.__file__, prunelab.__file__)"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count(str(site)) == 2, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "sweeps.fig6", "--dry-run", "--storage-path", str(run / "runs")],
                       cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "9 trials" in r.stdout and "total:" in r.stdout
