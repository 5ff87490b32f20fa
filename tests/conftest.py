"""Shared test setup: repo root on sys.path, GPU tests skipped *with the reason printed* where no CUDA exists."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

# Tests train tiny models in-process; one thread is several times faster than two for those (and does not fight
# the simulator workers the sim tests start).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = "gpu test: no CUDA device on this machine (run `make test` on a GPU node to include it)"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
