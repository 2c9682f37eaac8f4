"""Shared test helpers: fixture files, skip helpers, poisoned outputs, tolerances."""
import os
import pathlib

import pytest
import torch

DATA = pathlib.Path(__file__).parent / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("AUDIOMAE_RUN_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: use --runslow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def load_fixture(name):
    return torch.load(DATA / f"{name}.pt", weights_only=True)


@pytest.fixture
def fixture_data():
    return load_fixture


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A freshly initialised tiny pretraining checkpoint (this package's format)."""
    import torch
    from audiomae.checkpoint import save_model
    from audiomae.config import AudioMAEConfig
    from audiomae.model import AudioMAE

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(AudioMAE(AudioMAEConfig.preset("tiny")), path)
    return str(path)
