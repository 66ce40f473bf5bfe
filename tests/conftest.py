import os
import sys

import pytest
import torch

# tests/ itself is importable (sweeptools), also from tests/reliability/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# tests run on 2 cores next to other processes; one thread keeps timings stable and results exact
torch.set_num_threads(1)
os.environ.setdefault("PRUNELAB_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "prunelab"))


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
