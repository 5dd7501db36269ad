import os

import pytest
import torch

torch.set_num_threads(2)
# No test may reach for a hub: offline mode fails fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Every test shares one fresh token cache, never the user's ~/.cache/dlm."""
    os.environ["DLM_CACHE"] = str(tmp_path_factory.mktemp("dlm-cache"))
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than two, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
