"""Shared test settings: one torch intra-op thread for the whole suite (tiny models gain nothing from more, and
on a 2-core machine spinning threads slow each other down), and the tiny digits-det fixture."""
import pytest
import torch

pytest_plugins = ["fixtures_data", "fixtures_onnx"]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
