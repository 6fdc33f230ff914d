import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small tensors gain nothing from intra-op threads, and two threads on a busy 2-core machine
    run these tests ~10x slower; restore the setting for whatever runs next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
