import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# tests/ itself is importable (sweeptools), also from tests/reliability/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# tests run on 2 cores next to other processes; one thread keeps timings stable and results exact
torch.set_num_threads(1)
# prunelab's cache (synthetic sets, fingerprints) in a temporary folder: tests never write into the checkout
os.environ.setdefault("PRUNELAB_CACHE", tempfile.mkdtemp(prefix="prunelab-test-cache-"))

CHECKOUT = Path(__file__).resolve().parents[1]
# what any Python run leaves, and pytest's own cache: not the tests' doing
_OWN = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.venv|[^/]*\.egg-info)(/|$)")


def _checkout_files() -> set[str] | None:
    """Untracked and ignored files of the checkout, or None when it is not a git checkout."""
    r = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=CHECKOUT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return {line[3:] for line in r.stdout.splitlines() if line[:2] in ("??", "!!") and not _OWN.search(line[3:])}


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if it left files in the checkout (MLflow's ./mlruns, a store, a figure)."""
    before = getattr(session.config, "_checkout_before", None)
    after = _checkout_files()
    if before is None or after is None or getattr(session.config.option, "collectonly", False):
        return
    new = sorted(after - before)
    if new:
        print(f"\nthe tests wrote into the checkout {CHECKOUT}: " + ", ".join(new[:20]), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def digits():
    from prunelab.data import load_dataset
    from prunelab.hparams import DatasetHparams

    return load_dataset(DatasetHparams(name="digits"))


@pytest.fixture
def tiny_chain_hp():
    """A chain small enough to run a round in well under a second on CPU."""
    from prunelab.hparams import ChainHparams

    return ChainHparams.from_dict({
        "model": {"name": "convnet3", "width": 8},
        "pruning": {"rounds": 3},
        "pruning_training": {"epochs": 2, "lr": 0.05},
        "training": {"epochs": 2, "lr": 0.05},
    })
